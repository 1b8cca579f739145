#!/usr/bin/env bash
# The README's main command: on a fresh CPU machine, set up .venv, generate the bundled synthetic multi-image
# data, train a tiny VisualChat (MMCA) with tensor parallelism TP=2 on 2 CPU processes, save a checkpoint, export a
# chat checkpoint and answer one held-out multi-image conversation. A few minutes on 2 cores.
# The tiny LLM has no pretrained weights, so unlike the 7B-70B recipes it is trained too (--trainable ...,llm);
# the vision encoder stays frozen as in DS-VisualChat.
set -euo pipefail
cd "$(dirname "$0")/.."
./tools/setup_venv.sh
export OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore
OUT=${OUT:-runs/quickstart}
.venv/bin/torchrun --nproc-per-node 2 --master-port "${MASTER_PORT:-29510}" pretrain_vchat.py \
  --synthetic 2000 --data-cache-dir "$OUT/data" \
  --tensor-model-parallel-size 2 --micro-batch-size 16 --global-batch-size 32 --seq-length 256 \
  --train-iters "${TRAIN_ITERS:-500}" --lr 1e-3 --trainable projector,llm,embeddings \
  --eval-interval 100 --eval-iters 2 --log-interval 25 \
  --save "$OUT/checkpoints" --export-dir "$OUT/chat" "$@"
.venv/bin/python examples/answer_heldout.py --load "$OUT/chat" --eval-file "$OUT/data/synthetic-2000-seed1234/eval.jsonl"
echo "Chat with it: .venv/bin/megatron-visualchat chat --load $OUT/chat --image <png>"
