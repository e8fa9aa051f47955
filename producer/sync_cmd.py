"""``sync``: bulk migration, skopeo-compatible (same flags, same YAML), in parallel, resumable, with signatures."""

from __future__ import annotations

import argparse
import json
import sys
import threading
from collections.abc import Callable
from typing import Any

from worker.engine.blobcache import SqliteBlobLocations
from worker.engine.executor import ImageOutcome, PlanFeed, Report
from worker.engine.plan import CopyOptions, Plan, ResolvedImage, plan_copy
from worker.engine.status import ImageStatus, JobState
from worker.engine.steps import EngineContext
from worker.engine.sync import (
    CheckResult,
    Deletion,
    Discovery,
    SyncOutcome,
    SyncRequest,
    _options_key,
    apply_deletions,
    check,
    discover,
    plan_deletions,
    resolve_changed,
    sync_pipelined,
)
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
    from .lifecycle_cmd import run_verify  # lifecycle_cmd builds on this module's flags

    signing = trust_cmd.signing_config(args)
    if signing is not None and args.dest != "docker":
        raise InvalidInput("signing needs --dest docker: sigstore signatures are stored in a registry")
    queued = bool(queue_url(args))
    signer = None if queued or args.dry_run else trust_cmd.load_signer(signing)
    ctx = engine_context(args)
    memo = ctx.locations if isinstance(ctx.locations, SqliteBlobLocations) else None
    req = sync_request(args, options)
    quiet = args.quiet
    parallel = max(streams(args), 8)
    try:
        if signing is None and not args.dry_run and not queued and args.dest != "dir":
            # signing re-resolves images already there (to sign them if unsigned): that path plans first
            return _sync_embedded(args, ctx, req, memo)
        disc = discover(ctx, req, parallel=parallel)
        if args.dest == "dir" and not args.dry_run:
            _refuse_existing_dirs(disc.items)
        for w in disc.warnings:
            print(f"Warning: {w}", file=sys.stderr)
        checked = check(ctx, disc.items, req, memo, parallel=parallel, tag_lists=disc.tag_lists)
        if signing is not None:
            # an image already there may still lack a signature by this key: resolve it to sign it if so
            checked.changed += [item for item, _digest in checked.unchanged]
            checked.unchanged = []
        failures: list[tuple[str, str, str]] = [(str(i.source), str(i.destination), e) for i, e in checked.failed]
        if failures and not args.keep_going:
            src, _dst, err = failures[0]
            raise InvalidInput(f"syncing {src}: {err} (use --keep-going to go on past failed images)")
        resolved, rfailed = resolve_changed(ctx, checked.changed, req, parallel=parallel)
        failures += [(str(i.source), str(i.destination), e) for i, e in rfailed]
        if rfailed and not args.keep_going:
            src, _dst, err = failures[-1]
            raise InvalidInput(f"syncing {src}: {err} (use --keep-going to go on past failed images)")
        if queued and signing is not None:
            # a worker's finalizer signs by appending to sha256-HEX.sig; a copied .sig written by another
            # task could replace that manifest, so on workers the source's signatures do not go along
            carried = [r for r in resolved if r.attachment and r.destination.endswith(".sig")]
            if carried and not quiet:
                print(f"Note: {len(carried)} source signature tag(s) not copied: signing on workers", file=sys.stderr)
            resolved = [r for r in resolved if all(r is not c for c in carried)]
        plan = plan_copy(resolved, options)
        if args.dry_run:
            incoming = [(i.destination, i.dest_digest) for i in plan.images]
            incoming += [(str(item.destination), digest) for item, digest in checked.unchanged]
            deletions = plan_deletions(ctx, disc, disc.items, incoming) if args.delete else []
            code = _dry_run(plan, checked.unchanged, deletions, failures)
            if skopeo_lines.wanted(quiet):
                pairs = [(i.source, i.destination) for i in plan.images]
                pairs += [(str(item.source), str(item.destination)) for item, _ in checked.unchanged]
                for line in skopeo_lines.sync_log(pairs, dry_run=True):
                    print(line, file=sys.stderr)
            return code
        queue = queue_url(args)
        if queue:
            from .distributed import submit_plan

            for flag in ("delete", "verify"):
                if getattr(args, flag) and not args.wait:
                    print(f"Note: --{flag} needs --wait with --queue (it runs once the job has ended)", file=sys.stderr)
            verified: list[VerifyReport] = []
            log = skopeo_lines.SyncLog(skopeo_lines.wanted(quiet))
            log.expect([str(item.source) for item, _digest in checked.unchanged])
            if any(side.credentials for side in disc.sides.values()):
                print(
                    "Note: credentials in the sync file are used for planning only; workers use their own.",
                    file=sys.stderr,
                )

            def job_done(summary: dict[str, Any]) -> None:
                # what the embedded path does after its run: remember digests, then delete what is stale
                done = [(i["source"], i["status"], i.get("digest", "")) for i in summary["images"]]
                _remember(memo, done, checked, resolved, options)
                if args.delete and summary["state"] == JobState.DONE:
                    deletions = plan_deletions(ctx, disc, disc.items)
                    deleted = apply_deletions(ctx, deletions)
                    for d in deletions:
                        if d.kept_because:
                            print(f"Kept {d.destination}: {d.kept_because}", file=sys.stderr)
                    if not quiet:
                        print(f"{len(deleted)} tag(s) deleted", file=sys.stderr)
                if args.verify:
                    verified.append(run_verify(args, ctx, req, memo, disc))

            code = submit_plan(
                args,
                plan,
                queue,
                kind="sync",
                source_sides=disc.sides,
                on_done=job_done,
                signing=signing,
                registries=queued_registries(args, ctx.opened_sources()),
                reporters=(log,),
            )
            if args.wait:
                # images already there are not in the job: reported here, as the embedded sync reports them
                for item, digest in checked.unchanged:
                    log.image_finished(
                        ImageOutcome("", str(item.source), str(item.destination), ImageStatus.UP_TO_DATE, digest)
                    )
                    if skopeo_lines.wanted(quiet):
                        print("Skipping: image already present at destination")
                    if not quiet:
                        print(f"Skipped {item.source} -> {item.destination}: already up to date ({digest})")
                log.finish()
            # images that failed before the job (reading the source, --keep-going) are not in it: say so here
            for src, dst, err in failures:
                print(f"Error: {src} -> {dst}: {err}", file=sys.stderr)
            return code or (1 if failures or (verified and not verified[0].ok) else 0)
        log = skopeo_lines.SyncLog(skopeo_lines.wanted(quiet))
        log.expect([str(item.source) for item, _digest in checked.unchanged])
        report = run_embedded(args, ctx, plan, quiet, fail_fast=not args.keep_going, signer=signer, also=(log,))
        return _finish(args, ctx, req, memo, disc, report, checked, resolved, failures, log=log)
    finally:
        ctx.close()


def _sync_embedded(
    args: argparse.Namespace, ctx: EngineContext, req: SyncRequest, memo: SqliteBlobLocations | None
) -> int:
    """Discovery, checks, resolution and copies at once: the executor starts on the first planned image."""

    quiet = args.quiet
    feed = PlanFeed()
    produced: dict[str, Any] = {}
    log = skopeo_lines.SyncLog(skopeo_lines.wanted(quiet))

    def produce() -> None:
        try:
            produced["outcome"] = sync_pipelined(
                ctx, req, memo, feed, parallel=max(streams(args), 8), keep_going=args.keep_going
            )
        except BaseException as exc:  # raised in the main thread below
            produced["error"] = exc

    producer = threading.Thread(target=produce, name="ferry-sync-plan", daemon=True)
    producer.start()
    try:
        report = run_embedded(args, ctx, Plan(), quiet, fail_fast=not args.keep_going, feed=feed, also=(log,))
    finally:
        feed.close()
        producer.join()
    if "error" in produced:
        raise produced["error"]
    outcome: SyncOutcome = produced["outcome"]
    disc, checked, resolved = outcome.discovery, outcome.checked, outcome.resolved
    for w in disc.warnings:
        print(f"Warning: {w}", file=sys.stderr)
    failures = [(str(i.source), str(i.destination), e) for i, e in [*checked.failed, *outcome.resolve_failed]]
    if failures and not args.keep_going and not report.cancelled:
        src, _dst, err = failures[0]
        raise InvalidInput(f"syncing {src}: {err} (use --keep-going to go on past failed images)")
    # unchanged images came through the feed (reported as they were found); failures before planning did not
    return _finish(args, ctx, req, memo, disc, report, checked, resolved, failures, report_unchanged=False, log=log)


def _finish(
    args: argparse.Namespace,
    ctx: EngineContext,
    req: SyncRequest,
    memo: SqliteBlobLocations | None,
    disc: Discovery,
    report: Report,
    checked: CheckResult,
    resolved: list[ResolvedImage],
    failures: list[tuple[str, str, str]],
    *,
    report_unchanged: bool = True,
    log: skopeo_lines.SyncLog | None = None,
) -> int:
    """After the copies: report unchanged and failed images, remember digests, --delete, --verify, outputs."""
    from .lifecycle_cmd import run_verify

    quiet = args.quiet
    for item, digest in checked.unchanged if report_unchanged else []:
        outcome = ImageOutcome("", str(item.source), str(item.destination), ImageStatus.UP_TO_DATE, digest)
        report.images.append(outcome)
        if log is not None:
            log.image_finished(outcome)
        if not quiet:
            if skopeo_lines.wanted(quiet):
                print("Skipping: image already present at destination")
            print(f"Skipped {outcome.source} -> {outcome.destination}: already up to date ({digest})")
    for src, dst, err in failures:
        report.images.append(ImageOutcome("", src, dst, ImageStatus.FAILED, error=err))
    _remember(memo, [(i.source, i.status, i.digest) for i in report.images], checked, resolved, req.options)
    deleted: list[str] = []
    kept: list[Deletion] = []
    if args.delete and report.ok:
        # planned now, against what the copy wrote: a tag it added may share a stale tag's manifest
        deletions = plan_deletions(ctx, disc, disc.items)
        deleted = apply_deletions(ctx, deletions)
        kept = [d for d in deletions if d.kept_because]
        for d in kept:
            print(f"Kept {d.destination}: {d.kept_because}", file=sys.stderr)
    verified_report = run_verify(args, ctx, req, memo, disc) if args.verify and not report.cancelled else None
    _outputs(args, report, deleted, kept, verified_report)
    if log is not None:
        log.finish()
    if not quiet:
        extra = f"; {len(deleted)} tag(s) deleted" if args.delete else ""
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
    return 0 if verified_report is None or verified_report.ok else 1


def _refuse_existing_dirs(items: list[Any]) -> None:
    """skopeo sync never writes into an existing directory (cmd/skopeo/sync.go destinationReference)."""
    import os

    for item in items:
        if item.destination.transport == "dir" and os.path.lexists(item.destination.details):
            raise InvalidInput(f"Refusing to overwrite destination directory {json.dumps(item.destination.details)}")


def _remember(
    memo: SqliteBlobLocations | None,
    images: list[tuple[str, str, str]],
    checked: Any,
    resolved: list[Any],
    options: Any,
) -> None:
    """Record what each source digest became at the destination, so the next sync needs only HEADs.

    Also when the plan found the copy already there (e.g. after the cache was lost).
    """
    if memo is None:
        return
    for source, status, digest in images:
        src_digest = checked.source_digests.get(source)
        if ImageStatus(status).ok and src_digest and digest:
            opts = next((r.options for r in resolved if r.source == source and r.options), options)
            memo.memo_put(source, src_digest, _options_key(opts), digest)


def _dry_run(plan: Plan, unchanged: list[Any], deletions: list[Any], failures: list[tuple[str, str, str]]) -> int:
    for img in plan.images:
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
    for src, dst, err in failures:
        print(f"Would fail {src} -> {dst}: {err}")
    total = sum(i.size for i in plan.images if not i.up_to_date)
    copies = sum(1 for i in plan.images if not i.up_to_date)
    print(
        f"Dry run: {copies} image(s) to copy ({human_bytes(total)}), {len(unchanged)} up to date,"
        f" {sum(1 for d in deletions if not d.kept_because)} to delete; nothing was written",
        file=sys.stderr,
    )
    return 1 if failures else 0


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
