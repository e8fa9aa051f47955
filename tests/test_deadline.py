"""``--command-timeout`` (producer/deadline.py) in this process: a running copy is cancelled through its hook, a
shielded commit is never cut, anything else is interrupted. The end-to-end cases are in test_faults.py."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator

import pytest

from producer import deadline
from worker.registry import TimedOut


@pytest.fixture(autouse=True)
def own_alarm() -> Iterator[None]:
    """pytest-timeout uses SIGALRM too: give it back its handler and what was left of its time."""
    handler = signal.getsignal(signal.SIGALRM)
    left = signal.getitimer(signal.ITIMER_REAL)
    yield
    deadline.disarm()
    signal.signal(signal.SIGALRM, handler)
    if left[0] > 0:
        signal.setitimer(signal.ITIMER_REAL, *left)


def test_interrupts_plain_work() -> None:
    deadline.arm(0.05, "50ms")
    with pytest.raises(TimedOut, match=r"^command timed out after 50ms \(--command-timeout\)$"):
        time.sleep(5)
    assert deadline.expired()


def test_cancels_a_running_copy_through_its_hook() -> None:
    cancel = threading.Event()
    deadline.arm(0.05, "50ms")
    with deadline.cancels(cancel.set):
        assert cancel.wait(5)  # the hook ran; nothing was raised here
    assert deadline.expired()


def test_never_cuts_a_shielded_commit() -> None:
    steps: list[str] = []
    deadline.arm(0.05, "50ms")
    with pytest.raises(TimedOut, match="after the destination was committed"), deadline.shielded():
        steps.append("rename 1")
        time.sleep(0.5)  # the deadline passes here
        steps.append("rename 2")
    assert steps == ["rename 1", "rename 2"]


def test_disarmed_in_time_nothing_happens() -> None:
    deadline.arm(0.2, "200ms")
    deadline.disarm()
    time.sleep(0.4)
    assert not deadline.expired()
