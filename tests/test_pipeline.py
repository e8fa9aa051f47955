"""The pipeline's after-run stage takes either executor's outcome: an embedded ``Report`` or a finished job read
back as one (``celery_executor.job_report``). No network: the digest memo is the real SQLite cache in a temp dir.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from worker.celery_executor import job_report
from worker.engine.blobcache import SqliteBlobLocations
from worker.engine.executor import ImageOutcome, Report
from worker.engine.pipeline import SyncRun, finish_sync, remember
from worker.engine.plan import CopyOptions
from worker.engine.status import ImageStatus, JobState
from worker.engine.steps import EngineContext
from worker.engine.sync import CheckResult, Discovery, SyncRequest, _options_key

SRC_A, SRC_B = "docker://src.test/app:1", "docker://src.test/app:2"
D = "sha256:" + "a" * 64
WROTE_A, WROTE_B = "sha256:" + "b" * 64, "sha256:" + "c" * 64


def summary(state: JobState, statuses: list[ImageStatus]) -> dict[str, Any]:
    images = [
        {"id": f"i{n}", "source": src, "destination": src.replace("src", "dst"), "status": s.value, "digest": dig}
        for n, (src, s, dig) in enumerate(zip((SRC_A, SRC_B), statuses, (WROTE_A, WROTE_B), strict=True))
    ]
    images[-1]["error"] = "boom" if statuses[-1] == ImageStatus.FAILED else ""
    return {
        "state": state.value,
        "images": images,
        "blobs_transferred": 3,
        "blobs_mounted": 1,
        "blobs_skipped": 2,
        "bytes_transferred": 1234,
    }


def test_a_job_reads_back_as_the_report_an_embedded_run_gives() -> None:
    done = job_report(summary(JobState.DONE, [ImageStatus.DONE, ImageStatus.UP_TO_DATE]))
    assert done.ok and not done.cancelled
    assert [(i.source, i.status, i.digest) for i in done.images] == [
        (SRC_A, ImageStatus.DONE, WROTE_A),
        (SRC_B, ImageStatus.UP_TO_DATE, WROTE_B),
    ]
    assert (done.blobs_transferred, done.blobs_mounted, done.blobs_skipped, done.bytes_transferred) == (3, 1, 2, 1234)
    failed = job_report(summary(JobState.FAILED, [ImageStatus.DONE, ImageStatus.FAILED]))
    assert not failed.ok and [i.error for i in failed.failed] == ["boom"]
    # a job cancelled by `ferry job cancel` after its images ended is still a cancelled run: no --delete after it
    cancelled = job_report(summary(JobState.CANCELLED, [ImageStatus.DONE, ImageStatus.DONE]))
    assert cancelled.cancelled and not cancelled.ok


def test_after_the_run_digests_are_remembered_for_images_that_ended_well_on_either_executor(tmp_path: Path) -> None:
    options = CopyOptions()
    req = SyncRequest("docker", "src.test/app", "docker", "dst.test", options)
    checked = CheckResult(source_digests={SRC_A: D, SRC_B: D})
    run = SyncRun(req, Discovery(), checked)
    embedded = Report(
        images=[
            ImageOutcome("i1", SRC_A, "x", ImageStatus.DONE, WROTE_A),
            ImageOutcome("i2", SRC_B, "y", ImageStatus.FAILED, WROTE_B, "boom"),
        ]
    )
    queued = job_report(summary(JobState.FAILED, [ImageStatus.DONE, ImageStatus.FAILED]))
    key = _options_key(options)
    for n, report in enumerate((embedded, queued)):
        memo = SqliteBlobLocations(tmp_path / f"cache{n}.sqlite")
        ctx = EngineContext(locations=memo)
        images = [(i.source, i.status, i.digest) for i in report.images]
        cleanup = finish_sync(ctx, run, memo, images, delete=False, verify_after=False)
        assert cleanup.deleted == [] and cleanup.verified is None
        assert memo.memo_get(SRC_A, D, key) == WROTE_A
        assert memo.memo_get(SRC_B, D, key) is None  # a failed image is never remembered
        memo.close()
    remember(None, run, [(SRC_A, "done", WROTE_A)])  # no cache: nothing to do, no error
