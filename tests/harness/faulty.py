"""A small lying HTTP server in front of a real registry, for the faults distribution cannot be made to produce.

Every request is forwarded to the upstream registry (``docker-registry`` from :mod:`tests.harness.servers`)
unless a :class:`Fault` matches it first; a fault applies a fixed number of times (or for ever) and then the
server behaves again. The faults:

- :func:`answer` -- a fixed status (503, 429, ...) with a distribution-style JSON error body;
- :func:`serve` -- a fixed answer with any body: a document distribution would refuse to store (a manifest
  with a null layer, other bytes than its digest names, a tag list that is not an object, a token answer
  with ``expires_in: "soon"``);
- :func:`reset` -- close the connection without an answer (a TCP reset);
- :func:`trickle` -- the upstream answer, but its body one small piece every ``interval`` seconds;
- :func:`endless_pages` -- the upstream answer plus a ``Link: rel="next"`` to a page that never ends
  (``repeat=True``: a link to the very same page).

Plain HTTP on 127.0.0.1 only; a client with ``--tls-verify=false`` reaches it after the HTTPS probe fails, as it
would reach any plain-HTTP registry. :attr:`FaultyServer.log` lists every ``(method, path)`` it was sent.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx

__all__ = [
    "Fault",
    "FaultyServer",
    "answer",
    "endless_pages",
    "reset",
    "serve",
    "slow_reader",
    "start_faulty",
    "trickle",
]

#: what a fault does with a request: gets the handler, the upstream answer (fetched lazily) and the server
Action = Callable[["_Handler", Callable[[], httpx.Response]], None]


@dataclass
class Fault:
    """Apply ``action`` to requests whose method is ``method`` (``None``: any) and path matches ``path``."""

    path: str
    action: Action
    method: str | None = None
    #: how many matching requests get the fault; ``None``: all of them
    times: int | None = 1
    hits: int = 0

    def matches(self, method: str, path: str) -> bool:
        if self.times is not None and self.hits >= self.times:
            return False
        return (self.method is None or self.method == method) and re.search(self.path, path) is not None


@dataclass
class FaultyServer:
    upstream: str
    faults: list[Fault] = field(default_factory=list)
    log: list[tuple[str, str]] = field(default_factory=list)
    port: int = 0
    stopping: threading.Event = field(default_factory=threading.Event)
    _httpd: ThreadingHTTPServer | None = field(default=None, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _http: httpx.Client = field(default_factory=lambda: httpx.Client(timeout=30), repr=False)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def add(self, fault: Fault) -> Fault:
        with self._lock:
            self.faults.append(fault)
        return fault

    def take(self, method: str, path: str) -> Fault | None:
        with self._lock:
            self.log.append((method, path))
            for fault in self.faults:
                if fault.matches(method, path):
                    fault.hits += 1
                    return fault
        return None

    def stop(self) -> None:
        self.stopping.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(5)
        self._http.close()

    def __enter__(self) -> FaultyServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_ref: FaultyServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _body(self) -> bytes:
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return bytes(out)
                out.extend(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("content-length") or 0)
        return self.rfile.read(length) if length else b""

    def _upstream(self, body: bytes) -> httpx.Response:
        srv = self.server_ref
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("content-length", "transfer-encoding")}
        # distribution builds absolute Location/Link URLs from Host: keep the client's, so they point back here
        return srv._http.request(self.command, srv.upstream + self.path, headers=headers, content=body)

    def _handle(self) -> None:
        srv = self.server_ref
        fault = srv.take(self.command, self.path)
        # a fault that reads the request body itself (slowly) gets it unread
        body = b"" if fault is not None and getattr(fault.action, "reads_body", False) else self._body()
        fetched: list[httpx.Response] = []

        def upstream() -> httpx.Response:
            if not fetched:
                fetched.append(self._upstream(body))
            return fetched[0]

        if fault is not None:
            fault.action(self, upstream)
        else:
            self.relay(upstream())

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

    def relay(
        self, resp: httpx.Response, *, extra: dict[str, str] | None = None, pieces: tuple[int, float] | None = None
    ) -> None:
        """Send ``resp`` on; ``pieces=(size, interval)`` sends its body ``size`` bytes at a time, slowly."""
        self.send_response(resp.status_code)
        replaced = {k.lower() for k in extra or {}}
        for k, v in resp.headers.items():
            if k.lower() in replaced:
                continue
            if k.lower() not in ("content-length", "transfer-encoding", "connection", "date", "server"):
                self.send_header(k, v)
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        data = resp.content
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command == "HEAD":
            return
        if pieces is None:
            self.wfile.write(data)
            return
        size, interval = pieces
        for i in range(0, len(data), size):
            if self.server_ref.stopping.wait(interval if i else 0):
                return
            try:
                self.wfile.write(data[i : i + size])
                self.wfile.flush()
            except OSError:  # the client gave up: that is what the test wanted
                return


def answer(status: int, code: str = "UNAVAILABLE", headers: dict[str, str] | None = None) -> Action:
    """A fixed error answer, as distribution words it."""

    def act(h: _Handler, _upstream: Callable[[], httpx.Response]) -> None:
        body = (
            b'{"errors":[{"code":"' + code.encode() + b'","message":"injected by the faulty server"}]}'
            if h.command != "HEAD"
            else b""
        )
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    return act


def serve(
    body: bytes | object,
    content_type: str = "application/json",
    headers: dict[str, str] | None = None,
    status: int = 200,
) -> Action:
    """A fixed answer with ``body`` (bytes, or any value sent as JSON), whatever the upstream holds."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()

    def act(h: _Handler, _upstream: Callable[[], httpx.Response]) -> None:
        h.send_response(status)
        h.send_header("Content-Type", content_type)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(data)

    return act


def reset() -> Action:
    """Close the connection with a TCP reset, no answer."""

    def act(h: _Handler, _upstream: Callable[[], httpx.Response]) -> None:
        h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        h.close_connection = True
        h.connection.close()

    return act


def trickle(interval: float, size: int = 1) -> Action:
    """The real answer, its body ``size`` bytes every ``interval`` seconds (each piece resets a read timeout)."""

    def act(h: _Handler, upstream: Callable[[], httpx.Response]) -> None:
        h.relay(upstream(), pieces=(size, interval))

    return act


def slow_reader(interval: float, size: int = 1024) -> Action:
    """Read the request body ``size`` bytes every ``interval`` seconds (a destination that cannot keep up), then
    answer 503; the client's kernel buffers fill and its upload crawls."""

    def act(h: _Handler, _upstream: Callable[[], httpx.Response]) -> None:
        left = int(h.headers.get("content-length") or 0) or 1 << 40
        chunked = h.headers.get("transfer-encoding", "").lower() == "chunked"
        while left > 0 and not h.server_ref.stopping.wait(interval):
            try:
                piece = h.rfile.read1(size) if chunked else h.rfile.read(min(size, left))
            except OSError:
                break
            if not piece:  # the client gave up
                break
            left -= len(piece)
        h.close_connection = True
        with contextlib.suppress(OSError):
            answer(503)(h, _upstream)

    act.reads_body = True  # type: ignore[attr-defined]
    return act


def endless_pages(*, repeat: bool = False) -> Action:
    """The real answer plus a ``Link`` to a next page, for ever: a new page each time, or (``repeat``) this one."""
    counter = iter(range(1 << 62))

    def act(h: _Handler, upstream: Callable[[], httpx.Response]) -> None:
        path = h.path.split("?")[0]
        target = h.path if repeat else f"{path}?n=1&last=page{next(counter)}"
        h.relay(upstream(), extra={"Link": f'<{target}>; rel="next"'})

    return act


def start_faulty(upstream: str, *faults: Fault) -> FaultyServer:
    """Start a faulty server in front of ``upstream`` (a registry base URL) on a free 127.0.0.1 port."""
    server = FaultyServer(upstream, list(faults))

    class Handler(_Handler):
        server_ref = server

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    server._httpd = httpd
    server.port = int(httpd.server_address[1])
    server._thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), name="faulty-server", daemon=True)
    server._thread.start()
    return server
