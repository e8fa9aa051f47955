"""A pass-through HTTP proxy in front of a real registry that can hold one blob mid-stream.

:class:`BlobGate` forwards every request to the upstream registry unchanged, except the body of a ``GET``
of the chosen digest: after ``hold_after`` bytes it stops sending until :meth:`BlobGate.release` (or a
safety timeout), then sends the rest. A test gets a transfer that is reliably in the middle of a blob for
as long as it needs to look at it (progress, metrics, Flower), without depending on timing.

This is the "lying server" the guide allows for what a real registry cannot be made to do: it changes no
byte, it only pauses.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx

__all__ = ["BlobGate", "start_blob_gate"]

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


@dataclass
class BlobGate:
    upstream: str
    digest: str
    hold_after: int
    #: the longest a held blob waits for :meth:`release` (so a failing test never hangs a worker)
    max_hold: float = 120.0
    server: ThreadingHTTPServer | None = field(default=None, repr=False)
    released: threading.Event = field(default_factory=threading.Event)
    #: set once the held blob has sent ``hold_after`` bytes and is waiting
    holding: threading.Event = field(default_factory=threading.Event)

    @property
    def host(self) -> str:
        assert self.server is not None
        return f"127.0.0.1:{self.server.server_address[1]}"

    def release(self) -> None:
        self.released.set()

    def stop(self) -> None:
        self.released.set()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


def start_blob_gate(upstream: str, digest: str, hold_after: int, max_hold: float = 120.0) -> BlobGate:
    """Serve on a free loopback port; ``upstream`` is the registry's base URL (``http://127.0.0.1:PORT``)."""
    gate = BlobGate(upstream.rstrip("/"), digest, hold_after, max_hold)
    client = httpx.Client(timeout=60.0)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _forward(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length) if length else None
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP | {"host"}}
            req = client.build_request(self.command, gate.upstream + self.path, headers=headers, content=body)
            resp = client.send(req, stream=True)
            try:
                self.send_response(resp.status_code)
                for k, v in resp.headers.multi_items():
                    if k.lower() not in _HOP_BY_HOP | {"content-length", "content-encoding"}:
                        self.send_header(k, v)
                held = self.command == "GET" and self.path.endswith(f"/blobs/{gate.digest}")
                raw = resp.iter_raw()
                if self.command == "HEAD" or resp.status_code in (204, 304):
                    self.send_header("Content-Length", resp.headers.get("content-length", "0"))
                    self.end_headers()
                    return
                data_len = resp.headers.get("content-length")
                if data_len is not None:
                    self.send_header("Content-Length", data_len)
                    if resp.headers.get("content-encoding"):
                        self.send_header("Content-Encoding", resp.headers["content-encoding"])
                    self.end_headers()
                    sent = 0
                    for chunk in raw:
                        if held and sent < gate.hold_after <= sent + len(chunk):
                            cut = gate.hold_after - sent
                            self.wfile.write(chunk[:cut])
                            self.wfile.flush()
                            gate.holding.set()
                            gate.released.wait(gate.max_hold)
                            chunk, sent = chunk[cut:], sent + cut
                        self.wfile.write(chunk)
                        sent += len(chunk)
                    self.wfile.flush()
                else:
                    data = b"".join(raw)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
            finally:
                resp.close()

        do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = _forward

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    # a connection cut at stop() is expected: no traceback on stderr
    server.handle_error = lambda request, client_address: None  # type: ignore[method-assign]
    gate.server = server
    thread = threading.Thread(target=server.serve_forever, name="blob-gate", daemon=True)
    thread.start()
    original_stop = gate.stop

    def stop() -> None:
        original_stop()
        with contextlib.suppress(Exception):
            client.close()

    gate.stop = stop  # type: ignore[method-assign]
    return gate
