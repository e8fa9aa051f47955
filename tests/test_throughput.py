"""Throughput behaviour (issue #9), checked by what crosses the wire, never by time.

* Small blobs stream into their single ``PUT``: the body reaches the transport piece by piece while the source
  is still producing, and a digest mismatch leaves nothing committed.
* One retry layer: a registry that answers 503 a given number of times gets exactly the expected number of
  requests (a lying forwarder in front of a real registry; a real one cannot be made to fail on cue).
* The counts of requests per blob that the benchmark reports: no HEAD before a mount that answers it.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote

import httpx
import pytest

from producer.progress import LiveProgress
from tests.conftest import RegistryFactory
from tests.harness.images import build_image, build_multiarch, make_layer, push_image, push_index
from tests.harness.servers import RegistryServer
from worker.engine.copy import CopyJob, build_plan
from worker.engine.executor import EmbeddedExecutor, ImageOutcome, NoEvents, Report
from worker.engine.pipeline import sync_streaming
from worker.engine.plan import BlobStep, CopyOptions, ImagePlan, ManifestStep, Plan
from worker.engine.steps import BlobResult, EngineContext, HostSlots, MemoryBlobLocations
from worker.engine.sync import SyncItem, SyncRequest, check, discover
from worker.engine.transports import ImageName, SideConfig
from worker.registry import (
    ClientOptions,
    Descriptor,
    Digest,
    DigestMismatch,
    RegistryClient,
    RetryPolicy,
    ServerError,
)

BLOB_TYPE = "application/octet-stream"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


# --------------------------------------------------------------------------------------------------------------------
# small blobs stream


class Recorder(httpx.BaseTransport):
    """Answers like a registry's upload endpoints; records each PUT body piece and how far the source had got."""

    def __init__(self, produced: list[int]) -> None:
        self.produced = produced
        self.pieces: list[tuple[int, int]] = []  # (piece length, chunks produced by the source so far)
        self.methods: list[str] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.methods.append(request.method)
        if request.method == "GET":
            return httpx.Response(200, json={})
        if request.method == "POST":
            return httpx.Response(202, headers={"Location": "/v2/a/b/blobs/uploads/u1"})
        if request.method == "PUT":
            assert isinstance(request.stream, httpx.SyncByteStream)
            for piece in request.stream:
                self.pieces.append((len(piece), self.produced[0]))
            return httpx.Response(201)
        return httpx.Response(204)


def source(data: bytes, size: int, produced: list[int]) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        produced[0] += 1
        yield data[i : i + size]


def test_small_blob_streams_into_its_put() -> None:
    data = os.urandom(1_000_000)
    produced = [0]
    rec = Recorder(produced)
    client = RegistryClient("reg.test", options=ClientOptions(transport=rec, retry=RetryPolicy(times=0)))
    desc = Descriptor(BLOB_TYPE, Digest.of(data), len(data))
    client.upload_blob("a/b", desc, source(data, 10_000, produced))
    assert rec.methods == ["GET", "POST", "PUT"]
    # the body arrived in the source's pieces, never gathered into one buffer ...
    assert sum(n for n, _ in rec.pieces) == len(data)
    assert max(n for n, _ in rec.pieces) == 10_000
    # ... while the source was still producing (the stream holds back one piece, to verify before the last)
    assert rec.pieces[0][1] == 2
    assert rec.pieces[-1][1] == 100


def test_small_blob_digest_mismatch_commits_nothing(registry: RegistryServer, unique_repo: str) -> None:
    data = os.urandom(300_000)
    claimed = Descriptor(BLOB_TYPE, Digest.of(b"other bytes"), len(data))
    client = RegistryClient(registry.host, options=ClientOptions(tls_verify=False, retry=RetryPolicy(times=0)))
    client.ping()
    mark = registry.log_mark()
    with pytest.raises(DigestMismatch):
        client.upload_blob(unique_repo, claimed, (data[i : i + 16_384] for i in range(0, len(data), 16_384)))
    log = registry.access_log(mark)
    # the PUT went out streaming but was cut short: the registry committed nothing
    assert not [e for e in log if e.method == "PUT" and e.status in (201, 204)]
    assert not client.blob_exists(unique_repo, claimed.digest)
    assert not client.blob_exists(unique_repo, Digest.of(data))


# --------------------------------------------------------------------------------------------------------------------
# one retry layer


class Lying(httpx.BaseTransport):
    """Forwards to a real registry, except that it answers 503 to requests matching a rule, a given number of times.

    ``rules``: (method, regex on the path and query, times; -1 forever). Every request is counted by (method, path)
    and by (method, path and query).
    """

    def __init__(self, rules: list[tuple[str, str, int]]) -> None:
        self.inner = httpx.HTTPTransport()
        self.rules = [(m, re.compile(p)) for m, p, _n in rules]
        self.left = [n for _m, _p, n in rules]
        self.lock = threading.Lock()
        self.seen: Counter[tuple[str, str]] = Counter()
        #: cross-repository mounts (POST ...?mount=&from=ANOTHER) per path; a mount from the repository into
        #: itself is an existence check, not counted here
        self.mounts: Counter[str] = Counter()
        self.seen_full: Counter[tuple[str, str]] = Counter()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        target = unquote(request.url.raw_path.decode())
        with self.lock:
            self.seen[(request.method, path)] += 1
            self.seen_full[(request.method, target)] += 1
            params = request.url.params
            if request.method == "POST" and params.get("mount") and f"/v2/{params.get('from')}/blobs/" not in path:
                self.mounts[path] += 1
            for i, (method, rx) in enumerate(self.rules):
                if request.method == method and rx.search(target) and self.left[i] != 0:
                    self.left[i] -= 1
                    return httpx.Response(503, json={"errors": [{"code": "UNAVAILABLE", "message": "lying"}]})
        return self.inner.handle_request(request)

    def count(self, method: str, pattern: str) -> int:
        with self.lock:
            return sum(n for (m, p), n in self.seen.items() if m == method and re.search(pattern, p))

    def count_full(self, method: str, pattern: str) -> int:
        """Like ``count``, the pattern searched in the path and query."""
        with self.lock:
            return sum(n for (m, p), n in self.seen_full.items() if m == method and re.search(pattern, p))


def copy_through(registry: RegistryServer, registry2: RegistryServer, repo: str, lying: Lying, times: int) -> Report:
    image = build_image(f"retry-{repo}", layers=[3000, 5000], fmt="oci")
    push_image(registry.url, repo, "v1", image)
    retry = RetryPolicy(times=times, delay=0.0)
    ctx = EngineContext(
        source_side=SideConfig(tls_verify=False, retry=retry),
        dest_side=SideConfig(tls_verify=False, retry=retry, transport=lying),
        locations=MemoryBlobLocations(),
    )
    job = CopyJob(
        ImageName.parse(f"docker://{registry.host}/{repo}:v1"), ImageName.parse(f"docker://{registry2.host}/{repo}:v1")
    )
    try:
        plan, _ = build_plan(ctx, [job], CopyOptions())
        return EmbeddedExecutor(ctx, parallel=2).run(plan)
    finally:
        ctx.close()


def test_temporary_failures_cost_one_request_each(
    registry: RegistryServer, registry2: RegistryServer, unique_repo: str
) -> None:
    image = build_image(f"retry-{unique_repo}", layers=[3000, 5000], fmt="oci")
    lying = Lying(
        [
            # two failed existence checks (a mount from the repository itself, which also opens the upload)
            ("POST", f"/blobs/uploads/[?]mount={image.config_digest}", 2),
            ("PUT", r"/blobs/uploads/", 2),  # two failed closing PUTs (whichever blobs they hit)
            ("PUT", r"/manifests/v1$", 1),
        ]
    )
    report = copy_through(registry, registry2, unique_repo, lying, times=3)
    assert report.ok, report
    blobs = 3  # config + 2 layers
    # each failure costs exactly one more request of its kind: no request is retried at two levels
    assert lying.count_full("POST", r"/blobs/uploads/[?]mount=") == blobs + 2
    assert lying.count("HEAD", r"/blobs/sha256:") == 0
    assert lying.count("PUT", r"/blobs/uploads/") == blobs + 2
    # a failed upload restarts its session: one more POST per failed PUT, the dead session cancelled
    assert lying.count_full("POST", r"/blobs/uploads/$") == 2
    assert lying.count("DELETE", r"/blobs/uploads/") == 2
    assert lying.count("PUT", r"/manifests/") == 2


def test_retry_budget_is_not_multiplied(registry: RegistryServer, registry2: RegistryServer, unique_repo: str) -> None:
    image = build_image(f"retry-{unique_repo}", layers=[3000, 5000], fmt="oci")
    bad = image.layers[1].digest
    lying = Lying([("POST", f"[?]mount={bad}", -1)])
    report = copy_through(registry, registry2, unique_repo, lying, times=3)
    assert not report.ok
    # --retry-times 3: four attempts in all (the old nesting of two levels sent up to 16)
    assert lying.count_full("POST", f"[?]mount={bad}") == 4
    assert lying.count("HEAD", f"/blobs/{bad}$") == 0
    assert lying.count("PUT", r"/manifests/") == 0  # the tag never points at a missing blob


def test_client_requests_outside_steps_retry_alone() -> None:
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if request.url.path == "/v2/":
            return httpx.Response(200, json={})
        return httpx.Response(503, json={"errors": [{"code": "UNAVAILABLE", "message": "x"}]})

    client = RegistryClient(
        "reg.test", options=ClientOptions(transport=httpx.MockTransport(handler), retry=RetryPolicy(times=2, delay=0))
    )
    with pytest.raises(ServerError):
        client.list_tags("a/b")
    assert calls.count("/v2/a/b/tags/list") == 3
    calls.clear()
    # inside an outer retry (a step), the request is tried once per outer attempt: 3, not 3 x 3
    with pytest.raises(ServerError):
        RetryPolicy(times=2, delay=0).run(lambda: client.list_tags("a/b"))
    assert calls.count("/v2/a/b/tags/list") == 3


# --------------------------------------------------------------------------------------------------------------------
# parallel discovery, overlapping with the copies


class Held(httpx.BaseTransport):
    """Forwards to the real registries; holds back the answer to one tag listing until ``release`` is set."""

    def __init__(self, hold: str | None, release: threading.Event, mark: str | None = None) -> None:
        self.inner = httpx.HTTPTransport()
        self.hold = hold
        self.release = release
        self.mark = mark
        self.released_in_time: bool | None = None
        self.listings: list[str] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path.endswith("/tags/list"):
            self.listings.append(path)
        if self.hold is not None and path == self.hold:
            self.released_in_time = self.release.wait(60)
        response = self.inner.handle_request(request)
        if self.mark is not None and request.method == "PUT" and re.search(self.mark, path):
            self.release.set()
        return response


def in_file_order(items: list[SyncItem], repos: list[str], tags: set[str]) -> bool:
    """Repositories in the file's order, each with all its tags (in the order its tag list gave them)."""
    names = [(i.source.reference.repository, i.source.reference.tag) for i in items if i.source.reference]
    grouped = [r for n, (r, _t) in enumerate(names) if n == 0 or names[n - 1][0] != r]
    return grouped == repos and all({t for r2, t in names if r2 == r} == tags for r in repos)


def test_first_blob_moves_before_discovery_ends(
    registry: RegistryServer, registry2: RegistryServer, unique_repo: str, tmp_path: Path
) -> None:
    repos = [f"{unique_repo}/r{i}" for i in range(5)]
    expected: dict[str, dict[str, str]] = {}
    for n, repo in enumerate(repos):
        for tag in ("a", "b"):
            image = build_image(f"disc-{repo}-{tag}", layers=[800 + n], fmt="oci")
            push_image(registry.url, repo, tag, image)
            expected.setdefault(repo.rsplit("/", 1)[-1], {})[tag] = str(image.digest)
    yaml_file = tmp_path / "sync.yaml"
    yaml_file.write_text(
        f"{registry.host}:\n  tls-verify: false\n  images:\n" + "".join(f"    {r}: []\n" for r in repos)
    )
    release = threading.Event()
    # the last repository's tag list is answered only once a blob upload has completed at the destination
    source = Held(f"/v2/{repos[-1]}/tags/list", release)
    dest = Held(None, release, mark=r"/blobs/uploads/")
    ctx = EngineContext(
        source_side=SideConfig(tls_verify=False, transport=source),
        dest_side=SideConfig(tls_verify=False, transport=dest),
        locations=MemoryBlobLocations(),
    )
    req = SyncRequest("yaml", str(yaml_file), "docker", f"{registry2.host}/{unique_repo}-m", CopyOptions())
    try:
        run, report = sync_streaming(ctx, req, None, EmbeddedExecutor(ctx, parallel=4), parallel=4)
    finally:
        ctx.close()
    assert source.released_in_time is True  # a blob was copied while a tag list was still outstanding
    assert report.ok and len(report.images) == 10
    # discovery order is the file's order, whatever order the listings came back in
    assert in_file_order(run.discovery.items, repos, {"a", "b"})
    assert sorted(source.listings) == sorted(f"/v2/{r}/tags/list" for r in repos)  # each repository listed once
    with httpx.Client(base_url=registry2.url) as c:
        for short, tags in expected.items():
            for tag, digest in tags.items():
                resp = c.head(
                    f"/v2/{unique_repo}-m/{short}/manifests/{tag}",
                    headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
                )
                assert resp.headers.get("docker-content-digest") == digest


def test_discover_lists_in_parallel_and_keeps_file_order(
    registry: RegistryServer, unique_repo: str, tmp_path: Path
) -> None:
    repos = [f"{unique_repo}/p{i}" for i in range(4)]
    for repo in repos:
        for tag in ("x", "y"):
            push_image(registry.url, repo, tag, build_image(f"order-{repo}-{tag}", layers=[300], fmt="oci"))
    yaml_file = tmp_path / "sync.yaml"
    yaml_file.write_text(
        f"{registry.host}:\n  tls-verify: false\n  images:\n" + "".join(f"    {r}: []\n" for r in repos)
    )
    release = threading.Event()
    # the first repository answers last: it waits until the second one's listing has gone out
    source = Held(f"/v2/{repos[0]}/tags/list", release)
    original = source.handle_request

    def watching(request: httpx.Request) -> httpx.Response:
        if request.url.path == f"/v2/{repos[1]}/tags/list":
            release.set()
        return original(request)

    source.handle_request = watching  # type: ignore[method-assign]
    ctx = EngineContext(source_side=SideConfig(tls_verify=False, transport=source))
    req = SyncRequest("yaml", str(yaml_file), "docker", "127.0.0.1:9/m", CopyOptions())
    try:
        disc = discover(ctx, req, parallel=4)
    finally:
        ctx.close()
    assert source.released_in_time is True  # listings overlapped
    assert in_file_order(disc.items, repos, {"x", "y"})
    assert set(disc.tag_lists) == {f"{registry.host}/{r}" for r in repos}


class SlowReferrers(httpx.BaseTransport):
    """Forwards to a real registry (which has no referrers API: 404); answers referrers requests late, counted."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.referrers = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if "/referrers/" in request.url.path:
            self.referrers += 1
            time.sleep(0.5)  # meanwhile the other checks reach their own referrers lookup
        return self.inner.handle_request(request)


def test_referrers_api_is_probed_once_not_by_every_check(
    registry: RegistryServer, registry2: RegistryServer, unique_repo: str, tmp_path: Path
) -> None:
    for n in range(6):
        push_image(registry.url, unique_repo, f"v{n}", build_image(f"refs-{unique_repo}-{n}", layers=[200], fmt="oci"))
    yaml_file = tmp_path / "sync.yaml"
    yaml_file.write_text(f"{registry.host}:\n  tls-verify: false\n  images:\n    {unique_repo}: []\n")
    source = SlowReferrers()
    ctx = EngineContext(
        source_side=SideConfig(tls_verify=False, transport=source), dest_side=SideConfig(tls_verify=False)
    )
    req = SyncRequest("yaml", str(yaml_file), "docker", f"{registry2.host}/{unique_repo}-x", CopyOptions())
    try:
        disc = discover(ctx, req)
        checked = check(ctx, disc.items, req, None, parallel=6, tag_lists=disc.tag_lists)
    finally:
        ctx.close()
    assert len(checked.changed) == 6 and not checked.failed
    assert source.referrers == 1  # the first answer (404: no API) serves all six checks


def test_child_manifests_of_an_index_are_read_at_once(
    registry: RegistryServer, registry2: RegistryServer, unique_repo: str
) -> None:
    index = build_multiarch(f"children-{unique_repo}", ["linux/amd64", "linux/arm64"], layers=[300])
    push_index(registry.url, unique_repo, "v1", index)
    first, second = (str(c.digest) for c in index.children)
    met = threading.Event()
    # the first child's GET is answered only once the second's has arrived: one after the other would stall
    source = Meeting(met, wait_for=f"^GET /v2/.*/manifests/{first}$", signal=f"^GET /v2/.*/manifests/{second}$")
    ctx = EngineContext(
        source_side=SideConfig(tls_verify=False, transport=source), dest_side=SideConfig(tls_verify=False)
    )
    job = CopyJob(
        ImageName.parse(f"docker://{registry.host}/{unique_repo}:v1"),
        ImageName.parse(f"docker://{registry2.host}/{unique_repo}-c:v1"),
    )
    try:
        plan, _ = build_plan(ctx, [job], CopyOptions(multi_arch="all"))
    finally:
        ctx.close()
    assert source.in_time == [True]
    assert plan.images[0].dest_digest == str(index.digest)


class StartOrder(NoEvents):
    def __init__(self) -> None:
        self.started: list[BlobStep | ManifestStep] = []

    def step_started(self, step: BlobStep | ManifestStep) -> None:
        self.started.append(step)


def test_largest_blobs_start_first(registry: RegistryServer, registry2: RegistryServer, unique_repo: str) -> None:
    # the longest transfers must not start last (they would make the tail of the run)
    image = build_image(f"order-{unique_repo}", layers=[300, 9000, 40, 5000, 1200], fmt="oci")
    push_image(registry.url, unique_repo, "v1", image)
    ctx = EngineContext(source_side=SideConfig(tls_verify=False), dest_side=SideConfig(tls_verify=False))
    job = CopyJob(
        ImageName.parse(f"docker://{registry.host}/{unique_repo}:v1"),
        ImageName.parse(f"docker://{registry2.host}/{unique_repo}-o:v1"),
    )
    events = StartOrder()
    try:
        plan, _ = build_plan(ctx, [job], CopyOptions())
        report = EmbeddedExecutor(ctx, parallel=1, events=events).run(plan)
    finally:
        ctx.close()
    assert report.ok
    sizes = [s.size for s in events.started if isinstance(s, BlobStep)]
    assert len(sizes) == 6 and sizes == sorted(sizes, reverse=True)
    assert isinstance(events.started[-1], ManifestStep)


class Meeting(httpx.BaseTransport):
    """Forwards to a real registry. A request matching ``wait_for`` is held until ``met`` is set (at most 10 s);
    a request matching ``signal`` sets it. Records whether each held request met the other in time."""

    def __init__(self, met: threading.Event, *, wait_for: str | None = None, signal: str | None = None) -> None:
        self.inner = httpx.HTTPTransport()
        self.met = met
        self.wait_for = re.compile(wait_for) if wait_for else None
        self.signal = re.compile(signal) if signal else None
        self.in_time: list[bool] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        line = f"{request.method} {request.url.path}"
        if self.signal is not None and self.signal.search(line):
            self.met.set()
        if self.wait_for is not None and self.wait_for.search(line):
            self.in_time.append(self.met.wait(10))
        return self.inner.handle_request(request)


def test_check_sends_both_heads_at_once(
    registry: RegistryServer, registry2: RegistryServer, unique_repo: str, tmp_path: Path
) -> None:
    image = build_image(f"heads-{unique_repo}", layers=[700], fmt="oci")
    push_image(registry.url, unique_repo, "v1", image)
    yaml_file = tmp_path / "sync.yaml"
    yaml_file.write_text(f"{registry.host}:\n  tls-verify: false\n  images:\n    {unique_repo}: []\n")
    met = threading.Event()
    # the source's HEAD is answered only once the destination's HEAD has arrived: one after the other would stall
    source = Meeting(met, wait_for=r"^HEAD /v2/.*/manifests/v1$")
    dest = Meeting(met, signal=r"^HEAD /v2/.*/manifests/v1$")
    ctx = EngineContext(
        source_side=SideConfig(tls_verify=False, transport=source),
        dest_side=SideConfig(tls_verify=False, transport=dest),
        locations=MemoryBlobLocations(),
    )
    req = SyncRequest("yaml", str(yaml_file), "docker", f"{registry2.host}/{unique_repo}-h", CopyOptions())
    try:
        disc = discover(ctx, req)
        checked = check(ctx, disc.items, req, None, tag_lists=disc.tag_lists)
    finally:
        ctx.close()
    assert source.in_time == [True]
    (changed,) = checked.changed
    assert str(changed.destination).startswith(f"docker://{registry2.host}/{unique_repo}-h/")


def test_pipelined_sync_reaches_the_destination_during_discovery(
    registry: RegistryServer, registry_factory: RegistryFactory, unique_repo: str, tmp_path: Path
) -> None:
    registry2 = registry_factory()  # a host this process has not reached yet: its first request is the probe
    push_image(registry.url, unique_repo, "v1", build_image(f"reach-{unique_repo}", layers=[600], fmt="oci"))
    yaml_file = tmp_path / "sync.yaml"
    yaml_file.write_text(f"{registry.host}:\n  tls-verify: false\n  images:\n    {unique_repo}: []\n")
    met = threading.Event()
    # the tag list is answered only once the destination has been asked for /v2/: after it, that would stall
    source = Meeting(met, wait_for=r"^GET /v2/.*/tags/list$")
    dest = Meeting(met, signal=r"^GET /v2/$")
    ctx = EngineContext(
        source_side=SideConfig(tls_verify=False, transport=source),
        dest_side=SideConfig(tls_verify=False, transport=dest),
        locations=MemoryBlobLocations(),
    )
    req = SyncRequest("yaml", str(yaml_file), "docker", f"{registry2.host}/{unique_repo}-r", CopyOptions())
    try:
        _run, report = sync_streaming(ctx, req, None, EmbeddedExecutor(ctx, parallel=4), parallel=4)
    finally:
        ctx.close()
    assert source.in_time == [True]
    assert report.ok and [i.status.value for i in report.images] == ["done"]


# --------------------------------------------------------------------------------------------------------------------
# per-host caps


def test_host_slots_cap_transfers_per_host() -> None:
    slots = HostSlots(default=16, caps={"slow.example": 2})
    cancel = threading.Event()
    first, second = slots.hold(["slow.example", "a.example"], cancel), slots.hold(["slow.example"], cancel)
    first.__enter__()
    second.__enter__()
    entered = threading.Event()

    def third() -> None:
        with slots.hold(["b.example", "slow.example"], cancel):
            entered.set()

    t = threading.Thread(target=third)
    t.start()
    assert not entered.wait(0.3)  # both slots of slow.example are taken (other hosts have room)
    second.__exit__(None, None, None)
    assert entered.wait(30)
    t.join()
    first.__exit__(None, None, None)


def test_bad_host_concurrency_is_one_error_line(tmp_path: Path) -> None:
    ferry = str(Path(sys.executable).with_name("ferry"))
    proc = subprocess.run(
        [ferry, "copy", "--host-concurrency", "reg.example", "oci:/nonexistent:x", f"oci:{tmp_path}/o:x"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "FERRY_CACHE_DIR": str(tmp_path)},
    )
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == (
        "Error: --host-concurrency 'reg.example': expected HOST=N with N 1 or more"
    )


# --------------------------------------------------------------------------------------------------------------------
# the terminal display


def test_live_progress_counts_images_and_shows_transfers_in_flight() -> None:
    out = io.StringIO()
    progress = LiveProgress(out, hz=0.001)  # no timed redraw during the test: only the final one
    progress.start(Plan())
    steps = [
        BlobStep.from_message(f"b{n}", "docker://a/b:c", "docker://d/e:f", f"sha256:{n:064x}", 1000 * (n + 1), "x")
        for n in range(9)
    ]
    for n in range(3):
        progress.image_planned(ImagePlan(f"i{n}", "s", "d", "", ""), {})
    for step in steps:
        progress.step_started(step)
    progress.on_bytes(str(steps[8].digest), 4500)
    progress.step_finished(steps[0], BlobResult("mounted"), None)
    progress.image_finished(ImageOutcome("i0", "s0", "d0", "done"))
    progress.image_finished(ImageOutcome("i1", "s1", "d1", "failed", error="boom"))
    frame = progress.frame()
    progress.stop()
    cut = frame.index("\x00")
    assert frame[:cut] == ["Failed s1 -> d1: boom"]  # failures stay on screen as lines
    head, *flight = frame[cut + 1 :]
    assert head.startswith("images 2/3: 1 copied, 0 up to date, 1 failed | blobs 0 copied, 1 mounted, 0 present")
    # the largest transfers by name (most bytes first), the rest counted: never a line per blob
    assert len(flight) == LiveProgress.SHOWN + 1 and flight[-1] == "  ... and 2 more in flight"
    assert flight[0].startswith(f"  {steps[8].digest.hex[:12]} [##########") and "4.4 KiB / 8.8 KiB" in flight[0]
    # one redraw (the final one) went to the stream: events themselves draw nothing
    written = out.getvalue()
    assert written.count("images 2/3") == 1
    assert written.count("Failed s1 -> d1") == 0  # frame() above already took it: each failure is printed once


def test_no_request_for_a_blob_the_plan_already_put_in_the_repository(
    registry: RegistryServer, registry2: RegistryServer, unique_repo: str
) -> None:
    shared = make_layer(f"shared-{unique_repo}", 3000)
    for tag in ("a", "b", "c"):
        push_image(registry.url, unique_repo, tag, build_image(f"{unique_repo}-{tag}", layers=[shared, 500], fmt="oci"))
    counting = Lying([])  # no faults: it only counts
    ctx = EngineContext(
        source_side=SideConfig(tls_verify=False),
        dest_side=SideConfig(tls_verify=False, transport=counting),
        locations=MemoryBlobLocations(),
    )
    jobs = [
        CopyJob(
            ImageName.parse(f"docker://{registry.host}/{unique_repo}:{t}"),
            ImageName.parse(f"docker://{registry2.host}/{unique_repo}:{t}"),
        )
        for t in ("a", "b", "c")
    ]
    try:
        plan, _ = build_plan(ctx, jobs, CopyOptions())
        report = EmbeddedExecutor(ctx, parallel=4).run(plan)
    finally:
        ctx.close()
    # the shared layer is one step of the three images (a repository is one blob store): one check (which opens the
    # upload) and one upload; no blob gets a HEAD, nor a POST of its own to start its upload
    assert [s.digest for s in plan.blob_steps].count(shared.digest) == 1
    assert report.ok and report.blobs_transferred == 7 and report.blobs_skipped == 0
    assert counting.count_full("POST", f"[?]mount={shared.digest}") == 1
    assert counting.count("HEAD", r"/blobs/") == 0
    assert counting.count_full("POST", r"/blobs/uploads/$") == 0
    assert counting.count_full("POST", r"/blobs/uploads/[?]mount=") == 7
    assert counting.count("PUT", r"/blobs/uploads/") == 7


def test_one_mount_per_repository_for_a_layer_another_repository_brings(
    registry: RegistryServer, registry2: RegistryServer, unique_repo: str
) -> None:
    shared = make_layer(f"mount-{unique_repo}", 3000)
    pairs = [("a", "1"), ("b", "1"), ("b", "2"), ("b", "3"), ("c", "1"), ("c", "2")]
    for repo, tag in pairs:
        image = build_image(f"{unique_repo}-{repo}{tag}", layers=[shared, 400], fmt="oci")
        push_image(registry.url, f"{unique_repo}/{repo}", tag, image)
    counting = Lying([])
    ctx = EngineContext(
        source_side=SideConfig(tls_verify=False),
        dest_side=SideConfig(tls_verify=False, transport=counting),
        locations=MemoryBlobLocations(),
    )
    jobs = [
        CopyJob(
            ImageName.parse(f"docker://{registry.host}/{unique_repo}/{repo}:{tag}"),
            ImageName.parse(f"docker://{registry2.host}/{unique_repo}-m/{repo}:{tag}"),
        )
        for repo, tag in pairs
    ]
    try:
        plan, _ = build_plan(ctx, jobs, CopyOptions())
        report = EmbeddedExecutor(ctx, parallel=4).run(plan)
    finally:
        ctx.close()
    assert report.ok and report.blobs_mounted == 2
    shared_steps = [s for s in plan.blob_steps if s.digest == shared.digest]
    # one step per repository, each shared by that repository's images: a's upload, one mount into b and into c
    assert len(shared_steps) == 3 and sorted(len(plan.step_images()[s.id]) for s in shared_steps) == [1, 2, 3]
    assert counting.mounts == Counter(
        {f"/v2/{unique_repo}-m/b/blobs/uploads/": 1, f"/v2/{unique_repo}-m/c/blobs/uploads/": 1}
    )
    # a's check (a mount from a into itself, which opened a's upload); a mount needs none; nothing asks with a HEAD
    assert counting.count_full("POST", f"/{unique_repo}-m/a/blobs/uploads/[?]mount={shared.digest}") == 1
    assert counting.count("HEAD", f"/blobs/{shared.digest}$") == 0
    with httpx.Client(base_url=registry2.url) as c:
        for repo, tag in pairs:
            resp = c.head(f"/v2/{unique_repo}-m/{repo}/manifests/{tag}", headers={"Accept": OCI_MANIFEST})
            assert resp.status_code == 200


# --------------------------------------------------------------------------------------------------------------------
# connections: one small pool per thread


def test_each_thread_keeps_its_own_connections_until_it_ends(registry: RegistryServer) -> None:
    import gc

    from worker.registry._pools import ThreadPools

    client = RegistryClient(registry.host, options=ClientOptions(tls_verify=False, retry=RetryPolicy(times=0)))
    pools = client._transport.inner
    assert isinstance(pools, ThreadPools)
    client.ping()
    client.ping()
    assert pools.pools == 1  # this thread's pool, its connection reused
    seen: list[int] = []

    def in_thread() -> None:
        client.ping()
        seen.append(pools.pools)

    threads = [threading.Thread(target=in_thread) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    gc.collect()
    assert max(seen) >= 2  # a thread of its own got a pool of its own ...
    assert pools.pools == 1  # ... closed with its connections when the thread ended
    client.close()
    assert pools.pools == 0
    with pytest.raises(RuntimeError, match="closed"):
        client.ping()


# --------------------------------------------------------------------------------------------------------------------
# one request asks whether the repository has a blob and starts its upload


def test_existence_check_opens_the_upload(registry: RegistryServer, unique_repo: str) -> None:
    client = RegistryClient(registry.host, options=ClientOptions(tls_verify=False, retry=RetryPolicy(times=0)))
    data = os.urandom(5000)
    desc = Descriptor(BLOB_TYPE, Digest.of(data), len(data))
    location = client.open_upload(unique_repo, desc.digest)
    assert location is not None  # absent: the registry opened an upload session instead of mounting
    # a wrong body through that session is refused before its last byte: nothing committed
    with pytest.raises(DigestMismatch):
        client.upload_blob(unique_repo, desc, [data[:2500], os.urandom(2500)], location=location)
    assert not client.blob_exists(unique_repo, desc.digest)
    location = client.open_upload(unique_repo, desc.digest)
    assert location is not None
    client.upload_blob(unique_repo, desc, [data[:2500], data[2500:]], location=location)
    assert client.blob_size(unique_repo, desc.digest) == len(data)
    assert client.open_upload(unique_repo, desc.digest) is None  # present: answered 201, nothing opened


class Refusing(Lying):
    """Counts like ``Lying``, and refuses (405 UNSUPPORTED) a mount from a repository into itself."""

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        params = request.url.params
        if request.method == "POST" and params.get("mount") and f"/v2/{params.get('from')}/blobs/" in request.url.path:
            with self.lock:
                self.seen_full[(request.method, unquote(request.url.raw_path.decode()))] += 1
            return httpx.Response(405, json={"errors": [{"code": "UNSUPPORTED", "message": "no"}]})
        return super().handle_request(request)


def test_copy_checks_blobs_by_mount_and_falls_back_to_head(
    registry: RegistryServer, registry2: RegistryServer, unique_repo: str
) -> None:
    shared = make_layer(f"shared-{unique_repo}", 3000)
    push_image(registry.url, unique_repo, "a", build_image(f"{unique_repo}-a", layers=[shared, 700], fmt="oci"))
    push_image(registry.url, unique_repo, "b", build_image(f"{unique_repo}-b", layers=[shared, 900], fmt="oci"))

    def copy(tag: str, transport: httpx.BaseTransport) -> Report:
        ctx = EngineContext(
            source_side=SideConfig(tls_verify=False),
            dest_side=SideConfig(tls_verify=False, transport=transport),
            locations=MemoryBlobLocations(),
        )
        job = CopyJob(
            ImageName.parse(f"docker://{registry.host}/{unique_repo}:{tag}"),
            ImageName.parse(f"docker://{registry2.host}/{unique_repo}:{tag}"),
        )
        try:
            plan, _ = build_plan(ctx, [job], CopyOptions())
            return EmbeddedExecutor(ctx, parallel=2).run(plan)
        finally:
            ctx.close()

    refusing = Refusing([])
    report = copy("a", refusing)
    assert report.ok and report.blobs_transferred == 3
    # each check was refused once, then asked with a HEAD; each upload started with a POST of its own
    assert refusing.count_full("POST", r"[?]mount=") == 3
    assert refusing.count("HEAD", r"/blobs/") == 3
    assert refusing.count_full("POST", r"/blobs/uploads/$") == 3

    counting = Lying([])
    report = copy("b", counting)
    # the shared layer is there already: the check (201) answers it and nothing is uploaded for it
    assert report.ok and report.blobs_skipped == 1 and report.blobs_transferred == 2
    assert counting.count_full("POST", rf"[?]mount={shared.digest}&from=") == 1
    assert counting.count("HEAD", r"/blobs/") == 0
    assert counting.count("PUT", r"/blobs/uploads/") == 2
    assert counting.count_full("POST", r"/blobs/uploads/$") == 0
