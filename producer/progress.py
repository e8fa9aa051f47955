"""Progress display for copy and sync: rich bars on a terminal, one line per image elsewhere, nothing with -q."""

from __future__ import annotations

import sys
import threading
from typing import Any, TextIO

from worker.engine.executor import ImageOutcome, Report
from worker.engine.plan import BlobStep, Plan, Step
from worker.engine.steps import BlobResult


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


class LineProgress:
    """One line per finished image (not a terminal), or nothing (quiet)."""

    def __init__(self, out: TextIO | None = None, quiet: bool = False) -> None:
        self.out = out or sys.stdout
        self.quiet = quiet
        self._lock = threading.Lock()

    def start(self, plan: Plan) -> None:
        pass

    def on_bytes(self, digest: str, n: int) -> None:
        pass

    def step_started(self, step: Step) -> None:
        pass

    def step_finished(self, step: Step, result: BlobResult | None, error: BaseException | None) -> None:
        pass

    def image_finished(self, outcome: ImageOutcome) -> None:
        if self.quiet:
            return
        with self._lock:
            if outcome.status == "done":
                line = f"Copied {outcome.source} -> {outcome.destination} ({outcome.digest})"
            elif outcome.status == "up-to-date":
                line = f"Skipped {outcome.source} -> {outcome.destination}: already up to date ({outcome.digest})"
            else:
                line = f"Failed {outcome.source} -> {outcome.destination}: {outcome.error}"
            print(line, file=self.out, flush=True)

    def stop(self) -> None:
        pass


class RichProgress(LineProgress):
    """Live bars: overall bytes and one bar per blob in flight."""

    def __init__(self, out: TextIO | None = None) -> None:
        super().__init__(out)
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TaskID,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self._console = Console(file=self.out)
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=self._console,
            transient=False,
        )
        self._tasks: dict[str, TaskID] = {}
        self._overall: TaskID | None = None

    def start(self, plan: Plan) -> None:
        total = sum(s.size for s in plan.blob_steps if not s.deps)
        self._overall = self._progress.add_task("[bold]total", total=total or 1)
        self._progress.start()

    def on_bytes(self, digest: str, n: int) -> None:
        task = self._tasks.get(digest)
        if task is not None:
            self._progress.advance(task, n)
        if self._overall is not None:
            self._progress.advance(self._overall, n)

    def step_started(self, step: Step) -> None:
        if isinstance(step, BlobStep) and step.digest not in self._tasks:
            short = step.digest.split(":", 1)[1][:12]
            self._tasks[step.digest] = self._progress.add_task(f"blob {short}", total=step.size or 1)

    def step_finished(self, step: Step, result: BlobResult | None, error: BaseException | None) -> None:
        if isinstance(step, BlobStep):
            task = self._tasks.get(step.digest)
            if task is not None:
                if result is not None and result.action != "transferred":
                    self._progress.update(task, description=f"blob {step.digest[7:19]} ({result.action})")
                    self._progress.update(task, completed=step.size)
                self._progress.remove_task(task) if result is not None and result.action == "skipped" else None

    def image_finished(self, outcome: ImageOutcome) -> None:
        with self._lock:
            if outcome.status == "done":
                self._console.print(f"[green]Copied[/] {outcome.source} -> {outcome.destination} ({outcome.digest})")
            elif outcome.status == "up-to-date":
                self._console.print(f"[cyan]Up to date[/] {outcome.destination} ({outcome.digest})")
            else:
                self._console.print(f"[red]Failed[/] {outcome.source} -> {outcome.destination}: {outcome.error}")

    def stop(self) -> None:
        self._progress.stop()


def make_progress(quiet: bool, out: TextIO | None = None) -> LineProgress:
    stream = out or sys.stdout
    if not quiet and stream.isatty():
        return RichProgress(stream)
    return LineProgress(stream, quiet=quiet)


def summary_line(report: Report) -> str:
    data: dict[str, Any] = report.to_json()
    parts = [
        f"{data['images_total']} image(s): {data['images_copied']} copied, {data['images_skipped']} up to date,"
        f" {data['images_failed']} failed",
        f"blobs: {report.blobs_transferred} transferred, {report.blobs_mounted} mounted,"
        f" {report.blobs_skipped} already present",
        f"{human_bytes(report.bytes_transferred)} in {report.seconds:.1f}s",
    ]
    return "; ".join(parts)
