"""Typed outcomes: what an image, a blob step or a job is, in every executor and every record.

The values are the strings users see (``ferry job status``, ``--summary-json``) and that Redis records hold;
``StrEnum`` members compare equal to them and serialise as them, so a record read back from JSON parses with
``ImageStatus(text)``.
"""

from __future__ import annotations

from enum import StrEnum


class ImageStatus(StrEnum):
    PENDING = "pending"  # planned, not (yet) enqueued
    QUEUED = "queued"  # every task of the image is enqueued
    RUNNING = "running"
    DONE = "done"
    UP_TO_DATE = "up-to-date"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def ended(self) -> bool:
        return self in _IMAGE_ENDED

    @property
    def ok(self) -> bool:
        return self in (ImageStatus.DONE, ImageStatus.UP_TO_DATE)


_IMAGE_ENDED = frozenset({ImageStatus.DONE, ImageStatus.UP_TO_DATE, ImageStatus.FAILED, ImageStatus.CANCELLED})


class BlobStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    RETRYING = "retrying"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


class JobState(StrEnum):
    QUEUED = "queued"  # created; its tasks are being enqueued
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def ended(self) -> bool:
        return self in (JobState.DONE, JobState.FAILED, JobState.CANCELLED)


class BlobAction(StrEnum):
    TRANSFERRED = "transferred"
    MOUNTED = "mounted"
    SKIPPED = "skipped"  # already at the destination


__all__ = ["BlobAction", "BlobStatus", "ImageStatus", "JobState"]
