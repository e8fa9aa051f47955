"""``--queue``: hand a plan to Celery workers through Redis and follow the job; the ``job``, ``worker`` and
``limit`` verbs. The executor itself (creating the job, sending tasks) is ``worker.celery_executor``."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from types import FrameType
from typing import TYPE_CHECKING, Any

from worker.engine.executor import Report
from worker.engine.plan import Plan
from worker.engine.status import ImageStatus, JobState
from worker.redis_url import masked, unreachable
from worker.registry import InvalidInput

from .options import add_bool, effective_tls_verify, user_agent
from .progress import human_bytes

if TYPE_CHECKING:
    from worker.engine.trust import SigningConfig
    from worker.state import SharedState

EXIT_INTERRUPTED = 130
#: ``job wait --timeout`` ran out while the job goes on
EXIT_TIMEOUT = 124
#: ``job wait`` reports a job when no blob or image has changed state for this long
STALL_AFTER = float(os.environ.get("FERRY_STALL_AFTER", "600"))


def _use_queue(url: str) -> None:
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise InvalidInput(f"--queue must be a Redis URL (redis://HOST:PORT/DB), got {masked(url)!r}")
    os.environ["FERRY_QUEUE"] = url


def _state(url: str) -> SharedState:
    from worker.state import SharedState, connect

    _use_queue(url)
    try:
        state = SharedState(connect(url))
        state.r.ping()
    except Exception as exc:
        raise InvalidInput(unreachable(url, exc)) from None
    return state


def job_options(
    args: argparse.Namespace, source_sides: dict[str, Any] | None = None, registries: dict[str, Any] | None = None
) -> dict[str, Any]:
    """What workers need to know beyond the plan: TLS and retry settings, registries.conf. Never credentials."""
    return {
        # the producer's registries.conf (rewrites, blocked, insecure) and where it read mirrored images from
        **({"registries": registries} if registries is not None else {}),
        # per source registry TLS settings (a sync YAML file's tls-verify / cert-dir)
        "source_registries": {
            host: {"tls_verify": side.tls_verify, "cert_dir": side.cert_dir}
            for host, side in (source_sides or {}).items()
        },
        "src_tls_verify": effective_tls_verify(args, "src-"),
        "dest_tls_verify": effective_tls_verify(args, "dest-"),
        "user_agent": user_agent(args),
        "src_cert_dir": getattr(args, "src_cert_dir", None),
        "dest_cert_dir": getattr(args, "dest_cert_dir", None),
        "retry_times": getattr(args, "retry_times", 3),
        "retry_delay": getattr(args, "retry_delay", None),
    }


@contextlib.contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """SIGINT and SIGTERM set the event instead of raising, so enqueueing stops between two images."""
    stop = threading.Event()

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def _report_interrupted(job_id: str, sent: int, left: int) -> int:
    print(
        f"Interrupted while enqueueing job {job_id}: {sent} image(s) enqueued, {left} left out (cancelled);"
        f" `ferry job retry {job_id}` enqueues them",
        file=sys.stderr,
    )
    return EXIT_INTERRUPTED


def warn_if_no_workers(state: SharedState, already: frozenset[str] = frozenset()) -> set[str]:
    """Warn about each Ferry queue no worker has consumed lately (but not again about ``already``); returns them."""
    from worker.celery_app import BLOB_QUEUE, META_QUEUE
    from worker.state.workers import BEAT_TIMEOUT

    idle = {q for q in (BLOB_QUEUE, META_QUEUE) if not state.workers.live(q)}
    for q in sorted(idle - already):
        print(
            f"Warning: no worker consumes {q} (none seen in the last {BEAT_TIMEOUT:.0f}s); the job waits until one"
            f" does: start `ferry worker --queue URL`",
            file=sys.stderr,
        )
    return idle


def submit_plan(
    args: argparse.Namespace,
    plan: Plan,
    queue: str,
    *,
    kind: str,
    source_sides: dict[str, Any] | None = None,
    on_done: Callable[[Report], None] | None = None,
    signing: SigningConfig | None = None,
    registries: dict[str, Any] | None = None,
    reporters: tuple[Any, ...] = (),
) -> int:
    """Enqueue the plan as a job (``CeleryExecutor``); with ``--wait`` follow it, then hand its outcome (the
    ``Report`` an embedded run gives) to ``on_done``, the pipeline's after-run stages.

    ``reporters`` (sync's logrus lines) hear of each image as it ends, as on the embedded executor; so do
    skopeo's lines when stdout is not a terminal.
    """
    from worker.celery_executor import CeleryExecutor, check_plan, job_report

    check_plan(plan)
    side_creds = [getattr(args, f"{p}creds", None) or getattr(args, f"{p}username", None) for p in ("src_", "dest_")]
    quiet = getattr(args, "quiet", False)
    if any(side_creds) and not quiet:
        print(
            "Note: --creds/--username are used for planning only; they are never sent to workers,"
            " which use their own auth files or credential helpers.",
            file=sys.stderr,
        )
    state = _state(queue)
    if (getattr(args, "digestfile", None) or getattr(args, "summary_json", None)) and not args.wait:
        raise InvalidInput("--digestfile and --summary-json need --wait when the job runs on a queue")
    executor = CeleryExecutor(state)
    options = job_options(args, source_sides, registries)
    if signing is not None:
        # paths only: each worker reads the key and the passphrase from its own files
        options["sign"] = signing.to_json()

    def created(job_id: str) -> None:
        # the id first, so that a producer cut while enqueueing has said which job to retry
        if not quiet or not args.wait:
            print(job_id, flush=True)

    with stop_on_signals() as stop:
        result = executor.submit(plan, kind, options, stop, on_created=created)
    job_id = result.job_id
    if result.interrupted:
        return _report_interrupted(job_id, len(result.enqueued), len(result.left_out))
    if not quiet:
        warn_if_no_workers(state)
    if args.wait:
        from worker.engine.executor import ImageOutcome

        from . import skopeo_lines

        listeners = list(reporters)
        if skopeo_lines.wanted(quiet):
            signatures = not getattr(args, "remove_signatures", False)
            listeners.append(skopeo_lines.SkopeoLines(plan, signatures=signatures))
        for listener in listeners:
            listener.start(plan)

        def image_ended(img: dict[str, Any]) -> None:
            outcome = ImageOutcome(
                img["id"], img["source"], img["destination"], ImageStatus(img["status"]), img.get("digest", "")
            )
            for listener in listeners:
                listener.image_finished(outcome)

        code = follow(state, job_id, quiet=quiet, timeout=getattr(args, "wait_timeout", None), on_image=image_ended)
        summary = job_summary(state, job_id)
        _write_job_outputs(args, summary)
        if on_done is not None and summary["ended"]:
            on_done(job_report(summary))
        if code not in (0, EXIT_INTERRUPTED) or summary["state"] == JobState.CANCELLED:
            print_job_errors(summary)
        return code
    return 0


def print_job_errors(summary: dict[str, Any]) -> None:
    """One ``Error:`` line per failed image on stderr, -q or not (as the embedded path prints them)."""
    for img in summary["failed"]:
        print(f"Error: {img['source']} -> {img['destination']}: {img['error']}", file=sys.stderr)
    if not summary["failed"] and summary["state"] != JobState.DONE:
        print(f"Error: job {summary['id']} {summary['state']}", file=sys.stderr)


def _write_job_outputs(args: argparse.Namespace, summary: dict[str, Any]) -> None:
    if getattr(args, "summary_json", None):
        with open(args.summary_json, "w") as f:
            json.dump(summary, f, indent=2)
            f.write("\n")
    if getattr(args, "digestfile", None):
        done = [i for i in summary["images"] if ImageStatus(i["status"]).ok]
        with open(args.digestfile, "w") as f:
            if summary.get("kind") == "copy" and done:
                f.write(done[0].get("digest", ""))
            else:
                for i in done:
                    f.write(f"{i.get('digest', '')} {i['destination']}\n")


def job_summary(state: SharedState, job_id: str) -> dict[str, Any]:
    from worker.celery_executor import job_summary as summary_of

    return summary_of(state, job_id)


def exit_code(state: JobState) -> int:
    """0 done, 1 failed, 130 cancelled (as an interrupted ``ferry copy``/``sync``)."""
    return {JobState.DONE: 0, JobState.CANCELLED: EXIT_INTERRUPTED}.get(state, 1)


def stall_report(summary: dict[str, Any], now: float | None = None, stall_after: float = STALL_AFTER) -> str | None:
    """A line saying the job has stopped progressing, or None while it moves (or has ended)."""
    if summary["ended"]:
        return None
    idle = (now or time.time()) - summary["touched"]
    if idle < stall_after:
        return None
    if summary["state"] == JobState.QUEUED and not any(i["enqueued"] for i in summary["images"]):
        hint = f"its producer may have died while enqueueing: `ferry job retry {summary['id']}`"
    else:
        hint = (
            f"{summary['blobs_running']} blob(s) running, {summary['blobs_retrying']} retrying,"
            f" {summary['blobs_total'] - summary['blobs_done']} not done; see `ferry job status {summary['id']}`"
        )
    return f"job {summary['id']} has made no progress for {idle:.0f}s: {hint}"


def follow(
    state: SharedState,
    job_id: str,
    *,
    quiet: bool = False,
    poll: float = 0.5,
    timeout: float | None = None,
    stall_after: float = STALL_AFTER,
    on_image: Callable[[dict[str, Any]], None] | None = None,
) -> int:
    """Follow a job until it ends (or ``timeout`` seconds pass); the exit code says how it ended.

    ``on_image`` hears of each image as it ends (before its line is printed)."""
    if not state.jobs.exists(job_id):
        raise InvalidInput(f"no job {job_id!r} in this queue")
    use_bars = not quiet and sys.stderr.isatty()
    progress: Any = None
    task: Any = None
    if use_bars:
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

        progress = Progress(
            TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), transient=False
        )
        progress.start()
    seen: set[str] = set()
    started = time.monotonic()
    next_check = started
    warned_idle: set[str] = set()
    warned_stall = 0.0
    ended_seen = -1
    summary: dict[str, Any] | None = None
    try:
        while True:
            # one command per look; the images only when one more has ended, the whole summary only for the
            # progress bars (a terminal) or when the job looks stalled
            state_now, ended, touched = state.jobs.glance(job_id)
            if progress is not None:
                summary = job_summary(state, job_id)
                if task is None:
                    task = progress.add_task(f"job {job_id}", total=summary["bytes_total"] or 1)
                progress.update(
                    task,
                    completed=summary["bytes_done"],
                    description=f"job {job_id}: {summary['images_done']}/{summary['images_total']} images",
                )
            if ended != ended_seen or state_now.ended:
                ended_seen = ended
                for img in sorted(state.jobs.images(job_id).values(), key=lambda i: (len(i.id), i.id)):
                    if img.status.ended and img.id not in seen:
                        seen.add(img.id)
                        if on_image is not None:
                            on_image(img.to_json())
                        if not quiet:
                            _print_image(img.to_json())
            if state_now.ended:
                break
            now = time.monotonic()
            if now >= next_check:
                # look for idle queues and a stalled job every 5 s (sooner when the stall limit is shorter)
                next_check = now + min(5.0, max(stall_after / 2, 0.5))
                warned_idle |= warn_if_no_workers(state, frozenset(warned_idle))
                if time.time() - touched >= stall_after:
                    summary = job_summary(state, job_id)
                    stall = stall_report(summary, stall_after=stall_after)
                    if stall is not None and time.time() - summary["touched"] >= warned_stall + stall_after:
                        warned_stall = time.time() - summary["touched"]
                        print(f"Warning: {stall}", file=sys.stderr)
                else:
                    warned_stall = 0.0
            if timeout is not None and now - started >= timeout:
                summary = job_summary(state, job_id)
                print(
                    f"Error: job {job_id} did not end within {timeout:g}s ({summary['state']}:"
                    f" {summary['images_done']}/{summary['images_total']} images done); it goes on",
                    file=sys.stderr,
                )
                return EXIT_TIMEOUT
            time.sleep(poll)
    except KeyboardInterrupt:
        print(f"Stopped following; job {job_id} goes on (ferry job cancel {job_id} stops it)", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if progress is not None:
            progress.stop()
    summary = job_summary(state, job_id)
    if not quiet:
        print(_summary_line(summary), file=sys.stderr)
    return exit_code(JobState(summary["state"]))


def _print_image(img: dict[str, Any]) -> None:
    status = ImageStatus(img["status"])
    if status == ImageStatus.DONE:
        line = f"Copied {img['source']} -> {img['destination']} ({img.get('digest', '')})"
    elif status == ImageStatus.UP_TO_DATE:
        line = f"Skipped {img['source']} -> {img['destination']}: already up to date"
    elif status == ImageStatus.CANCELLED:
        line = f"Cancelled {img['source']} -> {img['destination']}: {img.get('error', '')}"
    else:
        line = f"Failed {img['source']} -> {img['destination']}: {img.get('error', '')}"
    print(line, flush=True)


def _summary_line(s: dict[str, Any]) -> str:
    cancelled = f", {s['images_cancelled']} cancelled" if s["images_cancelled"] else ""
    return (
        f"job {s['id']} {s['state']}: {s['images_done']}/{s['images_total']} images done, {s['images_failed']} failed"
        f"{cancelled}; blobs: {s['blobs_transferred']} transferred, {s['blobs_mounted']} mounted,"
        f" {s['blobs_skipped']} already present; {human_bytes(s['bytes_transferred'])}"
    )


# -- verbs ------------------------------------------------------------------------------------------------------


def _queue_arg(args: argparse.Namespace) -> str:
    url = args.queue or os.environ.get("FERRY_QUEUE")
    if not url:
        raise InvalidInput("no queue: give --queue redis://HOST:PORT/DB or set FERRY_QUEUE")
    return str(url)


def _existing_job(state: SharedState, job_id: str) -> None:
    if not state.jobs.exists(job_id):
        raise InvalidInput(f"no job {job_id!r} in this queue")


def job_status(args: argparse.Namespace) -> int:
    state = _state(_queue_arg(args))
    _existing_job(state, args.job)
    if args.watch:
        from .monitor import watch

        return watch(state, args.job, as_json=args.json)
    summary = job_summary(state, args.job)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(_summary_line(summary))
    stall = stall_report(summary)
    if stall:
        print(f"  stalled: {stall}")
    for img in summary["images"]:
        extra = f": {img['error']}" if img.get("error") else ""
        print(f"  {img['status']:<10} {img['source']} -> {img['destination']}{extra}")
    return 0


def job_list(args: argparse.Namespace) -> int:
    state = _state(_queue_arg(args))
    rows = [job_summary(state, j) for j in state.jobs.recent(args.limit)]
    if args.json:
        print(json.dumps([{k: v for k, v in r.items() if k not in ("images",)} for r in rows], indent=2))
        return 0
    for r in rows:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["created"]))
        print(
            f"{r['id']}  {r['kind']:<5} {r['state']:<9} {created}  {r['images_done']}/{r['images_total']} images"
            f"  {r['images_failed']} failed  {r['images_cancelled']} cancelled  {human_bytes(r['bytes_transferred'])}"
        )
    return 0


def job_cancel(args: argparse.Namespace) -> int:
    state = _state(_queue_arg(args))
    _existing_job(state, args.job)
    current = state.jobs.job(args.job).state
    if current.ended:
        raise InvalidInput(f"job {args.job} has already ended ({current})")
    state.jobs.cancel(args.job)
    print(f"cancelled {args.job}")
    return 0


def job_retry(args: argparse.Namespace) -> int:
    """Re-enqueue what has not ended well (failed, cancelled, never or half enqueued); done blobs are kept."""
    from worker.celery_executor import CeleryExecutor

    state = _state(_queue_arg(args))
    _existing_job(state, args.job)
    with stop_on_signals() as stop:
        result = CeleryExecutor(state).retry(args.job, stop)
    if result.interrupted:
        return _report_interrupted(args.job, len(result.enqueued), len(result.left_out))
    if not result.enqueued:
        print(f"job {args.job}: nothing to retry")
        return 0
    print(f"job {args.job}: re-enqueued {len(result.enqueued)} image(s)")
    warn_if_no_workers(state)
    if args.wait:
        return follow(state, args.job, quiet=False)
    return 0


def job_wait(args: argparse.Namespace) -> int:
    state = _state(_queue_arg(args))
    return follow(state, args.job, timeout=args.timeout)


def worker(args: argparse.Namespace) -> int:
    url = _queue_arg(args)
    _use_queue(url)
    if args.visibility_timeout:
        os.environ["FERRY_VISIBILITY_TIMEOUT"] = str(args.visibility_timeout)
    if args.events:
        # before the app is made: the tasks this worker sends (finalizers, waiting steps) send task-sent events
        os.environ["FERRY_EVENTS"] = "1"
    from worker.celery_app import BLOB_QUEUE, META_QUEUE, app

    argv = [
        "worker",
        f"--concurrency={args.concurrency}",
        f"--queues={args.queues or f'{BLOB_QUEUE},{META_QUEUE}'}",
        f"--loglevel={args.loglevel}",
        f"--pool={args.pool}",
    ]
    if args.events:
        # Flower reads task events and worker heartbeats
        argv.append("--events")
    else:
        # nothing reads them: no task events, heartbeats, gossip or start-up sync (Redis commands saved)
        argv += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
    if args.hostname:
        argv.append(f"--hostname={args.hostname}")
    # not app.worker_main(), which drops the worker's exit status: a worker that stops on an unrecoverable error
    # must exit non-zero, so that a service manager (Restart=on-failure) starts it again
    from celery.bin.celery import celery as celery_cli

    celery_cli.params[0].default = app
    try:
        code = celery_cli.main(args=argv, standalone_mode=False)
    finally:
        celery_cli.params[0].default = None
    return code if isinstance(code, int) else 0


def _env_events() -> bool:
    # as worker.celery_app.events_wanted, without importing Celery for every command line
    return os.environ.get("FERRY_EVENTS", "").strip().lower() in ("1", "true", "yes", "on")


def limit(args: argparse.Namespace) -> int:
    from worker.registry import Reference
    from worker.state import Limits

    state = _state(_queue_arg(args))
    hosts = state.hosts
    if args.registry:
        # limits apply to the host workers contact: docker.io means registry-1.docker.io
        host = Reference.parse(f"{args.registry}/x").api_host
        if args.clear:
            hosts.clear_limits(host)
        else:
            current = hosts.limits(host)
            hosts.set_limits(
                host,
                Limits(
                    current.concurrency if args.concurrency is None else args.concurrency,
                    current.rps if args.rps is None else args.rps,
                ),
            )
    limits = hosts.all_limits()
    if not limits:
        print("no limits set")
    for host, lim in sorted(limits.items()):
        print(f"{host}: concurrency {lim.concurrency or 'unlimited'}, {lim.rps or 'unlimited'} requests/s")
    return 0


def add_parsers(sub: Any, verb: Callable[..., argparse.ArgumentParser]) -> None:
    def queue_flag(p: argparse.ArgumentParser) -> None:
        p.add_argument("--queue", metavar="REDIS-URL", help="the Redis of the queue (default: $FERRY_QUEUE)")

    p = verb("worker", worker, "Run a Celery worker that executes copy and sync tasks")
    queue_flag(p)
    p.add_argument("--concurrency", "-c", type=int, default=4, help="tasks run at once (default 4)")
    p.add_argument("--queues", "-Q", help="queues to consume (default: ferry.blobs,ferry.meta)")
    p.add_argument("--loglevel", "-l", default="INFO")
    p.add_argument("--hostname", "-n", help="worker name (default: celery@HOST)")
    p.add_argument(
        "--pool",
        choices=("threads", "prefork", "solo"),
        default="threads",
        help="Celery pool (default threads: one process, tasks on threads, suited to network-bound transfers)",
    )
    p.add_argument("--visibility-timeout", type=int, help="seconds before a dead worker's task is redone")
    add_bool(
        p,
        "--events",
        default=_env_events(),
        help="send Celery task events and heartbeats, for Flower (default: off, or on when FERRY_EVENTS=1)",
    )

    job = verb("job", lambda a: (a.job_parser.print_help(), 2)[1], "Inspect and control queued jobs")
    job.set_defaults(job_parser=job)
    jsub = job.add_subparsers(dest="job_verb", metavar="ACTION", parser_class=type(job))

    def jverb(name: str, handler: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        jp = jsub.add_parser(name, help=help, description=help)
        jp.set_defaults(handler=handler)
        queue_flag(jp)
        return jp

    jp = jverb("status", job_status, "Show a job: per image done / running / failed, bytes and blobs moved")
    jp.add_argument("job", metavar="JOB-ID")
    add_bool(jp, "--json", help="print JSON (with --watch: one JSON object per line)")
    add_bool(jp, "--watch", "-w", help="follow the job live until it ends: bytes in flight, rate, ETA, workers")
    jp = jverb("watch", job_status, "Follow a job live until it ends (job status --watch)")
    jp.set_defaults(watch=True)
    jp.add_argument("job", metavar="JOB-ID")
    add_bool(jp, "--json", help="print one JSON object per line")
    jp = jverb("list", job_list, "List recent jobs")
    add_bool(jp, "--json", help="print JSON")
    jp.add_argument("--limit", type=int, default=50)
    jp = jverb("cancel", job_cancel, "Cancel a job: running transfers stop, no tag is written for unfinished images")
    jp.add_argument("job", metavar="JOB-ID")
    jp = jverb(
        "retry", job_retry, "Re-enqueue the images of a job that did not end well (completed blobs are not moved again)"
    )
    jp.add_argument("job", metavar="JOB-ID")
    # Go-style booleans like every other flag: the CLI rewrites a bare ``--wait`` to ``--wait=true``
    add_bool(jp, "--wait", help="follow the job until it ends")
    jp = jverb("wait", job_wait, "Follow a job until it ends")
    jp.add_argument("job", metavar="JOB-ID")
    jp.add_argument(
        "--timeout", type=float, default=None, metavar="SECONDS", help="give up following after SECONDS (exit 124)"
    )

    from .monitor import DEFAULT_EXPORTER_PORT, exporter

    p = verb("exporter", exporter, "Serve Ferry's Prometheus metrics (bytes, blobs, images, retries, queues)")
    queue_flag(p)
    p.add_argument("--address", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument(
        "--port", type=int, default=DEFAULT_EXPORTER_PORT, help=f"port to listen on (default {DEFAULT_EXPORTER_PORT})"
    )

    p = verb("limit", limit, "Set or show per-registry limits shared by all workers")
    queue_flag(p)
    p.add_argument("registry", nargs="?", metavar="HOST[:PORT]")
    p.add_argument(
        "--concurrency", type=int, default=None, help="blob uploads at once to the host (0: no limit; default: keep)"
    )
    p.add_argument(
        "--rps", type=float, default=None, help="requests per second to the host (0: no limit; default: keep)"
    )
    add_bool(p, "--clear", help="remove the host's limits")
