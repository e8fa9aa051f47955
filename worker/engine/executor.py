"""Executors run a ``Plan``. The embedded one uses a bounded thread pool in this process.

Order comes from the plan's dependencies alone: blobs run in parallel, each
image's manifests as soon as its blobs exist, an index after its children and
the tag last. A failed step fails the images that contain it; their later
steps never run (so no tag points at missing content) while other images go on.
"""

from __future__ import annotations

import heapq
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from worker.registry import Cancelled, FerryError

from .plan import BlobStep, ImagePlan, ManifestStep, Plan, Step
from .status import BlobAction, ImageStatus
from .steps import BlobResult, EngineContext, run_blob_step, run_manifest_step

log = logging.getLogger("ferry.engine")


@dataclass
class ImageOutcome:
    id: str
    source: str
    destination: str
    status: ImageStatus = ImageStatus.PENDING
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
        return [i for i in self.images if i.status == ImageStatus.FAILED]

    @property
    def cancelled_images(self) -> list[ImageOutcome]:
        """Images not finished because the run was interrupted or stopped early (never counted as failed)."""
        return [i for i in self.images if i.status == ImageStatus.CANCELLED]

    @property
    def ok(self) -> bool:
        return not self.failed and not self.cancelled_images and not self.cancelled

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["images_total"] = len(self.images)
        d["images_copied"] = sum(1 for i in self.images if i.status == ImageStatus.DONE)
        d["images_skipped"] = sum(1 for i in self.images if i.status == ImageStatus.UP_TO_DATE)
        d["images_failed"] = len(self.failed)
        d["images_cancelled"] = len(self.cancelled_images)
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


class PlanFeed:
    """Images planned while the executor already runs: a producer ``put``s them, then ``finish``es.

    The executor takes what has arrived between steps, so the first blob moves while later images are still
    being discovered, checked and resolved. ``failed`` (set by the producer) stops new steps under
    ``fail_fast``; ``close`` (by the executor, when it stops) tells the producer to stop producing.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._items: list[tuple[list[ImagePlan], dict[str, Step]]] = []
        self._finished = False
        self.closed = False
        self.failed = False
        #: called after every change (the executor waiting on its steps wakes up for new images at once)
        self.on_change: Callable[[], None] | None = None

    def _changed(self) -> None:
        self._cond.notify_all()
        if self.on_change is not None:
            self.on_change()

    def put(self, images: list[ImagePlan], steps: dict[str, Step]) -> None:
        with self._cond:
            self._items.append((images, steps))
            self._changed()

    def fail(self) -> None:
        with self._cond:
            self.failed = True
            self._changed()

    def finish(self) -> None:
        with self._cond:
            self._finished = True
            self._changed()

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    @property
    def done(self) -> bool:
        with self._cond:
            return self._finished and not self._items

    def take(self) -> list[tuple[list[ImagePlan], dict[str, Step]]]:
        with self._cond:
            items, self._items = self._items, []
            return items

    def wait(self, timeout: float) -> None:
        with self._cond:
            if not self._items and not self._finished and not self.failed:
                self._cond.wait(timeout)


class _Ready:
    """Steps ready to run, in the order that ends a run soonest: manifests first (small, and each one brings an
    image closer to done), then blobs largest first, so the longest transfers never start last and make the
    tail; ties in arrival order."""

    def __init__(self, steps: dict[str, Step]) -> None:
        self._steps = steps
        self._heap: list[tuple[int, int, int, str]] = []
        self._seq = 0

    def append(self, sid: str) -> None:
        step = self._steps[sid]
        self._seq += 1
        key = (1, -step.size) if isinstance(step, BlobStep) else (0, 0)
        heapq.heappush(self._heap, (*key, self._seq, sid))

    def popleft(self) -> str:
        return heapq.heappop(self._heap)[-1]

    def clear(self) -> None:
        self._heap.clear()

    def __bool__(self) -> bool:
        return bool(self._heap)


class Executor(Protocol):
    def run(self, plan: Plan, feed: PlanFeed | None = None) -> Report: ...


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

    def run(self, plan: Plan, feed: PlanFeed | None = None) -> Report:
        """Run ``plan``; with a ``feed``, also every image added to it until it is closed (a pipelined sync)."""
        started = time.monotonic()
        report = Report()
        outcomes: dict[str, ImageOutcome] = {}
        steps: dict[str, Step] = {}
        step_images: dict[str, list[str]] = {}
        remaining: dict[str, set[str]] = {}
        dependents: dict[str, list[str]] = {}
        open_steps: dict[str, set[str]] = {}
        ready = _Ready(steps)
        #: steps that ran and succeeded; steps that failed (or never ran because a dependency failed) -> error
        succeeded: set[str] = set()
        failed: dict[str, tuple[str, ImageStatus]] = {}
        lock = threading.Lock()
        aborted = threading.Event()

        def finish_image(out: ImageOutcome, status: ImageStatus, error: str = "") -> None:
            out.status = status
            out.error = error
            self.events.image_finished(out)
            if status == ImageStatus.FAILED and self.fail_fast:
                aborted.set()

        def add(images: list[ImagePlan], new_steps: dict[str, Step], fed: bool = True) -> None:
            for sid, step in new_steps.items():
                steps[sid] = step
            planned = getattr(self.events, "image_planned", None)  # optional: a display counting images
            for img in images:
                if planned is not None and fed:
                    planned(img, new_steps)
                out = ImageOutcome(img.id, img.source, img.destination, digest=img.dest_digest)
                outcomes[img.id] = out
                report.images.append(out)
                open_steps[img.id] = set()
                for sid in img.steps:
                    step_images.setdefault(sid, []).append(img.id)
                    if sid in failed:
                        if out.status == ImageStatus.PENDING:
                            finish_image(out, failed[sid][1], failed[sid][0])
                    elif sid not in succeeded:
                        open_steps[img.id].add(sid)
                if out.status != ImageStatus.PENDING:
                    continue
                if img.up_to_date:
                    finish_image(out, ImageStatus.UP_TO_DATE)
                elif not open_steps[img.id]:
                    finish_image(out, ImageStatus.DONE)
            for sid, step in new_steps.items():
                deps = {d for d in step.deps if d in steps and d not in succeeded}
                bad = next((d for d in deps if d in failed), None)
                remaining[sid] = deps
                for d in deps:
                    dependents.setdefault(d, []).append(sid)
                if bad is not None:
                    fail_step(sid, *failed[bad])
                elif not deps:
                    ready.append(sid)

        def finish_step(sid: str) -> None:
            for image_id in step_images.get(sid, []):
                open_steps[image_id].discard(sid)
                out = outcomes[image_id]
                if not open_steps[image_id] and out.status == ImageStatus.PENDING:
                    finish_image(out, ImageStatus.DONE)

        def fail_step(sid: str, error: str, status: ImageStatus = ImageStatus.FAILED) -> None:
            # the step and everything after it never run; its images fail
            stack = [sid]
            while stack:
                cur = stack.pop()
                if cur in failed or cur in succeeded:
                    continue
                failed[cur] = (error, status)
                remaining.pop(cur, None)
                stack.extend(dependents.get(cur, []))
                for image_id in step_images.get(cur, []):
                    out = outcomes[image_id]
                    open_steps[image_id].discard(cur)
                    if out.status == ImageStatus.PENDING:
                        finish_image(out, status, error)

        # each step reports to one queue as it ends: the loop below wakes once per finished step (or per change
        # of the feed), where waiting on the set of running futures cost time in proportion to their number
        finished: queue.SimpleQueue[tuple[str, BlobResult | None, BaseException | None] | None] = queue.SimpleQueue()

        def run_step(sid: str, step: Step) -> None:
            try:
                if self.ctx.cancel.is_set():
                    raise Cancelled("copy interrupted")
                self.events.step_started(step)
                if isinstance(step, BlobStep):
                    finished.put((sid, run_blob_step(self.ctx, step, deps_done=True), None))
                else:
                    run_manifest_step(self.ctx, step)
                    finished.put((sid, None, None))
            except BaseException as exc:  # reported to the loop, which fails the step's images
                finished.put((sid, None, exc))

        add(plan.images, plan.steps, fed=False)
        pool = ThreadPoolExecutor(max_workers=self.parallel, thread_name_prefix="ferry-step")
        running: dict[str, Future[None]] = {}
        if feed is not None:
            feed.on_change = lambda: finished.put(None)
        try:
            while True:
                if feed is not None:
                    for images, new_steps in feed.take():
                        with lock:
                            add(images, new_steps)
                    if feed.failed and self.fail_fast:
                        aborted.set()
                feeding = feed is not None and not feed.done
                if aborted.is_set():
                    ready.clear()
                    if not running:
                        break
                while ready and len(running) < self.parallel * 2 and not self.ctx.cancel.is_set():
                    sid = ready.popleft()
                    if sid in failed or sid in succeeded or sid in running:
                        continue
                    running[sid] = pool.submit(run_step, sid, steps[sid])
                if self.ctx.cancel.is_set() and not running:
                    break
                if not running:
                    if not feeding:
                        if not ready:
                            break
                        continue
                    assert feed is not None
                    feed.wait(0.5)
                    continue
                try:
                    reports = [finished.get(timeout=0.5)]
                except queue.Empty:
                    continue
                while True:
                    try:
                        reports.append(finished.get_nowait())
                    except queue.Empty:
                        break
                for reported in reports:
                    if reported is None:  # the feed changed
                        continue
                    sid, result, exc = reported
                    running.pop(sid, None)
                    step = steps[sid]
                    with lock:
                        if exc is not None:
                            log.debug("step %s failed", sid, exc_info=exc)
                            self.events.step_finished(step, None, exc)
                            cancelled = isinstance(exc, Cancelled)
                            fail_step(
                                sid, describe_error(exc), ImageStatus.CANCELLED if cancelled else ImageStatus.FAILED
                            )
                            continue
                        self._count(report, step, result)
                        self.events.step_finished(step, result, None)
                        succeeded.add(sid)
                        finish_step(sid)
                        for dep in dependents.get(sid, []):
                            deps = remaining.get(dep)
                            if deps is None:
                                continue
                            deps.discard(sid)
                            if not deps and dep not in failed and dep not in succeeded:
                                ready.append(dep)
        except KeyboardInterrupt:
            self.ctx.cancel.set()
            raise
        finally:
            if feed is not None:
                feed.on_change = None
                feed.close()
            if self.ctx.cancel.is_set():
                report.cancelled = True
                for fut in running.values():
                    fut.cancel()
                pool.shutdown(wait=True, cancel_futures=True)
                for outcome in report.images:
                    if outcome.status == ImageStatus.PENDING:
                        outcome.status = ImageStatus.CANCELLED
                        outcome.error = "interrupted"
            else:
                pool.shutdown(wait=True)
            if aborted.is_set():
                for outcome in report.images:
                    if outcome.status == ImageStatus.PENDING:
                        outcome.status = ImageStatus.CANCELLED
                        outcome.error = "not attempted: an earlier image failed"
            report.seconds = time.monotonic() - started
        return report

    @staticmethod
    def _count(report: Report, step: Step, result: BlobResult | None) -> None:
        if isinstance(step, ManifestStep):
            report.manifests_pushed += 1
            return
        assert result is not None
        if result.action == BlobAction.TRANSFERRED:
            report.blobs_transferred += 1
            report.bytes_transferred += result.bytes
        elif result.action == BlobAction.MOUNTED:
            report.blobs_mounted += 1
        else:
            report.blobs_skipped += 1
