"""Megatron-style command-line flags for ``pretrain_vchat``, parsed once into a ``TrainingConfig``, and the
model config tree they describe."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from typing import Optional

from megatron_visualchat.argtypes import TRAINABLE_PARTS, int_list, name_list, trainable_parts
from megatron_visualchat.config import (
    ATTENTION_MODES, BACKENDS, COMBINES, IMAGE_ROWS, LLM_FROM_CHECKPOINT, LLM_PRESETS, LORA_TARGETS, MODALITY_SPLITS,
    AttentionConfig, ConfigError, FusionConfig, LLMConfig, LoraConfig, ParallelConfig, TrainableConfig, VisionConfig,
    VisualChatConfig,
)
from megatron_visualchat.data.boxes import BOX_OUTSIDE
from megatron_visualchat.model.image_tokenizer import parse_image_tokenizer_spec
from megatron_visualchat.training.run_config import TrainingConfig


def build_parser() -> argparse.ArgumentParser:
    """One argument group per ``TrainingConfig`` section (the group title is the section name)."""
    p = argparse.ArgumentParser(prog="pretrain_vchat", description="Train VisualChat (MMCA) on megatron-core.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dry-run", action="store_true",
                   help="check the flags, plan the data blend and build this layout's model on the meta device "
                        "(one process plays every rank); print per-rank parameter counts and exit")
    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--virtual-pipeline-model-parallel-size", type=int, default=None)
    g.add_argument("--pipeline-layers", type=int_list, default=None,
                   help="explicit decoder layers per pipeline stage, e.g. 18,22,20,20 (lighter first stage: it also "
                        "runs the vision encoder)")
    g.add_argument("--sequence-parallel", action="store_true",
                   help="megatron-core sequence parallelism: norms and residuals work on sequence shards over the "
                        "tensor-parallel ranks (activation memory / TP); needs TP >= 2 and --seq-length divisible "
                        "by TP; every batch is padded to --seq-length")
    g.add_argument("--context-parallel-size", type=int, default=1,
                   help="context parallelism: each rank of a CP group holds 2 of 2 x CP sequence chunks (megatron's "
                        "load-balanced split); MMCA all-gathers keys, values and token codes over the group. "
                        "--seq-length must be divisible by 2 x CP; every batch is padded to --seq-length")
    g.add_argument("--use-distributed-optimizer", action="store_true")
    g.add_argument("--overlap-grad-reduce", action="store_true",
                   help="megatron-core DDP: start each gradient bucket's all-reduce (reduce-scatter with the "
                        "distributed optimizer) during the backward pass of the last microbatch")
    g.add_argument("--overlap-param-gather", action="store_true",
                   help="distributed optimizer: all-gather the updated parameters bucket by bucket during the next "
                        "forward pass instead of at the end of the optimizer step (needs --use-distributed-optimizer)")
    g = p.add_argument_group("batch")
    g.add_argument("--micro-batch-size", type=int, default=1)
    g.add_argument("--global-batch-size", type=int, default=128)
    g.add_argument("--seq-length", type=int, default=4096)
    g.add_argument("--train-iters", type=int, default=None)
    g.add_argument("--train-epochs", type=float, default=None, help="alternative to --train-iters")
    g.add_argument("--seed", type=int, default=1234)
    g = p.add_argument_group("optimizer")
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-warmup-fraction", type=float, default=0.1)
    g.add_argument("--lr-decay-style", choices=["cosine", "linear", "constant"], default="cosine")
    g.add_argument("--override-opt-param-scheduler", action="store_true",
                   help="on resume, take lr/schedule/--train-iters from these flags instead of refusing a change")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.95)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g = p.add_argument_group("precision")
    prec = g.add_mutually_exclusive_group()
    prec.add_argument("--bf16", action="store_true")
    prec.add_argument("--fp16", action="store_true", help="with a dynamic loss scale")
    g.add_argument("--initial-loss-scale", type=float, default=2.0 ** 16)
    g = p.add_argument_group("recompute")
    g.add_argument("--recompute-granularity", choices=["full", "selective"], default=None)
    g.add_argument("--recompute-method", choices=["uniform", "block"], default=None)
    g.add_argument("--recompute-num-layers", type=int, default=None)
    g = p.add_argument_group("checkpoint")
    g.add_argument("--save", default=None, help="directory for trainable-only checkpoints")
    g.add_argument("--load", default=None, help="resume from this directory (defaults to --save when it holds one)")
    g.add_argument("--load-iteration", type=int, default=None,
                   help="resume from this iteration instead of the one latest_checkpointed_iteration.txt names")
    g.add_argument("--init-from", action="append", default=[],
                   help="start from the weights an earlier run saved (its --save directory; repeatable, later ones "
                        "win): every tensor of its latest checkpoint replaces the initial/--llm-load one, whatever "
                        "this run trains; optimizer, schedule and data position start fresh. Read again on resume "
                        "(this run's checkpoints hold only what it trains). How a recipe chains its stages")
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--exit-interval", type=int, default=None,
                   help="save (when --save is set) and stop when the iteration is a multiple of this")
    g.add_argument("--keep-last", type=int, default=3,
                   help="checkpoints of this run kept in --save (0: keep all)")
    g.add_argument("--export-dir", default=None,
                   help="after training, write a chat checkpoint (full weights merged over TP/PP, config, "
                        "tokenizer) for `megatron-visualchat chat --load DIR`; LoRA adapters are merged into the "
                        "weights")
    g.add_argument("--export-adapters", default=None,
                   help="after training, write the LoRA adapters unmerged (adapters.safetensors + "
                        "adapter_config.json, with the run's other trainable tensors) for `megatron-visualchat chat "
                        "--load BASE --adapters DIR` (docs/lora.md)")
    g = p.add_argument_group("metrics")
    g.add_argument("--eval-interval", type=int, default=None)
    g.add_argument("--eval-iters", type=int, default=4, help="global batches for the eval loss")
    g.add_argument("--eval-accuracy-iters", type=int, default=None,
                   help="global batches for the held-out answer accuracy (default: the whole eval set)")
    g.add_argument("--log-interval", type=int, default=1)
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--no-progress-bar", action="store_true")
    g = p.add_argument_group("model")
    g.add_argument("--model-preset", choices=[*sorted(LLM_PRESETS), LLM_FROM_CHECKPOINT], default="tiny",
                   help=f"the LLM architecture; {LLM_FROM_CHECKPOINT}: the one recorded in --llm-load (e.g. a fused "
                        "or imported checkpoint)")
    g.add_argument("--llm-load", default=None,
                   help="converted base LLM checkpoint (megatron-visualchat hf-to-megatron)")
    g.add_argument("--vision-encoder", default="tiny")
    g.add_argument("--vision-weights", default=None, help="local encoder weights (file or HF directory)")
    g.add_argument("--vision-encoder-options", type=json.loads, default={},
                   help='JSON EncoderOptions, e.g. LLaVA-1.5\'s {"feature_layer": -2, "drop_cls": true}')
    g.add_argument("--projector-weights", default=None,
                   help="start the projector from this safetensors file of its state dict (import-hf's "
                        "projector.safetensors) instead of a random one")
    g.add_argument("--projector", default="linear")
    g.add_argument("--projector-options", type=json.loads, default={}, help='JSON, e.g. {"pool_out": 16}')
    g.add_argument("--attention-mode", choices=ATTENTION_MODES, default="mmca")
    g.add_argument("--modality-split", choices=MODALITY_SPLITS, default="none")
    g.add_argument("--image-rows", choices=IMAGE_ROWS, default="self")
    g.add_argument("--combine", choices=COMBINES, default="sum")
    g.add_argument("--attention-backend", choices=BACKENDS, default="local")
    g.add_argument("--modality-norms", action="store_true",
                   help="per-modality input/pre-MLP norms (mPLUG-Owl2; with --attention-mode causal --modality-split "
                        "kv this is its modality-adaptive module)")
    g.add_argument("--cross-attention-interval", type=int, default=1,
                   help="--attention-mode cross: a gated cross-attention layer every K decoder layers (default 1)")
    g.add_argument("--trainable", type=trainable_parts, default=TrainableConfig(),
                   help="comma list of " + ",".join(sorted(TRAINABLE_PARTS)) + " or 'all' (default: projector, "
                        "image_projections)")
    g.add_argument("--lora-rank", type=int, default=0,
                   help="LoRA adapters of this rank on the decoder's --lora-targets (0: none); the weights they adapt "
                        "stay frozen unless --trainable llm (docs/lora.md)")
    g.add_argument("--lora-alpha", type=float, default=16.0, help="adapter scale alpha/rank (decoder and vision)")
    g.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the decoder adapters' input")
    g.add_argument("--lora-targets", type=name_list, default=LORA_TARGETS,
                   help="decoder linears to adapt, comma list of " + ",".join(LORA_TARGETS))
    g.add_argument("--vision-lora-rank", type=int, default=0,
                   help="LoRA adapters of this rank on the vision encoder's blocks (0: none)")
    g.add_argument("--vision-lora-targets", type=name_list, default=LORA_TARGETS,
                   help="vision block linears to adapt (timm attn.qkv, attn.proj, mlp.fc1, mlp.fc2), comma list of "
                        + ",".join(LORA_TARGETS))
    g = p.add_argument_group("data")
    g.add_argument("--data", action="append", default=[],
                   help="FORMAT:PATH[:WEIGHT[:NUM_SAMPLES[:CONCAT]]][:KEY=VALUE...] (e.g. objective=cm3), repeatable; "
                        "or a JSON list of dataset specs")
    g.add_argument("--eval-data", action="append", default=[], help="same syntax as --data")
    g.add_argument("--data-total-samples", type=int, default=None,
                   help="samples a weighted blend draws in total (default: --train-iters x --global-batch-size)")
    g.add_argument("--synthetic", type=int, default=None,
                   help="generate the bundled synthetic multi-image set with this many samples and train on it")
    g.add_argument("--data-cache-dir", default="runs/data", help="where generated data and tokenizers live")
    g.add_argument("--tokenizer-dir", default=None, help="VisualChatTokenizer directory (tokenizer.model + added)")
    g.add_argument("--template", default="dsvc")
    g.add_argument("--max-images", type=int, default=8)
    g.add_argument("--num-workers", type=int, default=0)
    g.add_argument("--pack", action="store_true",
                   help="pack whole samples, in data order, into bins of exactly --seq-length positions (sample_id "
                        "codes keep them apart); --micro-batch-size and --global-batch-size then count bins")
    g.add_argument("--strict-data", action="store_true",
                   help="stop at the first bad sample, naming the file and record, instead of skipping and counting")
    g.add_argument("--box-outside", choices=BOX_OUTSIDE, default="clip",
                   help="grounding data: a box the encoder's crop cuts is clipped to the image, or its record is "
                        "skipped and counted as box_outside (docs/grounding.md)")
    g.add_argument("--image-tokenizer", default=None,
                   help="NAME:DIR (e.g. tiny_vqvae:runs/vq): images as tokens; the vocabulary gains <boi>, <eoi>, its "
                        "codes and the CM3 sentinels, and jsonl_images_out answers write their images as codes "
                        "(docs/image_generation.md)")
    g.add_argument("--image-code-cache-dir", default=None,
                   help="where each output image's codes are kept, computed once (default: "
                        "<--data-cache-dir>/image_codes)")
    g.add_argument("--text-loss-weight", type=float, default=1.0,
                   help="loss weight of text targets (with --image-tokenizer); the loss is sum(w * loss) / sum(w)")
    g.add_argument("--image-code-loss-weight", type=float, default=1.0,
                   help="loss weight of image-code targets (with --image-tokenizer)")
    return p


def parse_args(argv=None) -> TrainingConfig:
    """Parse and check the flags that need no model or world size; the result is what training receives."""
    run = TrainingConfig.from_namespace(build_parser().parse_args(argv))
    batch, rec = run.batch, run.recompute
    if (batch.train_iters is None) == (batch.train_epochs is None):
        raise ConfigError("give exactly one of --train-iters and --train-epochs")
    if rec.recompute_granularity == "full" and (rec.recompute_method is None or rec.recompute_num_layers is None):
        raise ConfigError("--recompute-granularity full needs --recompute-method and --recompute-num-layers")
    if run.parallelism.overlap_param_gather and not run.parallelism.use_distributed_optimizer:
        raise ConfigError("--overlap-param-gather overlaps the distributed optimizer's parameter all-gather: give "
                          "--use-distributed-optimizer too")
    if not run.data.data and run.data.synthetic is None:
        raise ConfigError("no training data: give --data FORMAT:PATH (repeatable) or --synthetic N")
    if run.data.pack and batch.train_epochs is not None:
        raise ConfigError("--pack: the global batch counts bins, and the bins per epoch depend on the samples' "
                          "lengths, so --train-epochs cannot set the iterations: give --train-iters")
    _check_image_code_flags(run.data)
    return run


def _check_image_code_flags(data) -> None:
    """The images-as-tokens flags need --image-tokenizer (without it they would silently do nothing)."""
    weights = {"--text-loss-weight": data.text_loss_weight, "--image-code-loss-weight": data.image_code_loss_weight}
    if data.image_tokenizer is None:
        given = [f for f, v in (*weights.items(), ("--image-code-cache-dir", data.image_code_cache_dir))
                 if v not in (None, 1.0)]
        if given:
            raise ConfigError(f"{', '.join(given)}: used only with images as tokens; give --image-tokenizer NAME:DIR")
        return
    try:
        parse_image_tokenizer_spec(data.image_tokenizer)
    except ValueError as e:
        raise ConfigError(f"--image-tokenizer: {e}") from None
    for flag, value in weights.items():
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"{flag} {value} must be a finite number >= 0")
    if not any(weights.values()):
        raise ConfigError("--text-loss-weight and --image-code-loss-weight are both 0: nothing would be trained")


def parallel_config(run: TrainingConfig, world_size: int) -> ParallelConfig:
    par = run.parallelism
    return ParallelConfig.for_world(world_size, tp=par.tensor_model_parallel_size,
                                    pp=par.pipeline_model_parallel_size,
                                    vpp=par.virtual_pipeline_model_parallel_size, pp_layers=par.pipeline_layers,
                                    sequence_parallel=par.sequence_parallel, cp=par.context_parallel_size)


def _llm_architecture(m) -> tuple[LLMConfig, FusionConfig]:
    """The LLM and the model kind: a preset's, or what --llm-load records (a cross fusion: two towers)."""
    from megatron_visualchat.checkpoint.errors import CheckpointError
    from megatron_visualchat.checkpoint.fuse_cross import JamCrossRecord

    try:
        jam = JamCrossRecord.find(m.llm_load) if m.llm_load else None
    except CheckpointError as e:
        raise ConfigError(f"--llm-load {m.llm_load}: {e}") from None
    if m.model_preset != LLM_FROM_CHECKPOINT:
        if jam is not None:
            raise ConfigError(f"--llm-load {m.llm_load} is a cross fusion (two towers): train it with --model-preset "
                              f"{LLM_FROM_CHECKPOINT}")
        return LLM_PRESETS[m.model_preset], FusionConfig()
    if not m.llm_load:
        raise ConfigError(f"--model-preset {LLM_FROM_CHECKPOINT} reads the architecture of --llm-load: give --llm-load")
    if jam is not None:
        return jam.llm, jam.fusion
    from megatron_visualchat.checkpoint.legacy_format import ConversionRecord

    try:
        return ConversionRecord.load(m.llm_load).llm, FusionConfig()
    except CheckpointError as e:
        raise ConfigError(f"--llm-load {m.llm_load}: {e}") from None


def model_config(run: TrainingConfig, world_size: int, vocab_size: Optional[int] = None) -> VisualChatConfig:
    """The validated config tree for this run on ``world_size`` processes. ``vocab_size`` (the tokenizer's, with
    added tokens) enlarges the preset's vocabulary when larger."""
    m = run.model
    llm, fusion = _llm_architecture(m)
    if vocab_size is not None and vocab_size > llm.vocab_size:
        llm = dataclasses.replace(llm, vocab_size=vocab_size)
    cfg = VisualChatConfig(
        llm=llm,
        attention=AttentionConfig(mode=m.attention_mode, modality_split=m.modality_split, image_rows=m.image_rows,
                                  combine=m.combine, backend=m.attention_backend, modality_norms=m.modality_norms,
                                  cross_attention_interval=m.cross_attention_interval),
        vision=VisionConfig(encoder=m.vision_encoder, projector=m.projector, projector_options=m.projector_options,
                            encoder_weights=m.vision_weights, encoder_options=m.vision_encoder_options,
                            projector_weights=m.projector_weights),
        trainable=m.trainable,
        parallel=parallel_config(run, world_size),
        lora=LoraConfig(rank=m.lora_rank, alpha=m.lora_alpha, dropout=m.lora_dropout, targets=m.lora_targets,
                        vision_rank=m.vision_lora_rank, vision_targets=m.vision_lora_targets),
        fusion=fusion,
    )
    cfg.validate(world_size)
    if run.checkpoint.export_adapters and not cfg.lora.enabled:
        raise ConfigError("--export-adapters writes LoRA adapters: give --lora-rank and/or --vision-lora-rank")
    dp, batch = cfg.parallel.dp, run.batch
    if batch.global_batch_size % (batch.micro_batch_size * dp):
        raise ConfigError(f"--global-batch-size {batch.global_batch_size} is not divisible by micro-batch-size "
                          f"({batch.micro_batch_size}) x data-parallel size ({dp})")
    if m.trainable.new_token_rows_only and not m.trainable.llm and run.optimizer.weight_decay:
        raise ConfigError(f"--trainable new_token_rows_only masks the gradients of the other embedding rows, but "
                          f"--weight-decay {run.optimizer.weight_decay} would still shrink them: use --weight-decay 0")
    if batch.seq_length > llm.max_position_embeddings:
        raise ConfigError(f"--seq-length {batch.seq_length} exceeds the model's max_position_embeddings "
                          f"{llm.max_position_embeddings}")
    if cfg.parallel.sequence_parallel and batch.seq_length % cfg.parallel.tp:
        raise ConfigError(f"--sequence-parallel splits each sequence into {cfg.parallel.tp} equal shards (one per "
                          f"TP rank): --seq-length {batch.seq_length} must be a multiple of "
                          f"--tensor-model-parallel-size {cfg.parallel.tp}")
    cp_chunks = 2 * cfg.parallel.cp * (cfg.parallel.tp if cfg.parallel.sequence_parallel else 1)
    if cfg.parallel.cp > 1 and batch.seq_length % cp_chunks:
        raise ConfigError(f"--context-parallel-size {cfg.parallel.cp} cuts each sequence into 2 x CP equal chunks"
                          + (" (then TP shards under --sequence-parallel)" if cfg.parallel.sequence_parallel else "")
                          + f": --seq-length {batch.seq_length} must be a multiple of {cp_chunks}")
    return cfg
