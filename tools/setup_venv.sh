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
# The browser test (tests/inference/test_server_browser.py) drives Debian's chromium: installed once, as root.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        chromium chromium-driver >/dev/null; } || echo "warning: could not install chromium chromium-driver" >&2
  else
    echo "note: the browser test needs chromium and chromium-driver (apt-get install chromium chromium-driver)" >&2
  fi
fi
