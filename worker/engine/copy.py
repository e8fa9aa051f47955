"""Copy requests end to end: resolve every image, plan once, hand the plan to an executor."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from worker.registry import FerryError

from .executor import describe_error
from .plan import CopyOptions, Plan, ResolvedImage, plan_copy, resolve_image
from .steps import EngineContext
from .transports import ImageName

log = logging.getLogger("ferry.engine")


@dataclass(frozen=True)
class CopyJob:
    source: ImageName
    destination: ImageName


@dataclass
class ResolveFailure:
    job: CopyJob
    error: str


def resolve_all(
    ctx: EngineContext,
    jobs: Sequence[CopyJob],
    options: CopyOptions,
    *,
    parallel: int = 8,
    keep_going: bool = False,
) -> tuple[list[ResolvedImage], list[ResolveFailure]]:
    """Read every source image (in parallel); with ``keep_going`` a failure is recorded, not raised."""

    def one(job: CopyJob) -> ResolvedImage:
        src = ctx.source(str(job.source))
        dest = ctx.destination(str(job.destination))
        resolved = resolve_image(job.source, src, job.destination, dest, options)
        ctx.admit(job.source, src, resolved)
        return resolved

    resolved: list[ResolvedImage] = []
    failures: list[ResolveFailure] = []
    if len(jobs) == 1:
        return [one(jobs[0])], []
    with ThreadPoolExecutor(max_workers=max(1, parallel), thread_name_prefix="ferry-resolve") as pool:
        futures = [(job, pool.submit(one, job)) for job in jobs]
        for job, fut in futures:
            try:
                resolved.append(fut.result())
            except FerryError as exc:
                if not keep_going:
                    raise
                failures.append(ResolveFailure(job, describe_error(exc)))
    return resolved, failures


def build_plan(
    ctx: EngineContext, jobs: Sequence[CopyJob], options: CopyOptions, *, keep_going: bool = False
) -> tuple[Plan, list[ResolveFailure]]:
    resolved, failures = resolve_all(ctx, jobs, options, keep_going=keep_going)
    return plan_copy(resolved, options), failures
