"""The producer: enqueue a plan on Celery workers through Redis, and the ``job`` and ``worker`` verbs."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from worker.engine.plan import BlobStep, ImagePlan, Plan
from worker.redis_url import masked, unreachable
from worker.registry import InvalidInput

from .options import add_bool, effective_tls_verify, user_agent
from .progress import human_bytes

if TYPE_CHECKING:
    from worker.engine.trust import SigningConfig

EXIT_INTERRUPTED = 130


def _use_queue(url: str) -> None:
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise InvalidInput(f"--queue must be a Redis URL (redis://HOST:PORT/DB), got {masked(url)!r}")
    os.environ["FERRY_QUEUE"] = url


def _state(url: str) -> Any:
    from worker.state import SharedState, connect

    _use_queue(url)
    try:
        state = SharedState(connect(url))
        state.r.ping()
    except Exception as exc:
        raise InvalidInput(unreachable(url, exc)) from None
    return state


def job_options(args: argparse.Namespace, source_sides: dict[str, Any] | None = None) -> dict[str, Any]:
    """What workers need to know beyond the plan: TLS and retry settings. Never credentials."""
    return {
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


def enqueue_images(plan: Plan, job_id: str, images: list[ImagePlan], *, sign: bool = False) -> int:
    """Per image: a chord of blob tasks whose callback (the finalizer) pushes the manifests and tags."""
    from celery import chord

    from worker.task_labels import image_label
    from worker.tasks import copy_blob, finalize_image

    _no_result_subscriptions()
    sent = 0
    for img in images:
        if not img.has_work(sign=sign):
            continue
        header = []
        for sid in img.steps:
            step = plan.steps[sid]
            if isinstance(step, BlobStep):
                header.append(
                    copy_blob.si(
                        job_id,
                        img.id,
                        step.id,
                        step.source,
                        step.destination,
                        step.digest,
                        step.size,
                        step.media_type,
                        step.mount_from,
                    )
                )
        # Flower shows the finalizer with its image's name (its arguments hold only ids, and digests to sign)
        sign_digests = img.manifests if sign and not img.attachment else None
        body = finalize_image.si(job_id, img.id, sign_digests).set(
            argsrepr=image_label(job_id, img.destination, img.id)
        )
        if header:
            chord(header)(body)
        else:
            body.apply_async()
        sent += 1
    _drop_result_tracking()
    return sent


def _no_result_subscriptions() -> None:
    """The producer never waits on task results, so it must not subscribe to them.

    Celery's Redis backend subscribes to every task's result channel when the task
    is sent; those subscriptions would be torn down at interpreter exit, noisily.
    """
    from worker.celery_app import app

    app.backend.on_task_call = lambda producer, task_id: None


def _drop_result_tracking() -> None:
    """Forget the result objects Celery tracks for sent tasks (see ``_no_result_subscriptions``)."""
    from worker.celery_app import app

    backend = app.backend
    try:
        for mapping in backend._pending_results:
            mapping.clear()
        consumer = backend.result_consumer
        consumer.subscribed_to.clear()
        consumer._pending_unsubscribe.clear()
        consumer.stop()
    except AttributeError:  # another backend: nothing tracked
        pass


def submit_plan(
    args: argparse.Namespace,
    plan: Plan,
    queue: str,
    *,
    kind: str,
    source_sides: dict[str, Any] | None = None,
    on_done: Callable[[dict[str, Any]], None] | None = None,
    signing: SigningConfig | None = None,
) -> int:
    """Enqueue the plan as a job; with ``--wait`` follow it, then hand its summary to ``on_done``."""
    for img in plan.images:
        for name in (img.source, img.destination):
            if not name.startswith("docker://"):
                raise InvalidInput(
                    f"{name}: with --queue both sides must be docker:// registries (workers run on other machines)"
                )
    side_creds = [getattr(args, f"{p}creds", None) or getattr(args, f"{p}username", None) for p in ("src_", "dest_")]
    if any(side_creds) and not getattr(args, "quiet", False):
        print(
            "Note: --creds/--username are used for planning only; they are never sent to workers,"
            " which use their own auth files or credential helpers.",
            file=sys.stderr,
        )
    state = _state(queue)
    if (getattr(args, "digestfile", None) or getattr(args, "summary_json", None)) and not args.wait:
        raise InvalidInput("--digestfile and --summary-json need --wait when the job runs on a queue")
    options = job_options(args, source_sides)
    if signing is not None:
        # paths only: each worker reads the key and the passphrase from its own files
        options["sign"] = signing.to_json()
    job_id = state.create_job(plan, kind, options)
    enqueue_images(plan, job_id, plan.images, sign=signing is not None)
    state.set_job(job_id, state="running")
    state.refresh_job_state(job_id)
    if not getattr(args, "quiet", False) or not args.wait:
        print(job_id)
    if args.wait:
        code = follow(state, job_id, quiet=getattr(args, "quiet", False))
        summary = job_summary(state, job_id)
        _write_job_outputs(args, summary)
        if on_done is not None:
            on_done(summary)
        if code == 1:
            print_job_errors(summary)
        return code
    return 0


def print_job_errors(summary: dict[str, Any]) -> None:
    """One ``Error:`` line per failed image on stderr, -q or not (as the embedded path prints them)."""
    for img in summary["failed"]:
        print(f"Error: {img['source']} -> {img['destination']}: {img['error'] or 'cancelled'}", file=sys.stderr)
    if not summary["failed"] and summary["state"] != "done":
        print(f"Error: job {summary['id']} {summary['state']}", file=sys.stderr)


def _write_job_outputs(args: argparse.Namespace, summary: dict[str, Any]) -> None:
    if getattr(args, "summary_json", None):
        with open(args.summary_json, "w") as f:
            json.dump({k: v for k, v in summary.items()}, f, indent=2)
            f.write("\n")
    if getattr(args, "digestfile", None):
        done = [i for i in summary["images"] if i["status"] in ("done", "up-to-date")]
        with open(args.digestfile, "w") as f:
            if summary.get("kind") == "copy" and done:
                f.write(done[0].get("digest", ""))
            else:
                for i in done:
                    f.write(f"{i.get('digest', '')} {i['destination']}\n")


def _totals(state: Any, job_id: str, blobs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    images = state.images(job_id)
    done = [b for b in blobs.values() if b.get("status") == "done"]
    return {
        "blobs_total": len(blobs),
        "blobs_done": len(done),
        "blobs_transferred": sum(1 for b in done if b.get("action") == "transferred"),
        "blobs_mounted": sum(1 for b in done if b.get("action") == "mounted"),
        "blobs_skipped": sum(1 for b in done if b.get("action") == "skipped"),
        "bytes_total": sum(int(b.get("size", 0)) for b in blobs.values()),
        "bytes_transferred": sum(int(b.get("bytes", 0)) for b in done),
        "images_total": len(images),
        "images_done": sum(1 for i in images.values() if i["status"] in ("done", "up-to-date")),
        "images_failed": sum(1 for i in images.values() if i["status"] in ("failed", "cancelled")),
    }


def job_summary(state: Any, job_id: str) -> dict[str, Any]:
    if not state.job_exists(job_id):
        raise InvalidInput(f"no job {job_id!r} in this queue")
    job = state.job(job_id)
    images = state.images(job_id)
    out: dict[str, Any] = {
        "id": job_id,
        "kind": job.get("kind", ""),
        "state": job.get("state", ""),
        "created": float(job.get("created", 0) or 0),
        "finished": float(job.get("finished", 0) or 0),
    }
    from worker import telemetry

    blobs = state.blobs(job_id)
    out.update(_totals(state, job_id, blobs))
    # live progress: bytes in flight, rate, ETA, and the transfers running now with their workers
    out.update(telemetry.job_progress(state.r, job_id, blobs))
    out["images"] = [{"id": k, **v} for k, v in sorted(images.items(), key=lambda kv: int(kv[0][1:] or 0))]
    out["failed"] = [
        {"source": v["source"], "destination": v["destination"], "error": v.get("error", "")}
        for v in images.values()
        if v["status"] in ("failed", "cancelled")
    ]
    return out


def follow(state: Any, job_id: str, *, quiet: bool = False, poll: float = 0.5) -> int:
    """Follow a job until it ends; exit code 0 when every image is done."""
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
    try:
        while True:
            summary = job_summary(state, job_id)
            if progress is not None:
                if task is None:
                    task = progress.add_task(f"job {job_id}", total=summary["bytes_total"] or 1)
                progress.update(
                    task,
                    completed=summary["bytes_done"],
                    description=f"job {job_id}: {summary['images_done']}/{summary['images_total']} images",
                )
            for img in summary["images"]:
                if img["status"] in ("done", "up-to-date", "failed", "cancelled") and img["id"] not in seen:
                    seen.add(img["id"])
                    if not quiet:
                        _print_image(img)
            if summary["state"] in ("done", "failed", "cancelled"):
                break
            time.sleep(poll)
    except KeyboardInterrupt:
        print(f"Stopped following; job {job_id} goes on (ferry job cancel {job_id} stops it)", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if progress is not None:
            progress.stop()
    if not quiet:
        print(_summary_line(summary), file=sys.stderr)
    return 0 if summary["state"] == "done" else 1


def _print_image(img: dict[str, Any]) -> None:
    status = img["status"]
    if status == "done":
        line = f"Copied {img['source']} -> {img['destination']} ({img.get('digest', '')})"
    elif status == "up-to-date":
        line = f"Skipped {img['source']} -> {img['destination']}: already up to date"
    else:
        line = f"Failed {img['source']} -> {img['destination']}: {img.get('error', '')}"
    print(line, flush=True)


def _summary_line(s: dict[str, Any]) -> str:
    return (
        f"job {s['id']} {s['state']}: {s['images_done']}/{s['images_total']} images done, {s['images_failed']} failed;"
        f" blobs: {s['blobs_transferred']} transferred, {s['blobs_mounted']} mounted, {s['blobs_skipped']} already"
        f" present; {human_bytes(s['bytes_transferred'])}"
    )


# -- verbs ------------------------------------------------------------------------------------------------------


def _queue_arg(args: argparse.Namespace) -> str:
    url = args.queue or os.environ.get("FERRY_QUEUE")
    if not url:
        raise InvalidInput("no queue: give --queue redis://HOST:PORT/DB or set FERRY_QUEUE")
    return str(url)


def job_status(args: argparse.Namespace) -> int:
    state = _state(_queue_arg(args))
    if args.watch:
        from .monitor import watch

        return watch(state, args.job, as_json=args.json)
    summary = job_summary(state, args.job)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(_summary_line(summary))
    for img in summary["images"]:
        extra = f": {img['error']}" if img.get("error") else ""
        print(f"  {img['status']:<10} {img['source']} -> {img['destination']}{extra}")
    return 0


def job_list(args: argparse.Namespace) -> int:
    state = _state(_queue_arg(args))
    rows = [job_summary(state, j) for j in state.list_jobs(args.limit)]
    if args.json:
        print(json.dumps([{k: v for k, v in r.items() if k not in ("images",)} for r in rows], indent=2))
        return 0
    for r in rows:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["created"]))
        print(
            f"{r['id']}  {r['kind']:<5} {r['state']:<9} {created}  {r['images_done']}/{r['images_total']} images"
            f"  {r['images_failed']} failed  {human_bytes(r['bytes_transferred'])}"
        )
    return 0


def job_cancel(args: argparse.Namespace) -> int:
    state = _state(_queue_arg(args))
    if not state.job_exists(args.job):
        raise InvalidInput(f"no job {args.job!r} in this queue")
    current = state.job(args.job).get("state", "")
    if current in ("done", "failed", "cancelled"):
        raise InvalidInput(f"job {args.job} has already ended ({current})")
    state.cancel(args.job)
    print(f"cancelled {args.job}")
    return 0


def job_retry(args: argparse.Namespace) -> int:
    """Re-enqueue only what failed; blobs already done are not moved again."""
    state = _state(_queue_arg(args))
    if not state.job_exists(args.job):
        raise InvalidInput(f"no job {args.job!r} in this queue")
    plan = state.plan(args.job)
    images = state.images(args.job)
    retry = [img for img in plan.images if images.get(img.id, {}).get("status") in ("failed", "cancelled", "pending")]
    if not retry:
        print(f"job {args.job}: nothing to retry")
        return 0
    state.clear_cancel(args.job)
    for img in retry:
        state.update_image(args.job, img.id, status="pending", error="")
    for sid, rec in state.blobs(args.job).items():
        if rec.get("status") != "done":
            state.update_blob(args.job, sid, status="pending", attempts=0, error="")
    state.set_job(args.job, state="running", finished=0)
    signed = "sign" in json.loads(state.job(args.job).get("options") or "{}")
    enqueue_images(plan, args.job, retry, sign=signed)
    print(f"job {args.job}: re-enqueued {len(retry)} image(s)")
    if args.wait:
        return follow(state, args.job, quiet=False)
    return 0


def worker(args: argparse.Namespace) -> int:
    url = _queue_arg(args)
    _use_queue(url)
    if args.visibility_timeout:
        os.environ["FERRY_VISIBILITY_TIMEOUT"] = str(args.visibility_timeout)
    from worker.celery_app import BLOB_QUEUE, META_QUEUE, app

    argv = [
        "worker",
        f"--concurrency={args.concurrency}",
        f"--queues={args.queues or f'{BLOB_QUEUE},{META_QUEUE}'}",
        f"--loglevel={args.loglevel}",
        "--events",
    ]
    if args.hostname:
        argv.append(f"--hostname={args.hostname}")
    if args.pool:
        argv.append(f"--pool={args.pool}")
    app.worker_main(argv)
    return 0


def limit(args: argparse.Namespace) -> int:
    from worker.registry import Reference
    from worker.state import Limits

    state = _state(_queue_arg(args))
    if args.registry:
        # limits apply to the host workers contact: docker.io means registry-1.docker.io
        host = Reference.parse(f"{args.registry}/x").api_host
        if args.clear:
            state.r.hdel("ferry:limits", host)
        else:
            current = state.limits(host)
            state.set_limits(
                host,
                Limits(
                    current.concurrency if args.concurrency is None else args.concurrency,
                    current.rps if args.rps is None else args.rps,
                ),
            )
    limits = state.all_limits()
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
    p.add_argument("--pool", choices=("prefork", "threads", "solo"), help="Celery pool (default prefork)")
    p.add_argument("--visibility-timeout", type=int, help="seconds before a dead worker's task is redone")

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
    jp = jverb("retry", job_retry, "Re-enqueue the failed images of a job (completed blobs are not moved again)")
    jp.add_argument("job", metavar="JOB-ID")
    # Go-style booleans like every other flag: the CLI rewrites a bare ``--wait`` to ``--wait=true``
    add_bool(jp, "--wait", help="follow the job until it ends")
    jp = jverb("wait", lambda a: follow(_state(_queue_arg(a)), a.job), "Follow a job until it ends")
    jp.add_argument("job", metavar="JOB-ID")

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
