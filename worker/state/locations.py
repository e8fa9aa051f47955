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


class DestinationLocations:
    """The location map a blob task uses: reads every store, records only in the stores it writes to.

    After a transfer the engine also records the *source* repository; in Redis that costs two commands per
    blob and serves little: a later copy within that registry mounts from its source repository anyway.
    """

    def __init__(self, inner: RedisBlobLocations, stores: frozenset[str]) -> None:
        self.inner = inner
        self.stores = stores

    def where(self, store: str, digest: str) -> list[str]:
        return self.inner.where(store, digest)

    def add(self, store: str, digest: str, repository: str) -> None:
        if store in self.stores:
            self.inner.add(store, digest, repository)


__all__ = ["DestinationLocations", "RedisBlobLocations"]
