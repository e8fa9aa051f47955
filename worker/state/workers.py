"""Which workers consume which queue: each ``ferry worker`` says so every few seconds (``ferry:consumers:{queue}``).

The producer and ``ferry job wait`` read it to warn when nothing consumes a queue a job waits on.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import cast

import redis

from . import _keys as k

#: a worker says it is alive this often ...
BEAT_INTERVAL = 5.0
#: ... and counts as gone when it has not for this long
BEAT_TIMEOUT = 30.0


#: a beat also forgets workers gone for a day, and renews the sets' expiry, this often
TIDY_INTERVAL = 300.0


class WorkerRegistry:
    def __init__(self, r: redis.Redis) -> None:
        self.r = r
        self._tidied = 0.0

    def beat(self, name: str, queues: Iterable[str]) -> None:
        """One ZADD per queue; every ``TIDY_INTERVAL`` also the clean-up and the expiry."""
        now = time.time()
        tidy = now - self._tidied >= TIDY_INTERVAL
        pipe = self.r.pipeline(transaction=False)
        for q in queues:
            pipe.zadd(k.consumers(q), {name: now})
            if tidy:
                pipe.zremrangebyscore(k.consumers(q), "-inf", now - 24 * 3600)
                pipe.expire(k.consumers(q), 24 * 3600)
        pipe.execute()
        if tidy:
            self._tidied = now

    def leave(self, name: str, queues: Iterable[str]) -> None:
        pipe = self.r.pipeline(transaction=False)
        for q in queues:
            pipe.zrem(k.consumers(q), name)
        pipe.execute()

    def live(self, queue: str, within: float = BEAT_TIMEOUT) -> list[str]:
        """Workers that consumed ``queue`` in the last ``within`` seconds."""
        return cast(list[str], self.r.zrangebyscore(k.consumers(queue), time.time() - within, "+inf"))


__all__ = ["BEAT_INTERVAL", "BEAT_TIMEOUT", "WorkerRegistry"]
