"""Thin Celery tasks over the copy engine.

Arguments are identifiers only: a job id, a step id, image names, a digest and
a size; never bytes, never credentials (workers find their own: auth files,
environment, credential helpers). Each task is idempotent: a redelivered or
retried task finds the blob already present and does nothing.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

from celery import Task
from celery.exceptions import Retry

from worker import telemetry
from worker.celery_app import app, visibility_timeout
from worker.engine.plan import BlobStep, ManifestStep
from worker.engine.steps import EngineContext, blob_store, existing_blob, run_manifest_step, transfer_blob
from worker.engine.transports import ClientPool, ImageName, SideConfig
from worker.engine.trust import Signer, SigningConfig, sign_written
from worker.registry import USER_AGENT, FerryError, RetryPolicy, is_temporary
from worker.state import RedisGate, SharedState, connect

log = logging.getLogger("ferry.worker")

#: in-flight lock lifetime; a live transfer renews it every third of this
LOCK_TTL = float(os.environ.get("FERRY_LOCK_TTL", "30"))
#: longest pause before a task waiting on another worker's upload of the same blob looks again
LOCK_WAIT_POLL = float(os.environ.get("FERRY_LOCK_POLL", "2"))
#: how many times a temporary failure of one blob is retried by re-queueing it
DEFAULT_TASK_RETRIES = 5


@lru_cache(maxsize=1)
def _state() -> SharedState:
    from worker.celery_app import queue_url

    return SharedState(connect(queue_url()))


@lru_cache(maxsize=1)
def _pool() -> ClientPool:
    return ClientPool()


@lru_cache(maxsize=16)
def _sides(options_json: str) -> tuple[SideConfig, SideConfig]:
    opts = json.loads(options_json or "{}")
    gate = RedisGate(_state())

    def side(prefix: str) -> SideConfig:
        retry = RetryPolicy(times=int(opts.get("retry_times", 3)), delay=opts.get("retry_delay"))
        return SideConfig(
            tls_verify=opts.get(f"{prefix}tls_verify"),
            cert_dir=opts.get(f"{prefix}cert_dir"),
            user_agent=opts.get("user_agent") or USER_AGENT,
            retry=retry,
            gate=gate,
        )

    return side("src_"), side("dest_")


@lru_cache(maxsize=16)
def _source_sides(options_json: str) -> dict[str, SideConfig]:
    opts = json.loads(options_json or "{}")
    src, _dest = _sides(options_json)
    out = {}
    for host, o in (opts.get("source_registries") or {}).items():
        out[host] = SideConfig(
            tls_verify=o.get("tls_verify"), cert_dir=o.get("cert_dir"), retry=src.retry, gate=src.gate
        )
    return out


@lru_cache(maxsize=256)
def _job_options(job_id: str) -> str:
    """A job's options never change once it is created: read them once per worker process."""
    return str(_state().r.hget(f"ferry:job:{job_id}", "options") or "{}")


def _context(job_id: str) -> EngineContext:
    options = _job_options(job_id)
    src, dest = _sides(options)
    return EngineContext(
        source_side=src, dest_side=dest, source_sides=dict(_source_sides(options)), locations=_state(), pool=_pool()
    )


def _lock_wait(task: Task) -> float:
    waits = int(getattr(task.request, "retries", 0) or 0)
    return float(min(0.2 * 2**waits, LOCK_WAIT_POLL) * random.uniform(0.75, 1.25))


def _host(name: str) -> str:
    ref = ImageName.parse(name).reference
    return ref.api_host if ref is not None else ""


@contextmanager
def _heartbeat(ctx: EngineContext, job_id: str, store: str, digest: str, token: str) -> Iterator[None]:
    """Renew the in-flight lock and watch for cancellation while a transfer runs."""
    stop = threading.Event()
    state = _state()

    def beat() -> None:
        # renew the lock every third of its life; look for a cancel at least every 2 s
        interval = min(LOCK_TTL / 3, 2.0)
        last_renew = time.monotonic()
        while not stop.wait(interval):
            try:
                if time.monotonic() - last_renew >= LOCK_TTL / 3 - interval / 2:
                    last_renew = time.monotonic()
                    if not state.extend_lock(store, digest, token, LOCK_TTL):
                        log.warning("lost the in-flight lock of %s", digest)
                if state.cancelled(job_id):
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
        digest=step.digest,
        size=step.size,
        worker=worker,
        source_registry=_host(step.source),
        destination_registry=_host(step.destination),
    )


def _fail_images(job_id: str, step_id: str, image_ids: list[str], error: str) -> None:
    state = _state()
    state.update_blob(job_id, step_id, status="failed", error=error)
    for image_id in image_ids:
        state.update_image(job_id, image_id, status="failed", error=error)


@app.task(name="ferry.copy_blob", bind=True, max_retries=None, acks_late=True)
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
) -> dict[str, Any]:
    """Make one blob exist at the destination: skip, mount, or stream it (once per registry at a time)."""
    state = _state()
    if state.cancelled(job_id):
        return {"digest": digest, "action": "cancelled"}
    rec = state.blob(job_id, step_id)
    if rec.get("status") == "done":
        return {"digest": digest, "action": rec.get("action", "done"), "bytes": 0}
    step = BlobStep(step_id, source, destination, digest, size, media_type, mount_from=mount_from)
    images = list(rec.get("images") or [image_id])
    ctx = _context(job_id)
    store = blob_store(step)
    worker = _worker_name(self)
    try:
        for image in images:
            state.start_image(job_id, image)
        if state.lock_ttl(store, digest) > 0:
            # another worker is uploading this blob right now: a mount would be refused, so wait and
            # look again, soon at first (most blobs are small), then every FERRY_LOCK_POLL seconds
            raise self.retry(countdown=_lock_wait(self), max_retries=None)
        result = existing_blob(ctx, step)
        if result is None:
            token = state.acquire_lock(store, digest, LOCK_TTL)
            if token is None:
                raise self.retry(countdown=_lock_wait(self), max_retries=None)
            try:
                result = existing_blob(ctx, step)
                if result is None:
                    slot_ttl = float(visibility_timeout())
                    with state.slot(_host(destination), self.request.id or step_id, ttl=slot_ttl) as got:
                        if not got:
                            # the registry's transfer slots are all taken: queue up again shortly
                            raise self.retry(countdown=1.0 + random.random() * 2, max_retries=None)
                        state.blob_attempt(job_id, step_id, worker)
                        meter = _meter(job_id, step, worker)
                        with _heartbeat(ctx, job_id, store, digest, token), telemetry.metering(ctx, meter):
                            result = transfer_blob(ctx, step)
            finally:
                state.release_lock(store, digest, token)
        state.update_blob(job_id, step_id, status="done", action=result.action, bytes=result.bytes, worker=worker)
        telemetry.count_blob(state.r, result.action, _host(destination))
        return {"digest": digest, "action": result.action, "bytes": result.bytes}
    except Retry:
        raise
    except FerryError as exc:
        if state.cancelled(job_id):
            state.update_blob(job_id, step_id, status="cancelled")
            telemetry.count_blob(state.r, "cancelled", _host(destination))
            return {"digest": digest, "action": "cancelled"}
        error = " ".join(str(exc).split())
        # every temporary failure counts, wherever it happened (HEAD, mount or transfer)
        failures = int(state.update_blob(job_id, step_id, status="retrying", error=error).get("failures", 0)) + 1
        state.update_blob(job_id, step_id, failures=failures)
        limit = int(json.loads(_job_options(job_id)).get("task_retries", DEFAULT_TASK_RETRIES))
        if is_temporary(exc) and failures <= limit and not ctx.cancel.is_set():
            countdown = getattr(exc, "retry_after", None) or min(60.0, 2.0**failures) * random.uniform(0.5, 1.0)
            telemetry.count(state.r, "blob_retries", registry=_host(destination), reason=type(exc).__name__)
            raise self.retry(countdown=countdown, max_retries=None) from exc
        telemetry.count_blob(state.r, "failed", _host(destination))
        _fail_images(job_id, step_id, images, error)
        raise
    except Exception as exc:
        # a bug or a Redis outage: fail the image with the reason instead of leaving it running forever
        _fail_images(job_id, step_id, images, f"internal error: {type(exc).__name__}: {exc}")
        raise
    finally:
        ctx.close_transports()


@lru_cache(maxsize=4)
def _signer(config_json: str) -> Signer:
    """The job's signing key, read from this worker's own files (the job names paths, never key bytes)."""
    return Signer(SigningConfig.from_json(json.loads(config_json)))


@app.task(name="ferry.finalize_image", bind=True, acks_late=True)
def finalize_image(self: Task, job_id: str, image_id: str, sign_digests: list[str] | None = None) -> dict[str, Any]:
    """Once every blob of the image exists: push child manifests, the index, then the tag(s); then sign."""
    state = _state()
    record = state.image(job_id, image_id)
    if state.cancelled(job_id) or record.get("status") in ("failed", "cancelled"):
        return {"image": image_id, "status": record.get("status", "cancelled")}
    unfinished = state.unfinished_blobs(job_id, image_id)
    if unfinished:
        # the chord fired early (a blob task delivered twice counts twice): never write a manifest,
        # let alone a tag, before everything it points to exists; look again shortly
        log.warning("finalizer of %s/%s early: %d blob(s) not done; waiting", job_id, image_id, len(unfinished))
        raise self.retry(countdown=2.0, max_retries=None)
    steps = [ManifestStep(**s) for s in _manifest_steps(job_id, image_id)]
    ctx = _context(job_id)
    try:
        for step in steps:
            run_manifest_step(ctx, step)
        ctx.commit()
        sign = json.loads(_job_options(job_id)).get("sign")
        if sign and sign_digests:
            signer = _signer(json.dumps(sign, sort_keys=True))
            sign_written(signer, ctx.destination(record["destination"]), sign_digests)
    except FerryError as exc:
        error = " ".join(str(exc).split())
        if is_temporary(exc) and self.request.retries < DEFAULT_TASK_RETRIES:
            raise self.retry(countdown=2.0 ** (self.request.retries + 1), exc=exc) from exc
        state.update_image(job_id, image_id, status="failed", error=error)
        raise
    except Exception as exc:
        state.update_image(job_id, image_id, status="failed", error=f"internal error: {type(exc).__name__}: {exc}")
        raise
    finally:
        ctx.close_transports()
    # an image that needed only its signature was already up to date
    state.update_image(job_id, image_id, status="done" if steps else "up-to-date", finished=time.time())
    return {"image": image_id, "status": "done", "digest": record.get("digest", "")}


def _manifest_steps(job_id: str, image_id: str) -> list[dict[str, Any]]:
    raw = _state().r.hget(f"ferry:job:{job_id}:manifests", image_id)
    steps: list[dict[str, Any]] = json.loads(str(raw)) if raw else []
    for s in steps:
        s["raw"] = s["raw"].encode()
        s["deps"] = tuple(s.get("deps") or ())
    return steps


__all__ = ["ImageName", "copy_blob", "finalize_image"]
