"""Job records: a job, its images and its blob steps, with their statuses and counters.

Static facts (names, digests, sizes, which images a blob belongs to) are written once when the job is created;
what changes is written by the one task that owns it at that moment, in a single command where it can be (a
blob's state record, ``HINCRBY`` on its attempt and failure counts), and in a Lua script where a value is read
then written (an image's status and the job's counters; a blob's ``done`` and its images' countdown), so that
concurrent workers never lose an update.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import redis

from worker import telemetry
from worker.engine.plan import ManifestStep, Plan
from worker.engine.status import BlobAction, BlobStatus, ImageStatus, JobState

from . import _keys as k

# KEYS: job hash, images hash, cancel flag; ARGV: image id, JSON changes, mode, now.
# mode "any": apply; "unended": only if the image has not ended; "start": only if it is pending or queued.
# Keeps the job's ``ended``/``failed``/``cancelled`` counters and ends the job with its last image.
# Returns {changed, the record, the old status, the job's new state if this ended it}.
_IMAGE_SET = """
local raw = redis.call('hget', KEYS[2], ARGV[1])
if not raw then return {0, '', '', ''} end
local rec = cjson.decode(raw)
local old = rec['status']
local ended = {['done']=true, ['up-to-date']=true, ['failed']=true, ['cancelled']=true}
local mode = ARGV[3]
if mode == 'start' and KEYS[4] then
  -- blob tasks read this flag with their own state, and leave the image alone from then on
  redis.call('hset', KEYS[4], '_run:' .. ARGV[1], '1')
end
if (mode == 'unended' and ended[old]) or (mode == 'start' and old ~= 'pending' and old ~= 'queued') then
  return {0, raw, old or '', ''}
end
for key, value in pairs(cjson.decode(ARGV[2])) do rec[key] = value end
local new = rec['status']
raw = cjson.encode(rec)
redis.call('hset', KEYS[2], ARGV[1], raw)
local job_ended = ''
if old ~= new and mode ~= 'start' then
  redis.call('hset', KEYS[1], 'touched', ARGV[4])
end
if old ~= new then
  for _, s in ipairs({'failed', 'cancelled'}) do
    if (old == s) ~= (new == s) then redis.call('hincrby', KEYS[1], s, (new == s) and 1 or -1) end
  end
  if (ended[old] == true) ~= (ended[new] == true) then
    local n = redis.call('hincrby', KEYS[1], 'ended', ended[new] and 1 or -1)
    if ended[new] and n >= tonumber(redis.call('hget', KEYS[1], 'images') or '0') then
      local state = 'done'
      if redis.call('exists', KEYS[3]) == 1 then state = 'cancelled'
      elseif tonumber(redis.call('hget', KEYS[1], 'failed') or '0') > 0 then state = 'failed'
      elseif tonumber(redis.call('hget', KEYS[1], 'cancelled') or '0') > 0 then state = 'cancelled' end
      redis.call('hset', KEYS[1], 'state', state, 'finished', ARGV[4])
      job_ended = state
    end
  end
end
return {1, raw, old or '', job_ended}
"""

# KEYS: blob states, images' countdown, job hash, dependents; ARGV: step id, JSON state, now (empty: leave the
# job's ``touched`` as it is), "1" when steps wait for this one, image ids...
# Marks the blob done once (a redelivered task finds it done and changes nothing) and counts it off each of its
# images. Returns the steps waiting for this one (``job:{id}:after``, newline-separated, or ''), then the images
# left with no blob to wait for (their finalizers can run).
_BLOB_DONE = """
local after = ''
if ARGV[4] == '1' then after = redis.call('hget', KEYS[4], ARGV[1]) or '' end
local cur = redis.call('hget', KEYS[1], ARGV[1])
if cur and string.find(cur, '"status":"done"', 1, true) then return {after} end
redis.call('hset', KEYS[1], ARGV[1], ARGV[2])
if ARGV[3] ~= '' then redis.call('hset', KEYS[3], 'touched', ARGV[3]) end
local ready = {after}
for i = 5, #ARGV do
  if redis.call('hincrby', KEYS[2], ARGV[i], -1) <= 0 then table.insert(ready, ARGV[i]) end
end
return ready
"""

# KEYS: blob states, dependents; ARGV: TTL, then pairs (step id it waits for, the waiting step's entry).
# Each entry waits in ``job:{id}:after`` until the step it depends on ends, unless that step has already ended:
# returns the (1-based) numbers of the entries to send now.
_DEFER = """
local now = {}
local n = 0
for i = 2, #ARGV, 2 do
  n = n + 1
  local s = redis.call('hget', KEYS[1], ARGV[i])
  if s and (string.find(s, '"status":"done"', 1, true) or string.find(s, '"status":"failed"', 1, true)
            or string.find(s, '"status":"cancelled"', 1, true)) then
    table.insert(now, n)
  else
    local cur = redis.call('hget', KEYS[2], ARGV[i])
    redis.call('hset', KEYS[2], ARGV[i], cur and (cur .. '\\n' .. ARGV[i + 1]) or ARGV[i + 1])
  end
end
redis.call('expire', KEYS[2], ARGV[1])
return now
"""

# KEYS: images hash, images' countdown; ARGV: pairs (image id, "1" when its finalizer may be due now).
# Marks a batch of images enqueued; returns those flagged whose blobs are all done already.
_ENQUEUED = """
local due = {}
for i = 1, #ARGV, 2 do
  local raw = redis.call('hget', KEYS[1], ARGV[i])
  if raw then
    local rec = cjson.decode(raw)
    rec['enqueued'] = true
    redis.call('hset', KEYS[1], ARGV[i], cjson.encode(rec))
    if ARGV[i + 1] == '1' and tonumber(redis.call('hget', KEYS[2], ARGV[i]) or '0') <= 0 then
      table.insert(due, ARGV[i])
    end
  end
end
return due
"""

# KEYS: job hash; ARGV: new state, expected state. Compare-and-set of the job's state.
_JOB_STATE_IF = """
if redis.call('hget', KEYS[1], 'state') == ARGV[2] then redis.call('hset', KEYS[1], 'state', ARGV[1]) return 1 end
return 0
"""

# KEYS: images' countdown, blob states; ARGV: image id, the image's blob step ids...
# The countdown of one image: how many of its blobs are not done now.
_COUNT_LEFT = """
local left = 0
for i = 2, #ARGV do
  local s = redis.call('hget', KEYS[2], ARGV[i])
  if not (s and string.find(s, '"status":"done"', 1, true)) then left = left + 1 end
end
redis.call('hset', KEYS[1], ARGV[1], left)
return left
"""

_SUFFIXES = (
    "", ":plan", ":images", ":blobs", ":blob_state", ":counts", ":left", ":manifests", ":image_blobs", ":after",
)  # fmt: skip
#: a blob's ``done`` sets the job's ``touched`` at most this often per job and process (seconds)
TOUCH_INTERVAL = 5.0
#: the field of ``job:{id}:blob_state`` set when the job is cancelled (a blob task reads it with its own state)
CANCEL_FIELD = "_cancelled"


def _compact(obj: dict[str, Any]) -> str:
    """Records are JSON without spaces (the Lua scripts look for ``"status":"done"``)."""
    return json.dumps(obj, separators=(",", ":"))


@dataclass(frozen=True)
class BlobState:
    """What is known of one blob step now (``job:{id}:blob_state`` plus its counters)."""

    status: BlobStatus = BlobStatus.PENDING
    action: BlobAction | None = None
    bytes: int = 0
    worker: str = ""
    error: str = ""

    @classmethod
    def parse(cls, raw: str | None) -> BlobState:
        if not raw:
            return cls()
        d = json.loads(raw)
        action = d.get("action")
        return cls(
            BlobStatus(d.get("status", "pending")),
            BlobAction(action) if action else None,
            int(d.get("bytes", 0) or 0),
            str(d.get("worker", "")),
            str(d.get("error", "")),
        )

    def dump(self) -> str:
        d: dict[str, Any] = {"status": self.status.value}
        if self.action is not None:
            d["action"] = self.action.value
        if self.bytes:
            d["bytes"] = self.bytes
        if self.worker:
            d["worker"] = self.worker
        if self.error:
            d["error"] = self.error
        return _compact(d)


@dataclass(frozen=True)
class ImageRecord:
    id: str
    source: str
    destination: str
    status: ImageStatus
    error: str = ""
    digest: str = ""
    size: int = 0
    #: every task of the image was sent (an image cut half-way through enqueueing is sent again by ``job retry``)
    enqueued: bool = False
    finished: float = 0.0
    #: when the job signs: the digests of the image's manifests, which its finalizer signs
    sign: tuple[str, ...] = ()

    @classmethod
    def parse(cls, image_id: str, raw: str | None) -> ImageRecord:
        d = json.loads(raw) if raw else {}
        return cls(
            image_id,
            str(d.get("source", "")),
            str(d.get("destination", "")),
            ImageStatus(d.get("status", "pending")),
            str(d.get("error", "")),
            str(d.get("digest", "")),
            int(d.get("size", 0) or 0),
            bool(d.get("enqueued", False)),
            float(d.get("finished", 0) or 0),
            tuple(d.get("sign") or ()),
        )

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["status"] = self.status.value
        d["sign"] = list(self.sign)
        return d


@dataclass(frozen=True)
class JobRecord:
    id: str
    kind: str
    state: JobState
    created: float
    finished: float
    images: int
    ended: int
    failed: int
    cancelled: int
    #: last time an image or blob changed state
    touched: float
    options: str = "{}"

    @classmethod
    def parse(cls, job_id: str, d: dict[str, str]) -> JobRecord:
        def num(name: str) -> float:
            return float(d.get(name) or 0)

        return cls(
            job_id,
            d.get("kind", ""),
            JobState(d.get("state") or "queued"),
            num("created"),
            num("finished"),
            int(num("images")),
            int(num("ended")),
            int(num("failed")),
            int(num("cancelled")),
            num("touched") or num("created"),
            d.get("options") or "{}",
        )


@dataclass(frozen=True)
class BlobRecord:
    """A blob step's static facts joined with its state and counters (for summaries)."""

    id: str
    digest: str
    size: int
    images: list[str] = field(default_factory=list)
    state: BlobState = field(default_factory=BlobState)
    attempts: int = 0
    failures: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "digest": self.digest,
            "size": self.size,
            "images": self.images,
            "status": self.state.status.value,
            "action": self.state.action.value if self.state.action else "",
            "bytes": self.state.bytes,
            "worker": self.state.worker,
            "error": self.state.error,
            "attempts": self.attempts,
            "failures": self.failures,
        }


class JobStore:
    """Jobs, their images and blob steps."""

    def __init__(self, r: redis.Redis) -> None:
        self.r = r
        self._image_set = r.register_script(_IMAGE_SET)
        self._blob_done = r.register_script(_BLOB_DONE)
        self._state_if = r.register_script(_JOB_STATE_IF)
        self._count_left = r.register_script(_COUNT_LEFT)
        self._defer = r.register_script(_DEFER)
        self._touched: dict[str, float] = {}
        self._touch_lock = threading.Lock()
        self._enqueued = r.register_script(_ENQUEUED)

    # -- creating and reading -------------------------------------------------------------------------------------

    def create(self, plan: Plan, kind: str, options: dict[str, Any]) -> str:
        job_id = uuid.uuid4().hex[:12]
        key = k.job(job_id)
        now = time.time()
        # a signing job signs up-to-date images too: they wait for their finalizer
        sign = "sign" in options
        pipe = self.r.pipeline(transaction=False)
        pipe.hset(
            key,
            mapping={
                "kind": kind,
                "state": JobState.QUEUED.value,
                "created": now,
                "touched": now,
                "images": len(plan.images),
                # images already ended at creation (up to date, or nothing to do)
                "ended": sum(1 for i in plan.images if not i.has_work(sign=sign)),
                "failed": 0,
                "cancelled": 0,
                "options": json.dumps(options),
            },
        )
        pipe.set(f"{key}:plan", json.dumps(plan.to_json()))
        step_images = plan.step_images()
        blob_ids = {s.id for s in plan.blob_steps}
        images: dict[str, str] = {}
        manifests: dict[str, str] = {}
        image_blobs: dict[str, str] = {}
        left: dict[str, int] = {}
        ended_at_creation: list[str] = []
        for img in plan.images:
            status = None
            if not img.has_work(sign=sign):
                status = ImageStatus.UP_TO_DATE if img.up_to_date else ImageStatus.DONE
                ended_at_creation.append(status.value)
            signs = tuple(img.manifests) if sign and not img.attachment else ()
            rec = ImageRecord(
                img.id, img.source, img.destination, status or ImageStatus.PENDING, digest=img.dest_digest,
                size=img.size, enqueued=status is not None, sign=signs,
            )  # fmt: skip
            fields = {x: v for x, v in rec.to_json().items() if x != "id" and (x != "sign" or v)}
            images[img.id] = _compact(fields)
            steps = []
            for sid in img.steps:
                step = plan.steps[sid]
                if isinstance(step, ManifestStep):
                    steps.append(step.to_json())
            manifests[img.id] = json.dumps(steps)
            mine = [sid for sid in img.steps if sid in blob_ids]
            image_blobs[img.id] = json.dumps(mine)
            left[img.id] = len(mine)
        blobs = {
            s.id: _compact({"digest": str(s.digest), "size": s.size, "images": step_images.get(s.id, [])})
            for s in plan.blob_steps
        }
        for suffix, mapping in (
            (":images", images), (":blobs", blobs), (":manifests", manifests), (":image_blobs", image_blobs),
            (":left", left),
        ):  # fmt: skip
            if mapping:
                pipe.hset(key + suffix, mapping=cast(Any, mapping))
        pipe.zadd(k.JOBS, {job_id: now})
        for suffix in _SUFFIXES:
            pipe.expire(key + suffix, k.JOB_TTL)
        pipe.execute()
        # images that end at creation (already up to date, or nothing to copy) count as outcomes too
        telemetry.count_images(self.r, ended_at_creation)
        return job_id

    def exists(self, job_id: str) -> bool:
        return bool(self.r.exists(k.job(job_id)))

    def plan(self, job_id: str) -> Plan:
        raw = self.r.get(k.job(job_id, ":plan"))
        if raw is None:
            raise KeyError(job_id)
        return Plan.from_json(json.loads(cast(str, raw)))

    def job(self, job_id: str) -> JobRecord:
        return JobRecord.parse(job_id, cast(dict[str, str], self.r.hgetall(k.job(job_id))))

    def glance(self, job_id: str) -> tuple[JobState, int, float]:
        """One command: the job's state, how many images have ended, when an image or blob last changed state."""
        state, ended, touched, created = cast(
            list[str | None], self.r.hmget(k.job(job_id), ["state", "ended", "touched", "created"])
        )
        return JobState(state or "queued"), int(ended or 0), float(touched or created or 0)

    def options(self, job_id: str) -> str:
        return str(self.r.hget(k.job(job_id), "options") or "{}")

    def recent(self, limit: int = 50) -> list[str]:
        return list(reversed(cast(list[str], self.r.zrange(k.JOBS, -limit, -1))))

    def images(self, job_id: str) -> dict[str, ImageRecord]:
        raw = cast(dict[str, str], self.r.hgetall(k.job(job_id, ":images")))
        return {i: ImageRecord.parse(i, v) for i, v in raw.items()}

    def image(self, job_id: str, image_id: str) -> ImageRecord:
        return ImageRecord.parse(image_id, cast(str | None, self.r.hget(k.job(job_id, ":images"), image_id)))

    def blobs(self, job_id: str) -> dict[str, BlobRecord]:
        pipe = self.r.pipeline(transaction=False)
        for suffix in (":blobs", ":blob_state", ":counts"):
            pipe.hgetall(k.job(job_id, suffix))
        static, states, counts = cast(list[dict[str, str]], pipe.execute())
        out = {}
        for sid, raw in static.items():
            d = json.loads(raw)
            out[sid] = BlobRecord(
                sid, d["digest"], int(d["size"]), list(d.get("images") or []), BlobState.parse(states.get(sid)),
                int(counts.get(f"{sid}:a", 0)), int(counts.get(f"{sid}:f", 0)),
            )  # fmt: skip
        return out

    def image_blob_ids(self, job_id: str, image_id: str) -> list[str]:
        raw = self.r.hget(k.job(job_id, ":image_blobs"), image_id)
        return list(json.loads(cast(str, raw))) if raw else []

    def blob_states(self, job_id: str, step_ids: list[str]) -> dict[str, BlobState]:
        if not step_ids:
            return {}
        raw = cast(list[str | None], self.r.hmget(k.job(job_id, ":blob_state"), step_ids))
        return {sid: BlobState.parse(v) for sid, v in zip(step_ids, raw, strict=True)}

    def manifest_steps(self, job_id: str, image_id: str) -> list[ManifestStep]:
        raw = self.r.hget(k.job(job_id, ":manifests"), image_id)
        return [ManifestStep.from_json(s) for s in json.loads(cast(str, raw))] if raw else []

    # -- what a blob task reads and writes ---------------------------------------------------------------------------

    def blob_begin(self, job_id: str, step_id: str, image_ids: Iterable[str] = ()) -> tuple[bool, BlobState, set[str]]:
        """One command at a blob task's start: is the job cancelled, the blob's state, and which of
        ``image_ids`` a task has already marked running (``start_image``)."""
        images = list(image_ids)
        fields = [step_id, CANCEL_FIELD, *[f"_run:{i}" for i in images]]
        raw, cancelled, *run = cast(list[str | None], self.r.hmget(k.job(job_id, ":blob_state"), fields))
        return bool(cancelled), BlobState.parse(raw), {i for i, flag in zip(images, run, strict=True) if flag}

    def set_blob(self, job_id: str, step_id: str, state: BlobState) -> None:
        self.r.hset(k.job(job_id, ":blob_state"), step_id, state.dump())

    def blob_ended(self, job_id: str, step_id: str, state: BlobState, waited_on: bool) -> list[str]:
        """Record a blob ``failed`` or ``cancelled``; returns the entries of the steps that waited for it."""
        pipe = self.r.pipeline(transaction=False)
        pipe.hset(k.job(job_id, ":blob_state"), step_id, state.dump())
        if waited_on:
            # after the state: a step that registers to wait from now on sees it ended and is sent at once
            pipe.hget(k.job(job_id, ":after"), step_id)
        out = pipe.execute()
        return _entries(out[1] if waited_on else None)

    def blob_attempt(self, job_id: str, step_id: str, worker: str) -> int:
        """A transfer of the blob starts now on ``worker``: returns the attempt number."""
        pipe = self.r.pipeline(transaction=False)
        pipe.hincrby(k.job(job_id, ":counts"), f"{step_id}:a", 1)
        pipe.hset(k.job(job_id, ":blob_state"), step_id, BlobState(BlobStatus.RUNNING, worker=worker).dump())
        return int(pipe.execute()[0])

    def blob_failure(self, job_id: str, step_id: str, error: str, worker: str) -> int:
        """A temporary failure of the blob: returns how many it has had."""
        pipe = self.r.pipeline(transaction=False)
        pipe.hincrby(k.job(job_id, ":counts"), f"{step_id}:f", 1)
        pipe.hset(
            k.job(job_id, ":blob_state"), step_id, BlobState(BlobStatus.RETRYING, worker=worker, error=error).dump()
        )
        return int(pipe.execute()[0])

    def blob_done(
        self, job_id: str, step_id: str, state: BlobState, image_ids: Iterable[str], waited_on: bool = False
    ) -> tuple[list[str], list[str]]:
        """Record the blob done (once). Returns the images that now have every blob done, and (``waited_on``) the
        entries of the steps that waited for this one (also when it was done already: a redelivered task sends
        them again, as the first delivery may have died before it did)."""
        keys = [k.job(job_id, ":blob_state"), k.job(job_id, ":left"), k.job(job_id), k.job(job_id, ":after")]
        touch = self._touch_due(job_id, ready_soon=bool(image_ids))
        args = [step_id, state.dump(), time.time() if touch else "", "1" if waited_on else "0", *image_ids]
        after, *ready = cast(list[Any], self._blob_done(keys=keys, args=args))
        return [str(i) for i in ready], _entries(after)

    def _touch_due(self, job_id: str, ready_soon: bool) -> bool:
        """Whether a blob's ``done`` also sets the job's ``touched`` (stall detection): at most once per
        ``TOUCH_INTERVAL`` per job and process; an image's end always sets it."""
        if not ready_soon:
            return False
        now = time.monotonic()
        with self._touch_lock:
            last = self._touched.get(job_id)
            if last is not None and now - last < TOUCH_INTERVAL:
                return False
            if len(self._touched) > 10_000:
                self._touched.clear()
            self._touched[job_id] = now
        return True

    def defer(self, job_id: str, waits: list[tuple[str, str]]) -> list[int]:
        """Let each ``(step it waits for, entry)`` wait until that step ends; returns the indexes (0-based) of the
        entries whose step has already ended, to be sent now."""
        if not waits:
            return []
        args: list[str | int] = [k.JOB_TTL]
        for dep, entry in waits:
            args += [dep, entry]
        keys = [k.job(job_id, ":blob_state"), k.job(job_id, ":after")]
        return [int(n) - 1 for n in cast(list[Any], self._defer(keys=keys, args=args))]

    def forget_waiting(self, job_id: str, step_id: str) -> None:
        """The steps that waited for ``step_id`` have all been sent on."""
        self.r.hdel(k.job(job_id, ":after"), step_id)

    def mark_enqueued_batch(self, job_id: str, images: list[tuple[str, bool]]) -> list[str]:
        """Mark images enqueued in one call; of those flagged, returns the ones whose blobs are all done."""
        if not images:
            return []
        args = [x for image_id, flag in images for x in (image_id, "1" if flag else "0")]
        due = self._enqueued(keys=[k.job(job_id, ":images"), k.job(job_id, ":left")], args=args)
        return [str(i) for i in cast(list[Any], due)]

    def images_left(self, job_id: str, image_ids: list[str]) -> dict[str, int]:
        raw = cast(list[str | None], self.r.hmget(k.job(job_id, ":left"), image_ids))
        return {i: int(v or 0) for i, v in zip(image_ids, raw, strict=True)}

    # -- images and the job's state --------------------------------------------------------------------------------

    def _set_image(self, job_id: str, image_id: str, changes: dict[str, Any], mode: str) -> tuple[bool, ImageRecord]:
        keys = [k.job(job_id), k.job(job_id, ":images"), k.job(job_id, ":cancel")]
        if mode == "start":
            keys.append(k.job(job_id, ":blob_state"))
        now = time.time()
        args: list[str | float] = [image_id, json.dumps(changes), mode, now]
        changed, raw, old, job_ended = cast(list[Any], self._image_set(keys=keys, args=args))
        rec = ImageRecord.parse(image_id, raw or None)
        if changed and rec.status.ended and not (old and ImageStatus(old).ended):
            telemetry.count_images(self.r, [rec.status.value])
        if job_ended:
            self._observe_end(job_id, JobState(job_ended), now)
        return bool(changed), rec

    def _observe_end(self, job_id: str, state: JobState, finished: float) -> None:
        job = self.job(job_id)
        telemetry.job_ended(self.r, job_id, job.kind, state.value, job.created, finished)

    def set_image(self, job_id: str, image_id: str, status: ImageStatus, error: str = "") -> ImageRecord:
        changes: dict[str, Any] = {"status": status.value, "error": error}
        if status.ended:
            changes["finished"] = time.time()
        return self._set_image(job_id, image_id, changes, "any")[1]

    def end_image(self, job_id: str, image_id: str, status: ImageStatus, error: str = "") -> bool:
        """Set an ended status unless the image has already ended (the first outcome stands); True if it did."""
        assert status.ended
        changes = {"status": status.value, "error": error, "finished": time.time()}
        return self._set_image(job_id, image_id, changes, "unended")[0]

    def start_image(self, job_id: str, image_id: str) -> None:
        """Mark a pending or queued image running (a late task of an image that ended never revives it)."""
        self._set_image(job_id, image_id, {"status": ImageStatus.RUNNING.value}, "start")

    def mark_enqueued(self, job_id: str, image_id: str) -> None:
        self._set_image(job_id, image_id, {"enqueued": True}, "any")

    def set_running(self, job_id: str) -> None:
        """The producer has sent everything: queued -> running (unless the job already ended meanwhile)."""
        self._state_if(keys=[k.job(job_id)], args=[JobState.RUNNING.value, JobState.QUEUED.value])

    def end_if_all_ended(self, job_id: str) -> None:
        """End the job now if every image already has (an up-to-date set ends at once)."""
        job = self.job(job_id)
        if job.ended >= job.images and not job.state.ended:
            state = JobState.DONE
            if self.cancelled(job_id) or (job.cancelled and not job.failed):
                state = JobState.CANCELLED
            elif job.failed:
                state = JobState.FAILED
            now = time.time()
            self.r.hset(k.job(job_id), mapping={"state": state.value, "finished": now})
            self._observe_end(job_id, state, now)

    def cancel(self, job_id: str, reason: str = "cancelled by user") -> None:
        pipe = self.r.pipeline(transaction=False)
        pipe.set(k.job(job_id, ":cancel"), "1", ex=k.JOB_TTL)
        pipe.hset(k.job(job_id, ":blob_state"), CANCEL_FIELD, "1")
        pipe.execute()
        for image_id, rec in self.images(job_id).items():
            if not rec.status.ended:
                self.end_image(job_id, image_id, ImageStatus.CANCELLED, reason)
        if not self.job(job_id).state.ended:
            now = time.time()
            self.r.hset(k.job(job_id), mapping={"state": JobState.CANCELLED.value, "finished": now})
            self._observe_end(job_id, JobState.CANCELLED, now)

    def cancelled(self, job_id: str) -> bool:
        return bool(self.r.exists(k.job(job_id, ":cancel")))

    def reset_for_retry(self, job_id: str, image_ids: list[str]) -> None:
        """Make images pending again, forget their unfinished blobs' attempts, and recount what each waits for."""
        self.r.delete(k.job(job_id, ":cancel"))
        self.r.hdel(k.job(job_id, ":blob_state"), CANCEL_FIELD)
        self.r.hset(k.job(job_id), mapping={"state": JobState.QUEUED.value, "finished": 0})
        states = cast(dict[str, str], self.r.hgetall(k.job(job_id, ":blob_state")))
        for image_id in image_ids:
            changes = {"status": ImageStatus.PENDING.value, "error": "", "enqueued": False}
            self._set_image(job_id, image_id, changes, "any")
            self.r.hdel(k.job(job_id, ":blob_state"), f"_run:{image_id}")
            mine = self.image_blob_ids(job_id, image_id)
            redo = [sid for sid in mine if BlobState.parse(states.get(sid)).status != BlobStatus.DONE]
            if redo:
                self.r.hdel(k.job(job_id, ":blob_state"), *redo)
                self.r.hdel(k.job(job_id, ":counts"), *[f"{s}:{c}" for s in redo for c in "af"])
            self._count_left(keys=[k.job(job_id, ":left"), k.job(job_id, ":blob_state")], args=[image_id, *mine])


def _entries(raw: str | None) -> list[str]:
    return [e for e in (raw or "").split("\n") if e]


__all__ = ["CANCEL_FIELD", "BlobRecord", "BlobState", "ImageRecord", "JobRecord", "JobStore"]
