"""``copy``: plan, then run on the embedded executor (default) or on Celery workers (``--queue``)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING, Any

from worker.engine import pipeline
from worker.engine.compression import CompressionOptions
from worker.engine.copy import CopyJob, build_plan
from worker.engine.executor import EmbeddedExecutor, Executor, Report
from worker.engine.inspect import host_platform
from worker.engine.plan import CopyOptions, MultiArch, Plan
from worker.engine.steps import DEFAULT_PER_HOST, DEFAULT_STREAMS, EngineContext, HostSlots
from worker.engine.transports import ImageName
from worker.registry import InvalidInput, Platform

from . import deadline, skopeo_lines, trust_cmd
from .options import (
    add_bool,
    add_retry_flags,
    add_shared_authfile,
    add_side_flags,
    queued_registries,
    side_config,
)
from .progress import make_progress, summary_line

if TYPE_CHECKING:
    from worker.engine.trust import Signer

EXIT_INTERRUPTED = 130


def add_copy_flags(p: argparse.ArgumentParser) -> None:
    add_bool(p, "--all", "-a", help="copy all images of a multi-arch index (same as --multi-arch=all)")
    p.add_argument(
        "--multi-arch",
        choices=("system", "all", "index-only"),
        default=None,
        help="which images of an index to copy (default: system, the one for this platform)",
    )
    p.add_argument(
        "--platform",
        action="append",
        default=[],
        metavar="OS/ARCH[/VARIANT]",
        help="copy only these platforms of an index (repeatable); the index is rewritten to list just them",
    )
    add_bool(p, "--preserve-digests", help="fail rather than change any digest (no conversion, no subset)")
    p.add_argument(
        "--format", "-f", choices=("oci", "v2s1", "v2s2"), default=None, help="manifest format at the destination"
    )
    add_bool(p, "--remove-signatures", help="do not copy signatures")
    trust_cmd.add_copy_flags(p)
    p.add_argument(
        "--image-parallel-copies",
        type=int,
        default=None,
        metavar="N",
        help=f"steps (blob copies) at once for the whole run (default {DEFAULT_STREAMS})",
    )
    p.add_argument(
        "--host-concurrency",
        action="append",
        default=[],
        metavar="HOST=N",
        help=f"at most N blob copies at once from or to HOST (repeatable; default {DEFAULT_PER_HOST} per host)",
    )
    p.add_argument("--digestfile", metavar="PATH", help="write the digest of the written manifest to PATH")
    p.add_argument("--summary-json", metavar="PATH", help="write the run summary as JSON to PATH")
    add_bool(p, "--quiet", "-q", help="print nothing but errors")
    # skopeo's compression choices (worker/engine/compression.py)
    add_bool(p, "--dest-compress", help="compress plain layers when writing to a dir: destination")
    add_bool(p, "--dest-decompress", help="decompress layers when writing to a dir: destination")
    p.add_argument(
        "--dest-compress-format",
        metavar="FORMAT",
        help="gzip or zstd: compress plain layers with it, recompress layers in another format (registry, oci:, dir:)",
    )
    p.add_argument(
        "--dest-compress-level", metavar="LEVEL", help="compression level (gzip 0-9, default 6; zstd 1-19, default 3)"
    )
    add_bool(
        p,
        "--dest-force-compress-format",
        help="recompress every layer to --dest-compress-format, even one the destination already holds",
    )
    # plain layers stay plain in oci: (Ferry's default); with it, --dest-compress-format leaves oci: layers alone too
    add_bool(p, "--dest-oci-accept-uncompressed-layers", help=argparse.SUPPRESS)
    add_bool(p, "--dest-precompute-digests", help=argparse.SUPPRESS)
    # ocicrypt: refused in copy_options
    p.add_argument("--encryption-key", action="append", default=[], help=argparse.SUPPRESS)
    p.add_argument("--encrypt-layer", action="append", default=[], help=argparse.SUPPRESS)
    p.add_argument("--decryption-key", action="append", default=[], help=argparse.SUPPRESS)
    p.add_argument(
        "--queue",
        metavar="REDIS-URL",
        default=None,
        help="enqueue on Celery workers through this Redis (default: $FERRY_QUEUE; none: run here)",
    )
    add_bool(p, "--wait", help="with --queue: follow the job until it ends and exit with its outcome")
    add_shared_authfile(p)
    add_side_flags(p, "src-", "the source", creds_alias="screds")
    add_side_flags(p, "dest-", "the destination", creds_alias="dcreds")
    add_retry_flags(p)


def add_parsers(sub: Any, verb: Callable[..., argparse.ArgumentParser]) -> None:
    p = verb("copy", copy, "Copy an image (or a multi-arch index) from one location to another")
    add_copy_flags(p)
    p.add_argument("--additional-tag", action="append", default=[], metavar="TAG", help="also tag the copy as TAG")
    p.add_argument("source", metavar="SOURCE-IMAGE")
    p.add_argument("destination", metavar="DESTINATION-IMAGE")


def queue_url(args: argparse.Namespace) -> str | None:
    """``--queue URL``; without it ``$FERRY_QUEUE``; ``--queue ''`` runs here even when the variable is set."""
    url: str | None = args.queue if args.queue is not None else os.environ.get("FERRY_QUEUE")
    if url and (args.src_registry_token or args.dest_registry_token):
        raise InvalidInput("--src-registry-token/--dest-registry-token cannot be used with --queue: a token stays here")
    if url and (args.src_no_creds or args.dest_no_creds):
        raise InvalidInput(
            "--src-no-creds/--dest-no-creds cannot be used with --queue: workers use their own credentials"
        )
    return url or None


def refuse_unsupported(args: argparse.Namespace) -> None:
    """skopeo flags Ferry cannot honour: a clear error, never a flag accepted and ignored."""
    if getattr(args, "encryption_key", None) or getattr(args, "encrypt_layer", None):
        raise InvalidInput("--encryption-key/--encrypt-layer: Ferry does not encrypt layers (ocicrypt)")
    if getattr(args, "decryption_key", None):
        raise InvalidInput("--decryption-key: Ferry does not decrypt layers (ocicrypt)")
    if getattr(args, "format", None) == "v2s1":
        raise InvalidInput("--format v2s1: Ferry does not write Docker schema 1 manifests (use v2s2 or oci)")


def copy_options(args: argparse.Namespace, *, dest_transport: str | None = None) -> CopyOptions:
    refuse_unsupported(args)
    multi: MultiArch = args.multi_arch or ("all" if args.all else "system")
    if args.all and args.multi_arch not in (None, "all"):
        raise InvalidInput("--all and --multi-arch cannot disagree")
    platforms = tuple(Platform.parse(p) for p in args.platform)
    if args.image_parallel_copies is not None and args.image_parallel_copies < 1:
        raise InvalidInput("--image-parallel-copies must be 1 or more")
    for tag in getattr(args, "additional_tag", []):
        check_additional_tag(tag, dest_transport)
    return CopyOptions(
        multi_arch=multi,
        platforms=platforms,
        system_platform=host_platform(args.override_os, args.override_arch, args.override_variant),
        format=args.format,
        preserve_digests=args.preserve_digests,
        remove_signatures=args.remove_signatures,
        additional_tags=tuple(getattr(args, "additional_tag", [])),
        compression=compression_options(args),
    )


def compression_options(args: argparse.Namespace) -> CompressionOptions:
    """``--dest-compress-format``/``-level``, ``--dest-force-compress-format``, ``--dest-(de)compress``, checked."""
    return CompressionOptions.parse(
        getattr(args, "dest_compress_format", None),
        getattr(args, "dest_compress_level", None),
        force=bool(getattr(args, "dest_force_compress_format", False)),
        dir_compress=bool(getattr(args, "dest_compress", False)),
        dir_decompress=bool(getattr(args, "dest_decompress", False)),
        oci_accept_uncompressed=bool(getattr(args, "dest_oci_accept_uncompressed_layers", False)),
    )


def streams(args: argparse.Namespace) -> int:
    """The run's stream budget: ``--image-parallel-copies`` where given (skopeo's meaning), else the default."""
    n = getattr(args, "image_parallel_copies", None)
    return int(n) if n else DEFAULT_STREAMS


def host_slots(args: argparse.Namespace) -> HostSlots:
    """Per-host caps: ``--host-concurrency HOST=N``, else ``ferry limit HOST --concurrency N`` when
    ``$FERRY_QUEUE`` names a reachable Redis, else the default. They only ever lower the default."""
    from worker.registry import Reference

    caps: dict[str, int] = {}
    shared = os.environ.get("FERRY_QUEUE")
    if shared:
        caps.update(_shared_caps(shared))
    for spec in getattr(args, "host_concurrency", None) or []:
        host, sep, count = spec.rpartition("=")
        if not sep or not host or not count.isdigit() or int(count) < 1:
            raise InvalidInput(f"--host-concurrency {spec!r}: expected HOST=N with N 1 or more")
        caps[Reference.parse(f"{host}/x").api_host] = int(count)
    return HostSlots(DEFAULT_PER_HOST, {h: min(n, DEFAULT_PER_HOST) for h, n in caps.items() if n > 0})


def _shared_caps(url: str) -> dict[str, int]:
    try:
        import redis

        from worker.state import SharedState

        r = redis.Redis.from_url(url, decode_responses=True, socket_timeout=2.0, socket_connect_timeout=2.0)
        limits = SharedState(r).hosts.all_limits()
    except Exception:  # shared limits are a courtesy to the fleet's registries; a local run goes on without
        return {}
    return {host: lim.concurrency for host, lim in limits.items() if lim.concurrency}


def check_additional_tag(tag: str, dest_transport: str | None) -> None:
    """docker-archive: ``NAME:TAG`` (skopeo's rule: a tagged reference); a registry (Ferry's extension): a tag."""
    from worker.registry import Reference

    if dest_transport == "dir":
        raise InvalidInput("--additional-tag: a dir: destination has no tags")
    if dest_transport == "docker-archive":
        last = tag.rsplit("/", 1)[-1]
        try:
            Reference.parse(tag)
        except InvalidInput:
            raise InvalidInput(f"invalid --additional-tag {tag!r}") from None
        if ":" not in last or "@" in tag:
            raise InvalidInput(f"additional-tag '{tag}' must be a tagged reference")
        return
    try:
        Reference.parse(f"x/y:{tag}")
    except InvalidInput:
        raise InvalidInput(f"invalid --additional-tag {tag!r} (a tag; NAME:TAG is for docker-archive: only)") from None


def engine_context(args: argparse.Namespace, *, trust: bool = True) -> EngineContext:
    """Transports, caches and (``trust``: copy and sync) the trust policy every image must pass."""
    src_side = side_config(args, "src-")
    dest_side = side_config(args, "dest-")
    from worker.engine.blobcache import SqliteBlobLocations

    return EngineContext(
        source_side=src_side,
        dest_side=dest_side,
        locations=SqliteBlobLocations(),
        admission=trust_cmd.admission(args) if trust else None,
        hosts=host_slots(args),
    )


def write_outputs(args: argparse.Namespace, report: Report, plan: Plan) -> None:
    if args.summary_json:
        with open(args.summary_json, "w") as f:
            json.dump(report.to_json(), f, indent=2)
            f.write("\n")
    if getattr(args, "digestfile", None):
        digests = [i.digest for i in report.images if i.status.ok]
        if digests:
            with open(args.digestfile, "w") as f:
                f.write(digests[0])


def run_embedded(
    args: argparse.Namespace,
    ctx: EngineContext,
    plan: Plan,
    quiet: bool,
    *,
    fail_fast: bool = False,
    signer: Signer | None = None,
    run: Callable[[Executor], Report] | None = None,
    also: tuple[Any, ...] = (),
) -> Report:
    """The embedded executor with this terminal's progress display, Ctrl-C/SIGTERM and ``--command-timeout``.

    It runs ``plan`` (``pipeline.run_plan``), or ``run`` hands it to a pipeline that feeds it as it plans (a
    streaming sync); ``also``: more progress reporters (sync's logrus lines). Archives are written once every
    image succeeded."""
    progress: Any = make_progress(quiet)
    if skopeo_lines.wanted(quiet):
        signatures = not getattr(args, "remove_signatures", False)
        progress = skopeo_lines.Tee(skopeo_lines.SkopeoLines(plan, signatures=signatures), progress)
    if also:
        progress = skopeo_lines.Tee(*also, progress)
    ctx.on_bytes = progress.on_bytes
    executor = EmbeddedExecutor(ctx, parallel=streams(args), events=progress, fail_fast=fail_fast)

    def interrupt(signum: int, frame: FrameType | None) -> None:
        ctx.cancel.set()

    old = signal.signal(signal.SIGINT, interrupt)
    old_term = signal.signal(signal.SIGTERM, interrupt)
    progress.start(plan)
    try:
        # --command-timeout cancels the run like a Ctrl-C: nothing incomplete is written
        with deadline.cancels(ctx.cancel.set):
            report = run(executor) if run is not None else pipeline.run_plan(ctx, executor, plan, signer=signer)
    finally:
        progress.stop()
        signal.signal(signal.SIGINT, old)
        signal.signal(signal.SIGTERM, old_term)
    if report.ok:
        # archives are written only when every image in them is complete; a deadline never cuts a commit in half
        with deadline.shielded():
            ctx.commit()
    return report


def interrupted(report: Report) -> int:
    """The line and exit code of a cancelled run: Ctrl-C (130) or --command-timeout (1)."""
    if deadline.expired():
        print(f"Error: {deadline.message()}; no tag was written for incomplete images", file=sys.stderr)
        return 1
    print("Error: interrupted; no tag was written for incomplete images", file=sys.stderr)
    return EXIT_INTERRUPTED


def copy(args: argparse.Namespace) -> int:
    src = ImageName.parse(args.source)
    dest = ImageName.parse(args.destination)
    options = copy_options(args, dest_transport=dest.transport)
    queue = queue_url(args)
    signing = trust_cmd.signing_config(args)
    trust_cmd.check_signable(signing, [str(dest)])
    signer = None if queue else trust_cmd.load_signer(signing)
    ctx = engine_context(args)
    try:
        plan, _ = build_plan(ctx, [CopyJob(src, dest)], options)
        if queue:
            from .distributed import submit_plan

            registries = queued_registries(args, ctx.opened_sources())
            return submit_plan(args, plan, queue, kind="copy", signing=signing, registries=registries)
        report = run_embedded(args, ctx, plan, args.quiet, signer=signer)
    finally:
        ctx.close()
    write_outputs(args, report, plan)
    if not args.quiet:
        print(summary_line(report), file=sys.stderr)
    if report.cancelled or report.cancelled_images:
        return interrupted(report)
    if not report.ok:
        for img in report.failed:
            print(f"Error: copying {img.source} to {img.destination}: {img.error}", file=sys.stderr)
        return 1
    return 0
