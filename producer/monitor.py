"""Watching distributed jobs: ``ferry job status --watch`` (a live terminal view, or JSON lines) and
``ferry exporter`` (Prometheus metrics). Both read what workers record in Redis (``worker.telemetry``)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import deque
from typing import Any

from worker.engine.status import ImageStatus, JobState

from .progress import human_bytes

#: ``ferry exporter``'s port unless --port says otherwise
DEFAULT_EXPORTER_PORT = 9808
#: seconds of samples the live view's rate is measured over
RATE_WINDOW = 10.0


def human_duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    seconds = round(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class RateWindow:
    """The byte rate over the last ``RATE_WINDOW`` seconds of samples (the live view's rate and ETA)."""

    def __init__(self, window: float = RATE_WINDOW) -> None:
        self.window = window
        self.samples: deque[tuple[float, float]] = deque()

    def add(self, when: float, moved: float) -> float | None:
        self.samples.append((when, moved))
        while len(self.samples) > 2 and when - self.samples[0][0] > self.window:
            self.samples.popleft()
        (t0, b0), (t1, b1) = self.samples[0], self.samples[-1]
        return (b1 - b0) / (t1 - t0) if t1 > t0 else None


def image_counts(summary: dict[str, Any]) -> dict[str, int]:
    statuses = [ImageStatus(i["status"]) for i in summary["images"]]
    return {
        "done": sum(1 for s in statuses if s.ok),
        "failed": sum(1 for s in statuses if s == ImageStatus.FAILED),
        "cancelled": sum(1 for s in statuses if s == ImageStatus.CANCELLED),
        "running": sum(1 for s in statuses if s == ImageStatus.RUNNING),
        "pending": sum(1 for s in statuses if s in (ImageStatus.PENDING, ImageStatus.QUEUED)),
    }


def headline(summary: dict[str, Any]) -> str:
    """State and images: the live view's first line."""
    c = image_counts(summary)
    return (
        f"job {summary['id']} {summary['state']}: images {c['done']}/{summary['images_total']} done,"
        f" {c['running']} in progress, {c['pending']} waiting, {c['failed']} failed, {c['cancelled']} cancelled"
    )


def bytes_line(summary: dict[str, Any], rate: float | None = None) -> str:
    """Bytes done of the total, in flight, the rate and the ETA (``rate``: the caller's recent rate, else the
    average since the job's first byte)."""
    rate = summary["rate_bytes_per_second"] if rate is None else rate
    remaining = max(summary["bytes_total"] - summary["bytes_done"], 0)
    eta = (remaining / rate if rate else None) if remaining else 0.0
    return (
        f"{human_bytes(summary['bytes_done'])} of {human_bytes(summary['bytes_total'])}"
        f" ({human_bytes(summary['bytes_in_flight'])} in flight), {human_bytes(rate)}/s, ETA {human_duration(eta)}"
    )


def render(summary: dict[str, Any], rate: float | None) -> Any:
    """The live view: a headline, an overall bar, then one row per transfer running now."""
    from rich.console import Group
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    total = summary["bytes_total"] or 1
    table = Table(box=None, pad_edge=False, expand=False)
    for col in ("blob", "worker", "destination", "progress", "", "rate"):
        table.add_column(col, no_wrap=True)
    now = time.time()
    for t in summary["transfers"]:
        elapsed = now - t["started"]
        table.add_row(
            t["digest"].split(":", 1)[-1][:12],
            t["worker"],
            t["destination_registry"],
            ProgressBar(total=t["size"] or 1, completed=t["bytes"], width=24),
            f"{human_bytes(t['bytes'])} / {human_bytes(t['size'])}",
            f"{human_bytes(t['bytes'] / elapsed if elapsed > 0 else 0)}/s",
        )
    overall = Table.grid(padding=(0, 1))
    bar = ProgressBar(total=total, completed=min(summary["bytes_done"], total), width=40)
    overall.add_row(bar, bytes_line(summary, rate))
    parts: list[Any] = [Text(headline(summary), style="bold"), overall]
    if summary["transfers"]:
        parts.append(table)
    else:
        parts.append(Text("no transfer running", style="dim"))
    for img in summary["images"]:
        if ImageStatus(img["status"]) in (ImageStatus.FAILED, ImageStatus.CANCELLED):
            parts.append(Text(f"{img['status']} {img['destination']}: {img.get('error', '')}", style="red"))
    return Group(*parts)


def watch(state: Any, job_id: str, *, as_json: bool, poll: float = 1.0) -> int:
    """Follow a job until it ends: a live view on a terminal, JSON lines with ``--json``, else a line per poll."""
    from .distributed import exit_code, job_summary

    rates = RateWindow()
    live: Any = None
    if not as_json and sys.stdout.isatty():
        from rich.live import Live

        live = Live(refresh_per_second=4, transient=False)
        live.start()
    try:
        while True:
            summary = job_summary(state, job_id)
            rate = rates.add(time.time(), summary["bytes_moved"])
            if as_json:
                print(json.dumps({k: v for k, v in summary.items() if k != "images"}), flush=True)
            elif live is not None:
                live.update(render(summary, rate))
            else:
                print(f"{headline(summary)}; {bytes_line(summary, rate)}", flush=True)
            if JobState(summary["state"]).ended:
                break
            time.sleep(poll)
    except KeyboardInterrupt:
        return 130
    finally:
        if live is not None:
            live.stop()
    return exit_code(JobState(summary["state"]))


def exporter(args: argparse.Namespace) -> int:
    from worker.celery_app import BLOB_QUEUE, META_QUEUE
    from worker.exporter import serve

    from .distributed import _queue_arg, _state

    state = _state(_queue_arg(args))
    print(f"serving Ferry metrics on http://{args.address}:{args.port}/metrics", file=sys.stderr, flush=True)
    try:
        serve(state.r, (BLOB_QUEUE, META_QUEUE), args.address, args.port)
    except KeyboardInterrupt:
        return 0
    return 0


__all__ = ["RateWindow", "bytes_line", "exporter", "headline", "human_duration", "image_counts", "render", "watch"]
