"""Watching a job as it runs, as the people running it do: ``ferry job watch`` in a terminal (tmux), Flower in a
browser (headless Chromium), Ferry's Prometheus metrics (``ferry exporter``), and the Procfile and compose
commands that start them.

One real ``ferry worker`` named ``ferry@<host>`` (as compose names it), Flower and the exporter started from the
Procfile's own lines, real registries and Redis. The source is reached through a pass-through proxy that holds
the big layer after its first 2 MiB (:mod:`tests.harness.gate`), so the transfer is reliably mid-blob while the
test looks at it; nothing depends on timing.

The Flower screenshot (``flower-tasks.png``) and the tmux screen (``job-watch.txt``) are written to the test's
temporary directory, and copied to ``$FERRY_TEST_ARTIFACTS`` when that is set, for a person to look at.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.harness.gate import BlobGate, start_blob_gate
from tests.harness.images import Image, build_image, push_image
from tests.harness.servers import RedisServer, RegistryServer
from tests.harness.workers import FERRY_BIN, WorkerProcess, start_worker

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(FERRY_BIN).parent
QUEUE_DB = 13
BIG = 6 << 20
HOLD_AFTER = 2 << 20
INSECURE = ("--src-tls-verify=false", "--dest-tls-verify=false")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = pytest.mark.timeout(240)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(what: str, predicate: Callable[[], Any], timeout: float = 60.0, detail: Callable[[], str] = str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}\n{detail()}")
        time.sleep(0.1)


def _env(queue: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PORT", "DOCKER_CONFIG")}
    env.update({"FERRY_QUEUE": queue, "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", **extra})
    return env


def procfile() -> dict[str, str]:
    entries = {}
    for line in (ROOT / "Procfile").read_text().splitlines():
        m = re.match(r"^([a-z]+):\s*(.+)$", line)
        if m:
            entries[m.group(1)] = m.group(2)
    return entries


class Service:
    """A long-running process started from a Procfile line through sh, as honcho runs it."""

    def __init__(self, name: str, env: dict[str, str], log: Path) -> None:
        self.name, self.log = name, log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                ["sh", "-c", procfile()[name]],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=ROOT,
                start_new_session=True,
            )

    def wait_http(self, url: str) -> None:
        def up() -> bool:
            assert self.proc.poll() is None, f"{self.name} exited:\n{self.log.read_text()}"
            try:
                return httpx.get(url, timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(f"{self.name} at {url}", up, timeout=60, detail=self.log.read_text)

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, 15)
            self.proc.wait(10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, 9)
            self.proc.wait()


@pytest.fixture(scope="module")
def queue(redis_server: RedisServer) -> str:
    url = redis_server.url_for(QUEUE_DB)
    r = redis.Redis.from_url(url)
    r.flushdb()
    r.close()
    return url


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("operability")


@pytest.fixture(scope="module")
def worker(queue: str, workdir: Path) -> Iterator[WorkerProcess]:
    # named as compose names its workers, so that compose's healthcheck command can be run against it; with task
    # events, as compose and the Procfile run it beside Flower (--events)
    w = start_worker(queue, "ferry@%h", workdir / "workers", concurrency=2, env={"FERRY_EVENTS": "1"})
    yield w
    w.stop(grace=5)


@pytest.fixture(scope="module")
def flower(queue: str, workdir: Path) -> Iterator[str]:
    port = _free_port()
    # a Procfile runner sets PORT for every process: Flower must not take it
    svc = Service("flower", _env(queue, FERRY_FLOWER_PORT=str(port), PORT=str(_free_port())), workdir / "flower.log")
    url = f"http://127.0.0.1:{port}"
    try:
        svc.wait_http(url + "/healthcheck")
        yield url
    finally:
        svc.stop()


@pytest.fixture(scope="module")
def exporter(queue: str, workdir: Path) -> Iterator[str]:
    port = _free_port()
    svc = Service("exporter", _env(queue, FERRY_EXPORTER_PORT=str(port)), workdir / "exporter.log")
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        svc.wait_http(url)
        yield url
    finally:
        svc.stop()


def metrics(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(url, timeout=10).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def sample(m: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in m.items() if n == name and all((k, v2) in ls for k, v2 in labels.items()))


def ferry(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [FERRY_BIN, *args], capture_output=True, text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL
    )
    assert proc.returncode == 0, f"ferry {' '.join(args)}: {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def status(job: str, env: dict[str, str]) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(ferry("job", "status", job, "--json", env=env).stdout)
    return result


def chromium(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail("chromium is not installed (scripts/setup.sh installs Debian's chromium)")
    return subprocess.run(
        [exe, *CHROMIUM_FLAGS, *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )


def tmux_capture(command: list[str], env: dict[str, str], until: Callable[[str], bool]) -> str:
    """Run ``command`` in a detached 150x24 tmux session and return the screen once ``until`` holds."""
    if shutil.which("tmux") is None:
        pytest.fail("tmux is not installed (scripts/setup.sh installs it)")
    session = f"ferry-op-{os.getpid()}"
    socket_name = f"ferry-op-{os.getpid()}"
    tmux = ["tmux", "-L", socket_name]
    # COLUMNS: rich sizes its view when it starts, which can be before tmux has sized the new pane
    shell = "COLUMNS=150 LINES=24 " + " ".join(shlex.quote(c) for c in command) + "; sleep 30"
    subprocess.run(
        [*tmux, "new-session", "-d", "-s", session, "-x", "150", "-y", "24", shell], check=True, env=env, timeout=10
    )
    screen = ""
    try:

        def capture() -> bool:
            nonlocal screen
            screen = subprocess.run(
                [*tmux, "capture-pane", "-p", "-t", session], capture_output=True, text=True, timeout=10
            ).stdout
            return until(screen)

        wait_for("the terminal view", capture, timeout=30, detail=lambda: screen)
        return screen
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True, timeout=10)


@pytest.fixture
def held_job(
    queue: str, worker: WorkerProcess, registry: RegistryServer, registry2: RegistryServer, unique_repo: str
) -> Iterator[tuple[str, BlobGate, Image, str]]:
    """A copy job whose big layer is held mid-stream (2 of 6 MiB sent) until the gate is released."""
    img = build_image(f"operability/{unique_repo}", layers=[BIG, 4096])
    push_image(registry.url, unique_repo, "v1", img)
    big = str(img.layers[0].digest)
    gate = start_blob_gate(registry.url, big, HOLD_AFTER)
    try:
        env = _env(queue)
        dest = f"docker://{registry2.host}/{unique_repo}:v1"
        job = ferry("copy", *INSECURE, "--queue", queue, f"docker://{gate.host}/{unique_repo}:v1", dest, env=env)
        yield job.stdout.strip(), gate, img, dest
    finally:
        gate.stop()


def test_a_running_job_seen_in_the_terminal_the_browser_and_the_metrics(
    held_job: tuple[str, BlobGate, Image, str],
    queue: str,
    worker: WorkerProcess,
    flower: str,
    exporter: str,
    registry2: RegistryServer,
    workdir: Path,
) -> None:
    job, gate, img, dest = held_job
    env = _env(queue)
    big = img.layers[0]

    # -- mid-blob: the job status shows the bytes in flight and who moves them ------------------------------------
    wait_for("the big layer to be held mid-stream", gate.holding.is_set)

    def in_flight() -> dict[str, Any] | None:
        s = status(job, env)
        running = [t for t in s["transfers"] if t["digest"] == str(big.digest) and t["bytes"] > 0]
        return s if running else None

    s = wait_for("the held transfer's bytes in the job status", in_flight)
    (t,) = [t for t in s["transfers"] if t["digest"] == str(big.digest)]
    assert 0 < t["bytes"] <= HOLD_AFTER < t["size"] == big.size
    assert t["worker"] == worker.name and t["destination_registry"] == registry2.host
    assert s["state"] == "running" and s["bytes_in_flight"] >= t["bytes"]
    assert s["bytes_done"] < s["bytes_total"] and s["images_done"] == 0
    assert [i["status"] for i in s["images"]] == ["running"]
    assert s["rate_bytes_per_second"] > 0 and s["eta_seconds"] is not None

    # -- the metrics: the byte counter (absent before: this source host is new) has risen mid-blob ---------------
    mid = metrics(exporter)
    moved_mid = sample(mid, "ferry_transferred_bytes_total", source_registry=gate.host)
    # the held layer's first bytes, and the small blobs if they went first: never the whole big layer
    assert t["bytes"] <= moved_mid < BIG
    assert sample(mid, "ferry_transfers_in_flight", destination_registry=registry2.host) == 1
    assert sample(mid, "ferry_transfer_bytes_in_flight", destination_registry=registry2.host) > 0

    # -- the terminal: `ferry job watch` as a person sees it in tmux ---------------------------------------------
    short = str(big.digest).split(":", 1)[1][:12]
    screen = tmux_capture(
        [FERRY_BIN, "job", "watch", job], env, until=lambda text: short in text and worker.name in text
    )
    (workdir / "job-watch.txt").write_text(screen)
    assert f"job {job} running" in screen
    assert "in flight" in screen and "ETA" in screen and "1 in progress" in screen
    assert registry2.host in screen

    # -- the browser: Flower's task list names the job and the image ---------------------------------------------
    def flower_knows() -> bool:
        dom = chromium("--virtual-time-budget=8000", "--dump-dom", flower + "/tasks").stdout
        return job in dom and dest.removeprefix("docker://") in dom

    wait_for("Flower's task list to show the job", flower_knows, timeout=90)

    # its search box finds a job's tasks by job id, and a blob's task by digest (the same query the page sends)
    def search(text: str) -> list[dict[str, Any]]:
        params = {"draw": "1", "start": "0", "length": "50", "search[value]": text}
        params.update({"order[0][column]": "0", "order[0][dir]": "asc", "columns[0][data]": "name"})
        rows: list[dict[str, Any]] = httpx.get(flower + "/tasks/datatable", params=params, timeout=10).json()["data"]
        return rows

    rows = search(job)
    assert rows and all(job in str(row["args"]) for row in rows)
    (row,) = search(str(big.digest))
    assert row["name"] == "ferry.copy_blob" and row["state"] == "STARTED" and job in row["args"]
    shot = workdir / "flower-tasks.png"
    chromium("--window-size=1600,900", "--virtual-time-budget=8000", f"--screenshot={shot}", flower + "/tasks")
    assert shot.exists() and shot.stat().st_size > 10_000
    artifacts = os.environ.get("FERRY_TEST_ARTIFACTS")
    if artifacts:
        for f in (shot, workdir / "job-watch.txt"):
            shutil.copy(f, Path(artifacts) / f.name)

    # -- the rest of the blob goes: the job ends, the counters add up --------------------------------------------
    gate.release()
    proc = subprocess.run(
        [FERRY_BIN, "job", "wait", job], capture_output=True, text=True, timeout=120, env=env, stdin=subprocess.DEVNULL
    )
    assert proc.returncode == 0, proc.stderr + worker.log()[-3000:]
    s = status(job, env)
    assert s["transfers"] == [] and s["bytes_in_flight"] == 0 and s["bytes_done"] == s["bytes_total"]
    # the machine-readable watch: one JSON object per poll; an ended job gives one line and exit 0
    lines = ferry("job", "status", job, "--watch", "--json", env=env).stdout.splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["state"] == "done" and "images" not in json.loads(lines[0])
    # not a terminal: one plain line per poll
    (line,) = ferry("job", "watch", job, env=env).stdout.splitlines()
    assert line.startswith(f"job {job} done: images 1/1 done") and "6.0 MiB of 6.0 MiB" in line
    after = metrics(exporter)
    moved_after = sample(after, "ferry_transferred_bytes_total", source_registry=gate.host)
    # every byte of every blob, each counted once (no attempt was retried)
    assert moved_after == sum(size for _digest, size, _blob in img.blobs()) > moved_mid
    assert sample(after, "ferry_blobs_total", outcome="transferred", destination_registry=registry2.host) >= 3
    assert sample(after, "ferry_images_total", outcome="done") >= 1
    assert sample(after, "ferry_jobs_total", kind="copy", state="done") >= 1
    assert sample(after, "ferry_job_duration_seconds_count", kind="copy") >= 1
    assert sample(after, "ferry_transfers_in_flight") == 0
    assert ("ferry_queue_length", (("queue", "ferry.blobs"),)) in after


def _expand(text: str) -> str:
    """Compose's and sh's ``${VAR:-default}`` with nothing set: the default; compose's ``$$`` is a ``$``."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", text).replace("$$", "$")


def _run_healthcheck(test: list[str], env: dict[str, str], port_map: dict[str, str]) -> int:
    kind, *rest = test
    if kind == "CMD-SHELL":
        argv = ["sh", "-c", _expand(rest[0])]
    else:
        assert kind == "CMD"
        argv = [_expand(a) for a in rest]
    if argv[0] == "python":
        argv[0] = sys.executable
    for container_port, port in port_map.items():
        argv = [a.replace(f":{container_port}/", f":{port}/") for a in argv]
    return subprocess.run(argv, capture_output=True, timeout=60, env=env, stdin=subprocess.DEVNULL).returncode


def test_compose_and_procfile_run_real_ferry_and_celery_commands(
    queue: str, worker: WorkerProcess, flower: str, exporter: str
) -> None:
    """No Docker engine here: every compose command is parsed by the program it runs, and every healthcheck
    is run against the real worker, Flower and exporter this module started."""
    from flower.options import options as flower_options

    from producer.cli import build_parser

    compose = yaml.safe_load((ROOT / "compose" / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"redis", "worker", "flower", "exporter"}
    # one image build, shared
    assert [name for name, svc in services.items() if "build" in svc] == ["worker"]
    assert services["flower"]["image"] == services["exporter"]["image"] == services["worker"]["image"]

    parser = build_parser()
    for name in ("worker", "exporter"):
        argv = [_expand(a) for a in services[name]["command"]]
        assert argv[0] == "ferry"
        args = parser.parse_args(argv[1:])  # an unknown flag exits (SystemExit)
        assert args.handler.__name__ == name
    procfile_flower = shlex.split(_expand(procfile()["flower"]))
    for cmd in (services["flower"]["command"], procfile_flower):
        assert cmd[:4] == ["celery", "-A", "worker.celery_app", "flower"]
        for opt in cmd[4:]:
            key = opt.removeprefix("--").split("=", 1)[0].replace("_", "-")
            assert key in flower_options._options, f"Flower has no option {opt}"
        assert "--tasks_columns=name,args,state,started,runtime,worker,retries" in cmd
    assert "--address=127.0.0.1" in procfile_flower
    assert parser.parse_args(shlex.split(_expand(procfile()["exporter"]))[1:]).address == "127.0.0.1"
    assert parser.parse_args(shlex.split(_expand(procfile()["worker"]))[1:]).handler.__name__ == "worker"

    # healthchecks, as Docker would run them in each container
    host = worker.name.split("@", 1)[1]
    env = _env(queue, HOSTNAME=host)
    ports = {"5555": flower.rsplit(":", 1)[1], "9808": exporter.rsplit(":", 1)[1].split("/", 1)[0]}
    assert _run_healthcheck(services["worker"]["healthcheck"]["test"], env, ports) == 0
    # ...and it can fail: no worker answers for another container's name (asked with a shorter wait)
    gone = [services["worker"]["healthcheck"]["test"][0], services["worker"]["healthcheck"]["test"][1]]
    gone[1] = gone[1].replace("--timeout 10", "--timeout 2")
    assert "--timeout 2" in gone[1]
    assert _run_healthcheck(gone, {**env, "HOSTNAME": "gone"}, ports) != 0
    assert _run_healthcheck(services["flower"]["healthcheck"]["test"], env, ports) == 0
    assert _run_healthcheck(services["exporter"]["healthcheck"]["test"], env, ports) == 0
    assert _run_healthcheck(services["exporter"]["healthcheck"]["test"], env, {"9808": str(_free_port())}) != 0

    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        proc = subprocess.run(
            [docker, "compose", "-f", str(ROOT / "compose" / "docker-compose.yml"), "config", "--quiet"],
            capture_output=True,
            text=True,
            env={**os.environ, "FERRY_AUTH_FILE": os.devnull},
        )
        assert proc.returncode == 0, proc.stderr
