"""Shared state in Redis for every worker and producer, split by concern.

* :class:`JobStore` (``jobs``): jobs, their images and blob steps, statuses and counters;
* :class:`RedisBlobLocations` (``locations``): which repositories of a registry hold a digest;
* :class:`InFlightLocks` (``locks``): one upload of a digest per registry at a time;
* :class:`HostLimits` (``hosts``): per-registry transfer slots, request budget and backoff (and
  :class:`RedisGate`, the registry client's view of them);
* :class:`WorkerRegistry` (``workers``): which workers consume which queue.

Nothing here imports Celery. No credential is ever written here: records hold image names, digests, sizes,
states and error texts (which the registry client builds without secrets).

Keys (all under ``ferry:``)::

    jobs                      zset   job id -> created time
    job:{id}                  hash   kind, state, created, finished, touched, images, ended, failed, cancelled, options
    job:{id}:plan             string the plan as JSON (manifests included; a few KB per image)
    job:{id}:images           hash   image id -> JSON {source, destination, status, error, digest, size, enqueued}
    job:{id}:blobs            hash   step id -> JSON {digest, size, images}            (written once)
    job:{id}:blob_state       hash   step id -> JSON {status, action, bytes, worker, error}
    job:{id}:counts           hash   "{step id}:a" attempts, "{step id}:f" temporary failures
    job:{id}:left             hash   image id -> how many of its blobs are not done yet
    job:{id}:manifests        hash   image id -> JSON list of the image's manifest steps (finalizer input)
    job:{id}:image_blobs      hash   image id -> JSON list of the image's blob step ids
    job:{id}:cancel           string set when the job is cancelled
    loc:{store}:{digest}      zset   repositories holding the blob -> last seen
    lock:{store}:{digest}     string in-flight upload lock (token), with expiry
    backoff:{host}            string unix time until which every worker holds off the host
    sem:{host}                zset   holders of a per-host transfer slot -> expiry time
    limits                    hash   host -> JSON {concurrency, rps}
    rate:{host}               zset   requests admitted to the host in the last second -> time (ms)
    consumers:{queue}         zset   worker name -> last time it said it consumes the queue
"""

from __future__ import annotations

from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from ._keys import JOB_TTL, LOCATION_TTL, PREFIX
from .hosts import HostLimits, Limits, RedisGate
from .jobs import BlobRecord, BlobState, ImageRecord, JobRecord, JobStore
from .locations import RedisBlobLocations
from .locks import InFlightLocks
from .workers import WorkerRegistry

#: a command that meets a closed connection (Redis restarting) reconnects and tries again for about 20 s
RECONNECT = Retry(ExponentialBackoff(cap=2.0, base=0.1), retries=12)


def connect(url: str, *, reconnect: bool = False) -> redis.Redis:
    """A client for the queue's Redis. Workers pass ``reconnect``: a command that meets a Redis restarting waits
    for it (about 20 s) instead of failing the task; a command line tool fails at once with a clear error."""
    # health checks and keepalive: a connection dropped by a Redis restart is noticed and re-made before use
    extra: dict[str, Any] = {}
    if reconnect:
        extra = {
            "retry": RECONNECT,
            "retry_on_error": [redis.exceptions.ConnectionError, redis.exceptions.TimeoutError],
        }
    return redis.Redis.from_url(
        url,
        decode_responses=True,
        socket_timeout=30,
        socket_connect_timeout=10,
        socket_keepalive=True,
        health_check_interval=15,
        **extra,
    )


class SharedState:
    """Every concern over one connection pool."""

    def __init__(self, r: redis.Redis) -> None:
        self.r = r
        self.jobs = JobStore(r)
        self.locations = RedisBlobLocations(r)
        self.locks = InFlightLocks(r)
        self.hosts = HostLimits(r)
        self.workers = WorkerRegistry(r)

    def close(self) -> None:
        self.r.close()


__all__ = [
    "JOB_TTL",
    "LOCATION_TTL",
    "PREFIX",
    "BlobRecord",
    "BlobState",
    "HostLimits",
    "ImageRecord",
    "InFlightLocks",
    "JobRecord",
    "JobStore",
    "Limits",
    "RedisBlobLocations",
    "RedisGate",
    "SharedState",
    "WorkerRegistry",
    "connect",
]
