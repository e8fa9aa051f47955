"""Throughput behaviour (issue #9), checked by what crosses the wire, never by time.

* Small blobs stream into their single ``PUT``: the body reaches the transport piece by piece while the source
  is still producing, and a digest mismatch leaves nothing committed.
* One retry layer: a registry that answers 503 a given number of times gets exactly the expected number of
  requests (a lying forwarder in front of a real registry; a real one cannot be made to fail on cue).
* The counts of requests per blob that the benchmark reports: no HEAD before a mount that answers it.
"""

from __future__ import annotations

import os
import re
import threading
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest

from tests.harness.images import build_image, push_image
from tests.harness.servers import RegistryServer
from worker.engine.copy import CopyJob, build_plan
from worker.engine.executor import EmbeddedExecutor, Report
from worker.engine.plan import CopyOptions
from worker.engine.steps import EngineContext, MemoryBlobLocations
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

    ``rules``: (method, regex on path, times; -1 forever). Every request is counted by (method, path kind).
    """

    def __init__(self, rules: list[tuple[str, str, int]]) -> None:
        self.inner = httpx.HTTPTransport()
        self.rules = [(m, re.compile(p)) for m, p, _n in rules]
        self.left = [n for _m, _p, n in rules]
        self.lock = threading.Lock()
        self.seen: Counter[tuple[str, str]] = Counter()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        with self.lock:
            self.seen[(request.method, path)] += 1
            for i, (method, rx) in enumerate(self.rules):
                if request.method == method and rx.search(path) and self.left[i] != 0:
                    self.left[i] -= 1
                    return httpx.Response(503, json={"errors": [{"code": "UNAVAILABLE", "message": "lying"}]})
        return self.inner.handle_request(request)

    def count(self, method: str, pattern: str) -> int:
        with self.lock:
            return sum(n for (m, p), n in self.seen.items() if m == method and re.search(pattern, p))


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
            ("HEAD", f"/blobs/{image.config_digest}$", 2),  # two failed existence checks
            ("PUT", r"/blobs/uploads/", 2),  # two failed closing PUTs (whichever blobs they hit)
            ("PUT", r"/manifests/v1$", 1),
        ]
    )
    report = copy_through(registry, registry2, unique_repo, lying, times=3)
    assert report.ok, report
    blobs = 3  # config + 2 layers
    # each failure costs exactly one more request of its kind: no request is retried at two levels
    assert lying.count("HEAD", r"/blobs/sha256:") == blobs + 2
    assert lying.count("PUT", r"/blobs/uploads/") == blobs + 2
    # a failed upload restarts its session: one more POST per failed PUT, the dead session cancelled
    assert lying.count("POST", r"/blobs/uploads/$") == blobs + 2
    assert lying.count("DELETE", r"/blobs/uploads/") == 2
    assert lying.count("PUT", r"/manifests/") == 2


def test_retry_budget_is_not_multiplied(registry: RegistryServer, registry2: RegistryServer, unique_repo: str) -> None:
    image = build_image(f"retry-{unique_repo}", layers=[3000, 5000], fmt="oci")
    bad = image.layers[1].digest
    lying = Lying([("HEAD", f"/blobs/{bad}$", -1)])
    report = copy_through(registry, registry2, unique_repo, lying, times=3)
    assert not report.ok
    # --retry-times 3: four attempts in all (the old nesting of two levels sent up to 16)
    assert lying.count("HEAD", f"/blobs/{bad}$") == 4
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
