"""Faults a real registry cannot be made to produce, from the lying server in tests/harness/faulty.py in front of a
real registry: a flaky plain-HTTP probe, endless or looping pagination, trickling bodies."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.harness.faulty import Fault, FaultyServer, answer, endless_pages, reset, slow_reader, trickle
from tests.harness.images import build_image, push_image
from tests.harness.servers import RedisServer, RegistryServer
from tests.harness.workers import start_worker
from worker.registry import (
    ClientOptions,
    Descriptor,
    Digest,
    MediaType,
    RegistryClient,
    RegistryError,
    RequestTimeout,
    RetryPolicy,
    ServerError,
    TLSError,
    is_temporary,
)
from worker.registry import _client as client_module
from worker.state import SharedState, connect

FERRY = str(Path(sys.executable).with_name("ferry"))
FAST_RETRY = RetryPolicy(times=3, delay=0.0)
IMG = build_image("faults", layers=[900], fmt="oci")
#: the Redis database of the worker test's queue (flushed before use)
QUEUE_DB = 9


@pytest.fixture(autouse=True)
def forget_schemes() -> Iterator[None]:
    """Each test probes afresh (the learnt schemes are per process)."""
    client_module._SCHEMES.clear()
    yield
    client_module._SCHEMES.clear()


def insecure_client(server: FaultyServer, **options: Any) -> RegistryClient:
    options.setdefault("retry", FAST_RETRY)
    return RegistryClient(server.host, options=ClientOptions(tls_verify=False, **options))


def ferry(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([FERRY, *args], capture_output=True, text=True, timeout=timeout)


def probes(server: FaultyServer) -> int:
    return server.log.count(("GET", "/v2/"))


# --------------------------------------------------------------------------------------------------------------------
# the plain-HTTP probe of --tls-verify=false


@pytest.mark.parametrize("fault", [answer(503), answer(429, "TOOMANYREQUESTS"), reset()], ids=["503", "429", "reset"])
def test_flaky_plain_http_probe_is_retried(
    faulty: FaultyServer, registry: RegistryServer, unique_repo: str, fault: Any
) -> None:
    push_image(registry.url, unique_repo, "v1", IMG)
    faulty.add(Fault(r"^/v2/$", fault, method="GET", times=2))
    client = insecure_client(faulty)
    assert client.get_manifest(unique_repo, "v1").digest == IMG.digest
    assert client.base_url == f"http://{faulty.host}"
    assert probes(faulty) == 3  # two faults, then the answer


def test_lasting_503_on_probe_is_temporary_not_tls(faulty: FaultyServer, unique_repo: str) -> None:
    faulty.add(Fault(r"^/v2/$", answer(503), method="GET", times=None))
    with pytest.raises(ServerError, match=r"over plain HTTP.*HTTP 503") as info:
        insecure_client(faulty, retry=RetryPolicy(times=1, delay=0.0)).get_manifest(unique_repo, "v1")
    assert not isinstance(info.value, TLSError)
    assert probes(faulty) == 2


def test_not_a_registry_keeps_the_tls_error(faulty: FaultyServer, unique_repo: str) -> None:
    """A plain-HTTP answer that is neither a registry's nor temporary (a 400) is not a registry: the TLS error."""
    faulty.add(Fault(r"^/v2/$", answer(400, "BAD"), method="GET", times=None))
    with pytest.raises(TLSError):
        insecure_client(faulty).get_manifest(unique_repo, "v1")
    assert probes(faulty) == 1  # a 400 is not retried


def test_scheme_learnt_once_per_host(faulty: FaultyServer, registry: RegistryServer, unique_repo: str) -> None:
    push_image(registry.url, unique_repo, "v1", IMG)
    for _ in range(3):
        with insecure_client(faulty) as client:
            assert client.get_manifest(unique_repo, "v1").digest == IMG.digest
    assert probes(faulty) == 1


def test_cli_copy_survives_a_flaky_probe(
    faulty: FaultyServer, registry: RegistryServer, unique_repo: str, tmp_path: Path
) -> None:
    push_image(registry.url, unique_repo, "v1", IMG)
    faulty.add(Fault(r"^/v2/$", answer(503), method="GET", times=1))
    out = ferry("copy", "--src-tls-verify=false", "--retry-delay=0s", f"docker://{faulty.host}/{unique_repo}:v1",
                f"oci:{tmp_path / 'layout'}:v1")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert probes(faulty) == 2


# --------------------------------------------------------------------------------------------------------------------
# pagination that never ends


@pytest.mark.parametrize("repeat", [False, True], ids=["endless", "repeated"])
def test_tag_pagination_is_bounded(
    faulty: FaultyServer, registry: RegistryServer, unique_repo: str, repeat: bool
) -> None:
    push_image(registry.url, unique_repo, "v1", IMG)
    faulty.add(Fault(r"/tags/list", endless_pages(repeat=repeat), times=None))
    client = insecure_client(faulty, max_pages=20)
    expected = "links back to a page it already sent" if repeat else "more than 20 pages"
    with pytest.raises(RegistryError, match=expected):
        client.list_tags(unique_repo)
    pages = sum(1 for _method, path in faulty.log if "/tags/list" in path)
    assert pages == (1 if repeat else 20)


@pytest.mark.parametrize("repeat", [False, True], ids=["endless", "repeated"])
def test_catalog_pagination_is_bounded(faulty: FaultyServer, repeat: bool) -> None:
    faulty.add(Fault(r"/_catalog", endless_pages(repeat=repeat), times=None))
    client = insecure_client(faulty, max_pages=20)
    with pytest.raises(RegistryError, match="already sent" if repeat else "more than 20 pages"):
        client.catalog(page_size=1)


def test_cli_list_tags_refuses_a_looping_registry(
    faulty: FaultyServer, registry: RegistryServer, unique_repo: str
) -> None:
    push_image(registry.url, unique_repo, "v1", IMG)
    faulty.add(Fault(r"/tags/list", endless_pages(repeat=True), times=None))
    out = ferry("list-tags", "--tls-verify=false", f"docker://{faulty.host}/{unique_repo}")
    assert out.returncode == 1
    assert out.stderr.startswith("Error: ") and "already sent" in out.stderr, out.stderr
    assert len(out.stderr.splitlines()) == 1


# --------------------------------------------------------------------------------------------------------------------
# time bounds: a minimum transfer rate, --command-timeout

SLOW = {"FERRY_MIN_RATE": "200", "FERRY_STALL_WINDOW": "1"}  # a 1-byte trickle is far below 200 bytes/s


def ferry_env(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [FERRY, *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, **env},
        stdin=subprocess.DEVNULL,
    )  # fmt: skip


@pytest.mark.timeout(60)
def test_trickled_blob_is_a_temporary_error_then_a_clear_one(
    faulty: FaultyServer, registry: RegistryServer, unique_repo: str
) -> None:
    push_image(registry.url, unique_repo, "v1", IMG)
    layer = IMG.layers[0].digest
    faulty.add(Fault(rf"/blobs/{layer}", trickle(0.2), method="GET", times=None))
    client = insecure_client(faulty, retry=RetryPolicy(times=2, delay=0.0), min_rate=200, stall_window=1)
    with (
        pytest.raises(RequestTimeout, match=r"too slow: download stalled: \d+ bytes in \d+ s") as info,
        client.open_blob(unique_repo, layer) as chunks,
    ):
        for _chunk in chunks:
            pass
    assert is_temporary(info.value)
    gets = [p for m, p in faulty.log if m == "GET" and str(layer) in p]
    assert len(gets) == 3  # the first try and two resumes, each given up after a window


@pytest.mark.timeout(60)
def test_trickled_manifest_times_out(faulty: FaultyServer, registry: RegistryServer, unique_repo: str) -> None:
    push_image(registry.url, unique_repo, "v1", IMG)
    faulty.add(Fault(r"/manifests/v1", trickle(0.2), method="GET", times=None))
    client = insecure_client(faulty, retry=RetryPolicy(times=1, delay=0.0), min_rate=200, stall_window=1)
    with pytest.raises(RequestTimeout, match="too slow"):
        client.get_manifest(unique_repo, "v1")


def test_a_fast_answer_is_never_judged(faulty: FaultyServer, registry: RegistryServer, unique_repo: str) -> None:
    """A body that arrives within the window passes, however small the rate limit makes it look."""
    push_image(registry.url, unique_repo, "v1", IMG)
    client = insecure_client(faulty, min_rate=10**9, stall_window=5)
    assert client.get_manifest(unique_repo, "v1").digest == IMG.digest
    assert len(client.read_blob(unique_repo, IMG.config_digest)) > 0


@pytest.mark.timeout(90)
def test_cli_copy_from_a_trickling_registry_fails_cleanly(
    faulty: FaultyServer, registry: RegistryServer, unique_repo: str, tmp_path: Path
) -> None:
    push_image(registry.url, unique_repo, "v1", IMG)
    faulty.add(Fault(rf"/blobs/{IMG.layers[0].digest}", trickle(0.2), method="GET", times=None))
    layout = tmp_path / "layout"
    out = ferry_env("copy", "--src-tls-verify=false", "--retry-times=1", "--retry-delay=0s",
                    f"docker://{faulty.host}/{unique_repo}:v1", f"oci:{layout}:v1", env=SLOW)  # fmt: skip
    assert out.returncode == 1, out.stderr
    assert "Error: " in out.stderr and "too slow" in out.stderr, out.stderr
    index = layout / "index.json"
    assert not index.exists() or json.loads(index.read_text()).get("manifests") == [], index.read_text()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("interval", [0.3, 60.0], ids=["winds-down", "stuck-read"])
def test_command_timeout_stops_a_copy_and_writes_no_tag(
    faulty: FaultyServer, registry: RegistryServer, registry2: RegistryServer, unique_repo: str, interval: float
) -> None:
    """The rate check is off: only --command-timeout ends the copy. A transfer that notices the cancel winds
    down; one stuck in a read is left behind after the grace period. Either way: no tag, one error line."""
    push_image(registry.url, unique_repo, "v1", IMG)
    faulty.add(Fault(rf"/blobs/{IMG.layers[0].digest}", trickle(interval), method="GET", times=None))
    env = {"FERRY_MIN_RATE": "0", "FERRY_TIMEOUT_GRACE": "1"}
    out = ferry_env("--command-timeout", "2s", "copy", "--src-tls-verify=false", "--dest-tls-verify=false",
                    f"docker://{faulty.host}/{unique_repo}:v1", f"docker://{registry2.host}/{unique_repo}:v1",
                    env=env)  # fmt: skip
    assert out.returncode == 1, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, out.stderr
    assert errors[0].startswith("Error: command timed out after 2s (--command-timeout)"), out.stderr
    assert httpx.get(f"{registry2.url}/v2/{unique_repo}/manifests/v1").status_code == 404


@pytest.mark.timeout(60)
def test_command_timeout_bounds_a_read_verb(faulty: FaultyServer, registry: RegistryServer, unique_repo: str) -> None:
    push_image(registry.url, unique_repo, "v1", IMG)
    faulty.add(Fault(r"/tags/list", trickle(0.5), times=None))
    out = ferry_env("--command-timeout", "1s", "list-tags", "--tls-verify=false",
                    f"docker://{faulty.host}/{unique_repo}", env={"FERRY_MIN_RATE": "0"})  # fmt: skip
    assert out.returncode == 1
    assert out.stderr == "Error: command timed out after 1s (--command-timeout)\n"


def test_command_timeout_needs_a_duration() -> None:
    out = ferry("--command-timeout", "5x", "list-tags", "docker://127.0.0.1:1/x")
    assert out.returncode == 1
    assert "invalid duration '5x'" in out.stderr


@pytest.mark.timeout(150)
def test_worker_transfer_from_a_trickling_registry_ends_and_frees_its_lock(
    faulty: FaultyServer,
    registry: RegistryServer,
    registry2: RegistryServer,
    redis_server: RedisServer,
    unique_repo: str,
    tmp_path: Path,
) -> None:
    """On a worker the rate check ends the stalled transfer (a temporary failure, retried later), so its heartbeat
    stops renewing the in-flight lock; once the job is cancelled nothing holds the lock."""
    queue = redis_server.url_for(QUEUE_DB)
    redis.Redis.from_url(queue).flushdb()
    push_image(registry.url, unique_repo, "v1", IMG)
    layer = str(IMG.layers[0].digest)
    faulty.add(Fault(rf"/blobs/{layer}", trickle(0.3), method="GET", times=None))
    env = {**SLOW, "FERRY_LOCK_TTL": "3", "REGISTRY_AUTH_FILE": str(tmp_path / "none.json")}
    worker = start_worker(queue, "stall@%h", tmp_path / "workers", concurrency=1, env=env)
    state = SharedState(connect(queue))
    try:
        env_producer = {"FERRY_QUEUE": queue, "REGISTRY_AUTH_FILE": str(tmp_path / "none.json")}
        out = ferry_env("copy", "--src-tls-verify=false", "--dest-tls-verify=false", "--retry-times=0",
                        f"docker://{faulty.host}/{unique_repo}:v1", f"docker://{registry2.host}/{unique_repo}:v1",
                        env=env_producer)  # fmt: skip
        assert out.returncode == 0, out.stderr
        job = out.stdout.strip()

        def stalled() -> bool:
            blobs = state.jobs.blobs(job).values()
            return any("too slow" in b.state.error for b in blobs if b.digest == layer)

        deadline = time.monotonic() + 60
        while not stalled():
            assert time.monotonic() < deadline, f"{state.jobs.blobs(job)}\n{worker.log()[-3000:]}"
            time.sleep(0.1)
        assert ferry_env("job", "cancel", job, env=env_producer).returncode == 0
        store = f"docker://{registry2.host}"
        while state.locks.ttl(store, layer) > 0:
            assert time.monotonic() < deadline, f"the lock is still held\n{worker.log()[-3000:]}"
            time.sleep(0.1)
        assert httpx.get(f"{registry2.url}/v2/{unique_repo}/manifests/v1").status_code == 404
    finally:
        state.r.close()
        worker.stop(grace=5)


@pytest.mark.timeout(60)
def test_upload_to_a_destination_that_cannot_keep_up_times_out(faulty: FaultyServer, unique_repo: str) -> None:
    """The request side too: a destination that reads a streamed upload at a crawl fails it as a timeout."""
    data = os.urandom(16 << 20)  # more than the loopback socket buffers hold
    desc = Descriptor(MediaType.OCI_LAYER, Digest.of(data), len(data))
    faulty.add(Fault(r"/blobs/uploads/", slow_reader(0.2, 16 * 1024), method="PATCH", times=None))
    client = insecure_client(faulty, retry=RetryPolicy(times=0), min_rate=1 << 20, stall_window=1, chunk_size=len(data))
    with pytest.raises(RequestTimeout, match="too slow: upload stalled"):
        client.upload_blob(unique_repo, desc, (data[i : i + (1 << 20)] for i in range(0, len(data), 1 << 20)))
    assert not client.blob_exists(unique_repo, desc.digest)
