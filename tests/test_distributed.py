"""Distributed execution (issue #4): real ``ferry worker`` processes on a real Redis, real registries.

Two Celery workers (``ferry worker --concurrency 2``, their own process groups, see tests/harness/workers.py)
serve the whole module. Jobs are submitted the way users do: ``ferry copy --queue URL`` (one image), or, for a
job of several images, ``build_plan`` + ``producer.distributed.submit_plan`` run in a child process (what
``ferry copy`` does with one image). Jobs are followed and inspected with ``ferry job wait|status|cancel|retry``.

The workers run with a short visibility timeout (5 s) and in-flight lock TTL (4 s), so that a SIGKILLed
worker's task is redone by the other one within seconds. Every job's outcome is checked at the destination
registry: skopeo 1.9 reads each copy back byte for byte, and the registry's access log shows what was uploaded,
mounted or written. Nothing runs in Celery's eager mode.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest
import redis

from tests.harness.images import Image, build_image, fetch_manifest, make_layer, make_stream_layer, push_image
from tests.harness.peer import skopeo
from tests.harness.servers import AccessLogEntry, RedisServer, RegistryServer
from tests.harness.workers import FERRY_BIN, WorkerProcess, start_worker
from worker.registry import Credentials, TooManyRequests, store_login
from worker.state import Limits, RedisGate, SharedState, connect

#: the Redis database of this module's queue (flushed when the module starts)
QUEUE_DB = 7
VISIBILITY_TIMEOUT = 5
LOCK_TTL = 4
#: the streamed layer of the cancel and SIGKILL tests: big enough that its transfer takes a second or more
BIG_LAYER = 200 << 20
INSECURE = ("--src-tls-verify=false", "--dest-tls-verify=false")
JOB_TIMEOUT = 90.0
#: how long after a worker's death its task must be done elsewhere (visibility timeout + lock TTL + a transfer)
REDELIVERY_DEADLINE = 45.0

pytestmark = pytest.mark.timeout(240)


# --------------------------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def queue(redis_server: RedisServer) -> str:
    url = redis_server.url_for(QUEUE_DB)
    r = redis.Redis.from_url(url)
    r.flushdb()
    r.close()
    return url


@pytest.fixture(scope="module")
def dist_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("distributed")


@pytest.fixture(scope="module")
def worker_auth_file(dist_dir: Path) -> Path:
    """The workers' own auth file (``REGISTRY_AUTH_FILE``); tests add logins with ``store_login``."""
    path = dist_dir / "worker-auth.json"
    path.write_text("{}")
    return path


@pytest.fixture(scope="module")
def producer_env(dist_dir: Path) -> dict[str, str]:
    """The producer's environment: its own empty auth file and blob cache, so it can never lend workers a login."""
    auth = dist_dir / "producer-auth.json"
    auth.write_text("{}")
    cache = dist_dir / "producer-cache"
    cache.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("FERRY_QUEUE", "DOCKER_CONFIG")}
    env.update({"REGISTRY_AUTH_FILE": str(auth), "FERRY_CACHE_DIR": str(cache)})
    return env


@dataclass
class Workers:
    queue: str
    log_dir: Path
    env: dict[str, str]
    procs: list[WorkerProcess]

    @property
    def names(self) -> set[str]:
        return {w.name for w in self.procs}

    def by_name(self, name: str) -> WorkerProcess:
        return next(w for w in self.procs if w.name == name)

    def ensure_running(self) -> None:
        """Restart any worker that died (a SIGKILL test kills one)."""
        for i, w in enumerate(self.procs):
            if not w.alive:
                self.procs[i] = start_worker(self.queue, w.name, self.log_dir, concurrency=2, env=self.env)

    def logs(self) -> str:
        return "\n".join(f"===== {w.name} =====\n{w.log()[-6000:]}" for w in self.procs)


@pytest.fixture(scope="module")
def worker_pool(queue: str, dist_dir: Path, worker_auth_file: Path) -> Iterator[Workers]:
    env = {
        "FERRY_VISIBILITY_TIMEOUT": str(VISIBILITY_TIMEOUT),
        "FERRY_LOCK_TTL": str(LOCK_TTL),
        "REGISTRY_AUTH_FILE": str(worker_auth_file),
    }
    log_dir = dist_dir / "workers"
    procs: list[WorkerProcess] = []
    try:
        for n in (1, 2):
            procs.append(start_worker(queue, f"w{n}@%h", log_dir, concurrency=2, env=env, wait=False))
        for w in procs:
            w.wait_ready()
        yield Workers(queue, log_dir, env, procs)
    finally:
        for w in procs:
            w.stop(grace=5)


@pytest.fixture
def workers(worker_pool: Workers, queue: str) -> Iterator[Workers]:
    """Both module workers, running and idle (nothing queued, nothing in flight) when the test starts."""
    worker_pool.ensure_running()
    wait_idle(queue)
    yield worker_pool


@pytest.fixture
def state(queue: str) -> Iterator[SharedState]:
    s = SharedState(connect(queue))
    yield s
    s.r.close()


@pytest.fixture(scope="module")
def big_image(registry: RegistryServer) -> tuple[str, Image]:
    """One image with a large streamed layer in the source registry (for the cancel and SIGKILL tests)."""
    token = uuid.uuid4().hex[:8]
    layer = make_stream_layer(f"dist-big-{token}", BIG_LAYER)
    img = build_image(f"dist-big-{token}", layers=[layer])
    repo = f"test/dist-big-{token}"
    push_image(registry.url, repo, "v1", img)
    return repo, img


# --------------------------------------------------------------------------------------------------------------------
# helpers


SUBMIT_SCRIPT = """
import json, sys
from producer.cli import build_parser
from producer.copy_cmd import copy_options, engine_context
from producer.distributed import submit_plan
from producer.options import BOOL_FLAGS, normalize_argv
from worker.engine.copy import CopyJob, build_plan
from worker.engine.transports import ImageName

pairs, flags = json.loads(sys.argv[1]), json.loads(sys.argv[2])
BOOL_FLAGS.add("--tls-verify")
args = build_parser().parse_args(normalize_argv(["copy", *flags, pairs[0][0], pairs[0][1]]))
ctx = engine_context(args)
try:
    jobs = [CopyJob(ImageName.parse(s), ImageName.parse(d)) for s, d in pairs]
    plan, _ = build_plan(ctx, jobs, copy_options(args))
    sys.exit(submit_plan(args, plan, args.queue, kind="copy"))
finally:
    ctx.close()
"""


def ferry(
    *args: str, env: dict[str, str], timeout: float = JOB_TIMEOUT, check: bool = True
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [FERRY_BIN, *args], capture_output=True, text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL
    )
    if check:
        assert proc.returncode == 0, f"ferry {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


def submit(
    pairs: list[tuple[str, str]], queue: str, env: dict[str, str], *flags: str, wait: bool = False
) -> tuple[str, subprocess.CompletedProcess[str]]:
    """One job copying every (source, destination) pair; returns the job id (and the producer's process)."""
    argv = [*INSECURE, "--queue", queue, *flags, *(["--wait"] if wait else [])]
    proc = subprocess.run(
        [sys.executable, "-c", SUBMIT_SCRIPT, json.dumps(pairs), json.dumps(argv)],
        capture_output=True,
        text=True,
        timeout=JOB_TIMEOUT,
        env={**env, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
        stdin=subprocess.DEVNULL,
    )
    if not wait:
        assert proc.returncode == 0, f"submitting failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    job = proc.stdout.strip().splitlines()[0] if proc.stdout.strip() else ""
    assert len(job) == 12, f"no job id printed:\n{proc.stdout}\n{proc.stderr}"
    return job, proc


def enqueue_copy(source: str, destination: str, queue: str, env: dict[str, str]) -> str:
    """``ferry copy --queue`` without ``--wait``: the job id it prints."""
    proc = ferry("copy", *INSECURE, "--queue", queue, source, destination, env=env)
    return proc.stdout.strip()


def job_status(job: str, queue: str, env: dict[str, str]) -> dict[str, Any]:
    out = ferry("job", "status", job, "--json", "--queue", queue, env=env, timeout=30)
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def job_wait(job: str, queue: str, env: dict[str, str], workers: Workers, timeout: float = JOB_TIMEOUT) -> int:
    try:
        proc = ferry("job", "wait", job, "--queue", queue, env=env, check=False, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"job {job} did not end in {timeout}s\n{workers.logs()}")
    return proc.returncode


def wait_idle(queue: str, timeout: float = 60.0) -> None:
    """Wait until no task is queued or in flight (held unacknowledged by a worker), three polls in a row.

    Tasks are acknowledged only once done (``acks_late``); a chord's callback is queued before the last header
    task is acknowledged. So empty queues and no unacknowledged message mean every task sent so far has ended.
    """
    r = redis.Redis.from_url(queue)
    deadline = time.monotonic() + timeout
    calm = 0
    try:
        while calm < 3:
            pipe = r.pipeline(transaction=True)
            pipe.llen("ferry.blobs")
            pipe.llen("ferry.meta")
            pipe.hlen("unacked")
            busy = sum(pipe.execute())
            calm = calm + 1 if busy == 0 else 0
            if time.monotonic() > deadline:
                raise TimeoutError(f"workers still busy after {timeout}s")
            time.sleep(0.1)
    finally:
        r.close()


def wait_for(
    what: str,
    predicate: Callable[[], Any],
    timeout: float = 30.0,
    interval: float = 0.05,
    detail: Callable[[], str] | None = None,
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}" + (f"\n{detail()}" if detail else ""))
        time.sleep(interval)


def blob_records(state: SharedState, job: str) -> dict[str, dict[str, Any]]:
    """Every blob step of the job as ``ferry job status --json`` would describe it."""
    return {sid: rec.to_json() for sid, rec in state.jobs.blobs(job).items()}


def blob_record(state: SharedState, job: str, digest: str) -> dict[str, Any]:
    recs = [b for b in blob_records(state, job).values() if b.get("digest") == digest]
    assert len(recs) == 1, f"expected one blob step for {digest}, got {recs}"
    return recs[0]


def raw_manifest(reg: RegistryServer, repo: str, ref: str, *creds: str) -> str:
    args = ["inspect", "--raw", "--tls-verify=false", *creds, f"docker://{reg.host}/{repo}:{ref}"]
    return skopeo(*args).stdout


def assert_copied(reg: RegistryServer, repo: str, tag: str, img: Image, *creds: str) -> None:
    """The destination serves the source manifest byte for byte."""
    assert raw_manifest(reg, repo, tag, *creds).encode() == img.manifest


def query(e: AccessLogEntry) -> dict[str, list[str]]:
    return parse_qs(e.query)


def uploads_of(log: list[AccessLogEntry], digest: str) -> list[AccessLogEntry]:
    """Completed blob uploads (the closing PUT ``?digest=``) of ``digest``."""
    return [
        e
        for e in log
        if e.method == "PUT" and "/blobs/uploads/" in e.path and e.status == 201 and query(e).get("digest") == [digest]
    ]


def mounts_of(log: list[AccessLogEntry], digest: str) -> list[AccessLogEntry]:
    """Successful cross-repository mounts (POST ``?mount=``, 201) of ``digest``."""
    return [e for e in log if e.method == "POST" and e.status == 201 and query(e).get("mount") == [digest]]


def source_blob_file(reg: RegistryServer, digest: str) -> Path:
    algo, hexd = digest.split(":")
    return reg.storage_dir / "docker" / "registry" / "v2" / "blobs" / algo / hexd[:2] / hexd / "data"


# --------------------------------------------------------------------------------------------------------------------
# shared backoff and per-host slots (Redis only, no workers)


def test_shared_backoff_and_host_slots_across_processes(queue: str) -> None:
    one, two = SharedState(connect(queue)), SharedState(connect(queue))
    try:
        host = f"reg-{uuid.uuid4().hex[:8]}.example:5000"
        other = f"other-{uuid.uuid4().hex[:8]}.example:5000"
        # worker one gets 429 Retry-After: 2; worker two (another connection, another gate) holds off too
        RedisGate(one.hosts).on_throttled(host, 2.0)
        gate = RedisGate(two.hosts)
        started = time.monotonic()
        gate.before_request(host)
        assert time.monotonic() - started >= 1.8
        # ... but only for that host
        started = time.monotonic()
        gate.before_request(other)
        assert time.monotonic() - started < 1.0
        # a wait longer than MAX_SLEEP is not slept: the request fails as temporarily throttled
        RedisGate(one.hosts).on_throttled(other, 30.0)
        with pytest.raises(TooManyRequests) as info:
            RedisGate(two.hosts).before_request(other)  # (a gate reads a host's backoff at most once a second)
        assert info.value.retry_after is not None and info.value.retry_after > RedisGate.MAX_SLEEP
        # a later, shorter Retry-After does not shorten the shared backoff
        RedisGate(two.hosts).on_throttled(other, 1.0)
        assert two.hosts.backoff_until(other) - time.time() > 25

        # per-host transfer slots: with a limit of 1, a second holder waits until the first releases
        one.hosts.set_limits(host, Limits(concurrency=1))
        assert two.hosts.limits(host).concurrency == 1
        assert one.hosts.try_slot(host, "task-a", 1, ttl=60)
        assert not two.hosts.try_slot(host, "task-b", 1, ttl=60)
        with two.hosts.slot(host, "task-c", ttl=60, limit=1) as got:
            assert not got
        one.hosts.release_slot(host, "task-a")
        with two.hosts.slot(host, "task-b", ttl=60, limit=1) as got:
            assert got
            assert not one.hosts.try_slot(host, "task-d", 1, ttl=60)
        assert one.hosts.try_slot(host, "task-d", 1, ttl=0.3)
        # a holder that died without releasing loses its slot when its ttl runs out
        time.sleep(0.4)
        assert two.hosts.try_slot(host, "task-e", 1, ttl=60)
        two.hosts.release_slot(host, "task-e")
    finally:
        one.r.close()
        two.r.close()


# --------------------------------------------------------------------------------------------------------------------
# two workers, one job, shared layers


def test_two_workers_copy_image_set_sharing_a_layer(
    workers: Workers,
    registry: RegistryServer,
    registry2: RegistryServer,
    queue: str,
    producer_env: dict[str, str],
    state: SharedState,
) -> None:
    token = uuid.uuid4().hex[:8]
    shared = make_layer(f"dist-shared-{token}", 2 << 20)
    images = [build_image(f"dist-set-{token}-{i}", layers=[shared, 48 << 10]) for i in range(4)]
    repos = [f"test/dist-set-{token}/app{i}" for i in range(4)]
    for repo, img in zip(repos, images, strict=True):
        push_image(registry.url, repo, "v1", img)
    pairs = [(f"docker://{registry.host}/{r}:v1", f"docker://{registry2.host}/{r}:v1") for r in repos]

    mark = registry2.log_mark()
    job, _ = submit(pairs, queue, producer_env)
    assert job_wait(job, queue, producer_env, workers) == 0, workers.logs()

    for repo, img in zip(repos, images, strict=True):
        assert_copied(registry2, repo, "v1", img)

    log = registry2.access_log(since=mark)
    shared_digest = str(shared.digest)
    assert len(uploads_of(log, shared_digest)) == 1, "the shared layer must be uploaded exactly once"
    assert len(mounts_of(log, shared_digest)) == 3, "the other three repositories must mount the shared layer"
    for img in images:
        for blob in (img.layers[1].digest, img.config_digest):
            assert len(uploads_of(log, str(blob))) == 1
    manifest_puts = [e for e in log if e.method == "PUT" and "/manifests/" in e.path and e.status == 201]
    assert sorted(e.path for e in manifest_puts) == sorted(f"/v2/{r}/manifests/v1" for r in repos)

    status = job_status(job, queue, producer_env)
    assert status["state"] == "done"
    assert (status["images_total"], status["images_done"], status["images_failed"]) == (4, 4, 0)
    assert [i["status"] for i in status["images"]] == ["done"] * 4
    # per image: the shared layer, its own layer, its config
    assert (status["blobs_total"], status["blobs_done"]) == (12, 12)
    assert (status["blobs_transferred"], status["blobs_mounted"], status["blobs_skipped"]) == (9, 3, 0)
    moved = shared.size + sum(img.layers[1].size + len(img.config) for img in images)
    assert status["bytes_transferred"] == moved

    # the tasks were spread over both workers (each records its Celery node name)
    by_worker = {b.get("worker") for b in blob_records(state, job).values()}
    assert by_worker == workers.names, f"blob tasks ran on {by_worker}"


BOTH_EXECUTORS_SCRIPT = """
import json, os, sys
queue, pairs, flags = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
os.environ["FERRY_QUEUE"] = queue  # the Celery app reads its broker from here
from producer.cli import build_parser
from producer.copy_cmd import copy_options, engine_context
from producer.distributed import job_options
from producer.options import BOOL_FLAGS, normalize_argv
from worker.celery_executor import CeleryExecutor
from worker.engine.copy import CopyJob, build_plan
from worker.engine.executor import EmbeddedExecutor
from worker.engine.transports import ImageName
from worker.state import SharedState, connect

BOOL_FLAGS.add("--tls-verify")
args = build_parser().parse_args(normalize_argv(["copy", *flags, pairs[0][0], pairs[0][1]]))
ctx = engine_context(args)
out = []
try:
    executors = [EmbeddedExecutor(ctx), CeleryExecutor(SharedState(connect(queue)), options=job_options(args))]
    for executor, (src, dst) in zip(executors, pairs):
        plan, _ = build_plan(ctx, [CopyJob(ImageName.parse(src), ImageName.parse(dst))], copy_options(args))
        report = executor.run(plan)  # one interface: a plan in, a Report out
        images = [[i.source, i.destination, i.status.value, i.digest] for i in report.images]
        blobs = report.blobs_transferred + report.blobs_mounted + report.blobs_skipped
        out.append({"ok": report.ok, "images": images, "blobs": blobs})
finally:
    ctx.close()
print(json.dumps(out))
"""


def test_both_executors_run_a_plan_behind_one_interface(
    workers: Workers, registry: RegistryServer, registry2: RegistryServer, queue: str, producer_env: dict[str, str]
) -> None:
    """``EmbeddedExecutor.run(plan)`` and ``CeleryExecutor.run(plan)`` take the same plan type and give the same
    ``Report``: the Celery one makes the plan a job, waits for real workers to end it and reads it back."""
    token = uuid.uuid4().hex[:8]
    img = build_image(f"dist-iface-{token}", layers=[64 << 10, 32 << 10])
    repo = f"test/dist-iface-{token}"
    push_image(registry.url, repo, "v1", img)
    src = f"docker://{registry.host}/{repo}:v1"
    dest_repos = [f"{repo}/{side}" for side in ("here", "workers")]
    pairs = [(src, f"docker://{registry2.host}/{d}:v1") for d in dest_repos]
    proc = subprocess.run(
        [sys.executable, "-c", BOTH_EXECUTORS_SCRIPT, queue, json.dumps(pairs), json.dumps(list(INSECURE))],
        capture_output=True,
        text=True,
        timeout=JOB_TIMEOUT,
        env={**producer_env, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}\n{workers.logs()}"
    here, queued = json.loads(proc.stdout.strip().splitlines()[-1])
    for report, (source, destination), dest_repo in zip((here, queued), pairs, dest_repos, strict=True):
        assert report["ok"] and report["blobs"] == 3, f"{report}\n{workers.logs()}"
        assert report["images"] == [[source, destination, "done", str(img.digest)]]
        assert_copied(registry2, dest_repo, "v1", img)


def _retries(workers: Workers, marks: list[int]) -> int:
    """Celery task retries (a task re-queueing itself) logged by the workers since ``marks``."""
    return sum(w.log()[m:].count("retry: Retry in") for w, m in zip(workers.procs, marks, strict=True))


def test_mounts_of_a_shared_layer_wait_for_its_upload_without_requeueing(
    workers: Workers,
    registry: RegistryServer,
    registry2: RegistryServer,
    queue: str,
    producer_env: dict[str, str],
    state: SharedState,
) -> None:
    """The steps that mount a layer another step uploads wait in Redis until that upload ends, then are sent
    once: no task re-queues itself to wait, and no mount is tried before the blob is there. A second tag of
    the first repository shares that repository's steps: it adds no step and no request."""
    token = uuid.uuid4().hex[:8]
    shared = make_layer(f"dist-wait-{token}", 3 << 20)
    images = [build_image(f"dist-wait-{token}-{i}", layers=[shared, 16 << 10]) for i in range(6)]
    repos = [f"test/dist-wait-{token}/app{i}" for i in range(6)]
    for repo, img in zip(repos, images, strict=True):
        push_image(registry.url, repo, "v1", img)
    pairs = [(f"docker://{registry.host}/{r}:v1", f"docker://{registry2.host}/{r}:v1") for r in repos]
    pairs.append((f"docker://{registry.host}/{repos[0]}:v1", f"docker://{registry2.host}/{repos[0]}:v2"))

    marks = [len(w.log()) for w in workers.procs]
    mark = registry2.log_mark()
    job, _ = submit(pairs, queue, producer_env)
    assert job_wait(job, queue, producer_env, workers) == 0, workers.logs()
    wait_idle(queue)

    assert _retries(workers, marks) == 0, workers.logs()
    log = registry2.access_log(since=mark)
    shared_digest = str(shared.digest)
    assert len(uploads_of(log, shared_digest)) == 1
    mounts = mounts_of(log, shared_digest)
    assert len(mounts) == 5 and all(e.status == 201 for e in mounts), "every mount works the first time"
    # v2 of the first repository: v1's steps are its steps; not even a HEAD is sent for it
    heads = [e for e in log if e.method == "HEAD" and shared_digest in e.path and f"/{repos[0]}/" in e.path]
    assert len(heads) <= 1, heads
    records = blob_records(state, job)
    mine = [b for b in records.values() if b["digest"] == shared_digest]
    assert len(mine) == 6 and all(b["status"] == "done" for b in mine)
    assert sorted(b["action"] for b in mine) == ["mounted"] * 5 + ["transferred"]
    # only the upload made a transfer attempt
    assert sum(b["attempts"] for b in mine) == 1
    for repo, img in zip(repos, images, strict=True):
        assert_copied(registry2, repo, "v1", img)
    assert_copied(registry2, repos[0], "v2", images[0])


def test_tags_of_one_repository_share_one_task_per_layer(
    workers: Workers,
    registry: RegistryServer,
    registry2: RegistryServer,
    queue: str,
    producer_env: dict[str, str],
    state: SharedState,
) -> None:
    token = uuid.uuid4().hex[:8]
    shared = make_layer(f"dist-tags-{token}", 256 << 10)
    base = f"test/dist-tags-{token}"
    pairs_of = [("a", "v1"), ("b", "v1"), ("b", "v2"), ("b", "v3")]
    images = {(r, t): build_image(f"dist-tags-{token}-{r}{t}", layers=[shared, 8 << 10]) for r, t in pairs_of}
    for (repo, tag), img in images.items():
        push_image(registry.url, f"{base}/{repo}", tag, img)
    pairs = [
        (f"docker://{registry.host}/{base}/{r}:{t}", f"docker://{registry2.host}/{base}/{r}:{t}") for r, t in pairs_of
    ]

    mark = registry2.log_mark()
    job, _ = submit(pairs, queue, producer_env)
    assert job_wait(job, queue, producer_env, workers) == 0, workers.logs()
    for (repo, tag), img in images.items():
        assert_copied(registry2, f"{base}/{repo}", tag, img)
    log = registry2.access_log(since=mark)
    # a's upload, then one mount into b for its three tags (one step, one task), not three
    assert len(uploads_of(log, str(shared.digest))) == 1
    assert [e.path for e in mounts_of(log, str(shared.digest))] == [f"/v2/{base}/b/blobs/uploads/"]
    records = [b for b in blob_records(state, job).values() if b.get("digest") == str(shared.digest)]
    assert len(records) == 2
    status = job_status(job, queue, producer_env)
    assert [i["status"] for i in status["images"]] == ["done"] * 4
    assert status["blobs_total"] == 2 + 4 * 2  # the shared layer twice (a, b), each image's own layer and config


def test_many_mounts_of_a_digest_busy_elsewhere_still_finish(
    workers: Workers,
    registry: RegistryServer,
    registry2: RegistryServer,
    queue: str,
    producer_env: dict[str, str],
    state: SharedState,
) -> None:
    """A shared layer whose in-flight lock another job holds (it is "uploading" it): the step that would upload
    it waits in place, the twelve steps that mount it wait for that step, and the job ends done once the lock
    goes, without a task re-queueing itself."""
    token = uuid.uuid4().hex[:8]
    shared = make_layer(f"dist-busy-{token}", 1 << 20)
    images = [build_image(f"dist-busy-{token}-{i}", layers=[shared, 4096]) for i in range(13)]
    repos = [f"test/dist-busy-{token}/app{i}" for i in range(13)]
    for repo, img in zip(repos, images, strict=True):
        push_image(registry.url, repo, "v1", img)
    pairs = [(f"docker://{registry.host}/{r}:v1", f"docker://{registry2.host}/{r}:v1") for r in repos]
    store = f"docker://{registry2.host}"
    lock = state.locks.acquire(store, str(shared.digest), ttl=120)
    assert lock is not None
    marks = [len(w.log()) for w in workers.procs]
    mark = registry2.log_mark()
    try:
        job, _ = submit(pairs, queue, producer_env)
        shared_digest = str(shared.digest)

        def own_blobs_done() -> bool:
            own = [b for b in blob_records(state, job).values() if b["digest"] != shared_digest]
            return len(own) == 26 and all(b["status"] == "done" for b in own)

        wait_for("the images' own blobs", own_blobs_done, timeout=60)
        time.sleep(1.0)
        records = blob_records(state, job)
        assert not [b for b in records.values() if b["digest"] == str(shared.digest) and b["status"] == "done"]
        assert state.jobs.job(job).state == "running"
    finally:
        lock.release()
    assert job_wait(job, queue, producer_env, workers) == 0, workers.logs()
    wait_idle(queue)
    assert _retries(workers, marks) == 0, workers.logs()
    log = registry2.access_log(since=mark)
    assert len(uploads_of(log, str(shared.digest))) == 1
    assert len(mounts_of(log, str(shared.digest))) == 12
    for repo, img in zip(repos, images, strict=True):
        assert_copied(registry2, repo, "v1", img)


# --------------------------------------------------------------------------------------------------------------------
# secrets stay out of Redis


def _texts(value: bytes, depth: int = 0) -> Iterator[str]:
    """``value`` as text, plus whatever base64 or JSON inside it decodes to (Celery message bodies are base64)."""
    text = value.decode("utf-8", errors="replace")
    yield text
    if depth > 3:
        return
    try:
        obj = json.loads(text)
    except ValueError:
        obj = None
    strings: list[str] = []

    def walk(o: Any) -> None:
        if isinstance(o, str):
            strings.append(o)
        elif isinstance(o, dict):
            for k, v in o.items():
                strings.append(str(k))
                walk(v)
        elif isinstance(o, list):
            for v in o:
                walk(v)

    walk(obj)
    if obj is None:
        strings.append(text)
    for s in strings:
        compact = s.strip()
        if len(compact) >= 8 and len(compact) % 4 == 0:
            try:
                decoded = base64.b64decode(compact, validate=True)
            except (binascii.Error, ValueError):
                continue
            yield from _texts(decoded, depth + 1)


def redis_dump(url: str) -> dict[str, list[str]]:
    """Every key of the database with every member/field/value of it, decoded to text."""
    r: Any = redis.Redis.from_url(url)  # bytes in, bytes out
    out: dict[str, list[str]] = {}
    try:
        for key in r.scan_iter(count=1000):
            kind = r.type(key).decode()
            raw: list[bytes] = [key]
            if kind == "string":
                raw.append(r.get(key) or b"")
            elif kind == "hash":
                for f, v in r.hgetall(key).items():
                    raw += [f, v]
            elif kind == "list":
                raw += r.lrange(key, 0, -1)
            elif kind == "set":
                raw += list(r.smembers(key))
            elif kind == "zset":
                raw += [m for m, _score in r.zrange(key, 0, -1, withscores=True)]
            elif kind == "stream":
                for _id, fields in r.xrange(key):
                    for f, v in fields.items():
                        raw += [f, v]
            elif kind != "none":
                raise AssertionError(f"unexpected Redis type {kind} for {key!r}")
            out[key.decode(errors="replace")] = [t for item in raw for t in _texts(item)]
    finally:
        r.close()
    return out


def find_secrets(dump: dict[str, list[str]], secrets: dict[str, str]) -> list[str]:
    return [
        f"{what} in {key}"
        for key, texts in dump.items()
        for what, secret in secrets.items()
        if any(secret in t for t in texts)
    ]


def test_workers_use_own_credentials_and_redis_holds_no_secret(
    workers: Workers,
    registry_factory: Callable[..., RegistryServer],
    queue: str,
    producer_env: dict[str, str],
    worker_auth_file: Path,
) -> None:
    src = registry_factory(auth="htpasswd")
    dst = registry_factory(auth="token")
    assert src.username and src.password and dst.username and dst.password and dst.token_server
    issued: list[str] = []
    ts = dst.token_server
    make_token = ts.make_token

    def recording_make_token(*args: Any, **kwargs: Any) -> str:
        tok = make_token(*args, **kwargs)
        issued.append(tok)
        return tok

    ts.make_token = recording_make_token  # type: ignore[method-assign]

    token = uuid.uuid4().hex[:8]
    img = build_image(f"dist-secret-{token}", layers=[6 << 20, 4096])  # a chunked (PATCH) upload and a small one
    repo = f"test/dist-secret-{token}"
    push_image(src.url, repo, "v1", img, auth=(src.username, src.password))
    # the workers log in through their own auth file; the producer only gets --src-creds/--dest-creds
    store_login(src.host, Credentials(src.username, src.password), authfile=worker_auth_file)
    store_login(dst.host, Credentials(dst.username, dst.password), authfile=worker_auth_file)

    src_creds = f"{src.username}:{src.password}"
    dest_creds = f"{dst.username}:{dst.password}"
    proc = ferry(
        "copy", *INSECURE, "--queue", queue, "--wait",
        "--src-creds", src_creds, "--dest-creds", dest_creds,
        f"docker://{src.host}/{repo}:v1", f"docker://{dst.host}/{repo}:v1",
        env=producer_env, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}\n{workers.logs()}"
    job = proc.stdout.strip().splitlines()[0]
    status = job_status(job, queue, producer_env)
    assert status["state"] == "done" and status["images_done"] == 1
    assert status["blobs_transferred"] == 3
    assert_copied(dst, repo, "v1", img, "--creds", dest_creds)
    # the workers pushed with the password from their auth file (the producer only ever asks to pull)
    pushes = [q for q in ts.requests if q.username == dst.username and any("push" in s for s in q.scopes)]
    assert pushes, f"no authenticated push token was requested: {ts.requests}"
    assert issued

    secrets = {
        "the source password": src.password,
        "the destination password": dst.password,
        "base64 user:password (source)": base64.b64encode(src_creds.encode()).decode(),
        "base64 user:password (destination)": base64.b64encode(dest_creds.encode()).decode(),
    }
    for n, tok in enumerate(issued):
        secrets[f"bearer token {n}"] = tok
        secrets[f"bearer token {n} signature"] = tok.rsplit(".", 1)[1]
    for n, rt in enumerate(ts.refresh_tokens):
        secrets[f"refresh token {n}"] = rt

    # the scanner does see every type of value, base64-wrapped ones included
    canary = f"canary-{uuid.uuid4().hex}"
    r = redis.Redis.from_url(queue)
    try:
        r.zadd("ferry:test:canary-z", {canary: 1})
        r.hset("ferry:test:canary-h", "body", base64.b64encode(json.dumps({"x": [canary]}).encode()))
        found = find_secrets(redis_dump(queue), {"canary": canary})
        assert sorted(found) == ["canary in ferry:test:canary-h", "canary in ferry:test:canary-z"]
    finally:
        r.delete("ferry:test:canary-z", "ferry:test:canary-h")
        r.close()

    wait_idle(queue)
    dump = redis_dump(queue)
    assert any(key.startswith(f"ferry:job:{job}") for key in dump), "the job's records should be in this database"
    # no task stores a result (ignore_result): nothing of Celery's but its queue bookkeeping to scan
    assert not any(key.startswith("celery-task-meta-") for key in dump), "tasks should store no result"
    leaks = find_secrets(dump, secrets)
    assert not leaks, f"secrets found in Redis: {leaks}"
    # nor in what the workers logged
    logs = {w.name: [w.log_path.read_text(errors="replace")] for w in workers.procs}
    assert not find_secrets(logs, secrets)


# --------------------------------------------------------------------------------------------------------------------
# re-running and retrying jobs


def test_rerun_moves_nothing_and_retry_moves_only_what_failed(
    workers: Workers,
    registry: RegistryServer,
    registry2: RegistryServer,
    queue: str,
    producer_env: dict[str, str],
    state: SharedState,
) -> None:
    token = uuid.uuid4().hex[:8]
    # -- a completed job, submitted again, is up to date and moves nothing
    images = [build_image(f"dist-rerun-{token}-{i}", layers=[32 << 10, 8 << 10]) for i in range(2)]
    repos = [f"test/dist-rerun-{token}/app{i}" for i in range(2)]
    for repo, img in zip(repos, images, strict=True):
        push_image(registry.url, repo, "v1", img)
    pairs = [(f"docker://{registry.host}/{r}:v1", f"docker://{registry2.host}/{r}:v1") for r in repos]
    first, _ = submit(pairs, queue, producer_env)
    assert job_wait(first, queue, producer_env, workers) == 0, workers.logs()
    wait_idle(queue)

    mark = registry2.log_mark()
    again, _ = submit(pairs, queue, producer_env)
    assert again != first
    assert job_wait(again, queue, producer_env, workers) == 0
    status = job_status(again, queue, producer_env)
    assert status["state"] == "done"
    assert [i["status"] for i in status["images"]] == ["up-to-date", "up-to-date"]
    assert status["blobs_total"] == 0 and status["bytes_transferred"] == 0
    wait_idle(queue)
    writes = [e for e in registry2.access_log(since=mark) if e.method in ("POST", "PATCH", "PUT", "DELETE")]
    assert writes == [], f"a re-run must not write anything: {writes}"

    # -- a job with a failed image: retry re-enqueues that image only, and moves only the blob that failed
    ok_img = build_image(f"dist-retry-ok-{token}", layers=[24 << 10])
    bad_img = build_image(f"dist-retry-bad-{token}", layers=[40 << 10, 16 << 10])
    ok_repo, bad_repo = f"test/dist-retry-{token}/ok", f"test/dist-retry-{token}/bad"
    push_image(registry.url, ok_repo, "v1", ok_img)
    push_image(registry.url, bad_repo, "v1", bad_img)
    broken = str(bad_img.layers[0].digest)
    data = source_blob_file(registry, broken)
    saved = data.with_name("data.saved")
    shutil.copy2(data, saved)
    data.unlink()
    try:
        pairs = [
            (f"docker://{registry.host}/{ok_repo}:v1", f"docker://{registry2.host}/{ok_repo}:v1"),
            (f"docker://{registry.host}/{bad_repo}:v1", f"docker://{registry2.host}/{bad_repo}:v1"),
        ]
        job, _ = submit(pairs, queue, producer_env)
        assert job_wait(job, queue, producer_env, workers) == 1
        status = job_status(job, queue, producer_env)
        assert status["state"] == "failed"
        assert [i["status"] for i in status["images"]] == ["done", "failed"], status["images"]
        failed = status["images"][1]
        assert broken in failed["error"] and "404" in failed["error"], failed
        assert status["failed"] == [
            {"source": pairs[1][0], "destination": pairs[1][1], "error": failed["error"]},
        ]
        assert httpx.get(f"{registry2.url}/v2/{bad_repo}/manifests/v1").status_code == 404
        wait_idle(queue)  # the failed image's other blobs are finished too
        done_before = {sid: b for sid, b in blob_records(state, job).items() if b["status"] == "done"}
        assert len(done_before) == 4  # the good image's layer and config, the bad image's config and 16 KiB layer
    finally:
        shutil.move(saved, data)

    mark = registry2.log_mark()
    proc = ferry("job", "retry", job, "--wait", "--queue", queue, env=producer_env, check=False)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}\n{workers.logs()}"
    assert "re-enqueued 1 image(s)" in proc.stdout
    status = job_status(job, queue, producer_env)
    assert status["state"] == "done"
    assert [i["status"] for i in status["images"]] == ["done", "done"]
    wait_idle(queue)
    log = registry2.access_log(since=mark)
    assert_copied(registry2, bad_repo, "v1", bad_img)
    assert_copied(registry2, ok_repo, "v1", ok_img)
    uploads = [e for e in log if e.method == "PUT" and "/blobs/uploads/" in e.path]
    assert [query(e).get("digest") for e in uploads] == [[broken]], "only the blob that failed is moved again"
    # no mount from another repository (the existence check is a mount from the repository itself: it opens
    # the upload session of a blob that is not there)
    mounts = [e for e in log if e.method == "POST" and query(e).get("mount")]
    assert all(query(e).get("from") == [bad_repo] and e.path.startswith(f"/v2/{bad_repo}/") for e in mounts), mounts
    assert [(e.method, e.path) for e in log if "/manifests/" in e.path and e.method == "PUT"] == [
        ("PUT", f"/v2/{bad_repo}/manifests/v1")
    ]
    assert not [e for e in log if e.path.startswith(f"/v2/{ok_repo}/")], "the done image is not touched again"
    # the blobs done before keep their records (not redone)
    after = blob_records(state, job)
    for sid, rec in done_before.items():
        assert after[sid]["attempts"] == rec["attempts"] and after[sid]["status"] == "done"


def test_quiet_keep_going_sync_prints_its_errors(
    workers: Workers, registry: RegistryServer, registry2: RegistryServer, queue: str, producer_env: dict[str, str]
) -> None:
    """``sync -q --keep-going --wait`` on a queue: an image that fails on the workers and one that fails while
    planning each get an ``Error:`` line (they used to print nothing and exit 1)."""
    token = uuid.uuid4().hex[:8]
    repo = f"test/dist-quiet-{token}/app"
    imgs = {tag: build_image(f"dist-quiet-{token}-{tag}", layers=[12 << 10]) for tag in ("ok", "bad", "gone")}
    for tag, img in imgs.items():
        push_image(registry.url, repo, tag, img)
    broken_layer = source_blob_file(registry, str(imgs["bad"].layers[0].digest))  # fails on a worker
    broken_manifest = source_blob_file(registry, str(imgs["gone"].digest))  # fails while planning
    saved = [(f, f.with_name("data.saved")) for f in (broken_layer, broken_manifest)]
    for f, keep in saved:
        shutil.move(f, keep)
    try:
        out = ferry("sync", "--src", "docker", "--dest", "docker", *INSECURE, "-q", "--keep-going", "--wait",
                    "--retry-times=1", "--retry-delay=0s", "--queue", queue, f"{registry.host}/{repo}",
                    f"{registry2.host}/quiet-{token}", env=producer_env, check=False)  # fmt: skip
    finally:
        for f, keep in saved:
            shutil.move(keep, f)
    assert out.returncode == 1, f"{out.stdout}\n{out.stderr}\n{workers.logs()}"
    errors = [line for line in out.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 2, out.stderr
    assert any(f"{repo}:bad -> " in e and str(imgs["bad"].layers[0].digest) in e for e in errors), errors
    assert any(f"{repo}:gone -> " in e for e in errors), errors
    assert out.stdout == ""  # -q: no job id, no per-image lines
    assert_copied(registry2, f"quiet-{token}/app", "ok", imgs["ok"])


def test_queued_sync_plans_in_discovery_order_and_checks_new_blobs_with_one_request(
    workers: Workers,
    registry: RegistryServer,
    registry2: RegistryServer,
    queue: str,
    producer_env: dict[str, str],
    state: SharedState,
) -> None:
    """A queued sync plans its images with the stages overlapped (they finish in any order) but the job lists
    them in the order discovery found them; a worker checks a new blob with the request that also opens its
    upload session (a mount from the repository into itself), never with a HEAD first."""
    token = uuid.uuid4().hex[:8]
    repo = f"test/dist-order-{token}/app"
    tags = [f"t{n:02d}" for n in range(8)]
    imgs = {tag: build_image(f"dist-order-{token}-{tag}", layers=[(4 + n) << 10]) for n, tag in enumerate(tags)}
    for tag in tags:
        push_image(registry.url, repo, tag, imgs[tag])
    listed = httpx.get(f"{registry.url}/v2/{repo}/tags/list").json()["tags"]  # discovery's order (the registry's)
    assert sorted(listed) == tags
    mark = registry2.log_mark()
    src, dst = f"{registry.host}/{repo}", f"{registry2.host}/order-{token}"
    argv = ["sync", "--src", "docker", "--dest", "docker", *INSECURE, "--wait", "--queue", queue, src, dst]
    out = ferry(*argv, env=producer_env, check=False)
    assert out.returncode == 0, f"{out.stdout}\n{out.stderr}\n{workers.logs()}"
    for tag, img in imgs.items():
        assert_copied(registry2, f"order-{token}/app", tag, img)
    job = state.jobs.recent(1)[0]
    status = job_status(job, queue, producer_env)
    assert [i["destination"].rsplit(":", 1)[1] for i in status["images"]] == listed
    log = registry2.access_log(since=mark)
    assert not [e for e in log if e.method == "HEAD" and "/blobs/" in e.path], "a HEAD before the upload"
    dest_repo = f"order-{token}/app"
    checks = [e for e in log if e.method == "POST" and query(e).get("mount")]
    # every blob of the job is new (layers and configs): one check each, answered with an upload session
    assert len(checks) == 2 * len(tags), [(e.path, e.status) for e in checks]
    assert all(query(e).get("from") == [dest_repo] and e.status == 202 for e in checks)
    assert len([e for e in log if e.method == "PUT" and "/blobs/uploads/" in e.path]) == 2 * len(tags)


# --------------------------------------------------------------------------------------------------------------------
# cancel


def test_cancel_running_job_writes_no_tag(
    workers: Workers,
    registry: RegistryServer,
    registry2: RegistryServer,
    queue: str,
    producer_env: dict[str, str],
    state: SharedState,
    big_image: tuple[str, Image],
) -> None:
    src_repo, img = big_image
    dest_repo = f"test/dist-cancel-{uuid.uuid4().hex[:8]}"
    big, config = str(img.layers[0].digest), str(img.config_digest)
    # Hold the destination's in-flight lock of the config blob, as if another worker were uploading it: the
    # image cannot finish before the cancel, however fast the big layer goes.
    store = f"docker://{registry2.host}"
    lock = state.locks.acquire(store, config, ttl=120)
    assert lock is not None
    try:
        mark = registry2.log_mark()
        job = enqueue_copy(
            f"docker://{registry.host}/{src_repo}:v1", f"docker://{registry2.host}/{dest_repo}:v1", queue, producer_env
        )
        wait_for("the big blob's transfer to start", lambda: blob_record(state, job, big).get("status") == "running")
        assert state.jobs.job(job).state == "running"

        ferry("job", "cancel", job, "--queue", queue, env=producer_env)
        assert state.jobs.job(job).state == "cancelled"
        assert [i.status for i in state.jobs.images(job).values()] == ["cancelled"]
    finally:
        lock.release()

    wait_idle(queue)  # every task of the job (the finalizer included) has run
    assert blob_record(state, job, big)["status"] in ("cancelled", "done")
    assert blob_record(state, job, config)["status"] != "done"
    assert httpx.get(f"{registry2.url}/v2/{dest_repo}/manifests/v1").status_code == 404
    log = registry2.access_log(since=mark)
    assert not [e for e in log if e.method == "PUT" and "/manifests/" in e.path], "no manifest may be written"
    assert not uploads_of(log, config), "nothing is started once the job is cancelled"
    status = job_status(job, queue, producer_env)
    assert status["state"] == "cancelled" and [i["status"] for i in status["images"]] == ["cancelled"]
    # cancelled is its own outcome: not counted, printed or exited as a failure
    assert (status["images_failed"], status["images_cancelled"], status["failed"]) == (0, 1, [])
    waited = ferry("job", "wait", job, "--queue", queue, env=producer_env, check=False)
    assert waited.returncode == 130
    assert waited.stdout.startswith("Cancelled ") and waited.stdout.rstrip().endswith(": cancelled by user")
    assert "0 failed, 1 cancelled" in waited.stderr


def test_early_finalizer_waits_for_every_blob(
    workers: Workers,
    registry: RegistryServer,
    registry2: RegistryServer,
    queue: str,
    producer_env: dict[str, str],
    state: SharedState,
    unique_repo: str,
) -> None:
    """A finalizer that runs before the image's blobs are done (a chord fired early, e.g. by a task delivered
    twice) writes nothing: it waits, and the tag appears only once everything it points to exists."""
    from worker.celery_app import make_app

    img = build_image(f"dist-early/{unique_repo}", layers=[4096, 8192])
    push_image(registry.url, unique_repo, "v1", img)
    config = str(img.config_digest)
    store = f"docker://{registry2.host}"
    lock = state.locks.acquire(store, config, ttl=120)  # the config blob stays "being uploaded elsewhere"
    assert lock is not None
    try:
        mark = registry2.log_mark()
        job = enqueue_copy(
            f"docker://{registry.host}/{unique_repo}:v1",
            f"docker://{registry2.host}/{unique_repo}:v1",
            queue,
            producer_env,
        )
        (image_id,) = state.jobs.images(job)
        # the finalizer, early: sent by hand while the config blob cannot be done
        app = make_app(queue)
        app.send_task("ferry.finalize_image", args=[job, image_id], queue="ferry.meta")
        wait_for(
            "the early finalizer to run and wait",
            lambda: "early" in workers.logs() and "blob(s) not done" in workers.logs(),
            timeout=30,
        )
        assert httpx.get(f"{registry2.url}/v2/{unique_repo}/manifests/v1").status_code == 404
        log = registry2.access_log(since=mark)
        assert not [e for e in log if e.method == "PUT" and "/manifests/" in e.path]
        assert state.jobs.image(job, image_id).status != "done"
    finally:
        lock.release()
    assert job_wait(job, queue, producer_env, workers) == 0, workers.logs()
    assert_copied(registry2, unique_repo, "v1", img)
    wait_idle(queue)
    # the manifest was written once everything existed (the early finalizer and the chord's may both write it:
    # a PUT of the same bytes is idempotent)
    log = registry2.access_log(since=mark)
    puts = [e for e in log if e.method == "PUT" and "/manifests/" in e.path]
    assert 1 <= len(puts) <= 2


# --------------------------------------------------------------------------------------------------------------------
# a worker dies mid-transfer


def test_sigkilled_worker_task_is_redone_by_the_other(
    workers: Workers,
    registry: RegistryServer,
    registry_factory: Callable[..., RegistryServer],
    queue: str,
    producer_env: dict[str, str],
    state: SharedState,
    big_image: tuple[str, Image],
    tmp_path: Path,
) -> None:
    # a destination of its own: an earlier test (a cancel that may still finish the big blob) can leave it in
    # the shared registry2, and then this copy would mount it instead of uploading it
    registry2 = registry_factory()
    src_repo, img = big_image
    dest_repo = f"test/dist-kill-{uuid.uuid4().hex[:8]}"
    big = str(img.layers[0].digest)
    mark = registry2.log_mark()
    job = enqueue_copy(
        f"docker://{registry.host}/{src_repo}:v1", f"docker://{registry2.host}/{dest_repo}:v1", queue, producer_env
    )

    def first_patch() -> bool:
        return any(
            e.method == "PATCH" and e.path.startswith(f"/v2/{dest_repo}/blobs/uploads/") and e.status == 202
            for e in registry2.access_log(since=mark)
        )

    wait_for(
        "a PATCH of the big blob at the destination",
        first_patch,
        timeout=60.0,
        interval=0.02,
        detail=lambda: f"blobs: {blob_records(state, job)}\nlog: {registry2.requests(since=mark)}\n{workers.logs()}",
    )
    rec = blob_record(state, job, big)
    assert rec["status"] == "running" and rec["attempts"] == 1
    victim = workers.by_name(rec["worker"])
    victim.kill()
    (survivor,) = workers.names - {victim.name}
    # it died in the middle of the transfer: the blob is not at the destination
    assert httpx.head(f"{registry2.url}/v2/{dest_repo}/blobs/{big}").status_code == 404

    # after the visibility timeout the other worker gets the task, waits out the dead worker's lock, redoes it;
    # soon after: the workers look for abandoned tasks several times per visibility timeout (kombu's default
    # sweep is every 100 s)
    assert job_wait(job, queue, producer_env, workers, timeout=REDELIVERY_DEADLINE) == 0, workers.logs()
    status = job_status(job, queue, producer_env)
    assert status["state"] == "done" and status["images_done"] == 1
    rec = blob_record(state, job, big)
    assert rec["status"] == "done" and rec["action"] == "transferred"
    assert rec["attempts"] == 2 and rec["worker"] == survivor

    assert_copied(registry2, dest_repo, "v1", img)
    # skopeo copies it out, verifying every blob's digest
    skopeo("copy", "--src-tls-verify=false", f"docker://{registry2.host}/{dest_repo}:v1", f"oci:{tmp_path / 'out'}:v1")
    log = registry2.access_log(since=mark)
    assert len(uploads_of(log, big)) == 1


# --------------------------------------------------------------------------------------------------------------------
# promotion: the policy is checked while planning, workers sign with their own key file


def test_queued_copy_checks_policy_and_workers_sign_with_their_own_key(
    workers: Workers, registry: RegistryServer, queue: str, producer_env: dict[str, str], dist_dir: Path
) -> None:
    token = uuid.uuid4().hex[:8]
    passphrase = f"pass-{token}"
    pass_file = dist_dir / f"passphrase-file-{token}"
    pass_file.write_text(passphrase + "\n")
    prefix = dist_dir / f"key-{token}"
    ferry(
        "generate-sigstore-key", "--output-prefix", str(prefix), "--passphrase-file", str(pass_file),
        env=producer_env,
    )  # fmt: skip
    img = build_image(f"dist-sign-{token}", layers=[4096])
    repo = f"test/dist-sign-{token}"
    push_image(registry.url, repo, "v1", img)
    src, dest = f"docker://{registry.host}/{repo}:v1", f"docker://{registry.host}/{repo}-signed:v1"
    sign = (
        "--sign-by-sigstore-private-key",
        f"{prefix}.private",
        "--sign-passphrase-file",
        str(pass_file),
    )
    proc = ferry(
        "--insecure-policy", "copy", *INSECURE, "--queue", queue, "--wait", *sign, src, dest,
        env=producer_env, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}\n{workers.logs()}"
    sig_tag = f"sha256-{img.digest.hex}.sig"
    raw, _ = fetch_manifest(registry.url, f"{repo}-signed", sig_tag)
    assert [layer["mediaType"] for layer in json.loads(raw)["layers"]] == [
        "application/vnd.dev.cosign.simplesigning.v1+json"
    ]

    # the same copy again, now up to date: its finalizer only signs (for another identity), and reports it up to date
    again = ferry(
        "--insecure-policy", "copy", *INSECURE, "--queue", queue, "--wait", *sign,
        "--sign-identity", f"{registry.host}/{repo}-prod:v1", src, dest, env=producer_env, check=False,
    )  # fmt: skip
    assert again.returncode == 0, f"{again.stdout}\n{again.stderr}\n{workers.logs()}"
    status = job_status(again.stdout.strip().splitlines()[0], queue, producer_env)
    assert [i["status"] for i in status["images"]] == ["up-to-date"], status
    raw, _ = fetch_manifest(registry.url, f"{repo}-signed", sig_tag)
    assert len(json.loads(raw)["layers"]) == 2

    # a policy trusting that key admits the signed copy and refuses the unsigned source, before any job exists
    policy = dist_dir / f"policy-{token}.json"
    requirement = {"type": "sigstoreSigned", "keyPath": f"{prefix}.pub"}
    policy.write_text(json.dumps({"default": [{"type": "reject"}], "transports": {"docker": {"": [requirement]}}}))
    ok = ferry(
        "--policy", str(policy), "copy", *INSECURE, "--queue", queue, "--wait", dest,
        f"docker://{registry.host}/{repo}-prod:v1", env=producer_env, check=False,
    )  # fmt: skip
    assert ok.returncode == 0, f"{ok.stdout}\n{ok.stderr}\n{workers.logs()}"
    refused = ferry(
        "--policy", str(policy), "copy", *INSECURE, "--queue", queue, "--wait", src,
        f"docker://{registry.host}/{repo}-refused:v1", env=producer_env, check=False,
    )  # fmt: skip
    assert refused.returncode == 1 and refused.stdout == "", refused.stdout
    assert refused.stderr.startswith(f"Error: {src} rejected by the trust policy") and "no signature exists" in (
        refused.stderr
    )
    with httpx.Client() as client:
        resp = client.get(f"{registry.url}/v2/{repo}-refused/tags/list")
    assert resp.status_code == 404

    # the job named the key's path; neither the key nor the passphrase reached Redis or the workers' logs
    wait_idle(queue)
    key_body = "".join(Path(f"{prefix}.private").read_text().splitlines()[1:-1])
    secrets = {"the passphrase": passphrase, "the encrypted private key": key_body[-80:-20]}
    assert not find_secrets(redis_dump(queue), secrets)
    assert not find_secrets({w.name: [w.log_path.read_text(errors="replace")] for w in workers.procs}, secrets)
