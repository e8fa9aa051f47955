"""Run the real ``ferry`` CLI (the one next to this interpreter) in a subprocess, and check its error line.

Every run gets a private cache directory and an auth file that does not exist, so nothing from the machine
running the tests leaks in.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

__all__ = ["FERRY", "assert_one_error", "run_ferry"]

FERRY = str(Path(sys.executable).with_name("ferry"))


def run_ferry(
    *args: str, tmp_path: Path, stdin: str | None = None, timeout: float = 90
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "FERRY_QUEUE"}
    env.update(FERRY_CACHE_DIR=str(tmp_path / "ferry-cache"), REGISTRY_AUTH_FILE=str(tmp_path / "no-auth.json"))
    return subprocess.run(
        [FERRY, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
    )


def assert_one_error(proc: subprocess.CompletedProcess[str], *needles: str, code: int = 1) -> str:
    """Exit ``code``, exactly one ``Error: ...`` line holding every needle, no traceback, no internal error."""
    assert proc.returncode == code, f"expected exit {code}, got {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    lines = [line for line in proc.stderr.splitlines() if line.startswith("Error")]
    assert len(lines) == 1 and lines[0].startswith("Error: "), proc.stderr
    assert "internal error" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]
