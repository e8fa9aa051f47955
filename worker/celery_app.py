"""The Celery application. Broker and result backend: the Redis at ``$FERRY_QUEUE``.

Start workers with ``ferry worker`` or plainly ``celery -A worker.celery_app worker``;
Flower with ``celery -A worker.celery_app flower``.
"""

from __future__ import annotations

import os

from celery import Celery

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


def make_app(url: str | None = None) -> Celery:
    url = url or queue_url()
    celery = Celery("ferry", broker=url, backend=url, include=["worker.tasks"])
    transport = {"visibility_timeout": visibility_timeout()}
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
        task_routes={"ferry.copy_blob": {"queue": BLOB_QUEUE}},
        result_expires=24 * 3600,
        task_track_started=True,
        # events for Flower
        worker_send_task_events=True,
        task_send_sent_event=True,
        worker_hijack_root_logger=False,
    )
    return celery


app = make_app()
