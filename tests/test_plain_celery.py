"""A plain ``celery -A worker.celery_app worker`` (no ``-Q``, no ``ferry worker``) runs Ferry jobs: the app declares
both queues, so blob transfers and finalizers are both consumed."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import redis

from tests.harness.images import build_image, push_image
from tests.harness.servers import RedisServer, RegistryServer

ROOT = Path(__file__).resolve().parent.parent
CELERY = str(ROOT / ".venv" / "bin" / "celery") if (ROOT / ".venv" / "bin" / "celery").exists() else "celery"
FERRY = str(ROOT / ".venv" / "bin" / "ferry") if (ROOT / ".venv" / "bin" / "ferry").exists() else "ferry"


def test_plain_celery_worker_consumes_both_queues(
    redis_server: RedisServer,
    registry: RegistryServer,
    registry2: RegistryServer,
    unique_repo: str,
    tmp_path: Path,
) -> None:
    queue = redis_server.url.rsplit("/", 1)[0] + "/11"
    redis.Redis.from_url(queue).flushdb()
    env = {**os.environ, "FERRY_QUEUE": queue, "FERRY_CACHE_DIR": str(tmp_path / "cache")}
    log = tmp_path / "celery.log"
    with open(log, "wb") as out:
        worker = subprocess.Popen(
            [CELERY, "-A", "worker.celery_app", "worker", "--concurrency=2", "--loglevel=INFO", "-n", "plain@%h"],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=ROOT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        while " ready." not in log.read_text(errors="replace"):
            if worker.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"celery worker did not start:\n{log.read_text(errors='replace')}")
            time.sleep(0.1)
        banner = log.read_text(errors="replace")
        assert "ferry.blobs" in banner and "ferry.meta" in banner

        img = build_image(f"plain-celery/{unique_repo}", layers=[3000])
        push_image(registry.url, unique_repo, "v1", img)
        proc = subprocess.run(
            [
                FERRY, "copy", "--queue", queue, "--wait", "--src-tls-verify=false", "--dest-tls-verify=false",
                f"docker://{registry.host}/{unique_repo}:v1", f"docker://{registry2.host}/{unique_repo}:v1",
            ],
            capture_output=True, text=True, timeout=120, env=env, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}\n{log.read_text(errors='replace')}"
        head = registry2.client().head(f"/v2/{unique_repo}/manifests/v1", headers={"Accept": img.media_type})
        assert head.headers.get("docker-content-digest") == str(img.digest)
    finally:
        try:
            os.killpg(worker.pid, signal.SIGTERM)
            worker.wait(15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(5)
