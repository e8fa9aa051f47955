"""Flower watches the workers: every Ferry task shows with a readable name and arguments, and /metrics serves
Prometheus text. Real Redis, a real ``ferry worker`` and a real Flower process."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.harness.images import build_image, push_image
from tests.harness.servers import RedisServer, RegistryServer
from tests.harness.workers import WorkerProcess, start_worker

VENV_BIN = Path(__file__).resolve().parent.parent / ".venv" / "bin"
CELERY = str(VENV_BIN / "celery") if (VENV_BIN / "celery").exists() else "celery"
FERRY = str(VENV_BIN / "ferry") if (VENV_BIN / "ferry").exists() else "ferry"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def queue(redis_server: RedisServer) -> str:
    url = redis_server.url.rsplit("/", 1)[0] + "/9"
    import redis

    redis.Redis.from_url(url).flushdb()
    return url


@pytest.fixture(scope="module")
def flower(queue: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = _free_port()
    log = tmp_path_factory.mktemp("flower") / "flower.log"
    env = {**os.environ, "FERRY_QUEUE": queue, "FLOWER_UNAUTHENTICATED_API": "true"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [CELERY, "-A", "worker.celery_app", "flower", f"--port={port}", "--address=127.0.0.1"],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=Path(__file__).resolve().parent.parent,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(url + "/healthcheck", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                pytest.fail(f"flower did not start:\n{log.read_text()}")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def worker(queue: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    # task events are off unless asked for (ferry worker --events, or FERRY_EVENTS=1 as here): Flower needs them
    w = start_worker(
        queue, "flower-w1@%h", tmp_path_factory.mktemp("flower-workers"), concurrency=2, env={"FERRY_EVENTS": "1"}
    )
    yield w
    w.stop(grace=5)


def _tasks(flower: str) -> dict[str, Any]:
    resp = httpx.get(flower + "/api/tasks", timeout=10)
    resp.raise_for_status()
    tasks: dict[str, Any] = resp.json()
    return tasks


def test_flower_shows_ferry_tasks_with_readable_arguments_and_metrics(
    flower: str,
    worker: WorkerProcess,
    queue: str,
    registry: RegistryServer,
    registry2: RegistryServer,
    unique_repo: str,
    tmp_path: Path,
) -> None:
    img = build_image(f"flower/{unique_repo}", layers=[2048, 4096])
    push_image(registry.url, unique_repo, "v1", img)
    env = {**os.environ, "FERRY_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run(
        [
            FERRY, "copy", "--queue", queue, "--wait", "--src-tls-verify=false", "--dest-tls-verify=false",
            f"docker://{registry.host}/{unique_repo}:v1", f"docker://{registry2.host}/{unique_repo}:v1",
        ],
        capture_output=True, text=True, timeout=120, env=env, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.split()[0]

    # Flower learns of tasks from worker events: wait until it has seen this job's finalizer succeed.
    deadline = time.monotonic() + 30
    while True:
        tasks = _tasks(flower)
        mine = [t for t in tasks.values() if job in str(t.get("args", ""))]
        if any(t.get("name") == "ferry.finalize_image" and t.get("state") == "SUCCESS" for t in mine):
            break
        assert time.monotonic() < deadline, f"flower never saw job {job}'s tasks: {mine}"
        time.sleep(0.2)

    blob_tasks = [t for t in mine if t.get("name") == "ferry.copy_blob"]
    # one task per blob: two layers and the config
    assert len(blob_tasks) == 3
    layer_digests = {str(d.digest) for d in img.layer_descriptors}
    shown = " ".join(str(t.get("args")) for t in blob_tasks)
    for digest in layer_digests | {str(img.config_digest)}:
        assert digest in shown, f"{digest} not among the arguments Flower shows: {shown}"
    assert f"image={registry2.host}/{unique_repo}:v1" in shown
    assert all(t.get("state") == "SUCCESS" for t in blob_tasks)

    metrics = httpx.get(flower + "/metrics", timeout=10).text
    assert "flower_events_total" in metrics
    assert 'task="ferry.copy_blob"' in metrics
    assert 'task="ferry.finalize_image"' in metrics
