"""The Celery executor: a plan becomes a job in Redis and one task per blob step plus one finalizer per image.

The embedded executor (``worker.engine.executor``) runs a plan on threads in one process; this one hands it to
``ferry worker`` processes on any number of machines. Both run the same plan and report per-image outcomes with
the same statuses (``worker.engine.status``).

Enqueueing is all-or-nothing per image: a stop request (the producer's SIGINT/SIGTERM handler sets ``stop``) is
honoured between images, never in the middle of one, and an image is marked ``enqueued`` only once all its tasks
are sent. Images left out end ``cancelled`` (so the job still ends); ``ferry job retry`` sends them, and also any
image whose producer died (SIGKILL) half-way (not marked ``enqueued``): tasks are idempotent, so sending an
image's tasks again is harmless.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from worker.engine.executor import ImageOutcome, PlanFeed, Report
from worker.engine.plan import BlobStep, ImagePlan, Plan
from worker.engine.status import BlobAction, BlobStatus, ImageStatus, JobState
from worker.registry import InvalidInput
from worker.state import ImageRecord, SharedState

#: images per enqueueing batch, at most (batches start at one image and double)
MAX_BATCH = 256
#: the reason given to images a stopped producer did not enqueue
NOT_ENQUEUED = "not enqueued: the producer was stopped (ferry job retry JOB enqueues it)"


@dataclass
class EnqueueResult:
    job_id: str
    enqueued: list[str] = field(default_factory=list)
    #: images not sent because the producer was asked to stop
    left_out: list[str] = field(default_factory=list)

    @property
    def interrupted(self) -> bool:
        return bool(self.left_out)


def check_plan(plan: Plan) -> None:
    """Refuse (``InvalidInput``) a plan workers cannot run: they run on other machines, so both sides must be
    registries."""
    for img in plan.images:
        for name in (img.source, img.destination):
            if not name.startswith("docker://"):
                raise InvalidInput(
                    f"{name}: with --queue both sides must be docker:// registries (workers run on other machines)"
                )


class CeleryExecutor:
    """The executor on workers, behind the embedded executor's interface (``executor.Executor``): ``run``
    makes a plan one job, waits for it to end, and reads it back as the same ``Report``
    (``job_report``), so the pipeline's after-run stages (``pipeline.finish_sync``) take either.

    The CLI uses the two halves apart: ``submit`` (make the job, send its tasks), then its own display of the
    job (``ferry ... --queue --wait``), because there Ctrl-C means "stop enqueueing" while tasks are sent and
    "stop following" after.
    """

    def __init__(
        self, state: SharedState, *, kind: str = "copy", options: dict[str, Any] | None = None, poll: float = 0.5
    ) -> None:
        self.state = state
        #: what ``run`` makes its jobs: their kind, and what workers need beyond the plan (never credentials)
        self.kind = kind
        self.options = dict(options or {})
        self.poll = poll

    def run(self, plan: Plan, feed: PlanFeed | None = None) -> Report:
        """Run ``plan`` on workers: one job, followed until it ends (every job ends: done, failed or cancelled),
        read back as a ``Report``.

        A job is made of the whole plan at once, so images cannot be fed to it while it runs (``feed``).
        """
        if feed is not None:
            raise InvalidInput("the Celery executor needs the whole plan first: a job is made of it")
        started = time.monotonic()
        job_id = self.submit(plan, self.kind, self.options).job_id
        while not self.state.jobs.glance(job_id)[0].ended:
            time.sleep(self.poll)
        report = job_report(job_summary(self.state, job_id))
        report.seconds = time.monotonic() - started
        return report

    def submit(
        self,
        plan: Plan,
        kind: str,
        options: dict[str, Any],
        stop: threading.Event | None = None,
        on_created: Callable[[str], None] | None = None,
    ) -> EnqueueResult:
        """Create the job (``on_created`` gets its id before any task is sent), then enqueue it image by image."""
        check_plan(plan)
        job_id = self.state.jobs.create(plan, kind, options)
        if on_created is not None:
            on_created(job_id)
        return self.enqueue(job_id, plan, plan.images, stop)

    def enqueue(
        self,
        job_id: str,
        plan: Plan,
        images: list[ImagePlan],
        stop: threading.Event | None = None,
        on_image: Callable[[ImagePlan], None] | None = None,
    ) -> EnqueueResult:
        """Send the tasks of ``images`` (blob steps already done are not sent again), in batches of images.

        A batch's messages go out in one pipeline, then one call marks its images enqueued (so an image is
        enqueued whole or not at all); a stop request is honoured between batches, which start at one image and
        double up to ``MAX_BATCH``. A blob step that depends on another step sent before it (the same blob into
        another repository or tag of the registry: a mount or nothing, once that step is done) is not sent but
        left waiting in Redis; the task of the step it waits for sends it when that step ends, whatever the end.
        """
        from worker.celery_app import BLOB_QUEUE, META_QUEUE, app
        from worker.task_labels import image_label
        from worker.tasks import copy_blob, finalize_image, waiting_entry

        jobs = self.state.jobs
        result = EnqueueResult(job_id)
        step_images = plan.step_images()
        # a signing job signs up-to-date images too: their finalizer does
        sign = "sign" in json.loads(jobs.options(job_id))
        todo = [img for img in images if img.has_work(sign=sign)]
        blob_ids = [sid for img in todo for sid in img.steps if isinstance(plan.steps[sid], BlobStep)]
        states = jobs.blob_states(job_id, sorted(set(blob_ids)))
        done = {sid for sid, s in states.items() if s.status == BlobStatus.DONE}
        waited_on = {d for sid in blob_ids for d in cast(BlobStep, plan.steps[sid]).deps}
        sent: set[str] = set()
        start, size = 0, 1
        seen_queues: set[str] = set()

        def declared(queue: str) -> dict[str, Any]:
            if queue in seen_queues:
                return {"declare": []}
            seen_queues.add(queue)
            return {}

        with app.producer_or_acquire() as producer:
            while start < len(todo):
                if stop is not None and stop.is_set():
                    result.left_out = [i.id for i in todo[start:]]
                    break
                batch = todo[start : start + size]
                start, size = start + len(batch), min(size * 2, MAX_BATCH)
                tasks: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
                waits: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
                flags: list[tuple[str, bool]] = []
                for img in batch:
                    mine = 0
                    for sid in img.steps:
                        step = plan.steps[sid]
                        if not isinstance(step, BlobStep) or sid in sent or sid in done:
                            continue
                        sent.add(sid)
                        mine += 1
                        # the step's own wire form: names and a digest as text, never bytes or credentials
                        args = (job_id, img.id, *step.to_message(), step_images.get(sid, [img.id]))
                        kwargs: dict[str, Any] = {"waited_on": True} if sid in waited_on else {}
                        # a layer (de/re)compressed on the way: the worker reads the source layer and transforms it
                        recompress = step.recompress_message()
                        if recompress is not None:
                            kwargs["recompress"] = recompress
                        after = next((d for d in step.deps if d in done), "")
                        dep = next((d for d in step.deps if d in sent), None)
                        if after:
                            tasks.append((args, {**kwargs, "after": after}))
                        elif dep is not None:
                            waits.append((dep, args, kwargs))
                        else:
                            tasks.append((args, kwargs))
                    # nothing of its own to copy (all done, or shared with an image sent before): finalize now
                    flags.append((img.id, not mine))
                entries = [(dep, waiting_entry(args, kw)) for dep, args, kw in waits]
                for n in jobs.defer(job_id, entries):
                    # the step it waits for has ended already
                    tasks.append(waits[n][1:])
                with producer.batch(max_size=2 * MAX_BATCH):
                    for args, kwargs in tasks:
                        # the queue is declared (bound to its exchange) by the first message only
                        copy_blob.apply_async(args, kwargs or None, producer=producer, **declared(BLOB_QUEUE))
                due = jobs.mark_enqueued_batch(job_id, flags)
                if due:
                    with producer.batch(max_size=2 * MAX_BATCH):
                        for image_id in due:
                            img_plan = next(i for i in batch if i.id == image_id)
                            label = image_label(job_id, img_plan.destination, image_id)
                            finalize_image.apply_async(
                                (job_id, image_id), producer=producer, argsrepr=label, **declared(META_QUEUE)
                            )
                for img in batch:
                    result.enqueued.append(img.id)
                    if on_image is not None:
                        on_image(img)
        for image_id in result.left_out:
            jobs.end_image(job_id, image_id, ImageStatus.CANCELLED, NOT_ENQUEUED)
        jobs.set_running(job_id)
        jobs.end_if_all_ended(job_id)
        return result

    def retry(self, job_id: str, stop: threading.Event | None = None) -> EnqueueResult:
        """Send again every image that has not ended well: failed, cancelled, pending, or cut half-way."""
        jobs = self.state.jobs
        plan = jobs.plan(job_id)
        records = jobs.images(job_id)

        def unfinished(rec: ImageRecord | None) -> bool:
            # ended badly, never enqueued, or cut half-way through enqueueing (tasks sent, but not all)
            return rec is not None and not rec.status.ok and (rec.status.ended or not rec.enqueued)

        again = [img for img in plan.images if unfinished(records.get(img.id))]
        if not again:
            return EnqueueResult(job_id)
        jobs.reset_for_retry(job_id, [img.id for img in again])
        return self.enqueue(job_id, plan, again, stop)


def job_report(summary: dict[str, Any]) -> Report:
    """A job summary (``job_summary``) as a ``Report``; a cancelled job is a cancelled run."""
    images = [
        ImageOutcome(
            i["id"], i["source"], i["destination"], ImageStatus(i["status"]), i.get("digest", ""), i.get("error", "")
        )
        for i in summary["images"]
    ]
    return Report(
        images=images,
        blobs_transferred=summary["blobs_transferred"],
        blobs_mounted=summary["blobs_mounted"],
        blobs_skipped=summary["blobs_skipped"],
        bytes_transferred=summary["bytes_transferred"],
        cancelled=summary["state"] == JobState.CANCELLED,
    )


def job_summary(state: SharedState, job_id: str) -> dict[str, Any]:
    """The job as ``ferry job status --json`` shows it (and ``--summary-json`` writes it), with its live
    progress: bytes in flight, rate, ETA, and the transfers running now with their workers (``worker.telemetry``).
    """
    from worker import telemetry

    jobs = state.jobs
    job = jobs.job(job_id)
    images = jobs.images(job_id)
    blobs = jobs.blobs(job_id)
    progress = telemetry.job_progress(state.r, job_id, {sid: b.to_json() for sid, b in blobs.items()})
    done = [b for b in blobs.values() if b.state.status == BlobStatus.DONE]
    ordered = sorted(images.values(), key=lambda i: (len(i.id), i.id))
    return {
        "id": job_id,
        "kind": job.kind,
        "state": job.state.value,
        "created": job.created,
        "finished": job.finished,
        "touched": job.touched,
        "blobs_total": len(blobs),
        "blobs_done": len(done),
        "blobs_running": sum(1 for b in blobs.values() if b.state.status == BlobStatus.RUNNING),
        "blobs_retrying": sum(1 for b in blobs.values() if b.state.status == BlobStatus.RETRYING),
        "blobs_transferred": sum(1 for b in done if b.state.action == BlobAction.TRANSFERRED),
        "blobs_mounted": sum(1 for b in done if b.state.action == BlobAction.MOUNTED),
        "blobs_skipped": sum(1 for b in done if b.state.action == BlobAction.SKIPPED),
        "bytes_total": sum(b.size for b in blobs.values()),
        "bytes_transferred": sum(b.state.bytes for b in done),
        "images_total": len(images),
        "images_done": sum(1 for i in images.values() if i.status.ok),
        "images_failed": sum(1 for i in images.values() if i.status == ImageStatus.FAILED),
        "images_cancelled": sum(1 for i in images.values() if i.status == ImageStatus.CANCELLED),
        "images": [i.to_json() for i in ordered],
        "failed": [
            {"source": i.source, "destination": i.destination, "error": i.error}
            for i in ordered
            if i.status == ImageStatus.FAILED
        ],
        "cancelled": [
            {"source": i.source, "destination": i.destination, "error": i.error}
            for i in ordered
            if i.status == ImageStatus.CANCELLED
        ],
        "ended": JobState(job.state).ended,
        **progress,
    }


__all__ = ["NOT_ENQUEUED", "CeleryExecutor", "EnqueueResult", "check_plan", "job_report", "job_summary"]
