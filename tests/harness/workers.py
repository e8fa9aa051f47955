"""Real Ferry Celery workers for the distributed tests: ``ferry worker`` processes in their own process groups.

:func:`start_worker` launches ``ferry worker --queue URL --concurrency N --hostname NAME [--pool POOL]`` (by
default the threads pool: one process; with ``pool="prefork"`` one parent and N children) with its own
environment (``FERRY_QUEUE``, ``FERRY_CACHE_DIR``, and whatever the caller adds: ``FERRY_VISIBILITY_TIMEOUT``,
``FERRY_LOCK_TTL``, ``REGISTRY_AUTH_FILE``...), in a new session so that :meth:`WorkerProcess.kill` can SIGKILL
the parent and every pool child at once, like a machine that died.
:meth:`WorkerProcess.wait_ready` waits for Celery's ``<name> ready.`` log line.

Every worker is stopped by :meth:`WorkerProcess.stop`, by :func:`stop_all_workers`, at interpreter exit, and --
when started from the main thread -- its parent process gets SIGKILL from the kernel if the Python process dies.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["FERRY_BIN", "WorkerProcess", "start_worker", "stop_all_workers"]

FERRY_BIN = str(Path(sys.executable).with_name("ferry"))
READY_TIMEOUT = 30.0

_PR_SET_PDEATHSIG = 1
_prctl = ctypes.CDLL(None, use_errno=True).prctl

_lock = threading.Lock()
_live: list[WorkerProcess] = []


def _preexec_main_thread() -> None:  # pragma: no cover - runs in the child
    os.setsid()
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _preexec_other_thread() -> None:  # pragma: no cover - runs in the child
    os.setsid()


@dataclass
class WorkerProcess:
    """One running ``ferry worker``; ``name`` is its Celery node name (``--hostname``)."""

    name: str
    queue: str
    log_path: Path
    cache_dir: Path
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _log_start: int = field(default=0, repr=False)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        """This run's log (stdout and stderr of the worker and its pool children)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_start)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Wait for ``<name> ready.``: the worker consumes from its queues from then on."""
        needle = f"{self.name} ready."
        deadline = time.monotonic() + timeout
        while True:
            if needle in self.log():
                return
            if not self.alive:
                raise RuntimeError(f"worker {self.name} exited before it was ready; log:\n{self.log()[-4000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker {self.name} not ready after {timeout}s; log:\n{self.log()[-4000:]}")
            time.sleep(0.05)

    def _signal_group(self, sig: int) -> None:
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            # the worker leads its own session: its process group holds the parent and every pool child
            os.killpg(self.process.pid, sig)

    def kill(self) -> None:
        """SIGKILL the whole worker (parent and pool children) at once: no warm shutdown, no acks, no requeue."""
        if self.process is None:
            return
        self._signal_group(signal.SIGKILL)
        self.process.wait()
        self._forget()

    def stop(self, grace: float = 10.0) -> None:
        """Stop the worker: SIGTERM to the parent (Celery's warm shutdown: running tasks finish, the pool
        children exit), then SIGKILL of the whole group after ``grace`` seconds."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        # pool children (and a worker that ignored SIGTERM) go with the group
        self._signal_group(signal.SIGKILL)
        self.process.wait()
        self._forget()

    def _forget(self) -> None:
        with _lock, contextlib.suppress(ValueError):
            _live.remove(self)


def start_worker(
    queue: str,
    name: str,
    log_dir: Path,
    *,
    concurrency: int = 2,
    env: Mapping[str, str] | None = None,
    loglevel: str = "INFO",
    wait: bool = True,
    pool: str | None = None,
) -> WorkerProcess:
    """Start ``ferry worker`` on ``queue`` as Celery node ``name`` (e.g. ``"w1@%h"``: Celery expands ``%h``).

    Its blob-location cache lives in ``log_dir/<name>-cache``; ``env`` is added to the environment. With
    ``wait`` (the default) this returns once the worker is ready. The log is ``log_dir/<name>.log`` (appended
    to, so a restarted worker keeps one log; :meth:`WorkerProcess.log` shows the current run only).
    """
    import socket

    node = name.replace("%h", socket.gethostname())
    safe = node.replace("@", "_")
    log_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = log_dir / f"{safe}-cache"
    cache_dir.mkdir(exist_ok=True)
    full_env = {**os.environ, "FERRY_QUEUE": queue, "FERRY_CACHE_DIR": str(cache_dir), "PYTHONUNBUFFERED": "1"}
    full_env.update(env or {})
    log_path = log_dir / f"{safe}.log"
    start = log_path.stat().st_size if log_path.exists() else 0
    argv = [
        FERRY_BIN, "worker", "--queue", queue, "--concurrency", str(concurrency),
        "--hostname", node, "--loglevel", loglevel, *(["--pool", pool] if pool else []),
    ]  # fmt: skip
    main = threading.current_thread() is threading.main_thread()
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=full_env,
            preexec_fn=_preexec_main_thread if main else _preexec_other_thread,
        )
    worker = WorkerProcess(node, queue, log_path, cache_dir, dict(env or {}), proc, start)
    with _lock:
        _live.append(worker)
    if wait:
        try:
            worker.wait_ready()
        except BaseException:
            worker.stop(grace=1.0)
            raise
    return worker


def stop_all_workers() -> None:
    """Stop every worker this module started that is still running."""
    with _lock:
        workers = list(_live)
    for w in workers:
        with contextlib.suppress(Exception):
            w.stop(grace=2.0)


atexit.register(stop_all_workers)
