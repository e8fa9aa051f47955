"""In-flight upload locks: one upload of a digest per registry at a time, across every worker.

A redis-py ``Lock`` (a random token, released and extended only by its holder, with an expiry so a dead
worker's lock lapses). Not thread-local: the task takes it and a heartbeat thread renews it.
"""

from __future__ import annotations

import redis
from redis.lock import Lock

from . import _keys as k


class InFlightLocks:
    def __init__(self, r: redis.Redis) -> None:
        self.r = r

    def acquire(self, store: str, digest: str, ttl: float) -> Lock | None:
        """The lock of ``digest`` in ``store`` for ``ttl`` seconds, or ``None`` when another holder has it."""
        lock = Lock(self.r, k.lock(store, digest), timeout=ttl, blocking=False, thread_local=False)
        return lock if lock.acquire() else None

    def ttl(self, store: str, digest: str) -> float:
        """Seconds left on the current holder's lock (0: nobody holds it)."""
        return max(int(self.r.pttl(k.lock(store, digest))), 0) / 1000.0


def renew(lock: Lock, ttl: float) -> bool:
    """Extend a held lock to ``ttl`` seconds from now; False when it was lost (expired and taken by another)."""
    try:
        return bool(lock.extend(ttl, replace_ttl=True))
    except redis.exceptions.LockError:
        return False


def release(lock: Lock) -> None:
    """Release a held lock; one that expired meanwhile is not ours to delete (and may be another's now)."""
    try:
        lock.release()
    except redis.exceptions.LockError:
        pass


__all__ = ["InFlightLocks", "Lock", "release", "renew"]
