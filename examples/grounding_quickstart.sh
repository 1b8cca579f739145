#!/usr/bin/env bash
# README's grounding quickstart: InfMLLM's three stages (examples/recipes/infmllm_3stage.yaml, profile tiny) on CPU,
# on the bundled synthetic sets: align on shape questions, then multitask with referring expressions (REC: find the
# box of "the small red circle left of the blue square", REG: name a boxed shape), then conversations. Each stage
# starts from the weights of the ones before; one command runs them all and resumes a broken run stage by stage.
# Boxes are written as `pixel` text of the tiny encoder's 32 px frame ("[4,4,13,13]": 11 tokens, against 25 for
# norm3), which the tiny model learns better. Ends with held-out REC accuracy@0.5 against a model that always
# answers the mean training box.
# Extra arguments go to `megatron-visualchat recipe` (e.g. --set iters=50, --dry-run).
set -euo pipefail
cd "$(dirname "$0")/.."
./tools/setup_venv.sh
export OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore
OUT=${OUT:-runs/grounding}
GROUNDING="$OUT/data/grounding"
[ -f "$GROUNDING/eval_rec.json" ] || .venv/bin/python -m megatron_visualchat.data.synthetic_grounding \
  --out "$GROUNDING" --num-samples "${GROUNDING_SAMPLES:-2000}" --num-eval 100 --seed 1 --box-format pixel
.venv/bin/megatron-visualchat recipe examples/recipes/infmllm_3stage.yaml --profile tiny \
  --set run_dir="$OUT" --set grounding="$GROUNDING" "$@"
for arg in "$@"; do [ "$arg" != --dry-run ] || exit 0; done
.venv/bin/megatron-visualchat eval-replay --load "$OUT/chat" --data "$GROUNDING/eval_rec.json" \
  --image-root "$GROUNDING" --out-dir "$OUT/eval_rec" > "$OUT/eval_rec.log"
.venv/bin/python -m megatron_visualchat.inference.grounding_report --grounding "$GROUNDING" --results "$OUT/eval_rec/results.jsonl"
echo "Ask it yourself: .venv/bin/megatron-visualchat chat --load $OUT/chat --image $GROUNDING/images/eval-000000.png"
