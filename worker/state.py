"""Shared state in Redis for every worker: job records, blob locations, in-flight locks, registry limits.

Nothing here imports Celery: the tasks (``worker.tasks``) and the producer
(``producer.distributed``) both use this module. No credential is ever
written here: records hold image names, digests, sizes, states and error
texts (which the registry client builds without secrets).

Keys (all under ``ferry:``)::

    jobs                      zset   job id -> created time
    job:{id}                  hash   kind, state, created, finished, images, ended, failed, options
    job:{id}:plan             string the plan as JSON (manifests included; a few KB per image)
    job:{id}:images           hash   image id -> JSON {source, destination, status, error, digest}
    job:{id}:blobs            hash   step id -> JSON {digest, size, status, action, bytes, attempts, error}
    job:{id}:manifests        hash   image id -> JSON list of the image's manifest steps (finalizer input)
    job:{id}:image_blobs      hash   image id -> JSON list of the image's blob step ids
    job:{id}:cancel           string set when the job is cancelled
    loc:{store}:{digest}      zset   repositories holding the blob -> last seen
    lock:{store}:{digest}     string in-flight upload lock (token), with expiry
    backoff:{host}            string unix time until which every worker holds off the host
    sem:{host}                zset   holders of a per-host transfer slot -> expiry time
    limits                    hash   host -> JSON {concurrency, rps}
    rate:{host}:{second}      string requests counted in that second

Live progress and metrics counters live under ``ferry:telemetry:`` (``worker.telemetry``).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, cast

import redis

from worker import telemetry
from worker.engine.plan import ManifestStep, Plan
from worker.registry import HeldOff

PREFIX = "ferry:"
LOCATION_TTL = 30 * 24 * 3600
JOB_TTL = 14 * 24 * 3600

_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end
"""
_EXTEND = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end
"""
_SEM_ACQUIRE = """
redis.call('zremrangebyscore', KEYS[1], '-inf', ARGV[1])
if redis.call('zcard', KEYS[1]) < tonumber(ARGV[3]) then
  redis.call('zadd', KEYS[1], ARGV[2], ARGV[4])
  redis.call('expire', KEYS[1], 3600)
  return 1
end
return 0
"""

TERMINAL = frozenset({"done", "up-to-date", "failed", "cancelled"})


def connect(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, decode_responses=True, socket_timeout=30, socket_connect_timeout=10)


@dataclass
class Limits:
    concurrency: int = 0
    rps: float = 0.0


class SharedState:
    def __init__(self, r: redis.Redis) -> None:
        self.r = r

    # -- jobs ---------------------------------------------------------------------------------------------------

    def create_job(self, plan: Plan, kind: str, options: dict[str, Any]) -> str:
        job_id = uuid.uuid4().hex[:12]
        key = f"{PREFIX}job:{job_id}"
        now = time.time()
        # a signing job signs up-to-date images too: they wait for their finalizer
        sign = "sign" in options
        pipe = self.r.pipeline()
        pipe.hset(
            key,
            mapping={
                "kind": kind,
                "state": "queued",
                "created": now,
                "images": len(plan.images),
                # images already ended at creation (up to date, or nothing to do)
                "ended": sum(1 for i in plan.images if not i.has_work(sign=sign)),
                "failed": 0,
                "options": json.dumps(options),
            },
        )
        pipe.set(f"{key}:plan", json.dumps(plan.to_json()))
        images = {}
        for img in plan.images:
            if img.has_work(sign=sign):
                status = "pending"
            else:
                status = "up-to-date" if img.up_to_date else "done"
            images[img.id] = json.dumps(
                {
                    "source": img.source,
                    "destination": img.destination,
                    "status": status,
                    "error": "",
                    "digest": img.dest_digest,
                    "size": img.size,
                }
            )
        if images:
            pipe.hset(f"{key}:images", mapping=cast(Any, images))
        step_images = plan.step_images()
        blobs = {
            s.id: json.dumps(
                {
                    "digest": s.digest,
                    "size": s.size,
                    "status": "pending",
                    "attempts": 0,
                    "images": step_images.get(s.id, []),
                }
            )
            for s in plan.blob_steps
        }
        if blobs:
            pipe.hset(f"{key}:blobs", mapping=cast(Any, blobs))
        manifests = {}
        image_blobs = {}
        for img in plan.images:
            steps = []
            for sid in img.steps:
                step = plan.steps[sid]
                if isinstance(step, ManifestStep):
                    d = asdict(step)
                    d["raw"] = step.raw.decode()
                    steps.append(d)
            manifests[img.id] = json.dumps(steps)
            image_blobs[img.id] = json.dumps([sid for sid in img.steps if sid in blobs])
        if manifests:
            pipe.hset(f"{key}:manifests", mapping=cast(Any, manifests))
            pipe.hset(f"{key}:image_blobs", mapping=cast(Any, image_blobs))
        pipe.zadd(f"{PREFIX}jobs", {job_id: now})
        for suffix in ("", ":plan", ":images", ":blobs", ":manifests", ":image_blobs"):
            pipe.expire(key + suffix, JOB_TTL)
        pipe.execute()
        # images that end at creation (already up to date, or nothing to copy) count as outcomes too
        statuses = [rec["status"] for rec in map(json.loads, images.values())]
        telemetry.count_images(self.r, [status for status in statuses if status in TERMINAL])
        return job_id

    def job_exists(self, job_id: str) -> bool:
        return bool(self.r.exists(f"{PREFIX}job:{job_id}"))

    def plan(self, job_id: str) -> Plan:
        raw = self.r.get(f"{PREFIX}job:{job_id}:plan")
        if raw is None:
            raise KeyError(job_id)
        return Plan.from_json(json.loads(cast(str, raw)))

    def job(self, job_id: str) -> dict[str, Any]:
        return cast(dict[str, Any], self.r.hgetall(f"{PREFIX}job:{job_id}"))

    def set_job(self, job_id: str, **fields: Any) -> None:
        self.r.hset(f"{PREFIX}job:{job_id}", mapping={k: str(v) for k, v in fields.items()})

    def images(self, job_id: str) -> dict[str, dict[str, Any]]:
        raw = cast(dict[str, str], self.r.hgetall(f"{PREFIX}job:{job_id}:images"))
        return {k: json.loads(v) for k, v in raw.items()}

    def blobs(self, job_id: str) -> dict[str, dict[str, Any]]:
        raw = cast(dict[str, str], self.r.hgetall(f"{PREFIX}job:{job_id}:blobs"))
        return {k: json.loads(v) for k, v in raw.items()}

    def blob(self, job_id: str, step_id: str) -> dict[str, Any]:
        """One blob record (a single HGET: tasks must not read the whole table, which grows with the job)."""
        raw = self.r.hget(f"{PREFIX}job:{job_id}:blobs", step_id)
        return cast(dict[str, Any], json.loads(cast(str, raw))) if raw else {}

    def unfinished_blobs(self, job_id: str, image_id: str) -> list[str]:
        """Step ids of the image's blobs not yet done (a few HMGET fields, whatever the job's size)."""
        raw = self.r.hget(f"{PREFIX}job:{job_id}:image_blobs", image_id)
        step_ids: list[str] = json.loads(cast(str, raw)) if raw else []
        if not step_ids:
            return []
        records = cast(list[str | None], self.r.hmget(f"{PREFIX}job:{job_id}:blobs", step_ids))
        return [
            sid
            for sid, rec in zip(step_ids, records, strict=True)
            if not rec or json.loads(rec).get("status") != "done"
        ]

    def image(self, job_id: str, image_id: str) -> dict[str, Any]:
        raw = self.r.hget(f"{PREFIX}job:{job_id}:images", image_id)
        return cast(dict[str, Any], json.loads(cast(str, raw))) if raw else {}

    def _modify(
        self, key: str, field: str, change: Callable[[dict[str, Any]], dict[str, Any] | None]
    ) -> dict[str, Any]:
        """Read-modify-write one JSON record under WATCH so concurrent workers never lose an update.

        ``change`` gets the current record and returns the fields to set, or ``None`` to leave it as it is.
        """
        with self.r.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)  # type: ignore[no-untyped-call]
                    current = pipe.hget(key, field)
                    rec = json.loads(cast(str, current)) if current else {}
                    changes = change(dict(rec))
                    if changes is None:
                        pipe.unwatch()  # type: ignore[no-untyped-call]
                        return rec
                    rec.update(changes)
                    pipe.multi()
                    pipe.hset(key, field, json.dumps(rec))
                    pipe.execute()
                    return rec
                except redis.WatchError:
                    continue

    def _update(self, key: str, field: str, **changes: Any) -> dict[str, Any]:
        return self._modify(key, field, lambda rec: changes)

    def update_image(self, job_id: str, image_id: str, **changes: Any) -> dict[str, Any]:
        before: dict[str, Any] = {}

        def change(rec: dict[str, Any]) -> dict[str, Any]:
            before["status"] = rec.get("status")
            return changes

        rec = self._modify(f"{PREFIX}job:{job_id}:images", image_id, change)
        self._count_transition(job_id, before.get("status"), rec.get("status"))
        return rec

    def _count_transition(self, job_id: str, old: str | None, new: str | None) -> None:
        """Keep the job's ``ended``/``failed`` counters; end the job when the last image ends.

        Each image's transition happens once (under WATCH), so the counters are exact without
        reading every image record on every change.
        """
        key = f"{PREFIX}job:{job_id}"
        was_ended, is_ended = old in TERMINAL, new in TERMINAL
        was_failed, is_failed = old in ("failed", "cancelled"), new in ("failed", "cancelled")
        if was_failed != is_failed:
            self.r.hincrby(key, "failed", 1 if is_failed else -1)
        if is_ended and not was_ended:
            telemetry.count_images(self.r, [cast(str, new)])
        if was_ended != is_ended:
            ended = int(self.r.hincrby(key, "ended", 1 if is_ended else -1))
            if is_ended and ended >= int(cast(str, self.r.hget(key, "images") or 0)):
                self._finish(job_id)

    def update_blob(self, job_id: str, step_id: str, **changes: Any) -> dict[str, Any]:
        return self._update(f"{PREFIX}job:{job_id}:blobs", step_id, **changes)

    def start_image(self, job_id: str, image_id: str) -> bool:
        """Mark an image running, unless it already ended (failed, cancelled, done): a late blob task of an
        image that failed must not bring it back to "running", or the job would never end."""
        rec = self._modify(
            f"{PREFIX}job:{job_id}:images",
            image_id,
            lambda rec: None if rec.get("status") in TERMINAL else {"status": "running"},
        )
        return rec.get("status") == "running"

    def blob_attempt(self, job_id: str, step_id: str, worker: str = "") -> int:
        """Record that a transfer of the blob starts now (on ``worker``); returns the attempt number."""
        rec = self._modify(
            f"{PREFIX}job:{job_id}:blobs",
            step_id,
            lambda rec: {"status": "running", "attempts": int(rec.get("attempts", 0)) + 1, "worker": worker},
        )
        return int(rec["attempts"])

    def _finish(self, job_id: str) -> None:
        job = self.job(job_id)
        failed = int(job.get("failed", 0) or 0) > 0
        state = "cancelled" if self.cancelled(job_id) else ("failed" if failed else "done")
        finished = time.time()
        self.set_job(job_id, state=state, finished=finished)
        telemetry.job_ended(self.r, job_id, str(job.get("kind", "")), state, float(job.get("created", 0)), finished)

    def refresh_job_state(self, job_id: str) -> None:
        """End the job now if every image already has (an up-to-date set ends at once)."""
        job = self.job(job_id)
        if int(job.get("ended", 0) or 0) >= int(job.get("images", 0) or 0):
            self._finish(job_id)

    def list_jobs(self, limit: int = 50) -> list[str]:
        return list(reversed(cast(list[str], self.r.zrange(f"{PREFIX}jobs", -limit, -1))))

    def cancel(self, job_id: str) -> None:
        self.r.set(f"{PREFIX}job:{job_id}:cancel", "1", ex=JOB_TTL)
        for image_id, rec in self.images(job_id).items():
            if rec["status"] not in TERMINAL:
                self.update_image(job_id, image_id, status="cancelled", error="cancelled by user")
        self.set_job(job_id, state="cancelled", finished=time.time())

    def cancelled(self, job_id: str) -> bool:
        return bool(self.r.exists(f"{PREFIX}job:{job_id}:cancel"))

    def clear_cancel(self, job_id: str) -> None:
        self.r.delete(f"{PREFIX}job:{job_id}:cancel")

    # -- blob locations -------------------------------------------------------------------------------------------

    def where(self, store: str, digest: str) -> list[str]:
        return cast(list[str], self.r.zrevrange(f"{PREFIX}loc:{store}:{digest}", 0, 7))

    def add(self, store: str, digest: str, repository: str) -> None:
        key = f"{PREFIX}loc:{store}:{digest}"
        pipe = self.r.pipeline()
        pipe.zadd(key, {repository: time.time()})
        pipe.expire(key, LOCATION_TTL)
        pipe.execute()

    # -- in-flight locks ----------------------------------------------------------------------------------------------

    def acquire_lock(self, store: str, digest: str, ttl: float) -> str | None:
        token = uuid.uuid4().hex
        ok = self.r.set(f"{PREFIX}lock:{store}:{digest}", token, nx=True, px=int(ttl * 1000))
        return token if ok else None

    def extend_lock(self, store: str, digest: str, token: str, ttl: float) -> bool:
        return bool(self.r.eval(_EXTEND, 1, f"{PREFIX}lock:{store}:{digest}", token, int(ttl * 1000)))

    def release_lock(self, store: str, digest: str, token: str) -> None:
        self.r.eval(_RELEASE, 1, f"{PREFIX}lock:{store}:{digest}", token)

    def lock_ttl(self, store: str, digest: str) -> float:
        ms = int(self.r.pttl(f"{PREFIX}lock:{store}:{digest}"))
        return max(ms, 0) / 1000.0

    # -- per-registry limits and shared backoff -----------------------------------------------------------------

    def set_limits(self, host: str, limits: Limits) -> None:
        self.r.hset(f"{PREFIX}limits", host, json.dumps({"concurrency": limits.concurrency, "rps": limits.rps}))

    def limits(self, host: str) -> Limits:
        raw = self.r.hget(f"{PREFIX}limits", host)
        if not raw:
            return Limits()
        d = json.loads(cast(str, raw))
        return Limits(int(d.get("concurrency") or 0), float(d.get("rps") or 0))

    def all_limits(self) -> dict[str, Limits]:
        raw = cast(dict[str, str], self.r.hgetall(f"{PREFIX}limits"))
        out = {}
        for host, v in raw.items():
            d = json.loads(v)
            out[host] = Limits(int(d.get("concurrency") or 0), float(d.get("rps") or 0))
        return out

    def try_slot(self, host: str, holder: str, limit: int, ttl: float) -> bool:
        now = time.time()
        return bool(self.r.eval(_SEM_ACQUIRE, 1, f"{PREFIX}sem:{host}", now, now + ttl, limit, holder))

    def release_slot(self, host: str, holder: str) -> None:
        self.r.zrem(f"{PREFIX}sem:{host}", holder)

    @contextmanager
    def slot(self, host: str, holder: str, ttl: float) -> Iterator[bool]:
        """Hold one of the host's transfer slots; yields False (and holds nothing) when all are taken."""
        limit = self.limits(host).concurrency
        if limit <= 0:
            yield True
            return
        got = self.try_slot(host, holder, limit, ttl)
        try:
            yield got
        finally:
            if got:
                self.release_slot(host, holder)

    def backoff_until(self, host: str) -> float:
        raw = self.r.get(f"{PREFIX}backoff:{host}")
        return float(cast(str, raw)) if raw else 0.0

    def set_backoff(self, host: str, seconds: float) -> None:
        until = time.time() + seconds
        key = f"{PREFIX}backoff:{host}"
        current = self.backoff_until(host)
        if until > current:
            self.r.set(key, str(until), px=max(int(seconds * 1000), 1))


class RedisGate:
    """``RequestGate`` for the registry client: a shared backoff and an optional requests-per-second budget.

    When any worker gets 429 with Retry-After from a host, every worker holds
    off that host until then. Short waits are slept; long ones raise a
    temporary error so the task is retried later instead of blocking a worker.
    """

    #: waits up to this long are slept in place
    MAX_SLEEP = 5.0

    def __init__(self, state: SharedState) -> None:
        self.state = state

    def before_request(self, host: str) -> None:
        # one round trip for both the backoff and the host's limits
        pipe = self.state.r.pipeline(transaction=False)
        pipe.get(f"{PREFIX}backoff:{host}")
        pipe.hget(f"{PREFIX}limits", host)
        backoff, limits = pipe.execute()
        wait = (float(backoff) if backoff else 0.0) - time.time()
        if wait > self.MAX_SLEEP:
            raise HeldOff(f"{host} asked every worker to hold off", status=429, retry_after=wait)
        if wait > 0:
            time.sleep(wait)
        rps = float(json.loads(limits).get("rps") or 0) if limits else 0.0
        if rps > 0:
            while True:
                second = int(time.time())
                key = f"{PREFIX}rate:{host}:{second}"
                pipe = self.state.r.pipeline()
                pipe.incr(key)
                pipe.expire(key, 2)
                count = int(pipe.execute()[0])
                if count <= rps:
                    return
                time.sleep(max(second + 1 - time.time(), 0.01))

    def on_throttled(self, host: str, retry_after: float) -> None:
        telemetry.count(self.state.r, "registry_throttled", registry=host)
        self.state.set_backoff(host, retry_after)
