"""Wide-area sync benchmark: ``ferry sync`` vs ``skopeo sync`` over a simulated cross-cloud link.

Run it with ``make bench-wan`` (or ``PYTHONPATH=. .venv/bin/python -m bench.wan_bench --help``).

What it does, in one invocation:

1. starts a source ``docker-registry`` and seeds a deterministic fleet into it (directly, not through the link):
   repositories whose images share a few base layers, each image with its own application layers and config,
   some of them multi-platform indexes (two platforms);
2. puts a **link proxy** in front of each registry (asyncio, in this process): every chunk read is delivered
   after a one-way delay (default 20 ms each way), paced to a cap per TCP connection (default 160 Mbit/s) and a
   cap for all connections of that proxy together (default 1000 Mbit/s). The proxy counts the HTTP requests
   that cross it (it follows each request's framing: Content-Length or chunked);
3. for ``skopeo sync`` and ``ferry sync`` (embedded, default flags), each to a *fresh* destination registry
   behind its own proxy: a full sync of a YAML file naming every repository, then a no-op re-sync of the same;
   then ``ferry sync --image-parallel-copies 6`` (the old default; the default is 32 streams) to another fresh
   destination: peak RSS and speed against the number of streams;
4. a fleet of 1000 small tags (10 repositories of 100) on plain loopback, no proxy: full sync and no-op re-sync,
   skopeo and ferry, each to a fresh destination (ferry's peak RSS for a 1000-image plan); then ferry's full sync
   again with stdout on a pseudo-terminal (``script``), so its live display is drawn: the display's cost;
5. checks every copy (each destination tag's digest equals the source's), prints a Markdown table and writes
   every measurement to ``bench-out/wan.json`` and, when matplotlib is installed (the ``bench`` extra), a PNG
   plot to ``docs/wan-bench.png``.

Wall time, peak RSS and CPU of each tool come from ``copy_bench.run_measured`` (GNU time). Requests per blob:
requests the tool sent through both proxies divided by the number of distinct blobs of the fleet.
Everything (registries, proxies, temp storage) is stopped and removed at the end, also on error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import shlex
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.copy_bench import GNU_TIME, base_machine_info, compile_ferry, first_line, process_cpu_s, run_measured
from tests.harness.images import (
    Image,
    Index,
    build_image,
    build_index,
    make_layer,
    push_image,
    push_index,
)
from tests.harness.peer import SKOPEO_BIN, _home, peer_env
from tests.harness.servers import RegistryServer, start_registry, stop_all

MIB = 1 << 20
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench-out" / "wan.json"
DEFAULT_PLOT = ROOT / "docs" / "wan-bench.png"
ACCEPT = ", ".join(
    [
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ]
)


# --------------------------------------------------------------------------------------------------------------
# the link proxy


class RequestCounter:
    """Follows HTTP/1.1 request framing in the client-to-server byte stream and counts requests by kind."""

    def __init__(self, counts: Counter[str]) -> None:
        self.counts = counts
        self.head = b""
        self.state = "head"
        self.remaining = 0

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self.state in ("body", "chunk-data"):
                take = min(self.remaining, len(view))
                view = view[take:]
                self.remaining -= take
                if self.remaining == 0:
                    self.state = "head" if self.state == "body" else "chunk-size"
                continue
            self.head += bytes(view)
            view = memoryview(b"")
            self._parse_lines()

    def _parse_lines(self) -> None:
        while True:
            if self.state == "head":
                end = self.head.find(b"\r\n\r\n")
                if end < 0:
                    return
                head, self.head = self.head[:end], self.head[end + 4 :]
                lines = head.decode("latin-1").split("\r\n")
                method, target = ([*lines[0].split(" "), "", ""])[:2]
                headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
                self.counts[f"{method} {_kind(target)}"] += 1
                if "chunked" in headers.get("transfer-encoding", "").lower():
                    self.state = "chunk-size"
                elif int(headers.get("content-length") or 0) > 0:
                    self.state, self.remaining = "body", int(headers["content-length"])
            elif self.state == "chunk-size":
                end = self.head.find(b"\r\n")
                if end < 0:
                    return
                size = int(self.head[:end].split(b";")[0].strip() or b"0", 16)
                self.head = self.head[end + 2 :]
                self.state, self.remaining = ("trailer", 0) if size == 0 else ("chunk-data", size + 2)
            elif self.state == "trailer":
                end = self.head.find(b"\r\n")
                if end < 0:
                    return
                line, self.head = self.head[:end], self.head[end + 2 :]
                if not line:
                    self.state = "head"
            else:  # body bytes arrived together with the head: hand them back to feed()
                rest, self.head = self.head, b""
                self.feed(rest)
                return


def _kind(target: str) -> str:
    path = target.split("?", 1)[0]
    if path.rstrip("/") == "/v2":
        return "/v2/"
    for rx, kind in (
        (r"/blobs/uploads/?$", "upload start"),
        (r"/blobs/uploads/.+", "upload"),
        (r"/blobs/", "blob"),
        (r"/manifests/", "manifest"),
        (r"/tags/list", "tags"),
        (r"/_catalog", "catalog"),
        (r"/referrers/", "referrers"),
    ):
        if re.search(rx, path):
            return kind
    return "other"


class Pacer:
    """A cap in bytes per second: reserves send slots on a virtual clock."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.free = 0.0

    def reserve(self, now: float, n: int) -> float:
        self.free = max(self.free, now) + n / self.rate
        return self.free


class LinkProxy:
    """TCP proxy to ``upstream`` with one-way delay per chunk and pacing per connection and in total."""

    def __init__(self, upstream: int, delay_s: float, conn_mbit: float, total_mbit: float) -> None:
        self.upstream = upstream
        self.delay = delay_s
        self.conn_rate = conn_mbit * 1e6 / 8
        self.total = {"up": Pacer(total_mbit * 1e6 / 8), "down": Pacer(total_mbit * 1e6 / 8)}
        self.counts: Counter[str] = Counter()
        self.connections = 0
        self.port = 0
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

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
        me = asyncio.current_task()
        if me is not None:
            self._tasks.add(me)  # the loop holds tasks weakly: an idle connection's task must not be collected
            me.add_done_callback(self._tasks.discard)
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", self.upstream)
        except OSError:
            client_w.close()
            return
        counter = RequestCounter(self.counts)
        await asyncio.gather(
            self._pipe(client_r, server_w, self.total["up"], counter),
            self._pipe(server_r, client_w, self.total["down"], None),
            return_exceptions=True,
        )
        for w in (client_w, server_w):
            w.close()

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, total: Pacer, counter: RequestCounter | None
    ) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(maxsize=64)
        conn = Pacer(self.conn_rate)

        async def receive() -> None:
            try:
                while True:
                    data = await reader.read(65536)
                    if counter is not None and data:
                        counter.feed(data)
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

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="link-proxies", daemon=True)
        self.thread.start()
        self.proxies: list[LinkProxy] = []

    def open(self, upstream: int, args: argparse.Namespace) -> LinkProxy:
        proxy = LinkProxy(upstream, args.delay_ms / 1000, args.conn_mbit, args.total_mbit)
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


# --------------------------------------------------------------------------------------------------------------
# fleets


@dataclass
class Fleet:
    name: str
    #: repository -> tag -> top digest
    tags: dict[str, dict[str, str]] = field(default_factory=dict)
    blobs: set[str] = field(default_factory=set)
    blob_bytes: int = 0
    indexes: int = 0

    @property
    def images(self) -> int:
        return sum(len(t) for t in self.tags.values())


def _note_image(fleet: Fleet, image: Image) -> None:
    for digest, size, _blob in image.blobs():
        if str(digest) not in fleet.blobs:
            fleet.blobs.add(str(digest))
            fleet.blob_bytes += size


def build_wan_fleet(repos: int, tags: int, seed: str) -> tuple[Fleet, list[tuple[str, str, Image | Index]]]:
    """Deterministic: four base families of two shared layers; per image two app layers (64 KiB-6 MiB, one in
    six images also a 16 MiB layer) and its config; every fifth repository's images are two-platform indexes."""
    rng = random.Random(seed)
    fleet = Fleet("wan")
    bases = [
        [make_layer(f"{seed}/base{b}/0", rng.choice([6, 8, 10]) * MIB), make_layer(f"{seed}/base{b}/1", 400_000)]
        for b in range(4)
    ]
    pushes: list[tuple[str, str, Image | Index]] = []
    for r in range(repos):
        repo = f"fleet/app-{r:02d}"
        base = bases[r % len(bases)]
        multi = r % 5 == 4
        for t in range(tags):
            tag = f"v1.{t}"

            def image(platform: str, r: int = r, t: int = t, base: list[Any] = base) -> Image:
                key = f"{seed}/{r}/{t}/{platform}"
                app: list[Any] = [
                    make_layer(f"{key}/app0", rng.randrange(64 * 1024, 4 * MIB, 4096)),
                    make_layer(f"{key}/app1", rng.randrange(4096, 256 * 1024)),
                ]
                if rng.random() < 1 / 8:
                    app.append(make_layer(f"{key}/big", 16 * MIB))
                return build_image(key, layers=[*base, *app], fmt="oci", platform=platform)

            if multi:
                index = build_index([image("linux/amd64"), image("linux/arm64")])
                for child in index.children:
                    _note_image(fleet, child)
                fleet.tags.setdefault(repo, {})[tag] = str(index.digest)
                fleet.indexes += 1
                pushes.append((repo, tag, index))
            else:
                img = image("linux/amd64")
                _note_image(fleet, img)
                fleet.tags.setdefault(repo, {})[tag] = str(img.digest)
                pushes.append((repo, tag, img))
    return fleet, pushes


def build_small_fleet(repos: int, tags: int, seed: str) -> tuple[Fleet, list[tuple[str, str, Image | Index]]]:
    """``repos`` x ``tags`` tiny images: one 4 KiB layer shared per repository, a unique 1-2 KiB layer, a config."""
    fleet = Fleet("small")
    pushes: list[tuple[str, str, Image | Index]] = []
    for r in range(repos):
        repo = f"small/r{r:02d}"
        shared = make_layer(f"{seed}/{r}/shared", 4096)
        for t in range(tags):
            img = build_image(
                f"{seed}/{r}/{t}", layers=[shared, make_layer(f"{seed}/{r}/{t}", 1024 + t % 1024)], fmt="oci"
            )
            _note_image(fleet, img)
            fleet.tags.setdefault(repo, {})[f"t{t:03d}"] = str(img.digest)
            pushes.append((repo, f"t{t:03d}", img))
    return fleet, pushes


def seed_fleet(reg: RegistryServer, pushes: list[tuple[str, str, Image | Index]], threads: int = 8) -> float:
    started = time.perf_counter()

    def push(item: tuple[str, str, Image | Index]) -> None:
        repo, tag, obj = item
        if isinstance(obj, Index):
            push_index(reg.url, repo, tag, obj)
        else:
            push_image(reg.url, repo, tag, obj)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(push, pushes))
    return time.perf_counter() - started


def verify_fleet(dst: RegistryServer, fleet: Fleet, prefix: str) -> tuple[int, list[str]]:
    """HEAD every tag at the destination (directly, not through the link): how many carry the source digest."""
    wrong: list[str] = []

    def one(repo_tag: tuple[str, str, str]) -> None:
        repo, tag, digest = repo_tag
        name = f"{prefix}/{repo.rsplit('/', 1)[-1]}"
        with httpx.Client(base_url=dst.url, timeout=30) as c:
            resp = c.head(f"/v2/{name}/manifests/{tag}", headers={"Accept": ACCEPT})
        if resp.status_code != 200 or resp.headers.get("docker-content-digest") != digest:
            wrong.append(f"{name}:{tag} {resp.status_code} {resp.headers.get('docker-content-digest', '')[:19]}")

    items = [(repo, tag, d) for repo, tags in fleet.tags.items() for tag, d in tags.items()]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(one, items))
    return len(items) - len(wrong), wrong


# --------------------------------------------------------------------------------------------------------------
# runs


@dataclass
class Run:
    scenario: str
    tool: str
    phase: str  # full | noop
    flags: str
    wall_s: float
    maxrss_mib: float
    cpu_s: float
    exit_code: int
    requests: int = 0
    requests_per_blob: float = 0.0
    request_kinds: dict[str, int] = field(default_factory=dict)
    verified: str = ""
    #: CPU seconds both registries spent during the run (they share the machine with the tool)
    registry_cpu_s: float = 0.0


def write_yaml(path: Path, host: str, fleet: Fleet) -> None:
    lines = [f"{host}:", "  tls-verify: false", "  images:"]
    lines += [f"    {repo}: []" for repo in fleet.tags]
    path.write_text("\n".join(lines) + "\n")


def sync_argv(tool: str, yaml_path: Path, dest: str, flags: list[str]) -> list[str]:
    if tool == "skopeo":
        home = _home()
        return [
            SKOPEO_BIN,
            "--policy",
            str(home / "policy.json"),
            "--registries.d",
            str(home / "registries.d"),
            "sync",
            "--src",
            "yaml",
            "--dest",
            "docker",
            "--dest-tls-verify=false",
            "--all",
            *flags,
            str(yaml_path),
            dest,
        ]
    ferry = str(Path(sys.executable).with_name("ferry"))
    return [ferry, "sync", "--src", "yaml", "--dest", "docker", "--dest-tls-verify=false", "--all", *flags,
            str(yaml_path), dest]  # fmt: skip


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.links = Links()
        self.runs: list[Run] = []

    def scenario(
        self,
        name: str,
        tool: str,
        src: RegistryServer,
        src_proxy: LinkProxy | None,
        fleet: Fleet,
        flags: list[str],
        phases: tuple[str, ...] = ("full", "noop"),
        *,
        tty: bool = False,
    ) -> None:
        dst = start_registry(self.work / f"dst-{name}-{tool}-{len(self.runs)}")
        dst_proxy = self.links.open(dst.port, self.args) if src_proxy is not None else None
        src_host = f"127.0.0.1:{src_proxy.port}" if src_proxy is not None else src.host
        dst_host = f"127.0.0.1:{dst_proxy.port}" if dst_proxy is not None else dst.host
        yaml_path = self.work / f"{name}-{tool}.yaml"
        write_yaml(yaml_path, src_host, fleet)
        cache = self.work / f"cache-{name}-{tool}-{len(self.runs)}"
        cache.mkdir()
        env = peer_env({"FERRY_CACHE_DIR": str(cache)})
        try:
            for phase in phases:
                proxies = [p for p in (src_proxy, dst_proxy) if p is not None]
                for p in proxies:
                    p.counts.clear()
                log = self.work / f"{name}-{tool}-{phase}.log"
                argv = sync_argv(tool, yaml_path, f"{dst_host}/mirror", flags)
                if tty:
                    # a pseudo-terminal for the tool's stdout (its live display), the log still gets it all
                    argv = ["script", "-qefc", shlex.join(argv), "/dev/null"]
                if tool == "ferry" and self.args.py_spy is not None:
                    self.args.py_spy.mkdir(parents=True, exist_ok=True)
                    svg = self.args.py_spy / f"{name}-{phase}-{len(self.runs)}.svg"
                    argv = [str(Path(sys.executable).with_name("py-spy")), "record", "-s", "-o", str(svg), "--", *argv]
                reg_cpu = process_cpu_s(src) + process_cpu_s(dst)
                m = run_measured(argv, env, log, timeout=self.args.timeout)
                reg_cpu = process_cpu_s(src) + process_cpu_s(dst) - reg_cpu
                kinds: Counter[str] = Counter()
                for p in proxies:
                    kinds.update(p.counts)
                ok, wrong = verify_fleet(dst, fleet, "mirror")
                run = Run(
                    scenario=name,
                    tool=tool,
                    phase=phase,
                    flags=" ".join(flags) + (" (on a terminal)" if tty else ""),
                    wall_s=round(m.wall_s, 3),
                    maxrss_mib=round(m.maxrss_kib / 1024, 1),
                    cpu_s=round(m.user_s + m.sys_s, 2),
                    exit_code=m.exit_code,
                    requests=sum(kinds.values()),
                    requests_per_blob=round(sum(kinds.values()) / len(fleet.blobs), 2) if proxies else 0.0,
                    request_kinds=dict(sorted(kinds.items())),
                    verified=f"{ok}/{fleet.images}" + (f" (wrong: {', '.join(wrong[:3])})" if wrong else ""),
                    registry_cpu_s=round(reg_cpu, 2),
                )
                self.runs.append(run)
                print(
                    f"  {name:6} {tool:6} {phase:4} {run.flags:30} {run.wall_s:8.2f} s  rss {run.maxrss_mib:6.1f} MiB"
                    f"  cpu {run.cpu_s:6.2f} s  registries cpu {run.registry_cpu_s:6.2f} s"
                    f"  req {run.requests:6} ({run.requests_per_blob}/blob)"
                    f"  exit {run.exit_code}  verified {run.verified}",
                    flush=True,
                )
                if m.exit_code != 0:
                    print(log.read_text()[-2000:], file=sys.stderr)
        finally:
            if dst_proxy is not None:
                self.links.close(dst_proxy)
            dst.stop()
            shutil.rmtree(dst.root_dir, ignore_errors=True)


def ratio(runs: list[Run], scenario: str, phase: str, flags: str = "") -> float | None:
    s = [r for r in runs if r.scenario == scenario and r.phase == phase and r.tool == "skopeo"]
    f = [r for r in runs if r.scenario == scenario and r.phase == phase and r.tool == "ferry" and r.flags == flags]
    if not s or not f:
        return None
    return round(min(r.wall_s for r in s) / min(r.wall_s for r in f), 2)


def render_table(runs: list[Run]) -> str:
    head = (
        "| fleet | tool | flags | phase | wall (s) | vs skopeo | requests | per blob | peak RSS (MiB) | CPU (s) |"
        " registries' CPU (s) | verified |\n|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    rows = []
    for r in runs:
        x = ratio(runs, r.scenario, r.phase, r.flags) if r.tool == "ferry" else None
        rows.append(
            f"| {r.scenario} | {r.tool} | {r.flags or 'defaults'} | {r.phase} | {r.wall_s:.2f} |"
            f" {f'{x:.1f}x' if x else '-'} | {r.requests or '-'} | {r.requests_per_blob or '-'} | {r.maxrss_mib:.1f} |"
            f" {r.cpu_s:.2f} | {r.registry_cpu_s:.2f} | {r.verified} |"
        )
    return head + "\n" + "\n".join(rows)


def plot(runs: list[Run], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install -e '.[bench]'): no plot", file=sys.stderr)
        return False
    cases = [(s, p) for s in ("wan", "small") for p in ("full", "noop")]
    labels = [f"{s} {p}" for s, p in cases]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.38
    for i, tool in enumerate(("skopeo", "ferry")):
        walls = []
        for s, p in cases:
            rs = [r.wall_s for r in runs if r.scenario == s and r.phase == p and r.tool == tool and not r.flags]
            walls.append(min(rs) if rs else 0)
        xs = [k + (i - 0.5) * width for k in range(len(cases))]
        bars = ax1.bar(xs, walls, width, label=tool)
        ax1.bar_label(bars, fmt="%.1f", fontsize=7)
    ax1.set_xticks(range(len(cases)), labels)
    ax1.set_ylabel("wall seconds (lower is better)")
    ax1.set_yscale("log")
    ax1.set_title("sync wall time: WAN link (20 ms, 160 Mbit/s/conn) and 1000 small tags")
    ax1.title.set_fontsize(9)
    ax1.legend()
    rss = [(f"{r.tool} {r.scenario} {r.flags or 'defaults'}", r.maxrss_mib) for r in runs if r.phase == "full"]
    ax2.barh(
        [n for n, _ in rss], [v for _, v in rss], color=["#1f77b4" if "skopeo" in n else "#ff7f0e" for n, _ in rss]
    )
    ax2.set_xlabel("peak RSS, MiB (full sync)")
    ax2.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return True


def machine_info() -> dict[str, Any]:
    return {
        **base_machine_info(),
        "skopeo": first_line([SKOPEO_BIN, "--version"]),
        "rss_method": "GNU time (wait4 of its child)" if GNU_TIME else "os.wait4 of a direct child (upper bound)",
        "uptime": first_line(["uptime"]),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.wan_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--repos", type=int, default=15, help="repositories in the WAN fleet (default 15)")
    p.add_argument("--tags", type=int, default=4, help="tags per repository in the WAN fleet (default 4)")
    p.add_argument("--small", type=int, default=1000, help="small tags on loopback (default 1000; 0: skip)")
    p.add_argument("--delay-ms", type=float, default=20.0, help="one-way delay per chunk (default 20 ms)")
    p.add_argument("--conn-mbit", type=float, default=160.0, help="cap per TCP connection (default 160 Mbit/s)")
    p.add_argument("--total-mbit", type=float, default=1000.0, help="cap per proxy, all connections (default 1000)")
    p.add_argument("--tools", default="skopeo,ferry", help="which tools (default skopeo,ferry)")
    p.add_argument("--wan", action=argparse.BooleanOptionalAction, default=True, help="run the WAN fleet")
    p.add_argument(
        "--streams6", action=argparse.BooleanOptionalAction, default=True, help="also ferry at 6 streams (old default)"
    )
    p.add_argument(
        "--tty", action=argparse.BooleanOptionalAction, default=True, help="also the small full sync on a terminal"
    )
    p.add_argument("--py-spy", type=Path, default=None, metavar="DIR", help="record ferry runs with py-spy into DIR")
    p.add_argument("--timeout", type=float, default=1800.0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--plot", type=Path, default=DEFAULT_PLOT)
    p.add_argument("--work-dir", default=None, help="temp space (default: $TMPDIR)")
    args = p.parse_args(argv)
    compile_ferry()
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]

    work = Path(tempfile.mkdtemp(prefix="ferry-wan-", dir=args.work_dir))
    bench = Bench(args, work)
    info = machine_info()
    print(f"machine: {info}", flush=True)
    try:
        fleet = Fleet("wan")
        if args.wan:
            src = start_registry(work / "src")
            fleet, pushes = build_wan_fleet(args.repos, args.tags, "ferry-wan")
            secs = seed_fleet(src, pushes)
            del pushes  # layers are built in memory (gzip, so that skopeo does not recompress them): let them go
            print(
                f"WAN fleet: {fleet.images} images ({fleet.indexes} indexes), {len(fleet.blobs)} distinct blobs,"
                f" {fleet.blob_bytes / MIB:.0f} MiB; seeded in {secs:.0f} s",
                flush=True,
            )
            src_proxy = bench.links.open(src.port, args)
            for tool in tools:
                bench.scenario("wan", tool, src, src_proxy, fleet, [])
            if args.streams6 and "ferry" in tools:
                # the old default: memory should not depend on the number of streams, speed should
                bench.scenario("wan", "ferry", src, src_proxy, fleet, ["--image-parallel-copies", "6"], ("full",))
        small: Fleet | None = None
        if args.small:
            small_src = start_registry(work / "small-src")
            small, small_pushes = build_small_fleet(max(1, args.small // 100), min(100, args.small), "ferry-small")
            secs = seed_fleet(small_src, small_pushes, threads=16)
            del small_pushes
            print(f"small fleet: {small.images} images, {len(small.blobs)} distinct blobs; seeded in {secs:.0f} s")
            for tool in tools:
                bench.scenario("small", tool, small_src, None, small, [])
            if args.tty and "ferry" in tools:
                # the same full sync with the live display on a terminal: it must cost next to nothing
                bench.scenario("small", "ferry", small_src, None, small, [], ("full",), tty=True)
    finally:
        bench.links.shutdown()
        stop_all()
        shutil.rmtree(work, ignore_errors=True)
    info["uptime_after"] = first_line(["uptime"])
    table = render_table(bench.runs)
    print(table)
    ratios = {
        f"{s} {ph}": ratio(bench.runs, s, ph) for s in ("wan", "small") for ph in ("full", "noop")
    }  # fmt: skip
    print(f"ratios (skopeo wall / ferry wall): {ratios}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "machine": info,
        "command": " ".join(["python -m bench.wan_bench", *(argv if argv is not None else sys.argv[1:])]),
        "link": {"delay_ms": args.delay_ms, "conn_mbit": args.conn_mbit, "total_mbit": args.total_mbit},
        "wan_fleet": {
            "images": fleet.images,
            "indexes": fleet.indexes,
            "blobs": len(fleet.blobs),
            "bytes": fleet.blob_bytes,
        },
        "small_fleet": {"images": small.images, "blobs": len(small.blobs)} if small else None,
        "runs": [asdict(r) for r in bench.runs],
        "ratios": ratios,
    }
    args.out.write_text(json.dumps(data, indent=2) + "\n")
    if plot(bench.runs, args.plot):
        print(f"plot: {args.plot}")
    print(f"results: {args.out}")
    return 0 if all(r.exit_code == 0 and "wrong" not in r.verified for r in bench.runs) else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    os._exit(130)
