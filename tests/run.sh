#!/usr/bin/env bash
# The README's test command: creates .venv in the checkout (first run: ~2 min), installs the exact CPU pins and
# the package, then runs the whole suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ] || ! cmp -s requirements-cpu.txt .venv/.requirements-installed; then
  "$PY" -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check -r requirements-cpu.txt
  cp requirements-cpu.txt .venv/.requirements-installed
fi
.venv/bin/pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/python -m pytest "$@"
