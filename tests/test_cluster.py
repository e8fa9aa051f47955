"""Cluster mode never gets stuck (issue #10): real ``ferry worker`` processes (threads pool) on a real Redis
that keeps its data on disk (append-only file), real registries, and a lying proxy only where a registry
cannot be made to fail.

Each test shows one way a job used to hang or lie, and that it now ends: a finalizer whose manifest PUT keeps
failing, a finalizer sent before its blobs exist, a queue nobody consumes, a producer cut while enqueueing
(SIGTERM, SIGKILL), a Redis restart in the middle of a transfer. Nothing runs in Celery's eager mode.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis

from tests.harness.faulty import Fault, answer, start_faulty
from tests.harness.images import build_image, make_stream_layer, push_image
from tests.harness.peer import skopeo
from tests.harness.servers import REDIS_BIN, RegistryServer, _free_port
from tests.harness.workers import FERRY_BIN, WorkerProcess, start_worker
from worker.state import SharedState, connect

INSECURE = ("--src-tls-verify=false", "--dest-tls-verify=false")
WORKER_ENV = {
    "FERRY_VISIBILITY_TIMEOUT": "20",
    "FERRY_LOCK_TTL": "4",
    "FERRY_FINALIZE_WAIT": "4",  # a finalizer sent early gives up after 4 s
    "FERRY_FINALIZE_BACKOFF": "0.05",  # its temporary errors are retried after 0.1, 0.2, ... s
}
#: images in the enqueue-interruption tests: enough that enqueueing them takes a while
MANY = 150

pytestmark = pytest.mark.timeout(300)


@dataclass
class PersistentRedis:
    """A ``redis-server`` with an append-only file (fsync always) in ``dir``: :meth:`restart` keeps the data."""

    dir: Path
    port: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        argv = [
            REDIS_BIN, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir), "--save", "",
            "--appendonly", "yes", "--appendfsync", "always", "--protected-mode", "no", "--daemonize", "no",
        ]  # fmt: skip
        log = open(self.dir / "redis.log", "ab")  # noqa: SIM115 - the server's for its lifetime
        self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + 15
        while True:
            try:
                redis.Redis(port=self.port, socket_timeout=1).ping()
                return
            except redis.exceptions.RedisError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()  # SIGTERM: redis-server flushes the append-only file and exits
            self.process.wait(15)
            self.process = None

    def restart(self, down: float = 1.0) -> None:
        self.stop()
        time.sleep(down)
        self.start()


@pytest.fixture(scope="module")
def pred(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PersistentRedis]:
    server = PersistentRedis(tmp_path_factory.mktemp("redis-aof"), _free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def cluster(pred: PersistentRedis, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[WorkerProcess]]:
    log_dir = tmp_path_factory.mktemp("cluster-workers")
    procs = [start_worker(pred.url, f"c{n}@%h", log_dir, concurrency=2, env=WORKER_ENV, wait=False) for n in (1, 2)]
    try:
        for w in procs:
            w.wait_ready()
        yield procs
    finally:
        for w in procs:
            w.stop(grace=5)


@pytest.fixture
def state(pred: PersistentRedis) -> Iterator[SharedState]:
    s = SharedState(connect(pred.url))
    yield s
    s.close()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    home = tmp_path_factory.mktemp("producer")
    (home / "auth.json").write_text("{}")
    out = {k: v for k, v in os.environ.items() if k not in ("FERRY_QUEUE", "DOCKER_CONFIG")}
    out.update({"REGISTRY_AUTH_FILE": str(home / "auth.json"), "FERRY_CACHE_DIR": str(home / "cache")})
    return out


def logs(workers: list[WorkerProcess]) -> str:
    return "\n".join(f"===== {w.name} =====\n{w.log()[-5000:]}" for w in workers)


def ferry(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [FERRY_BIN, *args], capture_output=True, text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL
    )


def summary(job: str, url: str, env: dict[str, str]) -> dict[str, object]:
    out = ferry("job", "status", job, "--json", "--queue", url, env=env)
    assert out.returncode == 0, out.stderr
    result: dict[str, object] = json.loads(out.stdout)
    return result


def statuses(s: dict[str, object]) -> list[str]:
    images = s["images"]
    assert isinstance(images, list)
    return [str(i["status"]) for i in images]


# --------------------------------------------------------------------------------------------------------------------
# the finalizer's two bounded reasons to run again


def test_finalizer_gives_up_on_a_manifest_put_that_keeps_failing(
    cluster: list[WorkerProcess], pred: PersistentRedis, registry: RegistryServer, registry2: RegistryServer,
    env: dict[str, str], unique_repo: str,
) -> None:  # fmt: skip
    """Every manifest PUT answers 503: the finalizer retries a bounded number of times, then the image ends
    ``failed`` with the registry's error and the job ends (it used to stay ``running`` for ever)."""
    from worker.tasks import FINALIZE_RETRIES

    img = build_image(f"cluster-503/{unique_repo}", layers=[2048])
    push_image(registry.url, unique_repo, "v1", img)
    with start_faulty(registry2.url, Fault(r"/manifests/", answer(503), method="PUT", times=None)) as dest:
        out = ferry(
            "copy", *INSECURE, "--queue", pred.url, "--wait", "--retry-times=0",
            f"docker://{registry.host}/{unique_repo}:v1", f"docker://{dest.host}/{unique_repo}:v1", env=env,
        )  # fmt: skip
        puts = [p for m, p in dest.log if m == "PUT" and "/manifests/" in p]
    assert out.returncode == 1, f"{out.stdout}\n{out.stderr}\n{logs(cluster)}"
    job = out.stdout.splitlines()[0]
    s = summary(job, pred.url, env)
    assert s["state"] == "failed" and statuses(s) == ["failed"]
    assert "503" in out.stderr and f"Error: docker://{registry.host}/{unique_repo}:v1 -> " in out.stderr
    # the first attempt and FINALIZE_RETRIES more, one PUT each (--retry-times=0), then no more
    assert len(puts) == 1 + FINALIZE_RETRIES
    assert httpx.get(f"{registry2.url}/v2/{unique_repo}/manifests/v1").status_code == 404


def test_early_finalizer_waits_a_bounded_time(
    cluster: list[WorkerProcess], pred: PersistentRedis, registry: RegistryServer, registry2: RegistryServer,
    env: dict[str, str], state: SharedState, unique_repo: str,
) -> None:  # fmt: skip
    """A finalizer sent while a blob of its image cannot be copied (its in-flight lock is held elsewhere)
    writes nothing, waits FERRY_FINALIZE_WAIT seconds, then fails the image with the reason."""
    from worker.celery_app import make_app

    img = build_image(f"cluster-early/{unique_repo}", layers=[4096])
    push_image(registry.url, unique_repo, "v1", img)
    lock = state.locks.acquire(f"docker://{registry2.host}", str(img.config_digest), ttl=120)
    assert lock is not None
    try:
        out = ferry(
            "copy", *INSECURE, "--queue", pred.url,
            f"docker://{registry.host}/{unique_repo}:v1", f"docker://{registry2.host}/{unique_repo}:v1", env=env,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        job = out.stdout.strip()
        make_app(pred.url).send_task("ferry.finalize_image", args=[job, "i1"], queue="ferry.meta")
        waited = ferry("job", "wait", job, "--queue", pred.url, "--timeout", "60", env=env)
        assert waited.returncode == 1, f"{waited.stdout}\n{waited.stderr}\n{logs(cluster)}"
        s = summary(job, pred.url, env)
        assert s["state"] == "failed"
        (image,) = s["images"]  # type: ignore[misc]
        assert "gave up after waiting" in image["error"] and "1 blob(s)" in image["error"], image
        assert httpx.get(f"{registry2.url}/v2/{unique_repo}/manifests/v1").status_code == 404
    finally:
        lock.release()


# --------------------------------------------------------------------------------------------------------------------
# nobody consumes the queue; a job that does not move


def test_no_worker_is_reported_and_job_wait_times_out(
    pred: PersistentRedis, registry: RegistryServer, registry2: RegistryServer, env: dict[str, str], unique_repo: str
) -> None:
    """On a queue no worker consumes (another Redis DB), the producer and ``job wait`` say so, ``job wait``
    reports that the job does not progress, and ``--timeout`` ends the wait with exit 124."""
    url = f"redis://127.0.0.1:{pred.port}/11"
    redis.Redis.from_url(url).flushdb()
    img = build_image(f"cluster-idle/{unique_repo}", layers=[1024])
    push_image(registry.url, unique_repo, "v1", img)
    try:
        out = ferry(
            "copy", *INSECURE, "--queue", url,
            f"docker://{registry.host}/{unique_repo}:v1", f"docker://{registry2.host}/{unique_repo}:v1", env=env,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert "Warning: no worker consumes ferry.blobs" in out.stderr
        job = out.stdout.strip()
        waited = ferry("job", "wait", job, "--queue", url, "--timeout", "6", env={**env, "FERRY_STALL_AFTER": "1"})
        assert waited.returncode == 124, waited.stderr
        assert "Warning: no worker consumes ferry.blobs" in waited.stderr
        assert "Warning: no worker consumes ferry.meta" in waited.stderr
        assert f"job {job} has made no progress for" in waited.stderr
        assert f"Error: job {job} did not end within 6s" in waited.stderr
        status = ferry("job", "status", job, "--queue", url, env={**env, "FERRY_STALL_AFTER": "1"})
        assert "stalled: job" in status.stdout
    finally:
        redis.Redis.from_url(url).flushdb()


# --------------------------------------------------------------------------------------------------------------------
# the producer cut while enqueueing

SUBMIT = """
import json, sys
from producer.cli import build_parser
from producer.copy_cmd import copy_options, engine_context
from producer.distributed import submit_plan
from producer.options import normalize_argv
from worker.engine.copy import CopyJob, build_plan
from worker.engine.transports import ImageName

pairs, flags = json.loads(sys.argv[1]), json.loads(sys.argv[2])
args = build_parser().parse_args(normalize_argv(["copy", *flags, pairs[0][0], pairs[0][1]]))
ctx = engine_context(args)
try:
    plan, _ = build_plan(ctx, [CopyJob(ImageName.parse(s), ImageName.parse(d)) for s, d in pairs], copy_options(args))
finally:
    ctx.close()
print("planned", flush=True)
sys.exit(submit_plan(args, plan, args.queue, kind="copy"))
"""


def cut_producer(pairs: list[tuple[str, str]], url: str, env: dict[str, str], sig: int) -> tuple[str, str, int]:
    """Submit a job of ``pairs``, send ``sig`` to the producer as soon as it has printed the job id; returns
    the job id, the producer's stderr and its exit status."""
    proc = subprocess.Popen(
        [sys.executable, "-c", SUBMIT, json.dumps(pairs), json.dumps([*INSECURE, "--queue", url])],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
        env={**env, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    try:
        assert proc.stdout.readline().strip() == "planned", proc.stderr.read()
        job = proc.stdout.readline().strip()
        proc.send_signal(sig)
        assert len(job) == 12, proc.stderr.read()
        err = proc.stderr.read()
        return job, err, proc.wait(30)
    finally:
        proc.kill()
        proc.wait()


def test_producer_cut_while_enqueueing_then_retry_finishes_the_job(
    cluster: list[WorkerProcess], pred: PersistentRedis, registry: RegistryServer, registry2: RegistryServer,
    env: dict[str, str], state: SharedState, unique_repo: str,
) -> None:  # fmt: skip
    img = build_image(f"cluster-cut/{unique_repo}", layers=[1536])
    push_image(registry.url, unique_repo, "v1", img)
    src = f"docker://{registry.host}/{unique_repo}:v1"

    # -- SIGTERM: it stops between two images, says what was left, exits 130; the job still ends (cancelled)
    dest = f"{registry2.host}/{unique_repo}-term"
    job, err, code = cut_producer([(src, f"docker://{dest}:t{i}") for i in range(MANY)], pred.url, env, signal.SIGTERM)
    assert code == 130, err
    line = next(x for x in err.splitlines() if x.startswith("Interrupted while enqueueing"))
    sent, left = (int(w) for w in line.replace(",", "").split() if w.isdigit())
    assert sent + left == MANY and left > 0, line
    assert f"`ferry job retry {job}`" in line
    images = state.jobs.images(job).values()
    assert sum(1 for i in images if i.enqueued) == sent  # all or nothing per image
    waited = ferry("job", "wait", job, "--queue", pred.url, "--timeout", "120", env=env)
    assert waited.returncode == 130, f"{waited.stderr}\n{logs(cluster)}"  # cancelled is its own outcome
    assert "Failed " not in waited.stdout
    assert waited.stdout.count("Cancelled ") == left and "not enqueued" in waited.stdout
    assert f", {left} cancelled" in waited.stderr and " 0 failed" in waited.stderr
    retried = ferry("job", "retry", job, "--wait", "--queue", pred.url, env=env)
    assert retried.returncode == 0, f"{retried.stdout}\n{retried.stderr}\n{logs(cluster)}"
    assert f"re-enqueued {left} image(s)" in retried.stdout
    assert set(statuses(summary(job, pred.url, env))) == {"done"}
    tags = httpx.get(f"http://{dest.split('/', 1)[0]}/v2/{dest.split('/', 1)[1]}/tags/list").json()["tags"]
    assert len(tags) == MANY

    # -- SIGKILL: nothing is said and the job stays queued or running; retry sends every image not enqueued
    dest = f"{registry2.host}/{unique_repo}-kill"
    job, err, code = cut_producer([(src, f"docker://{dest}:t{i}") for i in range(MANY)], pred.url, env, signal.SIGKILL)
    assert code == -signal.SIGKILL
    unsent = [i for i in state.jobs.images(job).values() if not i.enqueued]
    assert unsent, "the producer was killed before it could enqueue everything"
    assert not state.jobs.job(job).state.ended
    retried = ferry("job", "retry", job, "--wait", "--queue", pred.url, env=env)
    assert retried.returncode == 0, f"{retried.stdout}\n{retried.stderr}\n{logs(cluster)}"
    assert set(statuses(summary(job, pred.url, env))) == {"done"}
    tags = httpx.get(f"http://{dest.split('/', 1)[0]}/v2/{dest.split('/', 1)[1]}/tags/list").json()["tags"]
    assert len(tags) == MANY


# --------------------------------------------------------------------------------------------------------------------
# the requests-per-second budget


def test_rps_budget_is_a_sliding_window(state: SharedState) -> None:
    """5 requests/s: after 5 requests at t=10.9, one at t=11.05 (a new second: a fixed per-second counter
    would admit it, a 2x burst) waits until the oldest leaves the window."""
    host = f"rps-{uuid.uuid4().hex[:8]}.example"
    hosts = state.hosts
    assert all(hosts.take_request(host, 5, now=10.9 + i * 0.001) == 0 for i in range(5))
    wait = hosts.take_request(host, 5, now=11.05)
    assert 0.8 < wait <= 0.86
    assert hosts.take_request(host, 5, now=11.5) > 0
    assert hosts.take_request(host, 5, now=11.91) == 0  # the first one has left the window
    # under one request per second: one request in every 1/rps seconds
    slow = f"slow-{uuid.uuid4().hex[:8]}.example"
    assert hosts.take_request(slow, 0.5, now=100.0) == 0
    assert 1.89 < hosts.take_request(slow, 0.5, now=100.1) <= 1.901
    assert hosts.take_request(slow, 0.5, now=102.01) == 0


# --------------------------------------------------------------------------------------------------------------------
# Redis restarts in the middle of a transfer


def test_workers_ride_out_a_redis_restart(
    cluster: list[WorkerProcess], pred: PersistentRedis, registry: RegistryServer, registry2: RegistryServer,
    env: dict[str, str], state: SharedState, unique_repo: str, tmp_path: Path,
) -> None:  # fmt: skip
    """Redis (with its append-only file) restarts while a worker streams a large blob: the workers reconnect
    (or exit non-zero, for a service manager to restart them), and the job finishes."""
    layer = make_stream_layer(f"cluster-restart-{unique_repo}", 120 << 20)
    img = build_image(f"cluster-restart/{unique_repo}", layers=[layer, 4096])
    push_image(registry.url, unique_repo, "v1", img)
    out = ferry(
        "copy", *INSECURE, "--queue", pred.url,
        f"docker://{registry.host}/{unique_repo}:v1", f"docker://{registry2.host}/{unique_repo}:v1", env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    job = out.stdout.strip()
    big = str(layer.digest)
    deadline = time.monotonic() + 60
    while not any(
        b.digest == big and b.state.status == "running" for b in state.jobs.blobs(job).values()
    ):  # fmt: skip
        assert time.monotonic() < deadline, logs(cluster)
        time.sleep(0.05)
    state.close()
    pred.restart(down=2.0)
    waited = ferry("job", "wait", job, "--queue", pred.url, "--timeout", "150", env=env, timeout=200)
    text = logs(cluster)
    assert waited.returncode == 0, f"{waited.stdout}\n{waited.stderr}\n{text}"
    # every worker reconnected and carried on
    assert "Connection to broker lost" in text and "Unrecoverable error" not in text, text
    assert all(w.alive for w in cluster), text
    raw = skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{registry2.host}/{unique_repo}:v1").stdout
    assert raw.encode() == img.manifest
