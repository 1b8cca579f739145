#!/usr/bin/env bash
# The README's test command: sets up .venv (first run ~2 min), then runs the whole suite. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
./tools/setup_venv.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/python -m pytest "$@"
