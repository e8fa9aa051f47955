"""Blob locations shared by every worker: which repositories of a registry hold a digest (for mounts)."""

from __future__ import annotations

import threading
import time
from typing import cast

import redis

from . import _keys as k

#: a location key's expiry is set again by a process at most this often (seconds)
EXPIRY_REFRESH = 3600.0


class RedisBlobLocations:
    """``BlobLocations`` (worker.engine.steps) in Redis: one sorted set per (registry, digest), newest first."""

    def __init__(self, r: redis.Redis) -> None:
        self.r = r
        #: location keys this process set the expiry of, and when (monotonic)
        self._expiry_set: dict[str, float] = {}
        self._lock = threading.Lock()

    def where(self, store: str, digest: str) -> list[str]:
        return cast(list[str], self.r.zrevrange(k.location(store, digest), 0, 7))

    def add(self, store: str, digest: str, repository: str) -> None:
        """Record (or refresh) a repository holding the digest; the key's 30-day expiry is renewed at most once
        an hour per process (the same blob mounted into many repositories costs one ZADD each)."""
        key = k.location(store, digest)
        now = time.monotonic()
        with self._lock:
            renew = now - self._expiry_set.get(key, -EXPIRY_REFRESH) >= EXPIRY_REFRESH
            if renew:
                if len(self._expiry_set) > 100_000:
                    self._expiry_set.clear()
                self._expiry_set[key] = now
        pipe = self.r.pipeline(transaction=False)
        pipe.zadd(key, {repository: time.time()})
        if renew:
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
