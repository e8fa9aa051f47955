"""``sync``: bulk migration, skopeo-compatible (same flags, same YAML), in parallel, resumable, with signatures."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from worker.engine import pipeline
from worker.engine.blobcache import SqliteBlobLocations
from worker.engine.executor import Executor, ImageOutcome, Report
from worker.engine.plan import CopyOptions, Plan
from worker.engine.status import ImageStatus
from worker.engine.steps import EngineContext
from worker.engine.sync import Deletion, Discovery, SyncRequest
from worker.engine.verify import VerifyReport
from worker.registry import InvalidInput

from . import skopeo_lines, trust_cmd
from .copy_cmd import (
    add_copy_flags,
    copy_options,
    engine_context,
    interrupted,
    queue_url,
    run_embedded,
    streams,
)
from .options import add_bool, queued_registries
from .progress import human_bytes, summary_line

if TYPE_CHECKING:
    from worker.engine.trust import SigningConfig


def add_addressing_flags(p: argparse.ArgumentParser, dest_kinds: tuple[str, ...] = ("docker", "dir", "oci")) -> None:
    """How sync (and verify) name sources and destinations: transports, ``--scoped``, ``--append-suffix``."""
    p.add_argument("--src", "-s", required=True, choices=("docker", "yaml", "dir", "oci"), help="SOURCE transport")
    p.add_argument("--dest", "-d", required=True, choices=dest_kinds, help="DESTINATION transport")
    add_bool(p, "--scoped", help="prefix destination images with the full source image path")
    p.add_argument("--append-suffix", default="", metavar="SUFFIX", help="string appended to destination tags")


def sync_request(args: argparse.Namespace, options: CopyOptions) -> SyncRequest:
    return SyncRequest(
        source_kind=args.src,
        source=args.source,
        dest_kind=args.dest,
        destination=args.destination,
        options=options,
        scoped=args.scoped,
        append_suffix=args.append_suffix,
        remove_signatures=args.remove_signatures,
    )


def add_parsers(sub: Any, verb: Callable[..., argparse.ArgumentParser]) -> None:
    p = verb("sync", sync, "Synchronize images between registries, directories and OCI layouts")
    add_addressing_flags(p)
    add_bool(p, "--dry-run", help="print what would be copied, skipped and deleted, with sizes; write nothing")
    add_bool(p, "--keep-going", help="go on past failed images; exit non-zero if any failed")
    add_bool(p, "--delete", help="delete destination tags the source no longer has (in synced repositories only)")
    add_bool(p, "--verify", help="after the sync, check that the destination is complete (as `ferry verify`)")
    add_copy_flags(p)
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("destination", metavar="DESTINATION")


def sync(args: argparse.Namespace) -> int:
    options = copy_options(args)
    if args.delete and args.dest != "docker":
        raise InvalidInput("--delete works with --dest docker only")
    if args.verify and args.dest == "dir":
        raise InvalidInput("--verify reads registries and OCI layouts (--dest docker or oci), not dir")
    signing = trust_cmd.signing_config(args)
    if signing is not None and args.dest != "docker":
        raise InvalidInput("signing needs --dest docker: sigstore signatures are stored in a registry")
    queue = queue_url(args)
    signer = None if queue or args.dry_run else trust_cmd.load_signer(signing)
    ctx = engine_context(args)
    memo = ctx.locations if isinstance(ctx.locations, SqliteBlobLocations) else None
    req = sync_request(args, options)
    quiet = args.quiet
    parallel = max(streams(args), 8)
    try:
        if signing is None and not args.dry_run and not queue and args.dest != "dir":
            # signing re-resolves images already there (to sign them if unsigned): that path plans first
            runs: list[pipeline.SyncRun] = []
            log = skopeo_lines.SyncLog(skopeo_lines.wanted(quiet))

            def streaming(executor: Executor) -> Report:
                run, report = pipeline.sync_streaming(
                    ctx, req, memo, executor, parallel=parallel, keep_going=args.keep_going
                )
                runs.append(run)
                return report

            report = run_embedded(args, ctx, Plan(), quiet, fail_fast=not args.keep_going, run=streaming, also=(log,))
            _warn(runs[0].discovery)
            if not report.cancelled:
                pipeline.stop_unless_keep_going(runs[0], args.keep_going)
            # unchanged images came through the feed (reported as they were found); failures before planning did not
            return _finish(args, ctx, memo, runs[0], report, report_unchanged=False, log=log)
        run = pipeline.prepare_sync(
            ctx,
            req,
            memo,
            parallel=parallel,
            keep_going=args.keep_going,
            sign=signing is not None,
            signing_on_workers=bool(queue) and signing is not None,
            writes=not args.dry_run,
            on_discovered=_warn,
        )
        if run.signatures_left_out and not quiet:
            print(
                f"Note: {run.signatures_left_out} source signature tag(s) not copied: signing on workers",
                file=sys.stderr,
            )
        if args.dry_run:
            code = _dry_run(run, pipeline.dry_run_deletions(ctx, run) if args.delete else [])
            if skopeo_lines.wanted(quiet):
                pairs = [(i.source, i.destination) for i in run.plan.images]
                pairs += [(str(item.source), str(item.destination)) for item, _ in run.checked.unchanged]
                for line in skopeo_lines.sync_log(pairs, dry_run=True):
                    print(line, file=sys.stderr)
            return code
        if queue:
            return _sync_queued(args, ctx, memo, run, queue, signing)
        log = skopeo_lines.SyncLog(skopeo_lines.wanted(quiet))
        log.expect([str(item.source) for item, _digest in run.checked.unchanged])
        report = run_embedded(args, ctx, run.plan, quiet, fail_fast=not args.keep_going, signer=signer, also=(log,))
        return _finish(args, ctx, memo, run, report, log=log)
    finally:
        ctx.close()


def _warn(disc: Discovery) -> None:
    for w in disc.warnings:
        print(f"Warning: {w}", file=sys.stderr)


def _sync_queued(
    args: argparse.Namespace,
    ctx: EngineContext,
    memo: SqliteBlobLocations | None,
    run: pipeline.SyncRun,
    queue: str,
    signing: SigningConfig | None,
) -> int:
    """The plan on Celery workers; with ``--wait``, the same after-run stages as the embedded run."""
    from .distributed import submit_plan
    from .lifecycle_cmd import print_verify

    quiet = args.quiet
    for flag in ("delete", "verify"):
        if getattr(args, flag) and not args.wait:
            print(f"Note: --{flag} needs --wait with --queue (it runs once the job has ended)", file=sys.stderr)
    verified: list[VerifyReport] = []
    log = skopeo_lines.SyncLog(skopeo_lines.wanted(quiet))
    log.expect([str(item.source) for item, _digest in run.checked.unchanged])
    if any(side.credentials for side in run.discovery.sides.values()):
        print("Note: credentials in the sync file are used for planning only; workers use their own.", file=sys.stderr)

    def job_done(report: Report) -> None:
        # the same after-run stages as the embedded run, on the job's outcome
        images = [(i.source, i.status, i.digest) for i in report.images]
        delete = args.delete and report.ok
        done = pipeline.finish_sync(ctx, run, memo, images, delete=delete, verify_after=args.verify)
        _print_kept(done.kept)
        if delete and not quiet:
            print(f"{len(done.deleted)} tag(s) deleted", file=sys.stderr)
        if done.verified is not None:
            print_verify(done.verified, quiet)
            verified.append(done.verified)

    code = submit_plan(
        args,
        run.plan,
        queue,
        kind="sync",
        source_sides=run.discovery.sides,
        on_done=job_done,
        signing=signing,
        registries=queued_registries(args, ctx.opened_sources()),
        reporters=(log,),
    )
    if args.wait:
        # images already there are not in the job: reported here, as the embedded sync reports them
        _print_unchanged(pipeline.unchanged_outcomes(run), log, quiet)
        log.finish()
    # images that failed before the job (reading the source, --keep-going) are not in it: say so here
    for f in run.failures:
        print(f"Error: {f.source} -> {f.destination}: {f.error}", file=sys.stderr)
    return code or (1 if run.failures or (verified and not verified[0].ok) else 0)


def _print_unchanged(outcomes: list[ImageOutcome], log: skopeo_lines.SyncLog | None, quiet: bool) -> None:
    for outcome in outcomes:
        if log is not None:
            log.image_finished(outcome)
        if not quiet:
            if skopeo_lines.wanted(quiet):
                print("Skipping: image already present at destination")
            print(f"Skipped {outcome.source} -> {outcome.destination}: already up to date ({outcome.digest})")


def _print_kept(kept: list[Deletion]) -> None:
    for d in kept:
        print(f"Kept {d.destination}: {d.kept_because}", file=sys.stderr)


def _finish(
    args: argparse.Namespace,
    ctx: EngineContext,
    memo: SqliteBlobLocations | None,
    run: pipeline.SyncRun,
    report: Report,
    *,
    report_unchanged: bool = True,
    log: skopeo_lines.SyncLog | None = None,
) -> int:
    """After the embedded run: report unchanged and failed images, the after-run stages, outputs, exit code."""
    from .lifecycle_cmd import print_verify

    quiet = args.quiet
    _print_unchanged(pipeline.add_unrun(report, run, unchanged=report_unchanged), log, quiet)
    done = pipeline.finish_sync(
        ctx,
        run,
        memo,
        [(i.source, i.status, i.digest) for i in report.images],
        delete=args.delete and report.ok,
        verify_after=args.verify and not report.cancelled,
    )
    _print_kept(done.kept)
    if done.verified is not None:
        print_verify(done.verified, quiet)
    _outputs(args, report, done.deleted, done.kept, done.verified)
    if log is not None:
        log.finish()
    if not quiet:
        extra = f"; {len(done.deleted)} tag(s) deleted" if args.delete else ""
        print(summary_line(report) + extra, file=sys.stderr)
    failed = report.failed
    for img in failed:
        print(f"Error: {img.source} -> {img.destination}: {img.error}", file=sys.stderr)
    if report.cancelled:
        return interrupted(report)
    if failed:
        return 1
    if report.cancelled_images:
        return interrupted(report)
    return 0 if done.verified is None or done.verified.ok else 1


def _dry_run(run: pipeline.SyncRun, deletions: list[Deletion]) -> int:
    unchanged = run.checked.unchanged
    for img in run.plan.images:
        if img.up_to_date:
            print(f"Would skip {img.source} -> {img.destination}: up to date")
        else:
            print(f"Would copy {img.source} -> {img.destination} ({human_bytes(img.size)})")
    for item, _digest in unchanged:
        print(f"Would skip {item.source} -> {item.destination}: up to date")
    for d in deletions:
        if d.kept_because:
            print(f"Would keep {d.destination}: {d.kept_because}")
        else:
            print(f"Would delete {d.destination} ({d.digest})")
    for f in run.failures:
        print(f"Would fail {f.source} -> {f.destination}: {f.error}")
    total = sum(i.size for i in run.plan.images if not i.up_to_date)
    copies = sum(1 for i in run.plan.images if not i.up_to_date)
    print(
        f"Dry run: {copies} image(s) to copy ({human_bytes(total)}), {len(unchanged)} up to date,"
        f" {sum(1 for d in deletions if not d.kept_because)} to delete; nothing was written",
        file=sys.stderr,
    )
    return 1 if run.failures else 0


def _outputs(
    args: argparse.Namespace, report: Report, deleted: list[str], kept: list[Deletion], verified: VerifyReport | None
) -> None:
    if args.summary_json:
        data = report.to_json()
        data["deleted"] = deleted
        data["kept"] = [{"destination": d.destination, "reason": d.kept_because} for d in kept]
        if verified is not None:
            data["verify"] = verified.to_json()
        data["failures"] = [{"source": i.source, "destination": i.destination, "error": i.error} for i in report.failed]
        with open(args.summary_json, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
    if args.digestfile:
        with open(args.digestfile, "w") as f:
            for img in report.images:
                if img.status == ImageStatus.DONE:
                    f.write(f"{img.digest} {img.destination}\n")
