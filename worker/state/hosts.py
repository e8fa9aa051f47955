"""Per-registry limits shared by every worker: transfer slots, a requests-per-second budget, and a backoff.

* ``ferry limit HOST --concurrency N``: at most N blob transfers to the host at once (``sem:{host}``, a sorted set
  of holders by expiry, so a dead holder's slot lapses).
* ``--rps R``: at most R requests to the host in any one-second window, across every worker: a sliding-window
  log (``rate:{host}``, a sorted set of request times), so there is no 2x burst at a window boundary as a
  fixed per-second counter allows.
* When a host answers 429 with Retry-After, every worker holds off it until then (``backoff:{host}``); a later,
  shorter Retry-After never shortens it.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import cast

import redis

from worker import telemetry
from worker.registry import HeldOff

from . import _keys as k

# KEYS: holders; ARGV: now, expiry, limit, holder
_SLOT_ACQUIRE = """
redis.call('zremrangebyscore', KEYS[1], '-inf', ARGV[1])
if redis.call('zcard', KEYS[1]) < tonumber(ARGV[3]) then
  redis.call('zadd', KEYS[1], ARGV[2], ARGV[4])
  redis.call('expire', KEYS[1], 3600)
  return 1
end
return 0
"""

# KEYS: backoff; ARGV: until (unix time), milliseconds to keep the key. Only ever lengthens the backoff.
_BACKOFF = """
local current = tonumber(redis.call('get', KEYS[1]) or '0')
if tonumber(ARGV[1]) > current then redis.call('set', KEYS[1], ARGV[1], 'px', ARGV[2]) return 1 end
return 0
"""

# KEYS: request log; ARGV: now (ms), window (ms), limit, member.
# Admits the request (returns 0) when fewer than ``limit`` were admitted in the last window, else returns how many
# milliseconds until the oldest of them leaves the window.
_RATE = """
local now, window, limit = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('zremrangebyscore', KEYS[1], '-inf', now - window)
if redis.call('zcard', KEYS[1]) < limit then
  redis.call('zadd', KEYS[1], now, ARGV[4])
  redis.call('pexpire', KEYS[1], math.ceil(window))
  return 0
end
local oldest = redis.call('zrange', KEYS[1], 0, 0, 'WITHSCORES')
return math.max(math.ceil(tonumber(oldest[2]) + window - now), 1)
"""


@dataclass(frozen=True)
class Limits:
    concurrency: int = 0
    rps: float = 0.0

    def dump(self) -> str:
        return json.dumps({"concurrency": self.concurrency, "rps": self.rps})

    @classmethod
    def parse(cls, raw: str | None) -> Limits:
        if not raw:
            return cls()
        d = json.loads(raw)
        return cls(int(d.get("concurrency") or 0), float(d.get("rps") or 0))


class HostLimits:
    def __init__(self, r: redis.Redis) -> None:
        self.r = r
        self._slot = r.register_script(_SLOT_ACQUIRE)
        self._backoff = r.register_script(_BACKOFF)
        self._rate = r.register_script(_RATE)

    # -- limits ---------------------------------------------------------------------------------------------------

    def set_limits(self, host: str, limits: Limits) -> None:
        self.r.hset(k.LIMITS, host, limits.dump())

    def clear_limits(self, host: str) -> None:
        self.r.hdel(k.LIMITS, host)

    def limits(self, host: str) -> Limits:
        return Limits.parse(cast(str | None, self.r.hget(k.LIMITS, host)))

    def all_limits(self) -> dict[str, Limits]:
        raw = cast(dict[str, str], self.r.hgetall(k.LIMITS))
        return {host: Limits.parse(v) for host, v in raw.items()}

    # -- transfer slots -------------------------------------------------------------------------------------------

    def try_slot(self, host: str, holder: str, limit: int, ttl: float) -> bool:
        now = time.time()
        return bool(self._slot(keys=[k.slots(host)], args=[now, now + ttl, limit, holder]))

    def release_slot(self, host: str, holder: str) -> None:
        self.r.zrem(k.slots(host), holder)

    @contextmanager
    def slot(self, host: str, holder: str, ttl: float, limit: int) -> Iterator[bool]:
        """Hold one of the host's ``limit`` transfer slots; yields False (holding nothing) when all are taken."""
        if limit <= 0:
            yield True
            return
        got = self.try_slot(host, holder, limit, ttl)
        try:
            yield got
        finally:
            if got:
                self.release_slot(host, holder)

    # -- backoff and the request budget ---------------------------------------------------------------------------

    def backoff_until(self, host: str) -> float:
        raw = self.r.get(k.backoff(host))
        return float(cast(str, raw)) if raw else 0.0

    def set_backoff(self, host: str, seconds: float) -> None:
        until = time.time() + seconds
        self._backoff(keys=[k.backoff(host)], args=[until, max(int(seconds * 1000), 1)])

    def take_request(self, host: str, rps: float, now: float | None = None) -> float:
        """Admit one request under the host's budget: 0 when admitted, else seconds to wait before asking again.

        The window is one second (``rps`` requests in any second), or ``1/rps`` seconds for budgets under one
        request per second (one request in any such window).
        """
        window = max(1.0, 1.0 / rps)
        limit = max(round(rps * window), 1)
        now_ms = (time.time() if now is None else now) * 1000
        wait_ms = self._rate(keys=[k.rate(host)], args=[now_ms, window * 1000, limit, uuid.uuid4().hex[:12]])
        return float(cast(int, wait_ms)) / 1000.0


class RedisGate:
    """``RequestGate`` for the registry client: the shared backoff and the optional requests-per-second budget.

    The host's backoff and limits are read at most once per ``cache`` seconds per process (one round trip), so a
    request costs no Redis command unless the host has an rps budget. A backoff another worker sets is seen
    within that time; one this process sets, at once. Short waits are slept; long ones raise a temporary error
    so the task is retried later instead of blocking a worker.
    """

    #: waits up to this long are slept in place
    MAX_SLEEP = 5.0

    def __init__(self, hosts: HostLimits, cache: float = 1.0) -> None:
        self.hosts = hosts
        self.cache = cache
        self._lock = threading.Lock()
        self._seen: dict[str, tuple[float, float, Limits]] = {}

    def _host(self, host: str) -> tuple[float, Limits]:
        now = time.monotonic()
        with self._lock:
            seen = self._seen.get(host)
        if seen is not None and now - seen[0] < self.cache:
            return seen[1], seen[2]
        pipe = self.hosts.r.pipeline(transaction=False)
        pipe.get(k.backoff(host))
        pipe.hget(k.LIMITS, host)
        backoff, limits = pipe.execute()
        value = (float(backoff) if backoff else 0.0, Limits.parse(limits))
        with self._lock:
            self._seen[host] = (now, *value)
        return value

    def limits(self, host: str) -> Limits:
        return self._host(host)[1]

    def before_request(self, host: str) -> None:
        backoff, limits = self._host(host)
        wait = backoff - time.time()
        if wait > self.MAX_SLEEP:
            raise HeldOff(f"{host} asked every worker to hold off", status=429, retry_after=wait)
        if wait > 0:
            time.sleep(wait)
        if limits.rps > 0:
            while (pause := self.hosts.take_request(host, limits.rps)) > 0:
                time.sleep(pause)

    def on_throttled(self, host: str, retry_after: float) -> None:
        telemetry.count(self.hosts.r, "registry_throttled", registry=host)
        self.hosts.set_backoff(host, retry_after)
        with self._lock:
            self._seen.pop(host, None)


__all__ = ["HostLimits", "Limits", "RedisGate"]
