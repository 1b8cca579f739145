#!/usr/bin/env bash
# Create .venv in the checkout with the exact CPU pins (requirements-cpu.txt) and the package (editable).
# Re-running is cheap: the pins are reinstalled only when requirements-cpu.txt changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ] || ! cmp -s requirements-cpu.txt .venv/.requirements-installed; then
  "$PY" -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check -r requirements-cpu.txt
  cp requirements-cpu.txt .venv/.requirements-installed
fi
.venv/bin/pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
