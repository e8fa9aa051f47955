"""A simulated wide-area link: a TCP proxy that delays every chunk by a one-way latency and paces each
connection (and all of them together) to a bandwidth. Adapted from helper i9's WAN benchmark proxy (its
``bench/wan_bench.py``), which had not landed when this benchmark was written: one asyncio loop in a thread
hosts every proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading


class Pacer:
    """A cap in bytes per second: reserves send slots on a virtual clock."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.free = 0.0

    def reserve(self, now: float, n: int) -> float:
        self.free = max(self.free, now) + n / self.rate
        return self.free


class LinkProxy:
    """TCP proxy to ``127.0.0.1:upstream`` with a one-way delay per chunk and pacing per connection and in total."""

    def __init__(self, upstream: int, delay_s: float, conn_mbit: float, total_mbit: float) -> None:
        self.upstream = upstream
        self.delay = delay_s
        self.conn_rate = conn_mbit * 1e6 / 8
        self.total = {"up": Pacer(total_mbit * 1e6 / 8), "down": Pacer(total_mbit * 1e6 / 8)}
        self.connections = 0
        self.port = 0
        self._server: asyncio.base_events.Server | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", self.upstream)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(
            self._pipe(client_r, server_w, self.total["up"]),
            self._pipe(server_r, client_w, self.total["down"]),
            return_exceptions=True,
        )
        for w in (client_w, server_w):
            w.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, total: Pacer) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(maxsize=64)
        conn = Pacer(self.conn_rate)

        async def receive() -> None:
            try:
                while True:
                    data = await reader.read(65536)
                    await queue.put((loop.time() + self.delay, data))
                    if not data:
                        return
            except (ConnectionError, OSError):
                await queue.put((loop.time(), b""))

        async def send() -> None:
            try:
                while True:
                    due, data = await queue.get()
                    if not data:
                        with contextlib.suppress(OSError, RuntimeError):
                            writer.write_eof()
                        return
                    now = loop.time()
                    at = max(due, conn.reserve(max(now, due), len(data)), total.reserve(max(now, due), len(data)))
                    if at > now:
                        await asyncio.sleep(at - now)
                    writer.write(data)
                    await writer.drain()
            except (ConnectionError, OSError):
                reader.feed_eof()

        await asyncio.gather(receive(), send())


class Links:
    """An event loop in a thread that hosts every link proxy."""

    def __init__(self, delay_ms: float, conn_mbit: float, total_mbit: float) -> None:
        self.delay_s = delay_ms / 1000
        self.conn_mbit = conn_mbit
        self.total_mbit = total_mbit
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="link-proxies", daemon=True)
        self.thread.start()
        self.proxies: list[LinkProxy] = []

    def open(self, upstream: int) -> LinkProxy:
        proxy = LinkProxy(upstream, self.delay_s, self.conn_mbit, self.total_mbit)
        asyncio.run_coroutine_threadsafe(proxy.start(), self.loop).result(10)
        self.proxies.append(proxy)
        return proxy

    def close(self, proxy: LinkProxy) -> None:
        asyncio.run_coroutine_threadsafe(proxy.stop(), self.loop).result(10)
        self.proxies.remove(proxy)

    def shutdown(self) -> None:
        for p in list(self.proxies):
            with contextlib.suppress(Exception):
                self.close(p)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
