"""megatron-core DDP + (distributed) optimizer over trainable parameters only, and the LR schedule."""

from __future__ import annotations

import math

import torch


def wrap_model(chunks: list, *, use_distributed_optimizer: bool, fp16: bool, bf16: bool) -> list:
    """Float16Module for bf16/fp16 (megatron casts inputs/outputs at the pipeline ends), then megatron-core DDP,
    which only buckets parameters with requires_grad (the frozen LLM never enters a buffer)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.module import Float16Module

    wrapped = []
    for chunk in chunks:
        config = chunk.config
        if fp16 or bf16:
            chunk = Float16Module(config, chunk)
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                   use_distributed_optimizer=use_distributed_optimizer)
        wrapped.append(DistributedDataParallel(config, ddp_config, chunk))
    return wrapped


def build_optimizer(chunks: list, args):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = OptimizerConfig(
        optimizer="adam", lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
        clip_grad=args.clip_grad, bf16=args.bf16, fp16=args.fp16,
        params_dtype=torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32,
        loss_scale=None, initial_loss_scale=args.initial_loss_scale,
        use_distributed_optimizer=args.use_distributed_optimizer,
    )
    return get_megatron_optimizer(config, chunks)


def build_scheduler(optimizer, args, train_iters: int):
    """Cosine (or linear/constant) decay with linear warmup over ``lr_warmup_fraction`` of training; steps are
    counted in samples like Megatron-LM, so resuming at another DP size keeps the schedule."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    total = train_iters * args.global_batch_size
    warmup = int(math.floor(args.lr_warmup_fraction * total))
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0 if warmup else args.lr, max_lr=args.lr, min_lr=args.min_lr,
        lr_warmup_steps=warmup, lr_decay_steps=total, lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay, end_wd=args.weight_decay, wd_incr_steps=total, wd_incr_style="constant",
    )
