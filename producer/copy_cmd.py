"""``copy`` (and later ``sync``): plan, then run on the embedded executor or a Celery queue."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any


def add_parsers(sub: Any, verb: Callable[..., argparse.ArgumentParser]) -> None:
    return None
