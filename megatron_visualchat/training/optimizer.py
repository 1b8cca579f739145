"""megatron-core DDP + (distributed) optimizer over trainable parameters only, and the LR schedule."""

from __future__ import annotations

import math

from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.module import Float16Module

from megatron_visualchat.training.run_config import TrainingConfig


def wrap_model(chunks: list, *, use_distributed_optimizer: bool, fp16: bool, bf16: bool,
               overlap_grad_reduce: bool = False, overlap_param_gather: bool = False) -> list:
    """Float16Module for bf16/fp16 (megatron casts inputs/outputs at the pipeline ends), then megatron-core DDP,
    which only buckets parameters with requires_grad (the frozen LLM never enters a buffer). The overlap flags
    make DDP reduce gradients during backward and (distributed optimizer) gather parameters during the next
    forward; the schedules drive them through the hooks ``pretrain._configure_schedule_hooks`` sets."""
    wrapped = []
    for chunk in chunks:
        config = chunk.config
        if fp16 or bf16:
            chunk = Float16Module(config, chunk)
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=overlap_grad_reduce,
                                                   overlap_param_gather=overlap_param_gather,
                                                   use_distributed_optimizer=use_distributed_optimizer)
        wrapped.append(DistributedDataParallel(config, ddp_config, chunk))
    return wrapped


def build_optimizer(chunks: list, run: TrainingConfig):
    opt, prec = run.optimizer, run.precision
    config = OptimizerConfig(
        optimizer="adam", lr=opt.lr, min_lr=opt.min_lr, weight_decay=opt.weight_decay,
        adam_beta1=opt.adam_beta1, adam_beta2=opt.adam_beta2, adam_eps=opt.adam_eps,
        clip_grad=opt.clip_grad, bf16=prec.bf16, fp16=prec.fp16, params_dtype=prec.dtype,
        loss_scale=None, initial_loss_scale=prec.initial_loss_scale,
        use_distributed_optimizer=run.parallelism.use_distributed_optimizer,
        overlap_param_gather=run.parallelism.overlap_param_gather,  # mirrors DDP's (megatron asks for both)
    )
    return get_megatron_optimizer(config, chunks)


def build_scheduler(optimizer, run: TrainingConfig, train_iters: int):
    """Cosine (or linear/constant) decay with linear warmup over ``lr_warmup_fraction`` of training; steps are
    counted in samples like Megatron-LM, so resuming at another DP size keeps the schedule. On resume the saved
    schedule must equal this one (``training_state.check_schedule``), unless ``--override-opt-param-scheduler``
    makes these values win over the checkpoint's."""
    opt = run.optimizer
    total = train_iters * run.batch.global_batch_size
    warmup = int(math.floor(opt.lr_warmup_fraction * total))
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0 if warmup else opt.lr, max_lr=opt.lr, min_lr=opt.min_lr,
        lr_warmup_steps=warmup, lr_decay_steps=total, lr_decay_style=opt.lr_decay_style,
        start_wd=opt.weight_decay, end_wd=opt.weight_decay, wd_incr_steps=total, wd_incr_style="constant",
        override_opt_param_scheduler=opt.override_opt_param_scheduler,
        use_checkpoint_opt_param_scheduler=not opt.override_opt_param_scheduler,
    )
