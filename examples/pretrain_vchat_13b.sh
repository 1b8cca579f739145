#!/usr/bin/env bash
# DS-VisualChat recipe on LLaMA-2-13B, one node of 8 GPUs: TP=4 (40 heads split 4 ways; 13B bf16 weights + activations at 4K do not fit TP=2 comfortably), DP=2.
# Inputs: a converted base checkpoint (tools/convert_checkpoint.py hf-to-megatron --tp 4 --pp 1), the LLaMA-2
# tokenizer saved with VisualChatTokenizer.save, local CLIP/QWen-VL encoder weights, datasets.
# Dry run first (flags, paths, data, parameters per rank; one CPU process): TORCHRUN=examples/torchrun_dry_run.py
set -euo pipefail
: "${LLM_CKPT:?converted LLaMA-2-13B (TP=4) directory}" "${TOKENIZER:?tokenizer directory}"
: "${VISION_WEIGHTS:?encoder weights}" "${DATA:?e.g. llava:/data/llava_instruct_150k.json}"
NPROC=${NPROC:-8}
"${TORCHRUN:-torchrun}" --nproc-per-node "$NPROC" "$(dirname "$0")/../pretrain_vchat.py" \
  --model-preset llama2-13b --llm-load "$LLM_CKPT" --tokenizer-dir "$TOKENIZER" \
  --vision-encoder qwen-vl-vit-bigg-14-448 --vision-weights "$VISION_WEIGHTS" --projector linear \
  --attention-mode mmca --modality-split none --trainable projector,embeddings \
  --tensor-model-parallel-size 4 --pipeline-model-parallel-size 1 --sequence-parallel \
  --micro-batch-size 2 --global-batch-size 128 --seq-length 4096 --train-epochs 6 \
  --lr 1e-3 --lr-warmup-fraction 0.1 --lr-decay-style cosine --adam-beta2 0.95 --clip-grad 1.0 --bf16 \
  --data "$DATA" --max-images 8 --num-workers 4 \
  --save "${SAVE:-runs/vchat-13b}" --save-interval 500 --eval-interval 500 --tensorboard-dir "${SAVE:-runs/vchat-13b}/tb" \
  "$@"
