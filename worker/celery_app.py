"""The Celery application. Broker and result backend: the Redis at ``$FERRY_QUEUE``.

Start workers with ``ferry worker`` or plainly ``celery -A worker.celery_app worker``;
Flower with ``celery -A worker.celery_app flower``.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from celery import Celery
from celery.signals import worker_ready, worker_shutdown
from kombu.entity import Exchange, Queue

DEFAULT_QUEUE_URL = "redis://127.0.0.1:6379/0"
#: blob transfers: large, slow; metadata: manifests, finalizers, HEADs. Separate so big blobs never starve finalizers.
BLOB_QUEUE = "ferry.blobs"
META_QUEUE = "ferry.meta"


def queue_url() -> str:
    return os.environ.get("FERRY_QUEUE") or DEFAULT_QUEUE_URL


def visibility_timeout() -> int:
    """Seconds before Redis hands an unacknowledged task to another worker.

    It must exceed the longest blob transfer (a dead worker's task is redone after
    this long); the default is 6 hours. Tests shorten it to see a redelivery.
    """
    return int(os.environ.get("FERRY_VISIBILITY_TIMEOUT", str(6 * 3600)))


def transport_options(timeout: int | None = None) -> dict[str, int]:
    """Redis transport options: the visibility timeout, and how often workers look for tasks to redeliver.

    A worker re-queues the unacknowledged tasks older than the visibility timeout only when it sweeps, and
    kombu sweeps every ``unacked_restore_interval * unacked_restore_throttle`` seconds (100 by default). Sweep
    about five times per visibility timeout (at most every 100 s, at least every second), so a dead worker's
    task is redone soon after the timeout rather than minutes later.
    """
    timeout = visibility_timeout() if timeout is None else timeout
    sweep = min(max(timeout // 5, 1), 100)
    interval = min(sweep, 10)
    return {
        "visibility_timeout": timeout,
        "unacked_restore_interval": interval,
        "unacked_restore_throttle": max(sweep // interval, 1),
    }


def events_wanted() -> bool:
    """Whether Celery task events are sent (``FERRY_EVENTS=1``; ``ferry worker --events``): Flower needs them;
    nothing else does, and they cost four Redis commands per task (the send, received, started, succeeded)."""
    return os.environ.get("FERRY_EVENTS", "").strip().lower() in ("1", "true", "yes", "on")


def make_app(url: str | None = None) -> Celery:
    url = url or queue_url()
    # FerryTask: Flower's task list shows "job=… image=… digest=…" instead of raw argument tuples
    celery = Celery("ferry", broker=url, backend=url, include=["worker.tasks"], task_cls="worker.task_labels:FerryTask")
    transport = transport_options()
    celery.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        # idempotent tasks acknowledged only when done: a dead worker's task is redone elsewhere
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options=transport,
        result_backend_transport_options=transport,
        broker_connection_retry_on_startup=True,
        task_default_queue=META_QUEUE,
        # declared so that a plain ``celery -A worker.celery_app worker`` consumes both
        task_queues=tuple(Queue(q, Exchange(q), routing_key=q) for q in (BLOB_QUEUE, META_QUEUE)),
        task_routes={"ferry.copy_blob": {"queue": BLOB_QUEUE}},
        result_expires=24 * 3600,
        task_track_started=True,
        # events only for Flower (``ferry worker --events``, FERRY_EVENTS=1 for producers' task-sent events)
        worker_send_task_events=events_wanted(),
        task_send_sent_event=events_wanted(),
        worker_hijack_root_logger=False,
    )
    return celery


def _survive_broker_loss() -> None:
    """Let a worker reconnect after Redis went away instead of dying (kombu 5.x, Redis transport).

    When the broker connection breaks, Celery's consumer closes it; closing its channel tries to put the
    channel's unacknowledged messages back, which builds a Redis client from connection details that the
    close has already dropped: an ``AttributeError`` (``'NoneType' object has no attribute 'hostname'``) that
    Celery treats as unrecoverable, and the worker stops. Raise it as the connection error it is, which the
    close ignores; the messages stay in Redis's ``unacked`` set and are redelivered after the visibility
    timeout, as for a worker that died.
    """
    import redis.exceptions
    from kombu.transport import redis as kombu_redis

    original = kombu_redis.Channel._connparams
    if getattr(original, "_ferry_patched", False):
        return

    def _connparams(self: Any, asynchronous: bool = False) -> Any:
        if self.connection.client is None:
            raise redis.exceptions.ConnectionError("the broker connection is closed")
        return original(self, asynchronous=asynchronous)

    _connparams._ferry_patched = True  # type: ignore[attr-defined]
    kombu_redis.Channel._connparams = _connparams  # type: ignore[method-assign]


_survive_broker_loss()
app = make_app()


def _announce_consumer(sender: Any, **_: Any) -> None:
    """Say every few seconds, in Redis, which queues this worker consumes (``ferry job wait`` warns when none)."""
    import threading

    from worker.state import SharedState, connect
    from worker.state.workers import BEAT_INTERVAL

    name = str(getattr(sender, "hostname", "") or "worker")
    queues = sorted(app.amqp.queues.consume_from or {}) or [BLOB_QUEUE, META_QUEUE]
    registry = SharedState(connect(queue_url(), reconnect=True)).workers
    stop = threading.Event()

    def beat() -> None:
        while True:
            try:
                registry.beat(name, queues)
            except Exception:  # Redis away for a moment: say it again next time
                pass
            if stop.wait(BEAT_INTERVAL):
                break
        with contextlib.suppress(Exception):
            registry.leave(name, queues)

    threading.Thread(target=beat, name="ferry-consumer-beat", daemon=True).start()
    _beats.append(stop)


def _stop_announcing(**_: Any) -> None:
    for stop in _beats:
        stop.set()


_beats: list[Any] = []
worker_ready.connect(_announce_consumer, weak=False)
worker_shutdown.connect(_stop_announcing, weak=False)
