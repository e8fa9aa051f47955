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
from .options import add_bool, add_retry_flags, add_side_flags
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


def verify_cmd(args: argparse.Namespace) -> int:
    from worker.registry import InvalidInput

    if args.parallel < 1:
        raise InvalidInput("--parallel must be 1 or more")
    options = copy_options(args)
    ctx = engine_context(args)
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
    if not args.quiet:
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
    return report
