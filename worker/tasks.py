"""Thin Celery tasks over the copy engine.

Arguments are identifiers only: a job id, a step id, image names, a digest and a size; never bytes, never
credentials (workers find their own: auth files, environment, credential helpers). Each task is idempotent: a
redelivered or retried task finds the blob already present and does nothing.

An image's finalizer is started by the blob task that finishes the image's last blob (a countdown per image in
Redis, counted once per blob however often its task is delivered), not by a Celery chord: no chord results
to store, no early chord, and no chord body that never runs when a header task fails.

Every task body runs under a ``try`` that records the outcome: an image ends ``done``, ``failed`` or
``cancelled`` whatever happens in its tasks, so a job always ends.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import lru_cache
from typing import Any, TypeVar

from celery import Task
from celery.exceptions import Retry
from redis.lock import Lock

from worker import telemetry
from worker.celery_app import app, visibility_timeout
from worker.engine.plan import BlobStep
from worker.engine.registries_conf import RegistriesConf
from worker.engine.status import BlobStatus, ImageStatus
from worker.engine.steps import (
    BlobResult,
    EngineContext,
    blob_store,
    check_blob,
    existing_blob,
    run_manifest_step,
    transfer_blob,
)
from worker.engine.transports import ClientPool, ImageName, SideConfig
from worker.engine.transports.base import BlobUpload
from worker.engine.trust import Signer, SigningConfig, sign_written
from worker.registry import USER_AGENT, Cancelled, FerryError, RetryPolicy, is_temporary
from worker.state import BlobState, RedisGate, SharedState, connect
from worker.state.locations import DestinationLocations
from worker.state.locks import InFlightLock, release, renew

log = logging.getLogger("ferry.worker")

_T = TypeVar("_T")
_R = TypeVar("_R")

#: in-flight lock lifetime; a live transfer renews it every third of this
LOCK_TTL = float(os.environ.get("FERRY_LOCK_TTL", "30"))
#: longest pause before a task waiting on another worker's upload of the same blob looks again
LOCK_WAIT_POLL = float(os.environ.get("FERRY_LOCK_POLL", "2"))
#: how long a task waits in place for another task's upload of the same blob before it re-queues itself
LOCK_WAIT_MAX = float(os.environ.get("FERRY_LOCK_WAIT", "60"))
#: how many pieces of inline follow-up work (mounts that waited for an upload, finalizers) a task runs at once
RELEASE_THREADS = int(os.environ.get("FERRY_RELEASE_THREADS", "8"))
#: a worker process reads a registry's shared backoff and limits at most this often (seconds; its own 429s at once)
GATE_CACHE = 5.0
#: how many times a temporary failure of one blob is retried by re-queueing it
DEFAULT_TASK_RETRIES = 5
#: how many times a finalizer that hit a temporary error (a manifest PUT answered 503...) is retried ...
FINALIZE_RETRIES = 5
#: ... after 2, 4, 8, 16, 32 s (this base times 2^n)
FINALIZE_BACKOFF = float(os.environ.get("FERRY_FINALIZE_BACKOFF", "1"))


def finalize_wait() -> float:
    """How long a finalizer that ran before its image's blobs were done waits for them before failing the image.

    A blob task can be delayed by up to the visibility timeout (a dead worker's task is redone after it) plus a
    transfer: the default is the visibility timeout plus ten minutes.
    """
    return float(os.environ.get("FERRY_FINALIZE_WAIT") or visibility_timeout() + 600)


@lru_cache(maxsize=1)
def _state() -> SharedState:
    from worker.celery_app import queue_url

    return SharedState(connect(queue_url(), reconnect=True))


@lru_cache(maxsize=1)
def _gate() -> RedisGate:
    return RedisGate(_state().hosts, cache=GATE_CACHE)


@lru_cache(maxsize=1)
def _pool() -> ClientPool:
    return ClientPool()


@lru_cache(maxsize=16)
def _sides(options_json: str) -> tuple[SideConfig, SideConfig]:
    opts = json.loads(options_json or "{}")
    gate = _gate()
    # the producer's registries.conf and the endpoint it read each mirrored image from (never this machine's)
    registries = RegistriesConf.from_json(opts["registries"]) if "registries" in opts else None

    def side(prefix: str) -> SideConfig:
        retry = RetryPolicy(times=int(opts.get("retry_times", 3)), delay=opts.get("retry_delay"))
        return SideConfig(
            tls_verify=opts.get(f"{prefix}tls_verify"),
            cert_dir=opts.get(f"{prefix}cert_dir"),
            user_agent=opts.get("user_agent") or USER_AGENT,
            retry=retry,
            gate=gate,
            registries=registries,
        )

    return side("src_"), side("dest_")


@lru_cache(maxsize=16)
def _source_sides(options_json: str) -> dict[str, SideConfig]:
    opts = json.loads(options_json or "{}")
    src, _dest = _sides(options_json)
    out = {}
    for host, o in (opts.get("source_registries") or {}).items():
        out[host] = SideConfig(
            tls_verify=o.get("tls_verify"),
            cert_dir=o.get("cert_dir"),
            retry=src.retry,
            gate=src.gate,
            registries=src.registries,
            user_agent=src.user_agent,
        )
    return out


@lru_cache(maxsize=256)
def _job_options(job_id: str) -> str:
    """A job's options never change once it is created: read them once per worker process."""
    return _state().jobs.options(job_id)


#: images this process has already marked running (each is marked once, not once per blob)
_started: dict[tuple[str, str], None] = {}
_started_lock = threading.Lock()


def _start_images(job_id: str, image_ids: list[str]) -> None:
    for image_id in image_ids:
        with _started_lock:
            if (job_id, image_id) in _started:
                continue
            if len(_started) > 10_000:
                _started.clear()
            _started[(job_id, image_id)] = None
        _state().jobs.start_image(job_id, image_id)


def _context(job_id: str, step: BlobStep | None = None) -> EngineContext:
    """The engine's context for one task; a blob task's records locations only in the store it writes to."""
    options = _job_options(job_id)
    src, dest = _sides(options)
    locations: Any = _state().locations
    if step is not None:
        locations = DestinationLocations(_state().locations, frozenset({blob_store(step)}))
    return EngineContext(
        source_side=src,
        dest_side=dest,
        source_sides=dict(_source_sides(options)),
        locations=locations,
        pool=_pool(),
    )


def _lock_wait(task: Task) -> float:
    waits = int(getattr(task.request, "retries", 0) or 0)
    return float(min(0.2 * 2**waits, LOCK_WAIT_POLL) * random.uniform(0.75, 1.25))


def _wait_for_lock(store: str, digest: str, cancelled: Callable[[], bool]) -> InFlightLock | None:
    """Take the in-flight lock of a digest another task is uploading, waiting in place for its upload to end:
    looked at soon at first (most blobs are small), then every ``FERRY_LOCK_POLL`` seconds, for at most
    ``FERRY_LOCK_WAIT`` seconds (one SET per look). ``None``: still busy (or the job was cancelled)."""
    locks = _state().locks
    deadline = time.monotonic() + LOCK_WAIT_MAX
    pause = 0.1
    while time.monotonic() < deadline:
        time.sleep(min(pause, max(deadline - time.monotonic(), 0.0)) * random.uniform(0.8, 1.2))
        lock = locks.acquire(store, digest, LOCK_TTL)
        if lock is not None:
            if cancelled():  # cancelled while waiting: start nothing
                release(lock)
                return None
            return lock
        if pause >= LOCK_WAIT_POLL / 2 and cancelled():
            return None
        pause = min(pause * 2, LOCK_WAIT_POLL)
    return None


def _host(name: ImageName) -> str:
    return name.reference.api_host if name.reference is not None else ""


def _host_of(text: str) -> str:
    """The registry of a name from a task message, or ``""`` when it does not parse (an error is being recorded)."""
    try:
        return _host(ImageName.parse(text))
    except FerryError:
        return ""


@contextmanager
def _heartbeat(ctx: EngineContext, job_id: str, lock: Lock) -> Iterator[None]:
    """Renew the in-flight lock and watch for cancellation while a transfer runs."""
    stop = threading.Event()
    jobs = _state().jobs

    def beat() -> None:
        # renew the lock every third of its life; look for a cancel at least every 2 s
        interval = min(LOCK_TTL / 3, 2.0)
        last_renew = time.monotonic()
        while not stop.wait(interval):
            try:
                if time.monotonic() - last_renew >= LOCK_TTL / 3 - interval / 2:
                    last_renew = time.monotonic()
                    if not renew(lock, LOCK_TTL):
                        log.warning("lost the in-flight lock %s", lock.name)
                if jobs.cancelled(job_id):
                    ctx.cancel.set()
            except Exception:  # Redis hiccup: the lock may lapse, the upload is still correct
                log.debug("heartbeat failed", exc_info=True)

    t = threading.Thread(target=beat, name="ferry-heartbeat", daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join(timeout=5)


def _worker_name(task: Task) -> str:
    """The Celery node name (``--hostname``, e.g. ``w1@host``): unique per worker, even several on one machine."""
    return str(getattr(task.request, "hostname", None) or socket.gethostname())


def _meter(job_id: str, step: BlobStep, worker: str) -> telemetry.TransferMeter:
    return telemetry.TransferMeter(
        _state().r,
        job_id=job_id,
        step_id=step.id,
        digest=str(step.digest),
        size=step.size,
        worker=worker,
        source_registry=_host(step.source),
        destination_registry=_host(step.destination),
    )


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if isinstance(exc, FerryError) else f"internal error: {type(exc).__name__}: {text}"


def _fail_images(
    job_id: str,
    step_id: str,
    image_ids: list[str],
    error: str,
    worker: str,
    destination_registry: str,
    waited_on: bool = False,
) -> None:
    """A blob failed for good: it and every image it belongs to fail (best effort: Redis may be the cause). The
    steps that waited for it are sent on: each may still upload the blob itself."""
    try:
        jobs = _state().jobs
        waiting = jobs.blob_ended(job_id, step_id, BlobState(BlobStatus.FAILED, worker=worker, error=error), waited_on)
        telemetry.count_blob(jobs.r, "failed", destination_registry)
        for image_id in image_ids:
            jobs.end_image(job_id, image_id, ImageStatus.FAILED, error)
        _release_waiting(job_id, step_id, waiting, False)
    except Exception:
        log.exception("could not record the failure of %s/%s: %s", job_id, step_id, error)


def send_finalizers(job_id: str, image_ids: list[str]) -> None:
    for image_id in image_ids:
        finalize_image.apply_async((job_id, image_id))


def waiting_entry(args: list[Any] | tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """How a blob task that waits for another step is kept (``JobStore.defer``) until that step ends."""
    return json.dumps({"a": list(args), "k": kwargs}, separators=(",", ":"))


def send_waiting(entries: list[str], done_step: str = "") -> None:
    """Send the blob tasks that waited for a step which has now ended (``done_step``: the step, when it ended
    done: a mount from the repository it wrote is then sure to work)."""
    for raw in entries:
        entry = json.loads(raw)
        kwargs = dict(entry.get("k") or {})
        if done_step:
            kwargs["after"] = done_step
        copy_blob.apply_async(tuple(entry["a"]), kwargs or None)


@app.task(name="ferry.copy_blob", bind=True, max_retries=None, acks_late=True, ignore_result=True)
def copy_blob(
    self: Task,
    job_id: str,
    image_id: str,
    step_id: str,
    source: str,
    destination: str,
    digest: str,
    size: int,
    media_type: str,
    mount_from: str | None = None,
    images: list[str] | None = None,
    recompress: list[Any] | None = None,
    waited_on: bool = False,
    after: str = "",
) -> dict[str, Any]:
    """Make one blob exist at the destination: skip, mount, or stream it (once per registry at a time).

    ``recompress``: [source digest, source size, source media type, transform] of a layer (de/re)compressed on
    the way (``BlobStep.recompress_message``). ``waited_on``: other steps of the job wait for this one (the
    same blob into other repositories of the registry, or other tags): they are sent when it ends. ``after``:
    this step waited for that step, which ended done (so the blob is in the registry, in ``mount_from`` or in
    this very repository).
    """
    image_ids = list(images or [image_id])
    worker = _worker_name(self)
    try:
        # the message's names and digest are parsed here, once: a malformed one fails the blob's images
        step = BlobStep.from_message(step_id, source, destination, digest, size, media_type, mount_from, recompress)
        if after:
            step = dataclasses.replace(step, deps=(after,))
        return _copy_blob(self, job_id, step, image_ids, worker, waited_on, bool(after))
    except Retry:
        raise
    except Exception as exc:
        # a permanent registry error, a bug, or Redis gone: the blob's images end failed, never stay running
        _fail_images(job_id, step_id, image_ids, _one_line(exc), worker, _host_of(destination), waited_on)
        raise


def _release_waiting(job_id: str, step_id: str, entries: list[str], done: bool, worker: str = "") -> None:
    """Send on the steps that waited for ``step_id``; when it ended done, those that need at most a mount run
    here, up to ``RELEASE_THREADS`` at once (each would otherwise cost a task of its own), the rest go to the
    queue."""
    if not entries:
        return
    if done and worker and not _state().jobs.cancelled(job_id):
        ctx = _context(job_id)
        try:
            ran = _side_by_side(lambda raw: _run_waiting_here(ctx, job_id, raw, step_id, worker), entries)
        finally:
            ctx.close_transports()
        entries = [raw for raw, here in zip(entries, ran, strict=True) if not here]
    send_waiting(entries, step_id if done else "")
    _state().jobs.forget_waiting(job_id, step_id)


def _run_waiting_here(ctx: EngineContext, job_id: str, raw: str, after: str, worker: str) -> bool:
    """Run a step that waited for ``after`` (done) if a mount or nothing makes its blob exist; False: it must
    be sent as a task (it needs an upload, it is waited on itself, or something went wrong)."""
    entry = json.loads(raw)
    kwargs = dict(entry.get("k") or {})
    if kwargs.get("waited_on"):
        return False
    try:
        _job, image_id, step_id, source, destination, digest, size, media_type, mount_from, images = entry["a"]
        step = BlobStep.from_message(
            step_id, source, destination, digest, size, media_type, mount_from, kwargs.get("recompress")
        )
        step = dataclasses.replace(step, deps=(after,))
        image_ids = list(images or [image_id])
        _start_images(job_id, image_ids)
        result = existing_blob(ctx, step, deps_done=True)
    except Exception:
        log.debug("step %s/%s goes to the queue", job_id, entry.get("a"), exc_info=True)
        return False
    if result is None:
        return False
    try:
        jobs = _state().jobs
        done = BlobState(BlobStatus.DONE, result.action, result.bytes, worker)
        ready, _ = jobs.blob_done(job_id, step.id, done, image_ids)
        telemetry.count_blob(jobs.r, result.action.value, _host(step.destination))
    except Exception:
        # Redis away: the step's own task (sent instead) finds it done, or does it, and sends the finalizers
        log.debug("step %s/%s goes to the queue", job_id, step.id, exc_info=True)
        return False
    finalize_here(job_id, ready)
    return True


def _copy_blob(
    self: Task, job_id: str, step: BlobStep, image_ids: list[str], worker: str, waited_on: bool, deps_done: bool
) -> dict[str, Any]:
    state = _state()
    jobs = state.jobs
    cancelled, current, running = jobs.blob_begin(job_id, step.id, image_ids)
    if cancelled:
        return {"digest": str(step.digest), "action": "cancelled"}
    if current.status == BlobStatus.DONE:
        # delivered again (or a duplicate): the first delivery may have died before starting the finalizers
        # and sending the steps that waited for this one
        left = jobs.images_left(job_id, image_ids)
        send_finalizers(job_id, [i for i, n in left.items() if n <= 0 and not jobs.image(job_id, i).status.ended])
        if waited_on:
            _release_waiting(job_id, step.id, jobs.blob_done(job_id, step.id, current, [], True)[1], True)
        return {"digest": str(step.digest), "action": current.action or "done", "bytes": 0}
    _start_images(job_id, [i for i in image_ids if i not in running])
    ctx = _context(job_id, step)
    upload: BlobUpload | None = None
    try:
        # no lock to skip or mount: only an upload must be the only one of its digest to its registry. The
        # check of a blob with nothing to mount it from opens its upload session too (one request, not two)
        result, upload = check_blob(ctx, step, deps_done=deps_done)
        if result is None:
            result = _upload(self, ctx, job_id, step, worker, upload)
    except FerryError as exc:
        if ctx.cancel.is_set() or jobs.cancelled(job_id):
            state_ = BlobState(BlobStatus.CANCELLED, worker=worker)
            _release_waiting(job_id, step.id, jobs.blob_ended(job_id, step.id, state_, waited_on), False)
            telemetry.count_blob(jobs.r, "cancelled", _host(step.destination))
            return {"digest": str(step.digest), "action": "cancelled"}
        error = " ".join(str(exc).split())
        if not is_temporary(exc):
            raise
        # every temporary failure counts, wherever it happened (HEAD, mount or transfer)
        failures = jobs.blob_failure(job_id, step.id, error, worker)
        limit = int(json.loads(_job_options(job_id)).get("task_retries", DEFAULT_TASK_RETRIES))
        if failures > limit:
            raise
        countdown = getattr(exc, "retry_after", None) or min(60.0, 2.0**failures) * random.uniform(0.5, 1.0)
        telemetry.count(jobs.r, "blob_retries", registry=_host(step.destination), reason=type(exc).__name__)
        raise self.retry(countdown=countdown, max_retries=None) from exc
    finally:
        if upload is not None:
            upload.cancel()  # not used (a retry, a wait, an error): give the session back
        ctx.close_transports()
    done = BlobState(BlobStatus.DONE, result.action, result.bytes, worker)
    ready, waiting = jobs.blob_done(job_id, step.id, done, image_ids, waited_on)
    try:
        telemetry.count_blob(jobs.r, result.action.value, _host(step.destination))
        finalize_here(job_id, ready)
        _release_waiting(job_id, step.id, waiting, True, worker)
    except Exception as exc:
        # the blob is done (never to be failed now): run again as a redelivery would, which finalizes its
        # images and sends the steps that waited for it
        log.warning("after %s/%s was done: %s; running again", job_id, step.id, _one_line(exc))
        raise self.retry(countdown=2.0, max_retries=None) from exc
    return {"digest": str(step.digest), "action": result.action.value, "bytes": result.bytes}


def _upload(
    self: Task, ctx: EngineContext, job_id: str, step: BlobStep, worker: str, upload: BlobUpload | None = None
) -> BlobResult:
    """Stream the blob, holding its in-flight lock; when another task holds it (the same digest to the same
    registry, from another job), wait for that upload to end and look again: a mount or nothing may do then."""
    store = blob_store(step)
    lock = _state().locks.acquire(store, str(step.digest), LOCK_TTL)
    waited = lock is None
    if lock is None:
        if upload is not None:
            upload.cancel()  # the other upload may well bring the blob: no session left open while waiting
            upload = None
        lock = _wait_for_lock(store, str(step.digest), lambda: _state().jobs.cancelled(job_id))
        if lock is None:
            if _state().jobs.cancelled(job_id):
                ctx.cancel.set()
                raise Cancelled("copy interrupted")
            # still busy after FERRY_LOCK_WAIT seconds (a long upload): queue up again rather than hold a slot
            raise self.retry(countdown=_lock_wait(self), max_retries=None)
    try:
        if waited:
            found = existing_blob(ctx, step)
            if found is not None:
                return found
        return _transfer(self, ctx, job_id, step, lock, worker, upload)
    finally:
        release(lock)


def _transfer(
    self: Task, ctx: EngineContext, job_id: str, step: BlobStep, lock: Lock, worker: str, upload: BlobUpload | None
) -> BlobResult:
    state = _state()
    host = _host(step.destination)
    limit = _gate().limits(host).concurrency if host else 0
    with state.hosts.slot(host, self.request.id or step.id, float(visibility_timeout()), limit) as got:
        if not got:
            # the registry's transfer slots are all taken: queue up again shortly
            raise self.retry(countdown=1.0 + random.random() * 2, max_retries=None)
        state.jobs.blob_attempt(job_id, step.id, worker)
        with _heartbeat(ctx, job_id, lock), telemetry.metering(ctx, _meter(job_id, step, worker)):
            return transfer_blob(ctx, step, upload=upload)


@lru_cache(maxsize=4)
def _signer(config_json: str) -> Signer:
    """The job's signing key, read from this worker's own files (the job names paths, never key bytes)."""
    return Signer(SigningConfig.from_json(json.loads(config_json)))


@app.task(name="ferry.finalize_image", bind=True, max_retries=None, acks_late=True, ignore_result=True)
def finalize_image(
    self: Task,
    job_id: str,
    image_id: str,
    sign_digests: list[str] | None = None,
    since: float = 0.0,
    errors: int = 0,
) -> dict[str, Any]:
    """Once every blob of the image exists: push child manifests, the index, then the tag(s).

    Two separate, bounded reasons to run again later: the image's blobs are not all done yet (the finalizer was
    sent early; it waits up to ``finalize_wait()`` seconds from ``since``), and a temporary registry error (up to
    ``FINALIZE_RETRIES`` times, counted in ``errors``). Whatever else happens, the image ends ``failed`` with
    the reason. When the job signs, the image's manifests (``sign_digests``, else those its record lists) are
    signed with the key read from this worker's own file.
    """
    try:
        return _finalize(job_id, image_id, sign_digests, since, errors)
    except _Later as later:
        raise self.retry(countdown=later.countdown, kwargs=later.kwargs, max_retries=None) from later.__cause__
    except Exception as exc:
        try:
            _state().jobs.end_image(job_id, image_id, ImageStatus.FAILED, _one_line(exc))
        except Exception:
            log.exception("could not record the failure of image %s/%s", job_id, image_id)
        raise


class _Later(Exception):
    """The finalizer must run again in ``countdown`` seconds with these keyword arguments."""

    def __init__(self, countdown: float, kwargs: dict[str, Any]) -> None:
        super().__init__(countdown)
        self.countdown = countdown
        self.kwargs = kwargs


def finalize_here(job_id: str, image_ids: list[str]) -> None:
    """Finalize images whose last blob this task has just recorded ``done``, here rather than as tasks of their
    own (a task costs Redis about ten commands): a finalizer that must run again later, and any image when
    task events are on (Flower lists every finalizer then), goes to the queue as ``ferry.finalize_image``."""
    if not image_ids:
        return
    if app.conf.worker_send_task_events:
        send_finalizers(job_id, image_ids)
        return

    def one(image_id: str) -> None:
        try:
            _finalize(job_id, image_id, None, 0.0, 0, ready=True)
        except _Later as later:
            finalize_image.apply_async((job_id, image_id), later.kwargs, countdown=later.countdown)
        except Exception as exc:
            log.warning("finalizer of %s/%s: %s", job_id, image_id, _one_line(exc))
            try:
                _state().jobs.end_image(job_id, image_id, ImageStatus.FAILED, _one_line(exc))
            except Exception:
                log.exception("could not record the failure of image %s/%s", job_id, image_id)

    # a layer many images share often ends last: their manifests go side by side, not one round trip after another
    _side_by_side(one, image_ids)


def _side_by_side(run: Callable[[_T], _R], items: list[_T]) -> list[_R]:
    """``run`` over ``items``, up to ``RELEASE_THREADS`` at once (one item: here); results in ``items``' order.
    For follow-up work a task does inline (mounts that waited for its upload, finalizers of images it
    completed): each is a round trip or two, and one after the other they were the tail of a job."""
    if len(items) <= 1:
        return [run(item) for item in items]
    with ThreadPoolExecutor(min(RELEASE_THREADS, len(items)), thread_name_prefix="ferry-inline") as pool:
        return list(pool.map(run, items))


def _finalize(
    job_id: str, image_id: str, sign_digests: list[str] | None, since: float, errors: int, ready: bool = False
) -> dict[str, Any]:
    """``ready``: this task has just counted the image's last blob off (every blob of it is ``done``)."""
    jobs = _state().jobs
    record = jobs.image(job_id, image_id)
    to_sign = list(sign_digests or record.sign)
    if (record.status.ended and not to_sign) or jobs.cancelled(job_id):
        return {"image": image_id, "status": record.status.value}
    states = {} if ready else jobs.blob_states(job_id, jobs.image_blob_ids(job_id, image_id))
    lost = [s for s in states.values() if s.status in (BlobStatus.FAILED, BlobStatus.CANCELLED)]
    if lost:
        jobs.end_image(job_id, image_id, ImageStatus.FAILED, lost[0].error or f"a blob was {lost[0].status}")
        return {"image": image_id, "status": "failed"}
    unfinished = [sid for sid, s in states.items() if s.status != BlobStatus.DONE]
    if unfinished:
        # sent before every blob was done: never write a manifest, let alone a tag, before everything it points
        # to exists; look again shortly, for a bounded time
        started = since or time.time()
        waited = time.time() - started
        if waited >= finalize_wait():
            error = f"gave up after waiting {waited:.0f}s for {len(unfinished)} blob(s) to be copied"
            jobs.end_image(job_id, image_id, ImageStatus.FAILED, error)
            return {"image": image_id, "status": "failed"}
        log.warning("finalizer of %s/%s early: %d blob(s) not done; waiting", job_id, image_id, len(unfinished))
        countdown = min(2.0 + waited / 4, 30.0)
        raise _Later(countdown, {"since": started, "errors": errors})
    ctx = _context(job_id)
    steps = jobs.manifest_steps(job_id, image_id)
    try:
        for step in steps:
            run_manifest_step(ctx, step)
        ctx.commit()
        sign = json.loads(_job_options(job_id)).get("sign")
        if sign and to_sign:
            sign_written(_signer(json.dumps(sign, sort_keys=True)), ctx.destination(record.destination), to_sign)
    except FerryError as exc:
        if is_temporary(exc) and errors < FINALIZE_RETRIES:
            log.warning("finalizer of %s/%s: %s; retrying", job_id, image_id, " ".join(str(exc).split()))
            countdown = FINALIZE_BACKOFF * 2.0 ** (errors + 1)
            raise _Later(countdown, {"since": since, "errors": errors + 1}) from exc
        raise
    finally:
        ctx.close_transports()
    # an image that needed only its signature was already up to date
    jobs.end_image(job_id, image_id, ImageStatus.DONE if steps else ImageStatus.UP_TO_DATE)
    return {"image": image_id, "status": "done", "digest": record.digest}


__all__ = [
    "ImageName", "copy_blob", "finalize_here", "finalize_image", "send_finalizers", "send_waiting", "waiting_entry",
]  # fmt: skip
