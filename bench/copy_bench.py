"""Registry-to-registry copy benchmark: ``ferry copy`` vs ``skopeo copy``, wall time and peak RSS.

Run it with ``make bench`` (or ``PYTHONPATH=. .venv/bin/python -m bench.copy_bench --help``).

What it does:

1. starts a source ``docker-registry`` (distribution 2.8, from the test harness) on a loopback port, with its
   storage in a fresh temp dir, and seeds one OCI image per size: a single uncompressed tar layer of exactly
   that many content bytes, generated and pushed as a stream (chunked PATCH, never whole in memory);
2. for every (size, run, tool) starts a *fresh* destination registry (new port, empty storage -- so neither
   tool can short-cut the upload with a cross-repository mount from an earlier run, whatever its blob-location
   cache says), runs the copy as a child process and reads the child's own resource usage with ``os.wait4``
   (``ru_maxrss``: peak resident set size of that process, in KiB on Linux), then checks the copy (the
   destination manifest digest equals the source's, and the layer is there) and deletes the destination;
3. prints a Markdown table (median wall time, throughput, max peak RSS over the runs, CPU time of the tool and of
   the destination registry) and writes every measurement as JSON to ``bench-out/copy.json``.

Besides ``ferry`` and ``skopeo`` there is a reference ``curl``: ``curl GET blob | curl PUT blob`` of the layer
only (the config and manifest are pushed untimed afterwards). It does no verification and no protocol work,
so its wall time is the ceiling the two registries allow on this machine.

Runs of the tools are interleaved (ferry, skopeo, curl, ferry, ...) so slow drift of the machine hits all.
Everything (registries, temp storage) is stopped and removed at the end, also on error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.harness.images import (
    Image,
    blob_exists,
    build_image,
    fetch_manifest,
    make_stream_layer,
    push_blob,
    push_image,
    put_manifest,
)
from tests.harness.servers import REGISTRY_BIN, RegistryServer, start_registry, stop_all
from worker.registry import Digest

MIB = 1 << 20
GIB = 1 << 30
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench-out" / "copy.json"
DEFAULT_SIZES = "64M,1G"
SKOPEO_BIN = "/usr/bin/skopeo"
GNU_TIME = shutil.which("time", path="/usr/bin:/bin") or ""  # GNU time (apt package "time"), not the shell keyword
SRC_REPO = "bench/source"
TOOLS = ("ferry", "skopeo", "curl")
CURL_BIN = "/usr/bin/curl"
CLOCK_TICK = os.sysconf("SC_CLK_TCK")

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": MIB, "G": GIB, "T": 1 << 40}


def parse_size(text: str) -> int:
    """``"64M"``, ``"64MiB"``, ``"1G"``, ``"1.5GiB"``, ``"4096"`` -> bytes (binary units)."""
    m = _SIZE_RE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 64M, 1G, 512MiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def parse_sizes(text: str) -> list[int]:
    sizes = [parse_size(part) for part in re.split(r"[,\s]+", text.strip()) if part]
    if not sizes:
        raise argparse.ArgumentTypeError("no sizes given")
    return sizes


def human_size(n: int) -> str:
    for unit, factor in (("GiB", GIB), ("MiB", MIB), ("KiB", 1 << 10)):
        if n >= factor and n % factor == 0:
            return f"{n // factor} {unit}"
    if n >= MIB:
        return f"{n / MIB:.1f} MiB"
    return f"{n} B"


# --------------------------------------------------------------------------------------------------------------
# measuring one child process


@dataclass
class Measurement:
    wall_s: float
    maxrss_kib: int
    user_s: float
    sys_s: float
    exit_code: int


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def run_measured(argv: list[str], env: dict[str, str], log_path: Path, timeout: float) -> Measurement:
    """Run ``argv`` to completion, output to ``log_path``; wall time and the rusage of that one process.

    The command runs under GNU ``time``, which forks it from its own small process and reports the child's
    ``wait4`` rusage. Forking the command straight from this (large) Python process would not do: Linux carries
    the forking process's peak RSS over ``exec`` into the child's ``ru_maxrss``, so every tool would appear to
    use at least as much memory as the benchmark itself. Without GNU time we fall back to ``os.wait4`` on a
    direct child (and say so: its RSS figures are then only upper bounds).
    """
    stats = log_path.with_name("time.out")
    timed = [GNU_TIME, "-f", "%M %U %S", "-o", str(stats), *argv] if GNU_TIME else argv
    with open(log_path, "ab") as log:
        log.write(f"$ {' '.join(argv)}\n".encode())
        log.flush()
        start = time.perf_counter()
        proc = subprocess.Popen(
            timed, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        # on timeout kill the whole group: killing GNU time alone would leave the command running
        watchdog = threading.Timer(timeout, _kill_group, (proc.pid,))
        watchdog.start()
        try:
            _pid, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            # Ctrl-C, SIGTERM or an error while waiting: never leave the command running
            _kill_group(proc.pid)
            proc.wait()
            raise
        finally:
            watchdog.cancel()
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)  # we reaped it ourselves; tell Popen
    maxrss, user, sys_ = usage.ru_maxrss, usage.ru_utime, usage.ru_stime
    if GNU_TIME and stats.exists():
        # the last line is "%M %U %S"; a line before it may say "Command exited with non-zero status N"
        fields = stats.read_text().strip().splitlines()[-1].split()
        maxrss, user, sys_ = int(fields[0]), float(fields[1]), float(fields[2])
        stats.unlink()
    return Measurement(wall_s=wall, maxrss_kib=maxrss, user_s=user, sys_s=sys_, exit_code=proc.returncode)


# --------------------------------------------------------------------------------------------------------------
# the benchmark


@dataclass
class Run:
    tool: str
    size: int
    run: int
    wall_s: float
    maxrss_kib: int
    user_s: float
    sys_s: float
    verified: bool
    dest_digest: str
    src_registry_cpu_s: float
    dest_registry_cpu_s: float


@dataclass
class Case:
    tool: str
    size: int
    runs: list[Run] = field(default_factory=list)

    @property
    def median_wall_s(self) -> float:
        return statistics.median(r.wall_s for r in self.runs)

    @property
    def max_rss_mib(self) -> float:
        return max(r.maxrss_kib for r in self.runs) / 1024

    @property
    def throughput_mib_s(self) -> float:
        return self.size / MIB / self.median_wall_s

    @property
    def best_throughput_mib_s(self) -> float:
        return self.size / MIB / min(r.wall_s for r in self.runs)

    @property
    def median_cpu_s(self) -> float:
        return statistics.median(r.user_s + r.sys_s for r in self.runs)

    @property
    def median_dest_registry_cpu_s(self) -> float:
        return statistics.median(r.dest_registry_cpu_s for r in self.runs)

    def summary(self) -> dict[str, Any]:
        walls = [r.wall_s for r in self.runs]
        return {
            "tool": self.tool,
            "size_bytes": self.size,
            "size": human_size(self.size),
            "runs": len(self.runs),
            "median_wall_s": round(self.median_wall_s, 3),
            "min_wall_s": round(min(walls), 3),
            "max_wall_s": round(max(walls), 3),
            "throughput_mib_s": round(self.throughput_mib_s, 1),
            "best_throughput_mib_s": round(self.best_throughput_mib_s, 1),
            "max_rss_mib": round(self.max_rss_mib, 1),
            "median_cpu_s": round(self.median_cpu_s, 3),
            "median_dest_registry_cpu_s": round(self.median_dest_registry_cpu_s, 3),
            "all_verified": all(r.verified for r in self.runs),
            "measurements": [asdict(r) for r in self.runs],
        }


def tool_argv(tool: str, bins: dict[str, str], src: str, dst: str) -> list[str]:
    """The copy command. ``--preserve-digests`` on both: a byte-for-byte copy. Without it skopeo gzips the
    uncompressed layer on the way to the registry (containers/image compresses uncompressed layers for docker
    destinations), which changes the digests and measures gzip rather than transfer; Ferry copies as-is
    either way."""
    opts = ["--src-tls-verify=false", "--dest-tls-verify=false", "--preserve-digests"]
    if tool == "ferry":
        return [bins["ferry"], "copy", *opts, f"docker://{src}", f"docker://{dst}"]
    return [bins["skopeo"], "copy", "--insecure-policy", *opts, f"docker://{src}", f"docker://{dst}"]


def curl_argv(curl: str, src: RegistryServer, dst: RegistryServer, repo: str, image: Image) -> list[str]:
    """``curl GET | curl PUT`` of the layer into an upload session opened here (untimed)."""
    layer = image.layers[0]
    resp = httpx.post(f"{dst.url}/v2/{repo}/blobs/uploads/")
    resp.raise_for_status()
    put = httpx.URL(dst.url).join(resp.headers["location"]).copy_merge_params({"digest": str(layer.digest)})
    get = f"{src.url}/v2/{SRC_REPO}/blobs/{layer.digest}"
    q = shlex.quote
    pipeline = (
        f"set -o pipefail; {q(curl)} -sSf {q(get)} | "
        f"{q(curl)} -sSf -X PUT -H 'Content-Type: application/octet-stream' -T - {q(str(put))}"
    )
    return ["/bin/bash", "-c", pipeline]


def curl_finish(dst: RegistryServer, repo: str, tag: str, image: Image) -> None:
    """After the timed layer upload: the config and the manifest, so the copy verifies like the others."""
    push_blob(dst.url, repo, image.config_digest, image.config, len(image.config))
    put_manifest(dst.url, repo, tag, image.manifest, image.media_type)


def startup_argv(tool: str, bins: dict[str, str]) -> list[str]:
    """A command that starts the tool and does nothing: its RSS is the interpreter/binary baseline."""
    return [bins[tool], "--version"] if tool == "curl" else [bins[tool], "copy", "--help"]


def process_cpu_s(reg: RegistryServer) -> float:
    """User + system CPU seconds the registry process has used so far."""
    if reg.process is None:
        return 0.0
    with open(f"/proc/{reg.process.pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICK


def verify_copy(dst: RegistryServer, repo: str, tag: str, image: Image) -> tuple[bool, str]:
    raw, _ctype = fetch_manifest(dst.url, repo, tag)
    digest = Digest.of(raw)
    ok = digest == image.digest and all(blob_exists(dst.url, repo, d) for d, _s, _b in image.blobs())
    return ok, str(digest)


def check_disk(work: Path, sizes: list[int]) -> None:
    # source holds every layer; one destination at a time holds the largest; plus some slack
    need = sum(sizes) + max(sizes) + 256 * MIB
    free = shutil.disk_usage(work).free
    if free < need:
        raise SystemExit(f"{work}: {human_size(free)} free, the benchmark needs about {human_size(need)}")


def first_line(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False).stdout
    except OSError:
        return "?"
    return out.strip().splitlines()[0] if out.strip() else "?"


def compile_ferry() -> None:
    """Compile Ferry's modules to bytecode once, as an installed package is.

    With PYTHONDONTWRITEBYTECODE set (as in this workplace) an editable install is never cached, so every
    ``ferry`` start would compile its modules from source: about a quarter more start-up instructions that
    no installed copy pays. Children still read the cached bytecode with the variable set.
    """
    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", str(root / "worker"), str(root / "producer")],
        env=env,
        check=False,
        stdout=subprocess.DEVNULL,
    )


def base_machine_info() -> dict[str, Any]:
    """CPU, memory, kernel, Python and Ferry's version: what every benchmark records of the machine."""
    mem_kib = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        from importlib.metadata import version

        ferry_version = version("ferry")
    except Exception:
        ferry_version = "?"
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "mem_total_gib": round(mem_kib / (1 << 20), 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "ferry": ferry_version,
        "registry": first_line([REGISTRY_BIN, "--version"]),
    }


def machine_info(bins: dict[str, str]) -> dict[str, Any]:
    return {
        **base_machine_info(),
        "skopeo": first_line([bins["skopeo"], "--version"]),
        "curl": " ".join(first_line([bins["curl"], "--version"]).split()[:2]),
        "rss_method": "GNU time (wait4 of its child)" if GNU_TIME else "os.wait4 of a direct child (upper bound)",
    }


def seed(src: RegistryServer, size: int) -> tuple[str, Image, float]:
    started = time.perf_counter()
    layer = make_stream_layer(f"ferry-bench-{size}", size)
    image = build_image(f"ferry-bench-{size}", layers=[layer], fmt="oci")
    tag = f"size-{size}"
    push_image(src.url, SRC_REPO, tag, image)
    return tag, image, time.perf_counter() - started


def render_table(cases: list[Case], baselines: dict[str, Measurement]) -> str:
    lines = [
        "| tool | layer | runs | median wall (s) | wall min-max (s) | throughput median (best), MiB/s | peak RSS (MiB) "
        "| CPU user+sys (s) | dest registry CPU (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for tool, m in baselines.items():
        what = "`--version`" if tool == "curl" else "`copy --help`"
        lines.append(
            f"| {tool} | ({what}: startup only) | 1 | {m.wall_s:.2f} | | | {m.maxrss_kib / 1024:.1f} "
            f"| {m.user_s + m.sys_s:.2f} | |"
        )
    for c in cases:
        walls = [r.wall_s for r in c.runs]
        lines.append(
            f"| {c.tool} | {human_size(c.size)} | {len(c.runs)} | {c.median_wall_s:.2f} "
            f"| {min(walls):.2f}-{max(walls):.2f} | {c.throughput_mib_s:.0f} ({c.best_throughput_mib_s:.0f}) "
            f"| {c.max_rss_mib:.1f} | {c.median_cpu_s:.2f} | {c.median_dest_registry_cpu_s:.2f} |"
        )
    return "\n".join(lines)


def rss_growth(cases: list[Case]) -> dict[str, dict[str, float]]:
    """Per tool: peak RSS at the smallest and the largest size, and the ratio."""
    out: dict[str, dict[str, float]] = {}
    for tool in {c.tool for c in cases}:
        mine = sorted((c for c in cases if c.tool == tool), key=lambda c: c.size)
        if len(mine) < 2:
            continue
        lo, hi = mine[0], mine[-1]
        out[tool] = {
            "smallest_size_bytes": lo.size,
            "largest_size_bytes": hi.size,
            "rss_smallest_mib": round(lo.max_rss_mib, 1),
            "rss_largest_mib": round(hi.max_rss_mib, 1),
            "ratio": round(hi.max_rss_mib / lo.max_rss_mib, 3),
            "size_ratio": round(hi.size / lo.size, 1),
        }
    return out


def measure_copy(
    tool: str,
    bins: dict[str, str],
    src: RegistryServer,
    work: Path,
    n: int,
    size: int,
    run: int,
    tag: str,
    image: Image,
    env: dict[str, str],
    timeout: float,
) -> Run:
    """One measured copy into a fresh destination registry, which is removed afterwards."""
    dst_dir = work / f"dest-{n}"
    cache = work / f"ferry-cache-{n}"
    dst = start_registry(dst_dir)
    try:
        env = {**env, "FERRY_CACHE_DIR": str(cache)}  # fresh: no remembered blob locations, no mounts
        repo = f"bench/{tool}-{size}-{run}"
        if tool == "curl":
            argv = curl_argv(bins["curl"], src, dst, repo, image)
        else:
            argv = tool_argv(tool, bins, f"{src.host}/{SRC_REPO}:{tag}", f"{dst.host}/{repo}:{tag}")
        src_cpu, dst_cpu = process_cpu_s(src), process_cpu_s(dst)
        m = run_measured(argv, env, work / "commands.log", timeout)
        src_cpu, dst_cpu = process_cpu_s(src) - src_cpu, process_cpu_s(dst) - dst_cpu
        verified, digest = False, ""
        if m.exit_code == 0:
            if tool == "curl":
                curl_finish(dst, repo, tag, image)
            verified, digest = verify_copy(dst, repo, tag, image)
        return Run(
            tool, size, run, m.wall_s, m.maxrss_kib, m.user_s, m.sys_s, verified, digest, src_cpu, dst_cpu
        )  # fmt: skip
    finally:
        dst.stop()
        shutil.rmtree(dst_dir, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.copy_bench", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--sizes", type=parse_sizes, default=parse_sizes(DEFAULT_SIZES), help="layer sizes (default: 64M,1G)"
    )
    parser.add_argument("--runs", type=int, default=3, help="runs per (tool, size) (default: 3)")
    parser.add_argument("--tools", default=",".join(TOOLS), help=f"comma-separated subset of {','.join(TOOLS)}")
    parser.add_argument(
        "--ferry", default=str(Path(sys.executable).with_name("ferry")), help="ferry binary (default: the venv's)"
    )
    parser.add_argument("--skopeo", default=SKOPEO_BIN, help=f"skopeo binary (default: {SKOPEO_BIN})")
    parser.add_argument("--curl", default=CURL_BIN, help=f"curl binary (default: {CURL_BIN})")
    parser.add_argument("--work-dir", default=None, help="where the temp storage goes (default: $TMPDIR or /tmp)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default: {DEFAULT_OUT})")
    parser.add_argument("--timeout", type=float, default=900.0, help="kill a copy after this many seconds")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (registry storage, logs)")
    args = parser.parse_args(argv)
    compile_ferry()

    bins = {"ferry": args.ferry, "skopeo": args.skopeo, "curl": args.curl}
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    for t in tools:
        if t not in TOOLS:
            parser.error(f"unknown tool {t!r}")
        if not os.access(bins[t], os.X_OK):
            parser.error(f"{bins[t]}: not executable")
    if args.runs < 1:
        parser.error("--runs must be >= 1")
    sizes: list[int] = args.sizes

    work = Path(tempfile.mkdtemp(prefix="ferry-bench-", dir=args.work_dir))
    machine = machine_info(bins)
    print(f"# ferry copy benchmark: sizes {', '.join(human_size(s) for s in sizes)}; {args.runs} runs; work {work}")
    print("# machine: " + ", ".join(f"{k}={v}" for k, v in machine.items()), flush=True)

    load_start = os.getloadavg()
    cases = {(t, s): Case(t, s) for s in sizes for t in tools}
    baselines: dict[str, Measurement] = {}
    seeding: dict[int, float] = {}
    ok = True
    try:
        check_disk(work, sizes)
        src = start_registry(work / "source")
        seeded: dict[int, tuple[str, Image]] = {}
        for size in sizes:
            tag, image, took = seed(src, size)
            seeded[size] = (tag, image)
            seeding[size] = took
            print(f"seeded {src.host}/{SRC_REPO}:{tag} ({human_size(size)} layer) in {took:.1f}s", flush=True)

        env = dict(os.environ)
        (work / "tmp").mkdir()
        env["TMPDIR"] = str(work / "tmp")
        for tool in tools:
            baselines[tool] = run_measured(startup_argv(tool, bins), env, work / "commands.log", 60)

        n = 0
        for size in sizes:
            tag, image = seeded[size]
            for run in range(args.runs):
                for tool in tools:
                    n += 1
                    r = measure_copy(tool, bins, src, work, n, size, run, tag, image, env, args.timeout)
                    cases[(tool, size)].runs.append(r)
                    print(
                        f"{tool:6} {human_size(size):>8} run {run + 1}: {r.wall_s:7.2f}s "
                        f"{size / MIB / r.wall_s:6.0f} MiB/s  peak RSS {r.maxrss_kib / 1024:6.1f} MiB  "
                        f"cpu {r.user_s + r.sys_s:5.2f}s  registries cpu src {r.src_registry_cpu_s:5.2f}s "
                        f"dest {r.dest_registry_cpu_s:5.2f}s  {'verified' if r.verified else 'NOT VERIFIED'}",
                        flush=True,
                    )
                    if not r.verified:
                        ok = False
                        tail = (work / "commands.log").read_text(errors="replace")[-3000:]
                        print(f"copy failed or did not verify; end of the command log:\n{tail}", file=sys.stderr)
    finally:
        stop_all()
        if args.keep:
            print(f"# kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    load_end = os.getloadavg()
    done = [c for c in cases.values() if c.runs]
    table = render_table(done, baselines)
    growth = rss_growth(done)
    print()
    print(table)
    print(f"\nload average (1, 5, 15 min) at start {load_start}, at end {load_end}")
    for tool, g in sorted(growth.items()):
        print(
            f"{tool}: peak RSS {g['rss_smallest_mib']} MiB at {human_size(int(g['smallest_size_bytes']))} -> "
            f"{g['rss_largest_mib']} MiB at {human_size(int(g['largest_size_bytes']))} "
            f"(x{g['ratio']} for x{g['size_ratio']} the data)"
        )

    report = {
        "benchmark": "registry-to-registry copy, one uncompressed layer",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": [sys.executable, "-m", "bench.copy_bench", *(argv if argv is not None else sys.argv[1:])],
        "machine": machine,
        "sizes_bytes": sizes,
        "runs": args.runs,
        # other work on the machine skews wall times: a load average well above 0 means the numbers are noisy
        "loadavg_start": [round(x, 2) for x in load_start],
        "loadavg_end": [round(x, 2) for x in load_end],
        "seeding_s": {str(k): round(v, 2) for k, v in seeding.items()},
        "startup": {t: asdict(m) for t, m in baselines.items()},
        "results": [c.summary() for c in done],
        "rss_growth": growth,
        "all_verified": ok,
        "markdown_table": table,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
