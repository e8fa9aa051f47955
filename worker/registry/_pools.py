"""Connections kept alive in one small pool per thread.

httpcore's ``ConnectionPool`` serves every thread from one list of connections under one lock, and on each
request and each response close it scans that list once per waiting request. With a few dozen threads
streaming at once (Ferry's default budget), that bookkeeping cost more CPU than the HTTP itself. A thread
sends one request at a time (two when it streams a blob from one registry into another, or into the same
one), so a pool per thread never waits, never contends, and scans a list of one or two.

``ThreadPools`` is an ``httpx.BaseTransport`` that gives each thread its own inner transport (made by the
factory, e.g. an ``httpx.HTTPTransport``). A thread's transport is closed when the thread ends (its
connections with it) and every one of them on ``close()``.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable

import httpx


class _Owner:
    """Held only by the thread's local storage: when the thread ends it goes, and its transport is closed."""

    __slots__ = ("__weakref__", "transport")

    def __init__(self, transport: httpx.BaseTransport) -> None:
        self.transport = transport


class ThreadPools(httpx.BaseTransport):
    """One inner transport (connection pool) per thread."""

    def __init__(self, factory: Callable[[], httpx.BaseTransport]) -> None:
        self._factory = factory
        self._local = threading.local()
        self._lock = threading.Lock()
        self._live: dict[int, httpx.BaseTransport] = {}
        self._closed = False

    def _own(self) -> httpx.BaseTransport:
        owner: _Owner | None = getattr(self._local, "owner", None)
        if owner is not None:
            return owner.transport
        transport = self._factory()
        with self._lock:
            if self._closed:
                transport.close()
                raise RuntimeError("Cannot send a request, as the client has been closed.")
            self._live[id(transport)] = transport
        owner = _Owner(transport)
        weakref.finalize(owner, self._release, transport)
        self._local.owner = owner
        return transport

    def _release(self, transport: httpx.BaseTransport) -> None:
        with self._lock:
            self._live.pop(id(transport), None)
        transport.close()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if self._closed:
            raise RuntimeError("Cannot send a request, as the client has been closed.")
        return self._own().handle_request(request)

    @property
    def pools(self) -> int:
        """How many threads hold a pool now (for tests)."""
        with self._lock:
            return len(self._live)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            live, self._live = list(self._live.values()), {}
        for transport in live:
            transport.close()


__all__ = ["ThreadPools"]
