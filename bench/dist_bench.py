"""Distributed copy benchmark: one multi-image ``ferry sync`` on the embedded executor vs on 1, 2, 4 Celery workers.

Run it with ``make bench-dist`` (or ``PYTHONPATH=. .venv/bin/python -m bench.dist_bench --help``).

By default both registries sit behind ``bench/wan_bench.py``'s simulated link (20 ms each way, 160 Mbit/s per
connection; ``--no-link`` for plain loopback) and workers use the threads pool (``--pool``). Each run also
records the Redis commands per blob step and the peak RSS of every worker process, and (``--enqueue-images``)
the time, producer memory and Redis memory per image of enqueueing a large synthetic job.

What it does:

1. starts a source ``docker-registry`` (distribution 2.8, from the test harness) and a ``redis-server`` on
   loopback ports, with their state in a fresh temp dir, and seeds a set of images once: ``--images`` images
   (default 16) in their own repositories ``src/app-NN:v1``, each made of one *shared* base layer (default
   32 MiB, the same blob in every image) and a few *unique* layers (default 8, 4 and 2 MiB). Layers are
   uncompressed streamed tars (``make_stream_layer``: deterministic, incompressible). A sync YAML file names
   every image;
2. for every round (``--runs``) and every configuration -- the embedded executor (``ferry sync`` without
   ``--queue``, at each ``--parallel`` value of ``--image-parallel-copies``) and 1, 2, 4 ``ferry worker``
   processes (``--workers``, each ``--concurrency`` C) -- syncs the whole set into a *fresh* destination
   registry (new port, empty storage), with a fresh ``FERRY_CACHE_DIR`` and, for workers, a Redis without
   blob locations from earlier runs, so nothing is skipped or mounted thanks to an earlier run. The timed
   command is the same ``ferry sync --src yaml`` both ways; with workers it gets ``--queue URL --wait``, so its
   wall time runs from submission (after planning) to the end of the job. Worker processes are started before
   the timed run and get one untimed warm-up job (they are long-lived in real use); configurations are
   interleaved within a round so drift on the machine hits all of them alike;
3. checks every copy (each destination manifest digest must equal the source's, every blob must be there)
   and reads the destination registry's access log: completed blob uploads (``PUT ...?digest=``, 201) and
   cross-repository mounts (``POST ...?mount=``, 201). The shared layer must be uploaded exactly once per
   run and mounted into every other repository;
4. prints a Markdown table (median and min-max wall time, MiB/s, uploads and mounts, CPU time of the producer,
   the workers and the destination registry, how busy the machine's CPUs were, the load average) and writes
   every measurement as JSON to ``bench-out/dist.json``.

Everything (registries, Redis, workers, temp storage) is stopped and removed at the end, also on error, Ctrl-C
or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import re
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis
import yaml

from bench.copy_bench import (
    base_machine_info,
    compile_ferry,
    first_line,
    human_size,
    parse_size,
    parse_sizes,
    process_cpu_s,
    run_measured,
)
from bench.wan_bench import Links
from tests.harness.images import Image, StreamLayer, blob_exists, build_image, fetch_manifest, make_stream_layer
from tests.harness.images import push_image as harness_push_image
from tests.harness.servers import RedisServer, RegistryServer, start_redis, start_registry, stop_all
from tests.harness.workers import FERRY_BIN, WorkerProcess, start_worker, stop_all_workers
from worker.registry import Digest

MIB = 1 << 20
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench-out" / "dist.json"
SRC_PREFIX = "src"
DEST_PREFIX = "bench"
TAG = "v1"
CLOCK_TICK = os.sysconf("SC_CLK_TCK")


def parse_ints(text: str) -> list[int]:
    try:
        values = [int(part) for part in re.split(r"[,\s]+", text.strip()) if part]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"need positive integers: {text!r}")
    return values


# --------------------------------------------------------------------------------------------------------------
# CPU accounting from /proc


def _proc_stat_fields(pid: int | str) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def group_cpu_s(pgids: set[int]) -> float:
    """User + system CPU seconds used so far by every live process in the given process groups.

    A ``ferry worker`` leads its own session (tests/harness/workers.py), so its process group holds the Celery
    parent and every prefork pool child.
    """
    if not pgids:
        return 0.0
    ticks = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _proc_stat_fields(entry)
        # after "(comm)": state ppid pgrp session ... utime(11) stime(12)
        if fields is not None and int(fields[2]) in pgids:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / CLOCK_TICK


def pid_cpu_s(pid: int | None) -> float:
    if pid is None:
        return 0.0
    fields = _proc_stat_fields(pid)
    return 0.0 if fields is None else (int(fields[11]) + int(fields[12])) / CLOCK_TICK


def machine_cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs since boot; busy excludes idle and iowait."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    total = sum(values[:8])  # user nice system idle iowait irq softirq steal (guest is counted in user)
    idle = values[3] + values[4]
    return total - idle, total


# --------------------------------------------------------------------------------------------------------------
# the image set (commands are measured with bench.copy_bench.run_measured)


class RssSampler:
    """Peak resident memory of every process in the given process groups (worker parents and pool children),
    read from /proc every 0.2 s while the context is open."""

    def __init__(self, pgids: set[int]) -> None:
        self.pgids = pgids
        self.peak: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self) -> RssSampler:
        if self.pgids:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def _run(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(0.2):
                return

    def sample(self) -> None:
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            fields = _proc_stat_fields(entry)
            if fields is None or int(fields[2]) not in self.pgids:
                continue
            with contextlib.suppress(OSError, ValueError):
                for line in Path(f"/proc/{entry}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        kib = int(line.split()[1])
                        self.peak[int(entry)] = max(self.peak.get(int(entry), 0), kib)

    def peaks(self) -> list[float]:
        return sorted((round(k / 1024, 1) for k in self.peak.values()), reverse=True)


@dataclass
class ImageSet:
    shared: StreamLayer
    images: list[Image]
    yaml_path: Path
    seeding_s: float

    @property
    def repos(self) -> list[str]:
        return [f"app-{n:02d}" for n in range(len(self.images))]

    @property
    def distinct_bytes(self) -> int:
        """Bytes that must cross the wire: every distinct blob once (the shared layer once)."""
        blobs: dict[Digest, int] = {}
        for img in self.images:
            for digest, size, _blob in img.blobs():
                blobs[digest] = size
        return sum(blobs.values())

    @property
    def image_bytes(self) -> int:
        """Sum of the images' sizes, the shared layer counted in every image."""
        return sum(size for img in self.images for _d, size, _b in img.blobs())

    @property
    def distinct_blobs(self) -> int:
        return len({d for img in self.images for d, _s, _b in img.blobs()})


def seed_set(
    src: RegistryServer, work: Path, n_images: int, shared_size: int, unique: list[int], yaml_host: str = ""
) -> ImageSet:
    started = time.perf_counter()
    shared = make_stream_layer("ferry-dist-bench/shared", shared_size)
    images: list[Image] = []
    first_repo = f"{SRC_PREFIX}/app-00"
    with src.client() as client:
        for n in range(n_images):
            layers = [shared] + [make_stream_layer(f"ferry-dist-bench/{n}/{k}", s) for k, s in enumerate(unique)]
            img = build_image(f"ferry-dist-bench/{n}", layers=layers, fmt="oci")
            repo = f"{SRC_PREFIX}/app-{n:02d}"
            if n:
                # the shared layer is already in the registry: mount it rather than push it again
                resp = client.post(
                    f"/v2/{repo}/blobs/uploads/", params={"mount": str(shared.digest), "from": first_repo}
                )
                if resp.status_code != 201:
                    raise RuntimeError(f"seeding: mount of the shared layer into {repo} gave {resp.status_code}")
            harness_push_image(client, repo, TAG, img)
            images.append(img)
    sync_file = work / "sync.yaml"
    sync_file.write_text(
        yaml.safe_dump(
            {
                yaml_host or src.host: {
                    "tls-verify": False,
                    "images": {f"{SRC_PREFIX}/app-{n:02d}": [TAG] for n in range(n_images)},
                }
            },
            sort_keys=False,
        )
    )
    return ImageSet(shared, images, sync_file, time.perf_counter() - started)


def verify_set(dst: RegistryServer, images: ImageSet) -> tuple[int, list[str]]:
    """How many images arrived intact (manifest digest equal to the source's, every blob present); problems."""
    ok = 0
    problems: list[str] = []
    with dst.client() as client:
        for repo, img in zip(images.repos, images.images, strict=True):
            name = f"{DEST_PREFIX}/{repo}"
            try:
                raw, _ctype = fetch_manifest(client, name, TAG)
            except Exception as exc:
                problems.append(f"{name}:{TAG}: {type(exc).__name__}: {exc}")
                continue
            digest = Digest.of(raw)
            if digest != img.digest:
                problems.append(f"{name}:{TAG}: digest {digest}, source {img.digest}")
                continue
            missing = [str(d) for d, _s, _b in img.blobs() if not blob_exists(client, name, d)]
            if missing:
                problems.append(f"{name}:{TAG}: missing blobs {missing}")
                continue
            ok += 1
    return ok, problems


@dataclass
class Traffic:
    uploads: int = 0  # completed blob uploads (PUT ?digest=, 201)
    mounts: int = 0  # cross-repository mounts (POST ?mount=, 201)
    mounts_refused: int = 0  # mount requests answered with an upload session (202)
    shared_uploads: int = 0
    shared_mounts: int = 0
    requests: int = 0


_UPLOAD_PUT = re.compile(r"/v2/.+/blobs/uploads/[^/]+")
_UPLOAD_POST = re.compile(r"/v2/.+/blobs/uploads/?")


def count_traffic(dst: RegistryServer, shared: Digest) -> Traffic:
    t = Traffic()
    for e in dst.access_log():
        t.requests += 1
        query = dict(part.partition("=")[::2] for part in e.query.split("&") if part)
        if e.method == "PUT" and e.status == 201 and "digest" in query and _UPLOAD_PUT.fullmatch(e.path):
            t.uploads += 1
            t.shared_uploads += query["digest"].replace("%3A", ":") == str(shared)
        elif e.method == "POST" and "mount" in query and _UPLOAD_POST.fullmatch(e.path):
            if e.status == 201:
                t.mounts += 1
                t.shared_mounts += query["mount"].replace("%3A", ":") == str(shared)
            else:
                t.mounts_refused += 1
    return t


# --------------------------------------------------------------------------------------------------------------
# configurations and runs


@dataclass(frozen=True)
class Config:
    kind: str  # "embedded" | "workers"
    parallel: int = 0  # embedded: --image-parallel-copies
    workers: int = 0  # workers: ferry worker processes
    concurrency: int = 0  # workers: --concurrency of each

    @property
    def label(self) -> str:
        if self.kind == "embedded":
            return f"embedded, --image-parallel-copies {self.parallel}"
        return f"{self.workers} worker{'s' if self.workers > 1 else ''} x concurrency {self.concurrency}"

    @property
    def slots(self) -> int:
        """Blob transfers that can run at once."""
        return self.parallel if self.kind == "embedded" else self.workers * self.concurrency


@dataclass
class Run:
    config: str
    run: int
    wall_s: float
    exec_s: float  # embedded: the executor's own time; workers: job created -> finished (from Redis)
    exit_code: int
    verified_images: int
    producer_cpu_s: float
    producer_maxrss_kib: int
    workers_cpu_s: float
    dest_registry_cpu_s: float
    src_registry_cpu_s: float
    redis_cpu_s: float
    machine_busy_pct: float  # of all CPUs, during the timed command
    #: workers: Celery task retries during the run ("retry: Retry in" in the workers' logs: temporary errors, full
    #: transfer slots, or an in-flight lock still held after FERRY_LOCK_WAIT; see worker/tasks.py)
    task_retries: int
    #: commands Redis processed during the run (broker, result backend and Ferry's shared state together)
    redis_commands: int
    #: the same by command name (INFO commandstats), most frequent first
    redis_by_command: dict[str, int]
    #: workers: the peak resident memory of each worker process (MiB), sampled every 0.2 s during the run
    worker_rss_mib: list[float]
    load1_before: float
    traffic: Traffic
    ferry_summary: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.problems and self.traffic.shared_uploads == 1

    @property
    def commands_per_blob(self) -> float:
        blobs = int(self.ferry_summary.get("blobs_total", 0) or 0)
        return self.redis_commands / blobs if blobs else 0.0


@dataclass
class Case:
    config: Config
    runs: list[Run] = field(default_factory=list)

    def med(self, attr: str) -> float:
        return statistics.median(float(getattr(r, attr)) for r in self.runs)

    def summary(self, data_bytes: int) -> dict[str, Any]:
        walls = [r.wall_s for r in self.runs]
        med = statistics.median(walls)
        return {
            "config": self.config.label,
            **asdict(self.config),
            "runs": len(self.runs),
            "median_wall_s": round(med, 3),
            "min_wall_s": round(min(walls), 3),
            "max_wall_s": round(max(walls), 3),
            "throughput_mib_s": round(data_bytes / MIB / med, 1),
            "best_throughput_mib_s": round(data_bytes / MIB / min(walls), 1),
            "median_exec_s": round(self.med("exec_s"), 3),
            "median_producer_cpu_s": round(self.med("producer_cpu_s"), 2),
            "median_workers_cpu_s": round(self.med("workers_cpu_s"), 2),
            "median_dest_registry_cpu_s": round(self.med("dest_registry_cpu_s"), 2),
            "median_machine_busy_pct": round(self.med("machine_busy_pct"), 1),
            "median_redis_commands_per_blob": round(self.med("commands_per_blob"), 1),
            "max_worker_rss_mib": max((max(r.worker_rss_mib, default=0.0) for r in self.runs), default=0.0),
            "all_ok": all(r.ok for r in self.runs),
            "measurements": [asdict(r) for r in self.runs],
        }


def sync_argv(cfg: Config, images: ImageSet, dst_host: str, summary: Path, queue: str | None) -> list[str]:
    argv = [
        FERRY_BIN, "sync", "--src", "yaml", "--dest", "docker",
        "--src-tls-verify=false", "--dest-tls-verify=false", "--preserve-digests",
        "--summary-json", str(summary),
    ]  # fmt: skip
    if cfg.kind == "embedded":
        argv += ["--image-parallel-copies", str(cfg.parallel)]
    else:
        assert queue is not None
        argv += ["--queue", queue, "--wait"]
    return [*argv, str(images.yaml_path), f"{dst_host}/{DEST_PREFIX}"]


class Bench:
    def __init__(
        self,
        args: argparse.Namespace,
        work: Path,
        images: ImageSet,
        src: RegistryServer,
        rds: RedisServer,
        links: Links | None = None,
    ):
        self.args = args
        self.links = links
        self.work = work
        self.images = images
        self.src = src
        self.redis = rds
        self.n = 0
        self.log = work / "commands.log"
        env = {k: v for k, v in os.environ.items() if k not in ("FERRY_QUEUE", "DOCKER_CONFIG")}
        (work / "tmp").mkdir(exist_ok=True)
        auth = work / "auth.json"
        auth.write_text("{}")  # no credentials: everything is anonymous on loopback
        env.update({"TMPDIR": str(work / "tmp"), "REGISTRY_AUTH_FILE": str(auth)})
        self.env = env

    def queue_url(self) -> str:
        return self.redis.url_for(0)

    def start_workers(self, cfg: Config) -> list[WorkerProcess]:
        # no worker is connected now: start from an empty Redis (no jobs, locks or blob locations of other runs)
        self.redis.flushall()
        log_dir = self.work / f"workers-{self.n}"
        env = {"TMPDIR": self.env["TMPDIR"], "REGISTRY_AUTH_FILE": self.env["REGISTRY_AUTH_FILE"]}
        procs: list[WorkerProcess] = []
        try:
            for i in range(cfg.workers):
                procs.append(
                    start_worker(
                        self.queue_url(),
                        f"w{i + 1}@%h",
                        log_dir,
                        concurrency=cfg.concurrency,
                        env=env,
                        wait=False,
                        pool=self.args.pool,
                    )
                )
            for w in procs:
                w.wait_ready(timeout=60)
        except BaseException:
            for w in procs:
                w.stop(grace=2)
            raise
        return procs

    def redis_commands(self) -> int:
        """Commands Redis has processed so far (INFO stats; the INFO command itself counts as one)."""
        r = redis.Redis.from_url(self.queue_url())
        try:
            return int(r.info("stats")["total_commands_processed"])
        finally:
            r.close()

    def redis_commandstats(self) -> dict[str, int]:
        """Calls so far per command name (INFO commandstats: a Lua script's own commands are counted too)."""
        r = redis.Redis.from_url(self.queue_url())
        try:
            stats = r.info("commandstats")
        finally:
            r.close()
        return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}

    def forget_locations(self) -> None:
        """Drop what workers learnt of blob locations (a later registry may reuse a port: same store name)."""
        r = redis.Redis.from_url(self.queue_url())
        try:
            for pattern in ("ferry:loc:*", "ferry:lock:*"):
                keys = list(r.scan_iter(pattern, count=1000))
                if keys:
                    r.delete(*keys)
        finally:
            r.close()

    def one(self, cfg: Config, run: int, workers: list[WorkerProcess]) -> Run:
        """One sync of the whole set into a fresh destination registry (removed afterwards)."""
        self.n += 1
        dst_dir = self.work / f"dest-{self.n}"
        dst = start_registry(dst_dir)
        proxy = self.links.open(dst.port, self.args) if self.links is not None else None
        summary_path = self.work / f"summary-{self.n}.json"
        env = {**self.env, "FERRY_CACHE_DIR": str(self.work / f"ferry-cache-{self.n}")}
        try:
            if workers:
                self.forget_locations()
            dst_host = f"127.0.0.1:{proxy.port}" if proxy is not None else dst.host
            argv = sync_argv(cfg, self.images, dst_host, summary_path, self.queue_url() if workers else None)
            rss = RssSampler({w.pid for w in workers})
            pgids = {w.pid for w in workers}
            log_marks = [len(w.log()) for w in workers]
            stats_before = self.redis_commandstats()
            redis_before = self.redis_commands()
            redis_pid = self.redis.process.pid if self.redis.process else None
            load1 = os.getloadavg()[0]
            before = (
                group_cpu_s(pgids), process_cpu_s(dst), process_cpu_s(self.src), pid_cpu_s(redis_pid),
                machine_cpu_ticks(),
            )  # fmt: skip
            with rss:
                m = run_measured(argv, env, self.log, self.args.timeout)
            after = (
                group_cpu_s(pgids), process_cpu_s(dst), process_cpu_s(self.src), pid_cpu_s(redis_pid),
                machine_cpu_ticks(),
            )  # fmt: skip
            busy = after[4][0] - before[4][0]
            total = after[4][1] - before[4][1]
            summary: dict[str, Any] = {}
            with contextlib.suppress(OSError, ValueError):
                summary = json.loads(summary_path.read_text())
            if cfg.kind == "embedded":
                exec_s = float(summary.get("seconds", 0.0))
            else:
                exec_s = float(summary.get("finished", 0.0)) - float(summary.get("created", 0.0))
            redis_commands = self.redis_commands() - redis_before
            stats_after = self.redis_commandstats()
            by_command = {
                name: n - stats_before.get(name, 0) for name, n in stats_after.items() if n > stats_before.get(name, 0)
            }
            retries = sum(w.log()[mark:].count("retry: Retry in") for w, mark in zip(workers, log_marks, strict=True))
            traffic = count_traffic(dst, self.images.shared.digest)
            verified, problems = verify_set(dst, self.images)
            if m.exit_code != 0:
                problems.insert(0, f"ferry sync exited with {m.exit_code}")
            if traffic.shared_uploads != 1:
                problems.append(f"the shared layer was uploaded {traffic.shared_uploads} times (expected once)")
            keep = (
                "seconds", "blobs_transferred", "blobs_mounted", "blobs_skipped", "bytes_transferred",
                "blobs_total", "images_total", "images_done", "images_failed", "state", "id",
            )  # fmt: skip
            return Run(
                config=cfg.label,
                run=run,
                wall_s=m.wall_s,
                exec_s=exec_s,
                exit_code=m.exit_code,
                verified_images=verified,
                producer_cpu_s=m.user_s + m.sys_s,
                producer_maxrss_kib=m.maxrss_kib,
                workers_cpu_s=after[0] - before[0],
                dest_registry_cpu_s=after[1] - before[1],
                src_registry_cpu_s=after[2] - before[2],
                redis_cpu_s=after[3] - before[3],
                machine_busy_pct=100.0 * busy / total if total else 0.0,
                task_retries=retries,
                redis_commands=redis_commands,
                redis_by_command=dict(sorted(by_command.items(), key=lambda kv: -kv[1])),
                worker_rss_mib=rss.peaks(),
                load1_before=load1,
                traffic=traffic,
                ferry_summary={k: summary[k] for k in keep if k in summary},
                problems=problems,
            )
        finally:
            if proxy is not None and self.links is not None:
                self.links.close(proxy)
            dst.stop()
            if not self.args.keep:
                shutil.rmtree(dst_dir, ignore_errors=True)
                shutil.rmtree(self.work / f"ferry-cache-{self.n}", ignore_errors=True)


# --------------------------------------------------------------------------------------------------------------
# reporting


def _top_commands(by_command: dict[str, int], n: int = 8) -> str:
    return " ".join(f"{name}={calls}" for name, calls in list(by_command.items())[:n])


def render_table(cases: list[Case], images: ImageSet) -> str:
    data = images.distinct_bytes
    base = next((c for c in cases if c.config.kind == "embedded" and c.runs), None)
    lines = [
        "| executor | transfer slots | runs | median wall (s) | wall min-max (s) | MiB/s median (best) "
        "| vs embedded default | job execution (s) | blob uploads / mounts (shared-layer uploads) "
        "| task retries | Redis commands per blob | worker RSS max (MiB) "
        "| CPU s: producer / workers / dest registry | CPUs busy | load avg (1 min) before |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in cases:
        if not c.runs:
            continue
        walls = [r.wall_s for r in c.runs]
        med = statistics.median(walls)
        ups = sorted({r.traffic.uploads for r in c.runs})
        mounts = sorted({r.traffic.mounts for r in c.runs})
        shared = sorted({r.traffic.shared_uploads for r in c.runs})
        speed = f"x{base.med('wall_s') / med:.2f}" if base is not None else ""
        loads = [r.load1_before for r in c.runs]
        workers = c.config.kind == "workers"
        workers_cpu = f"{c.med('workers_cpu_s'):.1f}" if workers else "-"
        retries = f"{c.med('task_retries'):.0f}" if workers else "-"
        per_blob = f"{c.med('commands_per_blob'):.1f}" if workers else "-"
        rss = f"{max(max(r.worker_rss_mib, default=0.0) for r in c.runs):.0f}" if workers else "-"
        lines.append(
            f"| {c.config.label} | {c.config.slots} | {len(c.runs)} | {med:.2f} | {min(walls):.2f}-{max(walls):.2f} "
            f"| {data / MIB / med:.0f} ({data / MIB / min(walls):.0f}) | {speed} | {c.med('exec_s'):.2f} "
            f"| {'/'.join(map(str, ups))} / {'/'.join(map(str, mounts))} ({'/'.join(map(str, shared))}) | {retries} "
            f"| {per_blob} | {rss} "
            f"| {c.med('producer_cpu_s'):.1f} / {workers_cpu} / {c.med('dest_registry_cpu_s'):.1f} "
            f"| {c.med('machine_busy_pct'):.0f}% | {min(loads):.2f}-{max(loads):.2f} |"
        )
    return "\n".join(lines)


ENQUEUE_SCRIPT = """
import sys, time
from worker.celery_executor import CeleryExecutor
from worker.engine.plan import BlobStep, ImagePlan, ManifestStep, Plan
from worker.engine.transports import ImageName
from worker.registry import Digest
from worker.state import SharedState, connect

n, url = int(sys.argv[1]), sys.argv[2]
plan = Plan()
for i in range(n):
    src, dst = f"docker://src.example/app-{i}:v1", f"docker://dst.example/app-{i}:v1"
    src_name, dst_name = ImageName.parse(src), ImageName.parse(dst)
    steps = []
    for k in range(3):
        digest = "sha256:" + f"{i:032x}{k:032x}"
        layer = "application/vnd.oci.image.layer.v1.tar"
        plan.steps[f"b{i}.{k}"] = BlobStep(f"b{i}.{k}", src_name, dst_name, Digest.parse(digest), 1 << 20, layer)
        steps.append(f"b{i}.{k}")
    raw = ('{"schemaVersion":2,"n":%d}' % i).encode()
    plan.steps[f"m{i}"] = ManifestStep(f"m{i}", dst_name, raw, "application/vnd.oci.image.manifest.v1+json", None,
                                       deps=tuple(steps), top=True)
    plan.images.append(ImagePlan(f"i{i + 1}", src, dst, "sha256:" + "0" * 64, "sha256:" + "1" * 64,
                                 [*steps, f"m{i}"], size=3 << 20))
state = SharedState(connect(url))
started = time.perf_counter()
result = CeleryExecutor(state).submit(plan, "copy", {})
print(f"{time.perf_counter() - started:.3f} {len(result.enqueued)}")
"""


def measure_enqueue(n: int, rds: RedisServer, work: Path, timeout: float) -> dict[str, Any]:
    """Enqueue a synthetic ``n``-image job on an empty queue no worker reads: time, the producer's peak RSS and
    what Redis holds per image (job records and task messages)."""
    url = rds.url_for(0)
    rds.flushall()
    r = redis.Redis.from_url(url)
    try:
        before = int(r.info("memory")["used_memory"])
        out = work / "enqueue.out"
        env = {**os.environ, "FERRY_QUEUE": url, "PYTHONPATH": str(ROOT)}
        m = run_measured([sys.executable, "-c", ENQUEUE_SCRIPT, str(n), url], env, out, timeout)
        if m.exit_code != 0:
            raise RuntimeError(f"enqueueing failed: {out.read_text(errors='replace')[-2000:]}")
        seconds, sent = out.read_text().strip().splitlines()[-1].split()
        after = int(r.info("memory")["used_memory"])
        queued = int(r.llen("ferry.blobs")) + int(r.llen("ferry.meta"))
    finally:
        r.close()
        rds.flushall()
    return {
        "images": n,
        "enqueued": int(sent),
        "task_messages": queued,
        "seconds": float(seconds),
        "wall_s": round(m.wall_s, 2),
        "producer_maxrss_mib": round(m.maxrss_kib / 1024, 1),
        "redis_bytes_per_image": round((after - before) / n),
    }


def render_plot(cases: list[Case], images: ImageSet, width: int = 50) -> str:
    """A text bar chart of median throughput per configuration (for docs/benchmarks.md)."""
    data = images.distinct_bytes / MIB
    rates = [(c.config.label, data / c.med("wall_s")) for c in cases if c.runs]
    top = max((r for _l, r in rates), default=1.0) or 1.0
    label_w = max((len(lbl) for lbl, _r in rates), default=10)
    return "\n".join(
        f"{lbl:<{label_w}} | {'#' * max(1, round(width * r / top)):<{width}} {r:6.1f} MiB/s" for lbl, r in rates
    )


def machine_info() -> dict[str, Any]:
    try:
        from importlib.metadata import version

        celery_version = version("celery")
    except Exception:
        celery_version = "?"
    return {
        **base_machine_info(),
        "celery": celery_version,
        "redis": first_line(["/usr/bin/redis-server", "--version"]),
    }


# --------------------------------------------------------------------------------------------------------------


def _sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dist_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=16, help="images in the set (default: 16)")
    parser.add_argument(
        "--shared", type=parse_size, default=parse_size("32M"), help="size of the base layer every image shares (32M)"
    )
    parser.add_argument(
        "--layers", type=parse_sizes, default=parse_sizes("8M,4M,2M"), help="unique layers per image (8M,4M,2M)"
    )
    parser.add_argument("--workers", type=parse_ints, default=parse_ints("1,2,4"), help="worker counts (1,2,4)")
    parser.add_argument("--concurrency", type=int, default=4, help="--concurrency of every worker (default: 4)")
    parser.add_argument(
        "--parallel", type=parse_ints, default=parse_ints("6,16"),
        help="embedded --image-parallel-copies values (default: 6 (ferry's default),16)",
    )  # fmt: skip
    parser.add_argument("--runs", type=int, default=3, help="timed runs per configuration (default: 3)")
    parser.add_argument("--pool", default="threads", help="ferry worker --pool (default: threads)")
    parser.add_argument("--delay-ms", type=float, default=20.0, help="simulated link: one-way delay (default: 20)")
    parser.add_argument(
        "--conn-mbit", type=float, default=160.0, help="simulated link: Mbit/s per connection (default: 160)"
    )
    parser.add_argument(
        "--total-mbit", type=float, default=1000.0, help="simulated link: Mbit/s per proxy in total (default: 1000)"
    )
    parser.add_argument("--no-link", action="store_true", help="no simulated link: loopback straight")
    parser.add_argument(
        "--enqueue-images", type=int, default=10000,
        help="also time enqueueing a synthetic job of N images on a queue no worker reads (default: 10000; 0: skip)",
    )  # fmt: skip
    parser.add_argument("--no-embedded", action="store_true", help="skip the embedded executor")
    parser.add_argument("--work-dir", default=None, help="where the temp storage goes (default: $TMPDIR or /tmp)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default: {DEFAULT_OUT})")
    parser.add_argument("--timeout", type=float, default=600.0, help="kill a sync after this many seconds")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (registry storage, logs)")
    args = parser.parse_args(argv)
    compile_ferry()
    if args.runs < 1 or args.images < 1 or args.concurrency < 1:
        parser.error("--runs, --images and --concurrency must be >= 1")
    if not os.access(FERRY_BIN, os.X_OK):
        parser.error(f"{FERRY_BIN}: not executable (run from the venv)")

    configs: list[Config] = []
    if not args.no_embedded:
        configs += [Config("embedded", parallel=p) for p in args.parallel]
    configs += [Config("workers", workers=n, concurrency=args.concurrency) for n in args.workers]

    signal.signal(signal.SIGTERM, _sigterm)
    # Ctrl-C must reach us even when started from a non-interactive shell's background job (which ignores SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    work = Path(tempfile.mkdtemp(prefix="ferry-dist-bench-", dir=args.work_dir))
    machine = machine_info()
    print(
        f"# ferry distributed benchmark: {args.images} images (shared {human_size(args.shared)} + "
        f"{', '.join(human_size(s) for s in args.layers)} each); {args.runs} runs; work {work}"
    )
    print("# machine: " + ", ".join(f"{k}={v}" for k, v in machine.items()), flush=True)
    load_start = os.getloadavg()
    cases = {c: Case(c) for c in configs}
    links: Links | None = None
    enqueue: dict[str, Any] = {}
    warmups: list[dict[str, Any]] = []
    ok = True
    interrupted = False
    images: ImageSet | None = None
    try:
        need = 2 * (args.images * (args.shared + sum(args.layers))) + 512 * MIB
        if shutil.disk_usage(work).free < need:
            raise SystemExit(f"{work}: not enough free space (need about {human_size(need)})")
        src = start_registry(work / "source")
        rds = start_redis(work / "redis")
        if not args.no_link:
            links = Links()  # the simulated link of bench/wan_bench.py
            src_link = links.open(src.port, args)
            print(
                f"# simulated link: {args.delay_ms:g} ms each way, {args.conn_mbit:g} Mbit/s per connection, "
                f"{args.total_mbit:g} Mbit/s in total, in front of the source and of every destination registry"
            )
        yaml_host = f"127.0.0.1:{src_link.port}" if links else ""
        images = seed_set(src, work, args.images, args.shared, args.layers, yaml_host)
        print(
            f"seeded {args.images} images into {src.host}/{SRC_PREFIX}/app-NN:{TAG} in {images.seeding_s:.1f}s: "
            f"{images.distinct_blobs} distinct blobs, {human_size(images.distinct_bytes)} to transfer "
            f"({human_size(images.image_bytes)} counting the shared layer in every image)",
            flush=True,
        )
        bench = Bench(args, work, images, src, rds, links)
        if args.enqueue_images:
            enqueue = measure_enqueue(args.enqueue_images, rds, work, args.timeout)
            print(
                f"enqueue of a {args.enqueue_images}-image job (3 blobs and 1 manifest each, no worker): "
                f"{enqueue['seconds']:.1f}s, producer max RSS {enqueue['producer_maxrss_mib']:.0f} MiB, "
                f"Redis {enqueue['redis_bytes_per_image']:.0f} bytes per image",
                flush=True,
            )
        # untimed: warms the page cache (venv, source blobs) for everyone
        first = bench.one(Config("embedded", parallel=6), 0, [])
        warmups.append({"config": "embedded warm-up", "wall_s": round(first.wall_s, 3), "ok": first.ok})
        for run in range(1, args.runs + 1):
            for cfg in configs:
                procs: list[WorkerProcess] = []
                try:
                    if cfg.kind == "workers":
                        procs = bench.start_workers(cfg)
                        warm = bench.one(cfg, 0, procs)  # untimed: first tasks of fresh pool processes
                        warmups.append({"config": cfg.label, "run": run, "wall_s": round(warm.wall_s, 3)})
                    r = bench.one(cfg, run, procs)
                finally:
                    for w in procs:
                        w.stop(grace=10)
                cases[cfg].runs.append(r)
                t = r.traffic
                print(
                    f"run {run} {cfg.label:42} {r.wall_s:6.2f}s (exec {r.exec_s:5.2f}s) "
                    f"{images.distinct_bytes / MIB / r.wall_s:5.0f} MiB/s  uploads {t.uploads} mounts {t.mounts} "
                    f"(refused {t.mounts_refused}) shared-layer uploads {t.shared_uploads}  cpu producer "
                    f"{r.producer_cpu_s:4.1f}s workers {r.workers_cpu_s:4.1f}s dest {r.dest_registry_cpu_s:4.1f}s  "
                    f"busy {r.machine_busy_pct:3.0f}%  retries {r.task_retries}  redis cmds {r.redis_commands} "
                    f"({r.commands_per_blob:.1f}/blob: {_top_commands(r.redis_by_command)})  "
                    f"worker RSS {r.worker_rss_mib} MiB  "
                    f"load {r.load1_before:.2f}  "
                    f"{r.verified_images}/{len(images.images)} verified{'' if r.ok else '  FAILED'}",
                    flush=True,
                )
                if not r.ok:
                    ok = False
                    for p in r.problems:
                        print(f"  problem: {p}", file=sys.stderr)
                    tail = bench.log.read_text(errors="replace")[-3000:]
                    print(f"  end of the command log:\n{tail}", file=sys.stderr)
    except KeyboardInterrupt:
        print("\ninterrupted; cleaning up (no JSON is written)", file=sys.stderr)
        interrupted = True
    finally:
        stop_all_workers()
        if links is not None:
            links.shutdown()
        stop_all()
        if args.keep:
            print(f"# kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    load_end = os.getloadavg()
    done = [c for c in cases.values() if c.runs]
    if interrupted:
        return 130
    if images is None or not done:
        return 1
    table = render_table(done, images)
    plot = render_plot(done, images)
    print()
    print(table)
    print()
    print(plot)
    print(f"\nload average (1, 5, 15 min) at start {load_start}, at end {load_end}")
    report = {
        "benchmark": "multi-image ferry sync: embedded executor vs Celery workers",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": [sys.executable, "-m", "bench.dist_bench", *(argv if argv is not None else sys.argv[1:])],
        "machine": machine,
        "set": {
            "images": args.images,
            "shared_layer_bytes": args.shared,
            "unique_layer_bytes": args.layers,
            "distinct_blobs": images.distinct_blobs,
            "distinct_bytes": images.distinct_bytes,
            "image_bytes": images.image_bytes,
            "seeding_s": round(images.seeding_s, 2),
        },
        "runs": args.runs,
        "worker_concurrency": args.concurrency,
        "loadavg_start": [round(x, 2) for x in load_start],
        "loadavg_end": [round(x, 2) for x in load_end],
        "warmups": warmups,
        "pool": args.pool,
        "link": None
        if args.no_link
        else {
            "delay_ms": args.delay_ms,
            "conn_mbit": args.conn_mbit,
            "total_mbit": args.total_mbit,
        },
        "enqueue": enqueue,
        "results": [c.summary(images.distinct_bytes) for c in done],
        "all_ok": ok,
        "markdown_table": table,
        "plot": plot,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
