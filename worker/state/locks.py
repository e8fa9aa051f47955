"""In-flight upload locks: one upload of a digest per registry at a time, across every worker.

A redis-py ``Lock`` (a random token, released and extended only by its holder, with an expiry so a dead
worker's lock lapses). Not thread-local: the task takes it and a heartbeat thread renews it.

Releasing costs one ``DEL`` while the lock cannot have expired yet (this process took or renewed it less
than its TTL ago, by its own monotonic clock, which started before Redis set the expiry), and redis-py's
compare-and-delete script only after that (the lock may have lapsed and be another holder's now).
"""

from __future__ import annotations

import time

import redis
from redis.lock import Lock

from . import _keys as k

#: a plain DEL only this long before the lock could expire, at the latest
RELEASE_MARGIN = 1.0


class InFlightLock(Lock):
    """A held lock that knows until when (monotonic time) nobody else can hold it."""

    valid_until: float = 0.0


class InFlightLocks:
    def __init__(self, r: redis.Redis) -> None:
        self.r = r

    def acquire(self, store: str, digest: str, ttl: float) -> InFlightLock | None:
        """The lock of ``digest`` in ``store`` for ``ttl`` seconds, or ``None`` when another holder has it."""
        lock = InFlightLock(self.r, k.lock(store, digest), timeout=ttl, blocking=False, thread_local=False)
        started = time.monotonic()
        if not lock.acquire():
            return None
        lock.valid_until = started + ttl
        return lock

    def ttl(self, store: str, digest: str) -> float:
        """Seconds left on the current holder's lock (0: nobody holds it)."""
        return max(int(self.r.pttl(k.lock(store, digest))), 0) / 1000.0


def renew(lock: Lock, ttl: float) -> bool:
    """Extend a held lock to ``ttl`` seconds from now; False when it was lost (expired and taken by another)."""
    started = time.monotonic()
    try:
        ok = bool(lock.extend(ttl, replace_ttl=True))
    except redis.exceptions.LockError:
        return False
    if ok and isinstance(lock, InFlightLock):
        lock.valid_until = started + ttl
    return ok


def release(lock: Lock) -> None:
    """Release a held lock; one that expired meanwhile is not ours to delete (and may be another's now)."""
    if isinstance(lock, InFlightLock) and time.monotonic() < lock.valid_until - RELEASE_MARGIN:
        lock.redis.delete(lock.name)
        lock.local.token = None
        return
    try:
        lock.release()
    except redis.exceptions.LockError:
        pass


__all__ = ["InFlightLock", "InFlightLocks", "Lock", "release", "renew"]
