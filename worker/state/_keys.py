"""Redis key names, in one place (docs/operations.md lists them for operators)."""

from __future__ import annotations

PREFIX = "ferry:"
#: job records (plan, images, blobs) live this long after the job is created
JOB_TTL = 14 * 24 * 3600
#: a (registry, digest) location is forgotten after this long without being seen again
LOCATION_TTL = 30 * 24 * 3600


def job(job_id: str, suffix: str = "") -> str:
    return f"{PREFIX}job:{job_id}{suffix}"


JOBS = f"{PREFIX}jobs"
LIMITS = f"{PREFIX}limits"


def location(store: str, digest: str) -> str:
    return f"{PREFIX}loc:{store}:{digest}"


def lock(store: str, digest: str) -> str:
    return f"{PREFIX}lock:{store}:{digest}"


def backoff(host: str) -> str:
    return f"{PREFIX}backoff:{host}"


def slots(host: str) -> str:
    return f"{PREFIX}sem:{host}"


def rate(host: str) -> str:
    return f"{PREFIX}rate:{host}"


def consumers(queue: str) -> str:
    return f"{PREFIX}consumers:{queue}"
