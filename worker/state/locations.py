"""Blob locations shared by every worker: which repositories of a registry hold a digest (for mounts)."""

from __future__ import annotations

import time
from typing import cast

import redis

from . import _keys as k


class RedisBlobLocations:
    """``BlobLocations`` (worker.engine.steps) in Redis: one sorted set per (registry, digest), newest first."""

    def __init__(self, r: redis.Redis) -> None:
        self.r = r

    def where(self, store: str, digest: str) -> list[str]:
        return cast(list[str], self.r.zrevrange(k.location(store, digest), 0, 7))

    def add(self, store: str, digest: str, repository: str) -> None:
        key = k.location(store, digest)
        pipe = self.r.pipeline(transaction=False)
        pipe.zadd(key, {repository: time.time()})
        pipe.expire(key, k.LOCATION_TTL)
        pipe.execute()


__all__ = ["RedisBlobLocations"]
