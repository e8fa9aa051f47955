"""``verify`` (is a migration complete?) and ``prune`` (retention rules): the end of an image's lifecycle."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from worker.engine.blobcache import SqliteBlobLocations
from worker.engine.steps import EngineContext
from worker.engine.sync import Discovery, SyncRequest
from worker.engine.verify import VerifyReport, verify

from .copy_cmd import copy_options, engine_context
from .options import add_bool, add_retry_flags, add_side_flags, side_config
from .sync_cmd import add_addressing_flags, sync_request


def add_parsers(sub: Any, verb: Callable[..., argparse.ArgumentParser]) -> None:
    p = verb("verify", verify_cmd, "Check that a destination holds every image a sync source names, complete")
    add_addressing_flags(p, ("docker", "oci"))
    add_bool(p, "--all", "-a", help="the sync copied whole multi-arch indexes (same as --multi-arch=all)")
    p.add_argument(
        "--multi-arch",
        choices=("system", "all", "index-only"),
        default=None,
        help="which images of an index the sync copied (default: system)",
    )
    p.add_argument(
        "--platform", action="append", default=[], metavar="OS/ARCH[/VARIANT]", help="the sync copied these platforms"
    )
    p.add_argument("--format", "-f", choices=("oci", "v2s2"), default=None, help="the sync converted to this format")
    add_bool(p, "--remove-signatures", help="do not expect signatures and referrers at the destination")
    p.add_argument("--summary-json", metavar="PATH", help="write what is missing or different as JSON to PATH")
    p.add_argument("--parallel", type=int, default=16, metavar="N", help="requests in flight at once (default 16)")
    add_bool(p, "--quiet", "-q", help="print only the summary line")
    add_side_flags(p, "src-", "the source")
    add_side_flags(p, "dest-", "the destination")
    add_retry_flags(p)
    # copy_options reads these; verify has no use for them
    p.set_defaults(sign_by=None, image_parallel_copies=1, preserve_digests=False)
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("destination", metavar="DESTINATION")
    add_prune_parser(verb)


def add_prune_parser(verb: Callable[..., argparse.ArgumentParser]) -> None:
    p = verb("prune", prune_cmd, "Delete the tags retention rules no longer keep (with their signatures and referrers)")
    p.add_argument("repository", nargs="?", metavar="REPOSITORY", help="REGISTRY/REPO (rules from the flags)")
    p.add_argument("--policy", metavar="FILE", help="a YAML policy file for many repositories and namespaces")
    p.add_argument("--keep-latest", type=int, default=0, metavar="N", help="keep the N latest tags")
    p.add_argument(
        "--keep-latest-by",
        choices=("semver", "created"),
        default="semver",
        help="how tags are ordered (default semver)",
    )
    p.add_argument("--older-than", metavar="AGE", help="delete only tags older than AGE (30d, 2w, 12h)")
    p.add_argument("--include-tags", metavar="REGEX", help="apply the rules only to tags matching REGEX")
    p.add_argument("--keep-tags", action="append", default=[], metavar="REGEX", help="never delete tags matching REGEX")
    add_bool(p, "--dry-run", help="print what would be deleted, with sizes, and why; delete nothing")
    p.add_argument("--summary-json", metavar="PATH", help="write what was deleted and kept, and why, as JSON to PATH")
    p.add_argument("--parallel", type=int, default=16, metavar="N", help="requests in flight at once (default 16)")
    p.add_argument(
        "--queue",
        metavar="REDIS-URL",
        default=None,
        help="obey the per-registry limits and backoff shared through this Redis (default: $FERRY_QUEUE)",
    )
    add_bool(p, "--quiet", "-q", help="print only errors and the summary line")
    add_side_flags(p)
    add_retry_flags(p)


def prune_cmd(args: argparse.Namespace) -> int:
    import os

    from worker.engine.blobcache import default_cache_path
    from worker.engine.prune import DeletesRefused, Rules, Scope, expand, load_policy, prune
    from worker.engine.transports import ClientPool
    from worker.registry import InvalidInput, Reference

    if args.parallel < 1:
        raise InvalidInput("--parallel must be 1 or more")
    side = side_config(args)
    queue = args.queue if args.queue is not None else os.environ.get("FERRY_QUEUE")
    if queue:
        from worker.state import RedisGate

        from .distributed import _state

        side.gate = RedisGate(_state(queue).hosts)
    rule_flags = args.keep_latest or args.older_than or args.include_tags or args.keep_tags
    if args.policy:
        if args.repository or rule_flags:
            raise InvalidInput("--policy takes its repositories and rules from the file: no REPOSITORY or rule flags")
        scopes = load_policy(args.policy, side)
    elif args.repository:
        ref = Reference.parse(args.repository.removeprefix("docker://"), default_tag=False)
        if ref.tag or ref.digest:
            raise InvalidInput(f"prune takes a repository, not an image: {args.repository}")
        entry: dict[str, Any] = {"keep-latest": args.keep_latest, "keep-latest-by": args.keep_latest_by}
        if args.older_than:
            entry["older-than"] = args.older_than
        if args.include_tags:
            entry["include-tags"] = args.include_tags
        if args.keep_tags:
            entry["keep-tags"] = args.keep_tags
        rules = Rules().with_yaml(entry, "prune").check("prune")
        scopes = [Scope(ref.registry, side, repositories=[(ref.repository, rules)])]
    else:
        raise InvalidInput("give a REPOSITORY (with rule flags) or --policy FILE")
    pool = ClientPool()
    try:
        targets = expand(pool, scopes)
        report = prune(
            pool,
            targets,
            journal_dir=default_cache_path().parent / "prune",
            dry_run=args.dry_run,
            parallel=args.parallel,
        )
    except DeletesRefused as exc:
        raise InvalidInput(
            f"{exc} -- the registry does not allow deletes (distribution: set storage.delete.enabled: true); "
            "nothing was deleted there"
        ) from None
    finally:
        pool.close()
    _print_prune(args, report)
    if args.summary_json:
        with open(args.summary_json, "w") as f:
            json.dump(report.to_json(), f, indent=2)
            f.write("\n")
    return 0 if report.ok else 1


def _print_prune(args: argparse.Namespace, report: Any) -> None:
    from .progress import human_bytes

    if not args.quiet:
        verb = "Would delete" if report.dry_run else "Deleted"
        for d in report.deleted:
            digest = "" if "@" in d.reference else f"{d.digest}, "
            print(f"{verb} {d.reference} ({digest}{human_bytes(d.size)}): {d.reason}")
        for d in report.skipped:
            print(f"Kept {d.reference} ({d.digest}): {d.reason}")
        if report.dry_run:
            for d in report.kept:
                print(f"Would keep {d.reference}: {d.reason}")
    for e in report.failed:  # errors print, -q or not
        print(f"Error: deleting {e['reference']}: {e['error']}", file=sys.stderr)
    data = report.to_json()
    what = "would delete" if report.dry_run else "deleted"
    line = (
        f"Prune: {len(report.repositories)} repository(ies), {data['manifests_deleted']} manifest(s) {what}"
        f" ({human_bytes(report.bytes)} referenced), {len(report.kept)} tag(s) kept, {len(report.failed)} failed"
    )
    if report.resumed:
        line += f", {report.resumed} finished from an interrupted run"
    if report.dry_run:
        line += "; nothing was deleted"
    print(f"{line} in {report.seconds:.1f}s", file=sys.stderr)


def verify_cmd(args: argparse.Namespace) -> int:
    from worker.registry import InvalidInput

    if args.parallel < 1:
        raise InvalidInput("--parallel must be 1 or more")
    options = copy_options(args)
    ctx = engine_context(args, trust=False)  # verify writes nothing: no trust policy applies
    memo = ctx.locations if isinstance(ctx.locations, SqliteBlobLocations) else None
    try:
        report = run_verify(args, ctx, sync_request(args, options), memo, None)
    finally:
        ctx.close()
    if args.summary_json:
        with open(args.summary_json, "w") as f:
            json.dump(report.to_json(), f, indent=2)
            f.write("\n")
    return 0 if report.ok else 1


def run_verify(
    args: argparse.Namespace, ctx: EngineContext, req: SyncRequest, memo: Any, disc: Discovery | None
) -> VerifyReport:
    """Verify and print what is wrong, one line each, then the summary line (stderr)."""
    report = verify(ctx, req, memo, disc=disc, parallel=getattr(args, "parallel", 16))
    print_verify(report, args.quiet)
    return report


def print_verify(report: VerifyReport, quiet: bool) -> None:
    """What verification found wrong, one line each (stdout; errors on stderr), then the summary line (stderr)."""
    if not quiet:
        for e in report.missing_tags:
            print(f"Missing {e['destination']} (source {e['source']})")
        for e in report.differing_digests:
            print(f"Different {e['destination']}: {e['destination_digest']}, expected {e['expected_digest']}")
        for m in report.missing_manifests:
            print(f"Missing child manifest {m.digest} of {m.manifest} ({m.destination})")
        for m in report.missing_blobs:
            print(f"Missing blob {m.digest} of {m.manifest} ({m.destination})")
    for e in report.errors:  # errors print, -q or not
        print(f"Error: {e['destination']}: {e['error']}", file=sys.stderr)
    print(report.summary(), file=sys.stderr)
