"""Layering: the registry client and the copy engine never pull in Celery, Redis or Kombu.

Each check runs in a fresh interpreter, so modules other tests imported do not hide a violation.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = ("celery", "redis", "kombu", "billiard", "flower")

PROBE = """
import importlib, json, pkgutil, sys
for name in {modules!r}:
    module = importlib.import_module(name)
    if {walk!r} and hasattr(module, "__path__"):
        for info in pkgutil.walk_packages(module.__path__, module.__name__ + "."):
            importlib.import_module(info.name)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in {forbidden!r})
print(json.dumps({{"loaded": loaded, "modules": sorted(sys.modules)}}))
"""


def probe(*modules: str, walk: bool = False) -> dict[str, list[str]]:
    code = PROBE.format(modules=list(modules), walk=walk, forbidden=list(FORBIDDEN))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    result: dict[str, list[str]] = json.loads(proc.stdout)
    return result


def test_forbidden_packages_are_installed() -> None:
    """The checks below mean something only if the packages could be imported at all."""
    result = probe("celery", "redis", "kombu")
    assert {"celery", "redis", "kombu"} <= set(result["loaded"])


def test_registry_client_imports_no_celery_or_redis() -> None:
    result = probe("worker.registry")
    assert "worker.registry._client" in result["modules"]
    assert result["loaded"] == []


@pytest.mark.parametrize("package", ["worker.engine", "worker.registry"])
def test_package_and_all_submodules_import_no_celery_or_redis(package: str) -> None:
    result = probe(package, walk=True)
    assert any(m.startswith(package + ".") for m in result["modules"])
    assert result["loaded"] == [], f"{package} pulls in {result['loaded']}"


def test_read_verbs_import_no_celery_or_redis() -> None:
    """``ferry inspect`` and friends start without loading the distributed machinery."""
    result = probe("producer.cli", "producer.verbs")
    assert result["loaded"] == []


def test_engine_pipeline_imports_neither_the_cli_nor_celery() -> None:
    """The pipeline (discover ... verify) is the engine's: the CLI hands it an executor, never the other way."""
    result = probe("worker.engine.pipeline", "worker.engine", walk=True)
    assert "worker.engine.pipeline" in result["modules"]
    assert result["loaded"] == [], f"the engine pulls in {result['loaded']}"
    cli = [m for m in result["modules"] if m.split(".")[0] == "producer" or m == "worker.celery_executor"]
    assert cli == [], f"the engine pulls in {cli}"
