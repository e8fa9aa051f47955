"""``--command-timeout DURATION``: a bound on the whole command, as skopeo's global flag.

When the time is up (a ``SIGALRM`` in the main thread):

- a running copy (the embedded executor registered a hook with :func:`cancels`) is cancelled like a
  Ctrl-C: transfers stop, no tag or manifest is written for an image that is not complete, a local
  destination is not committed; the command then ends with ``Error: command timed out after …``;
- anything else (planning, inspect, list-tags, following a queued job) is interrupted at once with
  :class:`TimedOut`;
- a local destination's commit (:func:`shielded`) is never interrupted: it finishes, then the command
  ends with the timeout error;
- if winding down takes longer than ``FERRY_TIMEOUT_GRACE`` seconds (default 5; a transfer stuck in a
  read), the process prints the error and exits at once. Nothing is committed by then; temporary files
  of a local destination may be left beside it.

Exit code 1.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

from worker.registry import TimedOut

#: registered and run in the main thread only (the signal handler runs there): no lock, which the handler could
#: find held by the very code it interrupted
_hooks: list[Callable[[], None]] = []


class _State:
    text = ""
    expired = False
    #: how many shielded steps are running
    shield = 0
    #: the deadline passed inside a shielded step
    pending = False


_state = _State()


def _grace() -> float:
    return float(os.environ.get("FERRY_TIMEOUT_GRACE") or 5.0)


def arm(seconds: float, text: str) -> None:
    """Start the clock (``seconds`` <= 0: no bound). ``text`` is the duration as the user wrote it."""
    if seconds <= 0:
        return
    _state.text, _state.expired, _state.shield, _state.pending = text, False, 0, False
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)


def disarm() -> None:
    """Stop the clock and forget that it ran out."""
    signal.setitimer(signal.ITIMER_REAL, 0)
    _state.expired = _state.pending = False


def expired() -> bool:
    return _state.expired


def message() -> str:
    return f"command timed out after {_state.text} (--command-timeout)"


@contextmanager
def cancels(hook: Callable[[], None]) -> Iterator[None]:
    """While inside, the deadline calls ``hook`` (e.g. ``ctx.cancel.set``) instead of interrupting the main thread."""
    _hooks.append(hook)
    try:
        yield
    finally:
        _hooks.remove(hook)


@contextmanager
def shielded() -> Iterator[None]:
    """A step that must not be cut in the middle (a local commit); a deadline inside it strikes at its end."""
    _state.shield += 1
    try:
        yield
    finally:
        _state.shield -= 1
    if not _state.shield and _state.pending:
        _state.pending = False
        signal.setitimer(signal.ITIMER_REAL, _grace())  # the last word, if winding down hangs
        raise TimedOut(f"{message()}, after the destination was committed")


def exit_now(code: int) -> None:
    """Leave without waiting for threads still stuck in a transfer (they must not hold the exit)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _on_alarm(signum: int, frame: FrameType | None) -> None:
    if _state.shield:
        # never cut a commit in half: look again shortly
        _state.expired = _state.pending = True
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        return
    if not _state.expired or _state.pending:
        _state.expired, _state.pending = True, False
        signal.setitimer(signal.ITIMER_REAL, _grace())  # the last word, if winding down hangs
        hooks = list(_hooks)
        if hooks:
            for hook in hooks:
                hook()
            return
        raise TimedOut(message())
    print(f"Error: {message()}", file=sys.stderr)
    exit_now(1)


__all__ = ["arm", "cancels", "disarm", "exit_now", "expired", "message", "shielded"]
