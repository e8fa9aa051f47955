"""Live progress and Prometheus counters of distributed jobs, in Redis, apart from the job records.

Workers write here while they run (a transfer's bytes as they stream, outcomes as they happen); the
producer's ``ferry job status --watch`` and the ``ferry exporter`` read it. Nothing here imports Celery,
and the copy engine does not know this module: a task hands a :class:`TransferMeter` to the engine as its
plain ``on_bytes``/``on_attempt`` callables.

Keys (all under ``ferry:telemetry:``)::

    inflight          hash  "{job}/{step}" -> JSON {job, step, digest, size, bytes, worker, source_registry,
                            destination_registry, started, updated}: one field per blob transfer running now
    job:{id}          hash  first_byte (unix time of the job's first transfer start), retried (bytes of attempts
                            started again), observed (set once its duration is counted)
    counters          hash  JSON [metric, [[label, value], ...]] -> number: the Prometheus counters and the
                            job-duration histogram, summed over every worker

Writes are few: while a transfer streams, one every ``FLUSH_SECONDS`` (2 s: its in-flight record and the byte
counter), and one when it ends (the record goes, its bytes are counted). A transfer shorter than that costs one
write (the counter), never one per chunk. A job's bytes streamed (``bytes_moved``) are those of its blobs done,
those in flight, and those of attempts that were started again (``retried``, written when that happens).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import redis

log = logging.getLogger("ferry.telemetry")

PREFIX = "ferry:telemetry:"
INFLIGHT = f"{PREFIX}inflight"
COUNTERS = f"{PREFIX}counters"
#: pause between two progress writes of a transfer that is moving bytes
FLUSH_SECONDS = 2.0
#: an in-flight record not updated for this long belongs to a worker that died: readers ignore it
STALE_SECONDS = 600.0
#: the job-duration histogram's bucket bounds (seconds)
DURATION_BUCKETS = (10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 21600.0, 86400.0)
#: the telemetry of a job lives as long as its records (``worker.state.JOB_TTL``)
JOB_TTL = 14 * 24 * 3600


class EngineHooks(Protocol):
    """What :func:`metering` sets on the engine's context (``worker.engine.steps.EngineContext``)."""

    on_bytes: Any
    on_attempt: Any


def _counter_field(metric: str, labels: dict[str, str]) -> str:
    return json.dumps([metric, sorted(labels.items())])


def count(r: redis.Redis, metric: str, amount: float = 1, **labels: str) -> None:
    """Add ``amount`` to a counter shared by every worker (``ferry_<metric>_total`` at the exporter)."""
    r.hincrbyfloat(COUNTERS, _counter_field(metric, labels), amount)


def counters(r: redis.Redis) -> Iterator[tuple[str, dict[str, str], float]]:
    """Every counter as (metric, labels, value)."""
    raw = cast(dict[str, str], r.hgetall(COUNTERS))
    for key, value in raw.items():
        metric, labels = json.loads(key)
        yield str(metric), {str(k): str(v) for k, v in labels}, float(value)


#: jobs whose first byte this process has already recorded (``first_byte`` is set once per job)
_first_byte_seen: set[str] = set()
_first_byte_lock = threading.Lock()


@dataclass
class TransferMeter:
    """Counts one blob transfer's bytes as they stream and shows them in Redis: at the start, every
    ``FLUSH_SECONDS`` while bytes come, and at the end. A new attempt (the engine restarts a failed upload from
    byte 0) starts the in-flight count again; the bytes already sent still count as moved."""

    r: redis.Redis
    job_id: str
    step_id: str
    digest: str
    size: int
    worker: str
    source_registry: str
    destination_registry: str
    #: bytes of the current attempt
    bytes: int = 0
    started: float = field(default_factory=time.time)
    attempts: int = 0
    _unflushed: int = 0
    #: the in-flight record is in Redis (written by a periodic write)
    _shown: bool = False
    _last_flush: float = field(default_factory=time.monotonic)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _io: threading.Lock = field(default_factory=threading.Lock)

    @property
    def field(self) -> str:
        return f"{self.job_id}/{self.step_id}"

    def record(self) -> dict[str, Any]:
        return {
            "job": self.job_id,
            "step": self.step_id,
            "digest": self.digest,
            "size": self.size,
            "bytes": self.bytes,
            "worker": self.worker,
            "source_registry": self.source_registry,
            "destination_registry": self.destination_registry,
            "started": self.started,
            "updated": time.time(),
        }

    def on_bytes(self, digest: str, n: int) -> None:
        """The engine's per-chunk callback: count, and write only when it is time to."""
        with self._lock:
            self.bytes += n
            self._unflushed += n
            due = time.monotonic() - self._last_flush >= FLUSH_SECONDS
        if due:
            self._try_flush()

    def on_attempt(self, digest: str) -> None:
        """A streaming attempt starts: its bytes count from 0 (the first one's start was written already)."""
        with self._lock:
            self.attempts += 1
            again = self.attempts > 1
        if again:
            self._try_flush()
            with self._lock:
                lost, self.bytes = self.bytes, 0
            try:
                if lost:
                    self.r.hincrby(f"{PREFIX}job:{self.job_id}", "retried", lost)
            except redis.RedisError:
                log.debug("progress write failed", exc_info=True)
            if self._shown:
                self._try_flush(force=True)

    def _try_flush(self, *, force: bool = False) -> None:
        """Telemetry never fails a copy: a Redis error here leaves the count to the next write."""
        try:
            self.flush(force=force)
        except redis.RedisError:
            log.debug("progress write failed", exc_info=True)

    def start(self) -> None:
        """The transfer starts: the job's first transfer if this process has not seen the job yet (nothing else:
        a transfer shows in ``inflight`` from its first periodic write on)."""
        with _first_byte_lock:
            first = self.job_id not in _first_byte_seen
            if first:
                if len(_first_byte_seen) > 10_000:
                    _first_byte_seen.clear()
                _first_byte_seen.add(self.job_id)
        with self._io:
            self._last_flush = time.monotonic()
        if first:
            job_key = f"{PREFIX}job:{self.job_id}"
            pipe = self.r.pipeline(transaction=False)
            pipe.hsetnx(job_key, "first_byte", time.time())
            pipe.expire(job_key, JOB_TTL)
            pipe.execute()

    def flush(self, *, force: bool = False, end: bool = False) -> None:
        """Write the count if bytes came since the last write (or if ``force``); one writer at a time, so the
        in-flight record never goes back. ``end``: the transfer is over, its record goes."""
        with self._io:
            with self._lock:
                if not force and not end and self._unflushed == 0:
                    return
                moved, self._unflushed = self._unflushed, 0
                self._last_flush = time.monotonic()
                record = json.dumps(self.record())
            pipe = self.r.pipeline(transaction=False)
            if end:
                if self._shown:
                    pipe.hdel(INFLIGHT, self.field)
                    self._shown = False
            else:
                pipe.hset(INFLIGHT, self.field, record)
                self._shown = True
            if moved:
                labels = {"source_registry": self.source_registry, "destination_registry": self.destination_registry}
                pipe.hincrbyfloat(COUNTERS, _counter_field("transferred_bytes", labels), moved)
            try:
                if len(pipe):
                    pipe.execute()
            except redis.RedisError:
                with self._lock:
                    self._unflushed += moved  # counted at the next write
                raise

    def close(self) -> None:
        self.flush(end=True)


@contextmanager
def metering(hooks: EngineHooks, meter: TransferMeter) -> Iterator[TransferMeter]:
    """Feed the engine's byte callbacks to ``meter`` for the duration of one transfer.

    Telemetry must never fail a copy: a Redis error while metering is left to the task's own Redis use
    to report, and the in-flight record is removed (or goes stale) either way.
    """
    stop = threading.Event()

    def tick() -> None:
        # a stream that stalls still shows what arrived before the stall, within FLUSH_SECONDS
        while not stop.wait(FLUSH_SECONDS):
            meter._try_flush()

    hooks.on_bytes = meter.on_bytes
    hooks.on_attempt = meter.on_attempt
    ticker = threading.Thread(target=tick, name="ferry-meter", daemon=True)
    try:
        try:
            meter.start()
        except redis.RedisError:
            log.debug("progress write failed", exc_info=True)
        ticker.start()
        yield meter
    finally:
        stop.set()
        if ticker.is_alive():
            ticker.join(timeout=5)
        hooks.on_bytes = None
        hooks.on_attempt = None
        try:
            meter.close()
        except redis.RedisError:
            pass


def inflight(r: redis.Redis, job_id: str | None = None) -> list[dict[str, Any]]:
    """The transfers running now (of one job, or of every job), oldest first; stale records are left out."""
    raw = cast(dict[str, str], r.hgetall(INFLIGHT))
    now = time.time()
    out = []
    for key, value in raw.items():
        if job_id is not None and not key.startswith(f"{job_id}/"):
            continue
        rec = json.loads(value)
        if now - float(rec.get("updated", 0)) > STALE_SECONDS:
            continue
        out.append(rec)
    return sorted(out, key=lambda rec: float(rec.get("started", 0)))


def job_meter(r: redis.Redis, job_id: str) -> dict[str, float]:
    """The bytes of a job's attempts that were started again (``retried``) and the time of its first transfer
    (``first_byte``, 0: none yet)."""
    raw = cast(dict[str, str], r.hgetall(f"{PREFIX}job:{job_id}"))
    return {"retried": float(raw.get("retried", 0) or 0), "first_byte": float(raw.get("first_byte", 0) or 0)}


def count_blob(r: redis.Redis, outcome: str, destination_registry: str) -> None:
    count(r, "blobs", outcome=outcome, destination_registry=destination_registry)


def count_images(r: redis.Redis, outcomes: Iterable[str]) -> None:
    """Count image outcomes (``done``, ``up-to-date``, ``failed``, ``cancelled``) in one round trip."""
    pipe = r.pipeline(transaction=False)
    for outcome, n in Counter(outcomes).items():
        pipe.hincrbyfloat(COUNTERS, _counter_field("images", {"outcome": outcome}), n)
    pipe.execute()


def job_ended(r: redis.Redis, job_id: str, kind: str, state: str, created: float, finished: float) -> None:
    """Count the job's end and its duration, once per job (a job ends once, but ``job retry`` may reopen it)."""
    key = f"{PREFIX}job:{job_id}"
    if not r.hsetnx(key, "observed", finished):
        return
    r.expire(key, JOB_TTL)
    seconds = max(finished - created, 0.0)
    bucket = next((f"{b:g}" for b in DURATION_BUCKETS if seconds <= b), "+Inf")
    pipe = r.pipeline(transaction=False)
    pipe.hincrbyfloat(COUNTERS, _counter_field("jobs", {"kind": kind, "state": state}), 1)
    pipe.hincrbyfloat(COUNTERS, _counter_field("job_duration_bucket", {"kind": kind, "le": bucket}), 1)
    pipe.hincrbyfloat(COUNTERS, _counter_field("job_duration_sum", {"kind": kind}), seconds)
    pipe.execute()


def job_progress(
    r: redis.Redis, job_id: str, blobs: dict[str, dict[str, Any]], now: float | None = None
) -> dict[str, Any]:
    """Bytes done including those in flight, the average rate since the first byte, an ETA, and the
    transfers running now (which worker, how far). ``blobs`` is the job's blob table."""
    now = time.time() if now is None else now
    running = inflight(r, job_id)
    in_flight = sum(int(t.get("bytes", 0)) for t in running)
    done_bytes = sum(int(b.get("size", 0)) for b in blobs.values() if b.get("status") == "done")
    total = sum(int(b.get("size", 0)) for b in blobs.values())
    meter = job_meter(r, job_id)
    # streamed: the blobs transferred, the transfers running, and the attempts started again
    streamed = sum(int(b.get("bytes", 0) or 0) for b in blobs.values() if b.get("status") == "done")
    moved = streamed + in_flight + meter["retried"]
    elapsed = now - meter["first_byte"] if meter["first_byte"] else 0.0
    rate = moved / elapsed if elapsed > 0 else 0.0
    remaining = max(total - done_bytes - in_flight, 0)
    return {
        "bytes_done": min(done_bytes + in_flight, total) if total else done_bytes + in_flight,
        "bytes_in_flight": in_flight,
        "bytes_moved": int(moved),
        "rate_bytes_per_second": rate,
        "eta_seconds": remaining / rate if rate > 0 and remaining else (0.0 if not remaining else None),
        "transfers": [
            {
                "digest": t["digest"],
                "size": int(t.get("size", 0)),
                "bytes": int(t.get("bytes", 0)),
                "worker": t.get("worker", ""),
                "destination_registry": t.get("destination_registry", ""),
                "started": float(t.get("started", 0)),
            }
            for t in running
        ],
    }


__all__ = [
    "DURATION_BUCKETS",
    "FLUSH_SECONDS",
    "TransferMeter",
    "count",
    "count_blob",
    "count_images",
    "counters",
    "inflight",
    "job_ended",
    "job_meter",
    "job_progress",
    "metering",
]
