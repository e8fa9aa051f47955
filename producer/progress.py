"""Progress display for copy and sync: a live status block on a terminal, one line per image elsewhere, nothing
with -q."""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any, TextIO

from worker.engine.executor import ImageOutcome, Report
from worker.engine.plan import BlobStep, ImagePlan, Plan, Step
from worker.engine.status import ImageStatus
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

    def image_planned(self, image: ImagePlan, steps: dict[str, Step]) -> None:
        """An image planned while the run goes on (a pipelined sync), with the steps it added."""

    def image_finished(self, outcome: ImageOutcome) -> None:
        if self.quiet:
            return
        with self._lock:
            if outcome.status == ImageStatus.DONE:
                line = f"Copied {outcome.source} -> {outcome.destination} ({outcome.digest})"
            elif outcome.status == ImageStatus.UP_TO_DATE:
                line = f"Skipped {outcome.source} -> {outcome.destination}: already up to date ({outcome.digest})"
            elif outcome.status == ImageStatus.CANCELLED:
                line = f"Cancelled {outcome.source} -> {outcome.destination}: {outcome.error}"
            else:
                line = f"Failed {outcome.source} -> {outcome.destination}: {outcome.error}"
            print(line, file=self.out, flush=True)

    def stop(self) -> None:
        pass


class LiveProgress(LineProgress):
    """A terminal status block, redrawn a few times a second: what is in flight and how far the run is.

    Events only bump counters under a lock (a few additions per chunk), so a 1000-image sync costs the
    display almost nothing; a background thread redraws at most ``hz`` times a second with one write. Images
    are counted, not listed (failures are printed as lines, and the summary comes at the end); in-flight
    transfers show the largest few, each with its bytes so far.
    """

    #: transfers shown by name; the rest are counted
    SHOWN = 6

    def __init__(self, out: TextIO | None = None, *, hz: float = 4.0) -> None:
        super().__init__(out)
        self.interval = 1.0 / hz
        self._images_total = 0
        self._done = self._skipped = self._failed = self._cancelled = 0
        self._blobs = {"transferred": 0, "mounted": 0, "skipped": 0}
        self._bytes = 0
        self._flight: dict[str, list[int]] = {}  # digest -> [bytes so far, size]
        self._lines = 0
        self._started = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failures: list[str] = []

    def start(self, plan: Plan) -> None:
        with self._lock:
            self._images_total += len(plan.images)
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._loop, name="ferry-progress", daemon=True)
        self._thread.start()

    def image_planned(self, image: ImagePlan, steps: dict[str, Step]) -> None:
        with self._lock:
            self._images_total += 1

    def on_bytes(self, digest: str, n: int) -> None:
        with self._lock:
            self._bytes += n
            slot = self._flight.get(digest)
            if slot is not None:
                slot[0] += n

    def step_started(self, step: Step) -> None:
        if isinstance(step, BlobStep):
            with self._lock:
                self._flight.setdefault(str(step.digest), [0, step.size])

    def step_finished(self, step: Step, result: BlobResult | None, error: BaseException | None) -> None:
        if isinstance(step, BlobStep):
            with self._lock:
                self._flight.pop(str(step.digest), None)
                if result is not None:
                    self._blobs[result.action] = self._blobs.get(result.action, 0) + 1

    def image_finished(self, outcome: ImageOutcome) -> None:
        with self._lock:
            if outcome.status == ImageStatus.DONE:
                self._done += 1
            elif outcome.status == ImageStatus.UP_TO_DATE:
                self._skipped += 1
            elif outcome.status == ImageStatus.CANCELLED:
                self._cancelled += 1
                self._failures.append(f"Cancelled {outcome.source} -> {outcome.destination}: {outcome.error}")
            else:
                self._failed += 1
                self._failures.append(f"Failed {outcome.source} -> {outcome.destination}: {outcome.error}")

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._draw()

    def frame(self, width: int = 100) -> list[str]:
        """The status block as lines (also what tests look at)."""
        with self._lock:
            elapsed = max(time.monotonic() - self._started, 1e-6)
            ended = self._done + self._skipped + self._failed + self._cancelled
            total = max(self._images_total, ended)
            cancelled = f", {self._cancelled} cancelled" if self._cancelled else ""
            head = (
                f"images {ended}/{total}: {self._done} copied, {self._skipped} up to date, {self._failed} failed"
                f"{cancelled}"
                f" | blobs {self._blobs['transferred']} copied, {self._blobs['mounted']} mounted,"
                f" {self._blobs['skipped']} present | {human_bytes(self._bytes)}"
                f" at {human_bytes(self._bytes / elapsed)}/s"
            )
            flight = sorted(self._flight.items(), key=lambda kv: -kv[1][1])
            lines = [head[:width]]
            for digest, (got, size) in flight[: self.SHOWN]:
                share = got / size if size > 0 else 0.0
                bar = "#" * int(share * 20)
                lines.append(f"  {digest[7:19]} [{bar:<20}] {human_bytes(got)} / {human_bytes(size)}"[:width])
            if len(flight) > self.SHOWN:
                lines.append(f"  ... and {len(flight) - self.SHOWN} more in flight")
            failures, self._failures = self._failures, []
        return [*failures, "\x00", *lines]

    def _draw(self, final: bool = False) -> None:
        try:
            width = os.get_terminal_size(self.out.fileno()).columns - 1
        except (OSError, ValueError):
            width = 100
        frame = self.frame(width)
        cut = frame.index("\x00")
        permanent, block = frame[:cut], frame[cut + 1 :]
        # back to the top of the last block, clear it, print new permanent lines, then the block again
        text = (f"\x1b[{self._lines}F" if self._lines else "") + "\x1b[J"
        text += "".join(line + "\n" for line in permanent) + "".join(line + "\n" for line in block)
        self._lines = len(block)
        if final:
            self._lines = 0
        with self._lock:
            self.out.write(text)
            self.out.flush()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            self._draw(final=True)


def make_progress(quiet: bool, out: TextIO | None = None) -> LineProgress:
    stream = out or sys.stdout
    if not quiet and stream.isatty():
        return LiveProgress(stream)
    return LineProgress(stream, quiet=quiet)


def summary_line(report: Report) -> str:
    data: dict[str, Any] = report.to_json()
    parts = [
        f"{data['images_total']} image(s): {data['images_copied']} copied, {data['images_skipped']} up to date,"
        f" {data['images_failed']} failed"
        + (f", {data['images_cancelled']} cancelled" if data["images_cancelled"] else ""),
        f"blobs: {report.blobs_transferred} transferred, {report.blobs_mounted} mounted,"
        f" {report.blobs_skipped} already present",
        f"{human_bytes(report.bytes_transferred)} in {report.seconds:.1f}s",
    ]
    return "; ".join(parts)
