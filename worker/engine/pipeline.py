"""One pipeline for ``copy`` and ``sync``, whichever executor runs the plan.

Stages: discover, check, resolve, plan (``prepare_sync``; ``copy.build_plan`` for ``copy``), run (``run_plan``
on the embedded executor, or the Celery executor on workers), then ``finish_sync``: remember what each source
digest became (the digest memo), delete stale tags, verify. The embedded ``sync`` can also run its stages at
once (``sync_streaming``): the executor starts on the first planned image.

Two executors run a plan behind one interface (``executor.Executor``: ``run(plan, feed) -> Report``):
``EmbeddedExecutor`` on threads in this process, and ``CeleryExecutor`` (``worker/celery_executor.py``) on
workers through Redis, whose job reads back as the same ``Report`` (``celery_executor.job_report``). The
stages before and after the run are these functions for both. The engine never imports the Celery side or
the CLI: the CLI (``producer/``) parses flags, builds the request, picks an executor, hands it in, and prints
what comes back.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from worker.registry import FerryError, InvalidInput

from .executor import Executor, ImageOutcome, PlanFeed, Report
from .plan import Plan, ResolvedImage, plan_copy
from .status import ImageStatus
from .steps import EngineContext
from .sync import (
    CheckResult,
    Deletion,
    Discovery,
    SyncItem,
    SyncRequest,
    _options_key,
    apply_deletions,
    check,
    discover,
    plan_deletions,
    resolve_changed,
    sync_pipelined,
)
from .verify import VerifyReport, verify

if TYPE_CHECKING:
    from .trust import Signer


class DigestMemo(Protocol):
    """What a sync remembers between runs: the digest each source digest became at the destination."""

    def memo_get(self, source: str, digest: str, options_key: str) -> str | None: ...

    def memo_put(self, source: str, digest: str, options_key: str, dest_digest: str) -> None: ...


@dataclass(frozen=True)
class Failure:
    """An image that failed before the run (its check or its resolution): it is in no plan."""

    source: str
    destination: str
    error: str


def _failures(items: Iterable[tuple[SyncItem, str]]) -> list[Failure]:
    return [Failure(str(i.source), str(i.destination), e) for i, e in items]


def _stop_unless(keep_going: bool, failure: Failure) -> None:
    if not keep_going:
        raise InvalidInput(f"syncing {failure.source}: {failure.error} (use --keep-going to go on past failed images)")


def stop_unless_keep_going(run: SyncRun, keep_going: bool) -> None:
    """Without ``--keep-going``, an image that failed before the run fails the sync (``InvalidInput``)."""
    if run.failures:
        _stop_unless(keep_going, run.failures[0])


@dataclass
class SyncRun:
    """What a sync found and planned, beside what its executor reports."""

    request: SyncRequest
    discovery: Discovery
    checked: CheckResult
    resolved: list[ResolvedImage] = field(default_factory=list)
    #: images that failed before the run, in the order found (checks, then resolution)
    failures: list[Failure] = field(default_factory=list)
    plan: Plan = field(default_factory=Plan)
    #: source signature tags left out because workers sign (``--queue`` with signing)
    signatures_left_out: int = 0


def refuse_existing_dirs(items: Iterable[SyncItem]) -> None:
    """skopeo sync never writes into an existing directory (cmd/skopeo/sync.go destinationReference)."""
    import json

    for item in items:
        if item.destination.transport == "dir" and os.path.lexists(item.destination.details):
            raise InvalidInput(f"Refusing to overwrite destination directory {json.dumps(item.destination.details)}")


def prepare_sync(
    ctx: EngineContext,
    req: SyncRequest,
    memo: DigestMemo | None,
    *,
    parallel: int = 8,
    keep_going: bool = False,
    sign: bool = False,
    signing_on_workers: bool = False,
    writes: bool = True,
    on_discovered: Callable[[Discovery], None] | None = None,
) -> SyncRun:
    """Discover, check, resolve and plan the whole sync before any of it runs (a dry run, ``--queue``, signing,
    ``dir:``): overlapped for ``--queue`` to a registry without signing, else one stage after the other.

    ``sign``: images already there are resolved too, to sign them if unsigned. ``signing_on_workers``: a
    worker's finalizer signs by appending to ``sha256-HEX.sig``, and a copied ``.sig`` written by another task
    could replace that manifest, so the source's signature tags do not go along. ``writes``: the run will write
    (not a dry run): a ``dir:`` destination that exists is refused. Without ``keep_going`` the first failed
    image raises ``InvalidInput``.
    """
    if writes and not sign and req.dest_kind == "docker":
        return _prepare_overlapped(
            ctx, req, memo, parallel=parallel, keep_going=keep_going, on_discovered=on_discovered
        )
    disc = discover(ctx, req, parallel=parallel)
    if writes and req.dest_kind == "dir":
        refuse_existing_dirs(disc.items)
    if on_discovered is not None:
        on_discovered(disc)
    checked = check(ctx, disc.items, req, memo, parallel=parallel, tag_lists=disc.tag_lists)
    if sign:
        # an image already there may still lack a signature by this key: resolve it to sign it if so
        checked.changed += [item for item, _digest in checked.unchanged]
        checked.unchanged = []
    run = SyncRun(req, disc, checked, failures=_failures(checked.failed))
    stop_unless_keep_going(run, keep_going)
    resolved, rfailed = resolve_changed(ctx, checked.changed, req, parallel=parallel)
    run.failures += _failures(rfailed)
    if rfailed:
        _stop_unless(keep_going, run.failures[-1])
    if signing_on_workers:
        carried = [r for r in resolved if r.attachment and r.destination.endswith(".sig")]
        run.signatures_left_out = len(carried)
        resolved = [r for r in resolved if all(r is not c for c in carried)]
    run.resolved = resolved
    run.plan = plan_copy(resolved, req.options)
    return run


def _prepare_overlapped(
    ctx: EngineContext,
    req: SyncRequest,
    memo: DigestMemo | None,
    *,
    parallel: int,
    keep_going: bool,
    on_discovered: Callable[[Discovery], None] | None,
) -> SyncRun:
    """``prepare_sync`` with its stages overlapped (``sync_pipelined``: each image is checked as soon as it is
    listed and resolved as soon as it is checked), then put in discovery order, so the plan is the one the
    staged stages would make. For ``--queue``: the job is planned in the time of its slowest image's round
    trips, not of each stage's slowest in a row."""
    feed = PlanFeed()
    outcome = sync_pipelined(ctx, req, memo, feed, parallel=parallel, keep_going=keep_going)
    feed.close()
    disc = outcome.discovery
    if on_discovered is not None:
        on_discovered(disc)
    order = {str(item.destination): n for n, item in enumerate(disc.items)}

    def key(destination: str) -> tuple[int, str]:
        return order.get(destination, len(order)), destination

    checked = outcome.checked
    checked.changed.sort(key=lambda item: key(str(item.destination)))
    checked.unchanged.sort(key=lambda pair: key(str(pair[0].destination)))
    checked.failed.sort(key=lambda pair: key(str(pair[0].destination)))
    run = SyncRun(req, disc, checked, failures=_failures(checked.failed))
    stop_unless_keep_going(run, keep_going)
    rfailed = sorted(outcome.resolve_failed, key=lambda pair: key(str(pair[0].destination)))
    run.failures += _failures(rfailed)
    if rfailed:
        _stop_unless(keep_going, run.failures[-1])
    run.resolved = sorted(outcome.resolved, key=lambda r: key(r.destination))
    run.plan = plan_copy(run.resolved, req.options)
    return run


def dry_run_deletions(ctx: EngineContext, run: SyncRun) -> list[Deletion]:
    """The stale tags a ``--delete`` would delete (or keep), counting what the plan would write."""
    incoming = [(i.destination, i.dest_digest) for i in run.plan.images]
    incoming += [(str(item.destination), digest) for item, digest in run.checked.unchanged]
    return plan_deletions(ctx, run.discovery, run.discovery.items, incoming)


def sync_streaming(
    ctx: EngineContext,
    req: SyncRequest,
    memo: DigestMemo | None,
    executor: Executor,
    *,
    parallel: int = 8,
    keep_going: bool = False,
) -> tuple[SyncRun, Report]:
    """Discovery, checks, resolution and copies at once: ``executor`` starts on the first planned image.

    Unchanged images come through the feed (reported as they are found); images that failed before the run are
    in ``SyncRun.failures`` (``stop_unless_keep_going`` turns the first into the error of a sync without
    ``--keep-going``, which here only stops new steps). An error of discovery itself is raised.
    """
    feed = PlanFeed()
    produced: dict[str, Any] = {}

    def produce() -> None:
        try:
            produced["outcome"] = sync_pipelined(ctx, req, memo, feed, parallel=parallel, keep_going=keep_going)
        except BaseException as exc:  # raised in the calling thread below
            produced["error"] = exc

    producer = threading.Thread(target=produce, name="ferry-sync-plan", daemon=True)
    producer.start()
    try:
        report = executor.run(Plan(), feed)
    finally:
        feed.close()
        producer.join()
    if "error" in produced:
        raise produced["error"]
    outcome = produced["outcome"]
    run = SyncRun(req, outcome.discovery, outcome.checked, outcome.resolved)
    run.failures = _failures([*outcome.checked.failed, *outcome.resolve_failed])
    return run, report


def run_plan(
    ctx: EngineContext, executor: Executor, plan: Plan, *, feed: PlanFeed | None = None, signer: Signer | None = None
) -> Report:
    """Run ``plan`` on the embedded executor, then sign what it wrote (``signer``; workers sign in their
    finalizers instead). A signing failure fails its image.

    The caller wraps this in its cancellation (signals, deadline), and then commits archives and ``dir:``
    (``ctx.commit()``) only when every image succeeded.
    """
    report = executor.run(plan, feed)
    if signer is not None and not report.cancelled:
        # once per image, after its manifests are written (and for images already there, if unsigned)
        sign_report(ctx, plan, report, signer)
    return report


def sign_report(ctx: EngineContext, plan: Plan, report: Report, signer: Signer) -> None:
    """Sign every image the run wrote or found up to date; a signing failure fails its image."""
    from .trust import sign_written

    outcomes = {o.id: o for o in report.images}
    for img in plan.images:
        outcome = outcomes.get(img.id)
        if img.attachment or outcome is None or not outcome.status.ok:
            continue
        try:
            sign_written(signer, ctx.destination(img.destination), img.manifests)
        except FerryError as exc:
            outcome.status = ImageStatus.FAILED
            outcome.error = f"signing failed: {' '.join(str(exc).split())}"


def unchanged_outcomes(run: SyncRun) -> list[ImageOutcome]:
    """The images the check found already there, which no executor runs, as up-to-date outcomes."""
    return [
        ImageOutcome("", str(item.source), str(item.destination), ImageStatus.UP_TO_DATE, digest)
        for item, digest in run.checked.unchanged
    ]


def add_unrun(report: Report, run: SyncRun, *, unchanged: bool = True) -> list[ImageOutcome]:
    """Put the images no executor ran into ``report``: unchanged ones (up to date) and failures before the run.

    Returns the unchanged outcomes added (the CLI prints a line for each)."""
    added = unchanged_outcomes(run) if unchanged else []
    report.images += added
    for f in run.failures:
        report.images.append(ImageOutcome("", f.source, f.destination, ImageStatus.FAILED, error=f.error))
    return added


@dataclass
class Cleanup:
    """What ``finish_sync`` did after the run: tags deleted, tags kept (and why), the verification."""

    deleted: list[str] = field(default_factory=list)
    kept: list[Deletion] = field(default_factory=list)
    verified: VerifyReport | None = None


def remember(memo: DigestMemo | None, run: SyncRun, images: Iterable[tuple[str, str, str]]) -> None:
    """Record what each source digest became at the destination, so the next sync needs only HEADs.

    ``images`` are (source, status, destination digest). Also when the plan found the copy already there
    (e.g. after the cache was lost).
    """
    if memo is None:
        return
    for source, status, digest in images:
        src_digest = run.checked.source_digests.get(source)
        if ImageStatus(status).ok and src_digest and digest:
            opts = next((r.options for r in run.resolved if r.source == source and r.options), run.request.options)
            memo.memo_put(source, src_digest, _options_key(opts), digest)


def finish_sync(
    ctx: EngineContext,
    run: SyncRun,
    memo: DigestMemo | None,
    images: Iterable[tuple[str, str, str]],
    *,
    delete: bool,
    verify_after: bool,
    verify_parallel: int = 16,
) -> Cleanup:
    """After the run, on either executor: remember digests, delete stale tags (``delete``: the run succeeded
    and ``--delete`` was given), verify the destination (``verify_after``).

    Deletions are planned now, against what the copy wrote: a tag it added may share a stale tag's manifest.
    """
    remember(memo, run, images)
    out = Cleanup()
    if delete:
        deletions = plan_deletions(ctx, run.discovery, run.discovery.items)
        out.deleted = apply_deletions(ctx, deletions)
        out.kept = [d for d in deletions if d.kept_because]
    if verify_after:
        out.verified = verify(ctx, run.request, memo, disc=run.discovery, parallel=verify_parallel)
    return out


__all__ = [
    "Cleanup",
    "DigestMemo",
    "Failure",
    "SyncRun",
    "add_unrun",
    "dry_run_deletions",
    "finish_sync",
    "prepare_sync",
    "refuse_existing_dirs",
    "remember",
    "run_plan",
    "sign_report",
    "stop_unless_keep_going",
    "sync_streaming",
    "unchanged_outcomes",
]
