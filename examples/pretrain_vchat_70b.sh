#!/usr/bin/env bash
# LLaMA-2-70B (80 layers, 64 heads, 8 query groups): TP=8 within a node (NVLink; TP may not exceed the 8 query
# groups), PP=4 across nodes (140 GB of bf16 weights / 8 = 17.5 GB per GPU at PP=1 leaves too little room for
# 4K-token activations; PP=4 -> ~4.4 GB of weights per GPU). The first stage also runs the vision encoder, so it
# gets fewer decoder layers (--pipeline-layers 17,21,21,21). 4 nodes x 8 GPUs = 32 GPUs, DP=1; scale DP with nodes.
# Launch one torchrun per node (see examples/slurm/pretrain_vchat_70b.sbatch for SLURM), e.g. on each node:
#   NNODES=4 NODE_RANK=<0..3> MASTER_ADDR=<node0> examples/pretrain_vchat_70b.sh
# Dry run first (flags, paths, data, parameters per rank; one CPU process): TORCHRUN=examples/torchrun_dry_run.py
# --sequence-parallel (as Megatron-LM's LLaMA recipes): norms and residuals hold sequence shards, so activations
# outside attention/MLP shrink by TP at no extra communication (TP's all-reduces become reduce-scatter + all-gather).
# Context parallelism: CP=2 NNODES=8 splits each sequence over 2 ranks (half the activations per GPU, one K/V
# all-gather per layer); --seq-length must be a multiple of 2 x CP.
set -euo pipefail
: "${LLM_CKPT:?converted LLaMA-2-70B (TP=8, PP=4, --pp-layers 17,21,21,21) directory}" "${TOKENIZER:?tokenizer dir}"
: "${VISION_WEIGHTS:?encoder weights}" "${DATA:?e.g. llava:/data/llava_instruct_150k.json}"
"${TORCHRUN:-torchrun}" --nnodes "${NNODES:-4}" --node-rank "${NODE_RANK:-0}" --nproc-per-node "${NPROC:-8}" \
  --master-addr "${MASTER_ADDR:-127.0.0.1}" --master-port "${MASTER_PORT:-29500}" \
  "$(dirname "$0")/../pretrain_vchat.py" \
  --model-preset llama2-70b --llm-load "$LLM_CKPT" --tokenizer-dir "$TOKENIZER" \
  --vision-encoder qwen-vl-vit-bigg-14-448 --vision-weights "$VISION_WEIGHTS" --projector linear \
  --attention-mode mmca --modality-split none --trainable projector,embeddings \
  --tensor-model-parallel-size 8 --sequence-parallel --pipeline-model-parallel-size 4 --pipeline-layers 17,21,21,21 \
  --context-parallel-size "${CP:-1}" \
  --use-distributed-optimizer --recompute-granularity full --recompute-method uniform --recompute-num-layers 1 \
  --micro-batch-size 1 --global-batch-size 128 --seq-length 4096 --train-epochs 6 \
  --lr 1e-3 --lr-warmup-fraction 0.1 --lr-decay-style cosine --adam-beta2 0.95 --clip-grad 1.0 --bf16 \
  --data "$DATA" --max-images 8 --num-workers 4 \
  --save "${SAVE:-runs/vchat-70b}" --save-interval 200 --eval-interval 200 --tensorboard-dir "${SAVE:-runs/vchat-70b}/tb" \
  "$@"
