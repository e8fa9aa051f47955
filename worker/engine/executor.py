"""Executors run a ``Plan``. The embedded one uses a bounded thread pool in this process.

Order comes from the plan's dependencies alone: blobs run in parallel, each
image's manifests as soon as its blobs exist, an index after its children and
the tag last. A failed step fails the images that contain it; their later
steps never run (so no tag points at missing content) while other images go on.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from worker.registry import Cancelled, FerryError

from .plan import BlobStep, ManifestStep, Plan, Step
from .steps import BlobResult, EngineContext, run_blob_step, run_manifest_step

log = logging.getLogger("ferry.engine")


@dataclass
class ImageOutcome:
    id: str
    source: str
    destination: str
    status: str = "pending"  # done | up-to-date | failed | cancelled
    digest: str = ""
    error: str = ""


@dataclass
class Report:
    images: list[ImageOutcome] = field(default_factory=list)
    blobs_transferred: int = 0
    blobs_mounted: int = 0
    blobs_skipped: int = 0
    bytes_transferred: int = 0
    manifests_pushed: int = 0
    seconds: float = 0.0
    cancelled: bool = False

    @property
    def failed(self) -> list[ImageOutcome]:
        return [i for i in self.images if i.status in ("failed", "cancelled")]

    @property
    def ok(self) -> bool:
        return not self.failed and not self.cancelled

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["images_total"] = len(self.images)
        d["images_copied"] = sum(1 for i in self.images if i.status == "done")
        d["images_skipped"] = sum(1 for i in self.images if i.status == "up-to-date")
        d["images_failed"] = len(self.failed)
        d["seconds"] = round(self.seconds, 3)
        return d


class Events(Protocol):
    """Progress hooks; every method may be called from worker threads."""

    def step_started(self, step: Step) -> None: ...

    def step_finished(self, step: Step, result: BlobResult | None, error: BaseException | None) -> None: ...

    def image_finished(self, outcome: ImageOutcome) -> None: ...


class NoEvents:
    def step_started(self, step: Step) -> None:
        pass

    def step_finished(self, step: Step, result: BlobResult | None, error: BaseException | None) -> None:
        pass

    def image_finished(self, outcome: ImageOutcome) -> None:
        pass


class Executor(Protocol):
    def run(self, plan: Plan) -> Report: ...


def describe_error(exc: BaseException) -> str:
    if isinstance(exc, FerryError):
        return " ".join(str(exc).split())
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


class EmbeddedExecutor:
    """Runs a plan on a bounded thread pool in this process (no Redis needed)."""

    def __init__(
        self,
        ctx: EngineContext,
        *,
        parallel: int = 6,
        events: Events | None = None,
        fail_fast: bool = False,
    ) -> None:
        self.ctx = ctx
        self.parallel = max(1, parallel)
        self.events: Events = events or NoEvents()
        #: stop starting new steps once an image failed (sync without --keep-going)
        self.fail_fast = fail_fast

    def run(self, plan: Plan) -> Report:
        started = time.monotonic()
        report = Report()
        outcomes = {i.id: ImageOutcome(i.id, i.source, i.destination, digest=i.dest_digest) for i in plan.images}
        report.images = list(outcomes.values())
        step_images = plan.step_images()
        remaining: dict[str, set[str]] = {}
        dependents: dict[str, list[str]] = {}
        for sid, step in plan.steps.items():
            remaining[sid] = {d for d in step.deps if d in plan.steps}
            for d in remaining[sid]:
                dependents.setdefault(d, []).append(sid)
        open_steps: dict[str, set[str]] = {i.id: set(i.steps) for i in plan.images}
        for img in plan.images:
            if img.up_to_date:
                outcomes[img.id].status = "up-to-date"
                self.events.image_finished(outcomes[img.id])
            elif not img.steps:
                outcomes[img.id].status = "done"
                self.events.image_finished(outcomes[img.id])
        ready = [sid for sid, deps in remaining.items() if not deps]
        done: set[str] = set()
        lock = threading.Lock()
        aborted = threading.Event()

        def finish_step(sid: str) -> None:
            for image_id in step_images.get(sid, []):
                open_steps[image_id].discard(sid)
                out = outcomes[image_id]
                if not open_steps[image_id] and out.status == "pending":
                    out.status = "done"
                    self.events.image_finished(out)

        def fail_step(sid: str, error: str, status: str = "failed") -> None:
            # the step and everything after it never run; its images fail
            stack = [sid]
            while stack:
                cur = stack.pop()
                if cur in done:
                    continue
                done.add(cur)
                remaining.pop(cur, None)
                stack.extend(dependents.get(cur, []))
                for image_id in step_images.get(cur, []):
                    out = outcomes[image_id]
                    open_steps[image_id].discard(cur)
                    if out.status == "pending":
                        out.status = status
                        out.error = error
                        self.events.image_finished(out)
                        if status == "failed" and self.fail_fast:
                            aborted.set()

        def run_step(step: Step) -> BlobResult | None:
            if self.ctx.cancel.is_set():
                raise Cancelled("copy interrupted")
            self.events.step_started(step)
            if isinstance(step, BlobStep):
                return run_blob_step(self.ctx, step)
            run_manifest_step(self.ctx, step)
            return None

        pool = ThreadPoolExecutor(max_workers=self.parallel, thread_name_prefix="ferry-step")
        running: dict[Future[BlobResult | None], str] = {}
        try:
            while ready or running:
                if aborted.is_set():
                    ready.clear()
                    if not running:
                        break
                while ready and len(running) < self.parallel * 2 and not self.ctx.cancel.is_set():
                    sid = ready.pop(0)
                    if sid in done:
                        continue
                    running[pool.submit(run_step, plan.steps[sid])] = sid
                if self.ctx.cancel.is_set() and not running:
                    break
                finished, _ = wait(list(running), timeout=0.5, return_when=FIRST_COMPLETED)
                for fut in finished:
                    sid = running.pop(fut)
                    step = plan.steps[sid]
                    exc = fut.exception()
                    with lock:
                        if exc is not None:
                            log.debug("step %s failed", sid, exc_info=exc)
                            self.events.step_finished(step, None, exc)
                            cancelled = isinstance(exc, Cancelled)
                            fail_step(sid, describe_error(exc), "cancelled" if cancelled else "failed")
                            continue
                        result = fut.result()
                        self._count(report, step, result)
                        self.events.step_finished(step, result, None)
                        done.add(sid)
                        finish_step(sid)
                        for dep in dependents.get(sid, []):
                            deps = remaining.get(dep)
                            if deps is None:
                                continue
                            deps.discard(sid)
                            if not deps and dep not in done:
                                ready.append(dep)
        except KeyboardInterrupt:
            self.ctx.cancel.set()
            raise
        finally:
            if self.ctx.cancel.is_set():
                report.cancelled = True
                for fut in running:
                    fut.cancel()
                pool.shutdown(wait=True, cancel_futures=True)
                for outcome in report.images:
                    if outcome.status == "pending":
                        outcome.status = "cancelled"
                        outcome.error = "interrupted"
            else:
                pool.shutdown(wait=True)
            if aborted.is_set():
                for outcome in report.images:
                    if outcome.status == "pending":
                        outcome.status = "cancelled"
                        outcome.error = "not attempted: an earlier image failed"
            report.seconds = time.monotonic() - started
        return report

    @staticmethod
    def _count(report: Report, step: Step, result: BlobResult | None) -> None:
        if isinstance(step, ManifestStep):
            report.manifests_pushed += 1
            return
        assert result is not None
        if result.action == "transferred":
            report.blobs_transferred += 1
            report.bytes_transferred += result.bytes
        elif result.action == "mounted":
            report.blobs_mounted += 1
        else:
            report.blobs_skipped += 1
