#!/usr/bin/env bash
# The prepared GPU check (docs/benchmarks.md, "GPU suite"): install the package into a scratch site-packages
# without touching the machine's torch, run benchmarks/gpu_suite.py at the headline shapes, and leave the markdown
# table, its JSON and the log in $OUT.
#
# The device machine reaches no package registry and its image lacks only megatron-core (torch, transformers,
# timm, sentencepiece, safetensors, pillow are there). Fetch the cp312 wheel here, once, into an ignored folder:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download megatron-core==0.16.1 --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_28_x86_64 -d .whl
# then run `bash tools/device_check.sh` there with `.whl` carried. Extra arguments go to gpu_suite.py (e.g.
# `--rows a --lengths 4096 8192` to rerun a part). WHEELS (default .whl), OUT (default runs/device_check),
# SUITE_TIMEOUT (seconds, default 540) and PYTHON (default python3) override the defaults.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/device_check}
WHEELS=${WHEELS:-.whl}
PYTHON=${PYTHON:-python3}
SITE=$(mktemp -d)
mkdir -p "$OUT"

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$PYTHON" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__,
                                        "cuda", torch.version.cuda)'
} 2>&1 | tee "$OUT/environment.txt"

if compgen -G "$WHEELS/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$WHEELS"/*.whl \
        || exit 1
fi
"$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target "$SITE" . || exit 1
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$PYTHON" -c 'import megatron.core, megatron_visualchat; print("megatron-core", megatron.core.__version__)' \
    | tee -a "$OUT/environment.txt" || exit 1

# The suite rewrites its JSON after every row, so a run stopped by the timeout keeps the rows it finished.
timeout "${SUITE_TIMEOUT:-540}" "$PYTHON" benchmarks/gpu_suite.py --json "$OUT/gpu_suite.json" "$@" \
    2> >(tee "$OUT/gpu_suite.log" >&2) | tee "$OUT/gpu_suite.md"
status=${PIPESTATUS[0]}
echo "gpu_suite exit status $status (124: stopped by the ${SUITE_TIMEOUT:-540} s timeout)"
exit "$status"
