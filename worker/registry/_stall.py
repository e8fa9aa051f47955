"""A minimum transfer rate for every request and response body (curl's low-speed limit).

httpx's read timeout bounds one read: a server that trickles one byte every 20 s resets it each time and
keeps a download (or an upload into a slow-reading server) going for ever. ``StallGuard`` wraps the
transport so that every body -- a blob stream, a manifest, a tag list, an upload -- is measured as it
moves: if fewer than ``min_rate * window`` bytes pass in any ``window`` seconds, the transfer fails with
``TransferStalled`` (a read or write timeout, so a temporary error: retried, then reported).

A body that completes within ``window`` seconds is never judged, so small answers are never refused.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import httpx

#: bytes per second below which a transfer counts as stalled (``FERRY_MIN_RATE``; 0 turns the check off)
DEFAULT_MIN_RATE = 1024.0
#: seconds over which the rate is judged (``FERRY_STALL_WINDOW``)
DEFAULT_WINDOW = 30.0
#: an upload body is written in pieces of at most this size, so its rate is judged between them
UPLOAD_PIECE = 64 * 1024


def env_min_rate() -> float:
    return float(os.environ.get("FERRY_MIN_RATE") or DEFAULT_MIN_RATE)


def env_window() -> float:
    return float(os.environ.get("FERRY_STALL_WINDOW") or DEFAULT_WINDOW)


class TransferStalled(httpx.ReadTimeout):
    """A body moved slower than the minimum rate for a whole window."""


class _UploadStalled(httpx.WriteTimeout):
    pass


class _Meter:
    def __init__(self, min_rate: float, window: float) -> None:
        self.min_rate = min_rate
        self.window = window
        self.since = time.monotonic()
        self.moved = 0

    def check(self, n: int) -> str | None:
        """Count ``n`` bytes; the reason to give up, if the last window was too slow."""
        self.moved += n
        elapsed = time.monotonic() - self.since
        if elapsed < self.window:
            return None
        if self.moved < self.min_rate * elapsed:
            return (
                f"{self.moved} bytes in {elapsed:.0f} s, under the minimum of {self.min_rate:.0f} bytes/s"
                f" (FERRY_MIN_RATE, over FERRY_STALL_WINDOW={self.window:g} s)"
            )
        self.since, self.moved = time.monotonic(), 0
        return None


class _MeteredStream(httpx.SyncByteStream):
    def __init__(self, inner: httpx.SyncByteStream, min_rate: float, window: float, *, upload: bool) -> None:
        self.inner = inner
        self.min_rate = min_rate
        self.window = window
        self.upload = upload

    def __iter__(self) -> Iterator[bytes]:
        meter = _Meter(self.min_rate, self.window)
        for chunk in self.inner:
            # an upload goes out in small pieces: a write blocked on a server that reads at a crawl is judged
            # after each piece, not after a whole (64 MiB) chunk
            pieces = (
                (chunk[i : i + UPLOAD_PIECE] for i in range(0, len(chunk), UPLOAD_PIECE)) if self.upload else (chunk,)
            )
            for piece in pieces:
                reason = meter.check(len(piece))
                if reason is not None:
                    if self.upload:
                        raise _UploadStalled(f"upload stalled: {reason}")
                    raise TransferStalled(f"download stalled: {reason}")
                yield piece

    def close(self) -> None:
        self.inner.close()


class StallGuard(httpx.BaseTransport):
    """Wrap ``inner`` so that request and response bodies slower than ``min_rate`` over ``window`` fail."""

    def __init__(self, inner: httpx.BaseTransport, min_rate: float, window: float) -> None:
        self.inner = inner
        self.min_rate = min_rate
        self.window = window

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if self.min_rate <= 0:
            return self.inner.handle_request(request)
        if isinstance(request.stream, httpx.SyncByteStream) and not isinstance(request.stream, httpx.ByteStream):
            request.stream = _MeteredStream(request.stream, self.min_rate, self.window, upload=True)
        response = self.inner.handle_request(request)
        assert isinstance(response.stream, httpx.SyncByteStream)
        response.stream = _MeteredStream(response.stream, self.min_rate, self.window, upload=False)
        return response

    def close(self) -> None:
        self.inner.close()


__all__ = ["DEFAULT_MIN_RATE", "DEFAULT_WINDOW", "StallGuard", "TransferStalled", "env_min_rate", "env_window"]
