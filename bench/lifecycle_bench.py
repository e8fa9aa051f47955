"""Lifecycle benchmark: ``ferry verify`` of N tags vs listing and inspecting them with skopeo; ``ferry prune``.

Run it with ``make bench-lifecycle`` (or ``PYTHONPATH=. .venv/bin/python -m bench.lifecycle_bench --help``).

What it does:

1. starts a source and a destination ``docker-registry`` (distribution 2.8, test harness) on loopback and pushes
   the same N tags to both with plain httpx (8 threads): each tag a distinct single-platform OCI image with its
   own small layer and config plus one 64 KiB base layer shared by all, and every tenth tag a cosign-style
   signature (``sha256-<hex>.sig``);
2. **verify**: ``ferry verify --src docker --dest docker SRC/bench/app DST/mirror`` (a fresh cache dir each run,
   so no digest memo helps) against the skopeo way of checking the same thing: ``skopeo list-tags`` of both
   repositories, then ``skopeo inspect --no-tags --format {{.Digest}}`` of every tag on both sides, compared.
   skopeo runs once one process at a time (a shell loop) and once with 8 at a time (``xargs -P 8``). Ferry does
   more than the skopeo loop: it also HEADs every blob and checks the signature tags;
3. **prune**: ``ferry prune --keep-latest 10`` of the destination repository, once as ``--dry-run`` and once
   for real (990 tags and their 99 signatures deleted when N = 1000), checked afterwards.

Each command runs as a child process under GNU time (``bench.copy_bench.run_measured``): wall time, CPU time,
peak RSS. The machine's load average is recorded before and after every measurement, since this box is shared.
Prints a Markdown table and writes everything to ``bench-out/lifecycle.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.copy_bench import SKOPEO_BIN, Measurement, base_machine_info, compile_ferry, first_line, run_measured
from tests.harness.images import build_image, make_layer, push_cosign_signature, push_image
from tests.harness.servers import RegistryServer, start_registry, stop_all

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench-out" / "lifecycle.json"
REPO = "bench/app"
MIRROR = "mirror"
#: where sync's naming puts REPO under MIRROR (its last path element)
DEST_REPO = f"{MIRROR}/app"


@dataclass
class Result:
    what: str
    run: int
    wall_s: float
    cpu_s: float
    maxrss_mib: float
    exit_code: int
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]
    note: str = ""


@dataclass
class Report:
    tags: int
    machine: dict[str, Any]
    seeding_s: float = 0.0
    results: list[Result] = field(default_factory=list)

    def median(self, what: str) -> float:
        walls = [r.wall_s for r in self.results if r.what == what and r.exit_code == 0]
        return statistics.median(walls) if walls else float("nan")


def seed(regs: list[RegistryServer], n: int) -> float:
    """The same N tags (and a signature on every tenth) in ``REPO`` of the source and ``DEST_REPO`` of the other."""
    started = time.perf_counter()
    base = make_layer("bench/base", 64 * 1024)

    def one(i: int) -> None:
        image = build_image(f"bench/{i}", layers=[base, 256])
        for reg, repo in zip(regs, (REPO, DEST_REPO), strict=True):
            with reg.client() as c:
                push_image(c, repo, f"1.{i // 100}.{i % 100}", image)
            if i % 10 == 0:
                push_cosign_signature(reg.url, repo, image)

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(one, range(n)))
    return time.perf_counter() - started


def skopeo_script(skopeo: str, src: RegistryServer, dst: RegistryServer, parallel: int, work: Path) -> list[str]:
    """A shell script checking every tag's digest on both sides with skopeo; exits 1 on any difference."""
    tls = "--tls-verify=false"
    inspect = f"{shlex.quote(skopeo)} inspect {tls} --no-tags --format '{{{{.Digest}}}}'"
    lines = [
        "set -euo pipefail",
        f"cd {shlex.quote(str(work))}",
        f"{shlex.quote(skopeo)} list-tags {tls} docker://{src.host}/{REPO} > src-tags.json",
        f"{shlex.quote(skopeo)} list-tags {tls} docker://{dst.host}/{DEST_REPO} > dst-tags.json",
        'python3 -c \'import json,sys; print("\\n".join(json.load(open(sys.argv[1]))["Tags"]))\' src-tags.json'
        " > tags.txt",
        f'xargs -P {parallel} -I TAG sh -c "echo TAG \\$({inspect} docker://{src.host}/{REPO}:TAG)"'
        " < tags.txt | sort > src.txt",
        f'xargs -P {parallel} -I TAG sh -c "echo TAG \\$({inspect} docker://{dst.host}/{DEST_REPO}:TAG)"'
        " < tags.txt | sort > dst.txt",
        "cmp src.txt dst.txt",
        "wc -l < src.txt",
    ]
    return ["bash", "-c", "\n".join(lines)]


def measure(report: Report, what: str, run: int, argv: list[str], env: dict[str, str], log: Path) -> Result:
    before = os.getloadavg()
    m: Measurement = run_measured(argv, env, log, timeout=3600)
    after = os.getloadavg()
    r = Result(what, run, m.wall_s, m.user_s + m.sys_s, m.maxrss_kib / 1024, m.exit_code, before, after)
    report.results.append(r)
    print(
        f"{what:28} run {run + 1}: {r.wall_s:8.2f}s  cpu {r.cpu_s:7.2f}s  peak RSS {r.maxrss_mib:6.1f} MiB"
        f"  exit {r.exit_code}  load {before[0]:.1f} -> {after[0]:.1f}",
        flush=True,
    )
    return r


def render(report: Report) -> str:
    rows = ["| command | runs | median wall | median CPU | peak RSS | exit | load (1 min) before → after |",
            "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for what in dict.fromkeys(r.what for r in report.results):
        rs = [r for r in report.results if r.what == what]
        loads = ", ".join(f"{r.load_before[0]:.1f}→{r.load_after[0]:.1f}" for r in rs)
        rows.append(
            f"| {what} | {len(rs)} | {statistics.median(r.wall_s for r in rs):.2f} s"
            f" | {statistics.median(r.cpu_s for r in rs):.2f} s | {max(r.maxrss_mib for r in rs):.0f} MiB"
            f" | {','.join(sorted({str(r.exit_code) for r in rs}))} | {loads} |"
        )
    ferry = report.median("ferry verify")
    for what in ("skopeo list+inspect, 1 at a time", "skopeo list+inspect, 8 at a time"):
        other = report.median(what)
        if other == other and ferry == ferry:
            rows.append(f"\n{what} / ferry verify: **{other / ferry:.1f}x**")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.lifecycle_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--tags", type=int, default=1000, help="tags in the repository (default 1000)")
    parser.add_argument("--runs", type=int, default=3, help="runs of ferry verify (default 3)")
    parser.add_argument("--skopeo-runs", type=int, default=1, help="runs of each skopeo variant (default 1)")
    parser.add_argument(
        "--ferry", default=str(Path(sys.executable).with_name("ferry")), help="ferry binary (default: the venv's)"
    )
    parser.add_argument("--skopeo", default=SKOPEO_BIN, help=f"skopeo binary (default: {SKOPEO_BIN})")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default: {DEFAULT_OUT})")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (registry storage, logs)")
    args = parser.parse_args(argv)
    compile_ferry()
    if args.tags < 20 or args.runs < 1:
        parser.error("--tags must be >= 20 and --runs >= 1")

    work = Path(tempfile.mkdtemp(prefix="ferry-lifecycle-bench-"))
    machine = {**base_machine_info(), "skopeo": first_line([args.skopeo, "--version"])}
    report = Report(args.tags, machine)
    print(f"# ferry lifecycle benchmark: {args.tags} tags; work {work}")
    print("# machine: " + ", ".join(f"{k}={v}" for k, v in machine.items()), flush=True)
    log = work / "commands.log"
    ok = True
    try:
        src = start_registry(work / "source")
        dst = start_registry(work / "destination")
        report.seeding_s = seed([src, dst], args.tags)
        print(f"seeded {args.tags} tags (+{(args.tags + 9) // 10} signatures) in both registries "
              f"in {report.seeding_s:.1f}s", flush=True)  # fmt: skip
        env = dict(os.environ)
        env.pop("FERRY_QUEUE", None)
        verify = [args.ferry, "verify", "--src", "docker", "--dest", "docker", "--src-tls-verify=false",
                  "--dest-tls-verify=false", f"{src.host}/{REPO}", f"{dst.host}/{MIRROR}"]  # fmt: skip
        for run in range(args.runs):
            env["FERRY_CACHE_DIR"] = str(work / f"cache-verify-{run}")
            summary = work / f"verify-{run}.json"
            r = measure(report, "ferry verify", run, [*verify, "--summary-json", str(summary)], env, log)
            data = json.loads(summary.read_text()) if summary.exists() else {}
            r.note = f"tags_checked={data.get('tags_checked')} complete={data.get('complete')}"
            ok &= r.exit_code == 0 and data.get("tags_checked") == args.tags + (args.tags + 9) // 10
        for parallel, what in ((1, "skopeo list+inspect, 1 at a time"), (8, "skopeo list+inspect, 8 at a time")):
            for run in range(args.skopeo_runs):
                scratch = work / f"skopeo-{parallel}-{run}"
                scratch.mkdir()
                r = measure(report, what, run, skopeo_script(args.skopeo, src, dst, parallel, scratch), env, log)
                ok &= r.exit_code == 0
        env["FERRY_CACHE_DIR"] = str(work / "cache-prune")
        prune = [args.ferry, "prune", "--tls-verify=false", "--keep-latest", "10", f"{dst.host}/{DEST_REPO}"]
        for what, extra in (("ferry prune --dry-run", ["--dry-run"]), ("ferry prune", [])):
            summary = work / f"{what.replace(' ', '-')}.json"
            r = measure(report, what, 0, [*prune, *extra, "--quiet", "--summary-json", str(summary)], env, log)
            data = json.loads(summary.read_text()) if summary.exists() else {}
            r.note = f"manifests_deleted={data.get('manifests_deleted')} kept={len(data.get('kept') or [])}"
            print(f"  {r.note}", flush=True)
            ok &= r.exit_code == 0
        with dst.client() as c:
            left = c.get(f"/v2/{DEST_REPO}/tags/list").json().get("tags") or []
        ok &= len([t for t in left if not t.startswith("sha256-")]) == 10
        report.results[-1].note += f" tags_left={len(left)}"
    finally:
        stop_all()
        if args.keep:
            print(f"# kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    table = render(report)
    print()
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**asdict(report), "table": table}, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    if not ok:
        print("Error: a command failed or a check did not hold (see above)", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
