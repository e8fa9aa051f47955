#!/usr/bin/env bash
# The test command: set up, then lint (ruff), types (mypy --strict) and the test suite (pytest).
# The tests start their own registries, token server and redis-server on free loopback ports.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# One command per line: under `set -e` a failure inside an `a && b` list does not stop the script.
echo "== ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "== mypy"
.venv/bin/mypy
echo "== pytest"
# --dist loadfile: a test file (and its module fixtures: worker processes, a Redis DB) stays in one process
exec .venv/bin/pytest -n "${FERRY_TEST_WORKERS:-2}" --dist loadfile -q -p no:cacheprovider "$@"
