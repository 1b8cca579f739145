#!/usr/bin/env bash
# README's draw demo (JAM-style images as tokens, tiny, CPU): train the tiny VQ-VAE image tokenizer, a text model
# on text-only conversations, then an image-code model continued from it on "draw a <colour> <shape>" -> codes;
# fuse the two (JAM-Uniform, vocabularies merged: the text model has no image tokens), fine-tune the fused model
# briefly on both, and let it draw held-out requests. Ends with how often the drawn picture's dominant colour is the
# requested one, against always drawing the most requested colour; and the text questions' exact-match score.
# Each finished step is kept (rerunning skips it); rm -rf $OUT to start over. Knobs: OUT, DRAW_SAMPLES, NUM_EVAL,
# VQ_STEPS, TEXT_ITERS, IMAGE_ITERS, TUNE_ITERS. Extra arguments go to every pretrain_vchat.py run.
set -euo pipefail
cd "$(dirname "$0")/.."
./tools/setup_venv.sh
export OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore
OUT=${OUT:-runs/draw}
DATA="$OUT/data"
PY=.venv/bin/python
MV=.venv/bin/megatron-visualchat
mkdir -p "$OUT"
done_() { [ -f "$1" ]; }  # a step's last output exists: it finished
# the single-process runs (one after another) meet on a free port, not torch's default 29500
export MASTER_ADDR=127.0.0.1 MASTER_PORT=${MASTER_PORT:-$($PY -c \
  'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}

done_ "$DATA/tokenizer/added_tokens.json" || $PY -m megatron_visualchat.data.synthetic_drawing --out "$DATA" \
  --num-samples "${DRAW_SAMPLES:-2000}" --num-eval "${NUM_EVAL:-40}" --seed 1

# 1. the image tokenizer (16 px images, 16 codes each, codebook 32) trains on one core while the text model trains
#    on the other
VQ_PID=
if ! done_ "$OUT/vq/model.safetensors"; then
  $MV train-image-tokenizer --out "$OUT/vq" --image-size 16 --codebook-size 32 --steps "${VQ_STEPS:-2000}" \
    > "$OUT/vq.log" 2>&1 &
  VQ_PID=$!
fi
VQ="tiny_vqvae:$OUT/vq"

train() {  # NAME ITERS FLAGS...: one tiny single-process run (causal attention: no input images here)
  local name=$1 iters=$2
  shift 2
  echo "== training $name ($iters steps, log: $OUT/$name.log)"
  $PY pretrain_vchat.py --attention-mode causal --trainable llm,embeddings --seq-length 96 \
    --micro-batch-size 16 --global-batch-size 16 --lr 5e-3 --train-iters "$iters" --log-interval 50 \
    --no-progress-bar --data-cache-dir "$OUT/cache" --export-dir "$OUT/$name/chat" "$@" "${EXTRA[@]}" \
    > "$OUT/$name.log" 2>&1 || { tail -20 "$OUT/$name.log"; exit 1; }
  grep '^iter' "$OUT/$name.log" | sed -n '1p;$p'
}

to_fuse_input() {  # NAME: its chat checkpoint's LLM (and tokenizer) as a converted Megatron checkpoint
  done_ "$OUT/$1/mg/latest_checkpointed_iteration.txt" ||
    $MV chat-to-megatron --load "$OUT/$1/chat" --out "$OUT/$1/mg" --force > /dev/null
}

EXTRA=("$@")
# 2. the text model: LLaMA-architecture tiny preset, text conversations only, no image vocabulary
done_ "$OUT/text/chat/SHA256SUMS" || train text "${TEXT_ITERS:-150}" --tokenizer-dir "$DATA/tokenizer" \
  --data "jsonl:$DATA/text.jsonl"
to_fuse_input text

# 3. the image-code model: the text model continued on drawing requests, answers written as <boi> codes <eoi>
[ -z "$VQ_PID" ] || wait "$VQ_PID" || { cat "$OUT/vq.log"; exit 1; }
tail -1 "$OUT/vq.log"
done_ "$OUT/image/chat/SHA256SUMS" || train image "${IMAGE_ITERS:-400}" --tokenizer-dir "$DATA/tokenizer" \
  --image-tokenizer "$VQ" --model-preset from-llm-load --llm-load "$OUT/text/mg" \
  --data "jsonl_images_out:$DATA/draw.jsonl"
to_fuse_input image

# 4. JAM-Uniform: every weight the mean of the parents'; the merged vocabulary gains the image tokens of the image model
done_ "$OUT/fused/latest_checkpointed_iteration.txt" || $MV fuse --method uniform --alpha 0.5 \
  --model-a "$OUT/text/mg" --model-b "$OUT/image/mg" --out "$OUT/fused" --dtype fp32

# 5. brief fine-tuning of the fused model on both kinds of data (3 drawing requests to 1 text conversation)
done_ "$OUT/tuned/chat/SHA256SUMS" || train tuned "${TUNE_ITERS:-200}" --tokenizer-dir "$OUT/fused/chat_tokenizer" \
  --image-tokenizer "$VQ" --model-preset from-llm-load --llm-load "$OUT/fused" \
  --data "jsonl_images_out:$DATA/draw.jsonl:3" --data "jsonl:$DATA/text.jsonl:1"

# 6. draw the held-out requests (the image model alone, then the fused one), answer held-out text questions, score
for name in image tuned; do
  $MV eval-replay --load "$OUT/$name/chat" --image-tokenizer "$VQ" --data "$DATA/eval_draw.json" \
    --out-dir "$OUT/eval_draw_$name" --max-new-tokens 32 > "$OUT/eval_draw_$name.log"
  echo -n "$name model: "
  $PY -m megatron_visualchat.data.synthetic_drawing report --data "$DATA" --results "$OUT/eval_draw_$name/results.jsonl"
done
$MV eval-replay --load "$OUT/tuned/chat" --image-tokenizer "$VQ" --data "$DATA/eval_text.json" \
  --out-dir "$OUT/eval_text" --max-new-tokens 32 > "$OUT/eval_text.log"
grep exact_match "$OUT/eval_text/summary.md" |
  awk -F'|' '{printf "tuned model, held-out text questions: %s%% exact match\n", $5}'
echo "Drawings: $OUT/eval_draw_tuned/images/. Ask it yourself: $MV chat --load $OUT/tuned/chat --image-tokenizer $VQ"
