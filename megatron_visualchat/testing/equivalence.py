"""Same weights, any layout: load one full (TP=1, PP=1) state dict into this rank's model, run megatron-core's
schedule, and hand back what the parent needs to compare layouts (last-stage loss, this rank's gradients)."""

from __future__ import annotations

from typing import Callable, Mapping, Optional

import torch
from megatron.core import parallel_state as ps

from megatron_visualchat.checkpoint.sharding import merge_state_dicts, shard_state_dict, stage_layer_range
from megatron_visualchat.config import LLMConfig, ParallelConfig
from megatron_visualchat.model.gpt import stage_flags
from megatron_visualchat.training.step import gpt_forward_step, run_schedule


def current_parallel() -> ParallelConfig:
    return ParallelConfig(tp=ps.get_tensor_model_parallel_world_size(),
                          pp=ps.get_pipeline_model_parallel_world_size(), dp=ps.get_data_parallel_world_size(),
                          cp=ps.get_context_parallel_world_size(),
                          vpp=ps.get_virtual_pipeline_model_parallel_world_size())


def load_full_state_dict(model: torch.nn.Module, full: Mapping[str, torch.Tensor], llm: LLMConfig,
                         *, tp_rank_override: Optional[int] = None, vp_stage: Optional[int] = None) -> None:
    """Load this rank's shard of ``full``. Keys the stage does not own are dropped; a key the model owns but the
    shard lacks is an error. ``tp_rank_override`` loads another rank's shard (to prove tests notice)."""
    par = current_parallel()
    pre, post = stage_flags(vp_stage)
    tp_rank = ps.get_tensor_model_parallel_rank() if tp_rank_override is None else tp_rank_override
    shard = shard_state_dict(full, tp=par.tp, tp_rank=tp_rank,
                             layers=stage_layer_range(llm, par, ps.get_pipeline_model_parallel_rank(), vp_stage),
                             pre_process=pre, post_process=post)
    own = {k for k in model.state_dict() if "_extra_state" not in k}
    missing = own - shard.keys()
    if missing:
        raise KeyError(f"the full state dict lacks {sorted(missing)[:5]}")
    model.load_state_dict({k: shard[k] for k in own}, strict=False)


def run_step_on_shard(build_model: Callable[..., torch.nn.Module], full: Mapping[str, torch.Tensor],
                      llm: LLMConfig, batches: list[dict], *, seq_length: int, micro_batch_size: int,
                      forward_step: Callable = gpt_forward_step, corrupt_tp_order: bool = False) -> dict:
    """Forward+backward of ``len(batches)`` microbatches on this rank; returns loss (last stage, else None),
    this rank's parameter gradients (None for frozen ones) and where its shards sit. With virtual pipeline
    stages ``build_model(vp_stage=i)`` is called once per chunk."""
    par = current_parallel()
    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    stages = [None] if par.vpp is None else list(range(par.vpp))
    chunks = []
    for vp_stage in stages:
        model = build_model() if vp_stage is None else build_model(vp_stage=vp_stage)
        load_full_state_dict(model, full, llm, vp_stage=vp_stage,
                             tp_rank_override=(par.tp - 1 - tp_rank) if corrupt_tp_order else None)
        chunks.append(model)
    losses = run_schedule(chunks, batches, num_microbatches=len(batches), seq_length=seq_length,
                          micro_batch_size=micro_batch_size, forward_step=forward_step)
    loss = sum(float(d["lm loss"][0]) for d in losses) / len(batches) if losses else None
    shards = [(stage_layer_range(llm, par, pp_rank, vp_stage),
               {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()})
              for vp_stage, model in zip(stages, chunks)]
    return dict(tp_rank=tp_rank, pp_rank=pp_rank, loss=loss, shards=shards)


def merge_rank_results(results: list[dict], tp: int):
    """(loss, full gradients) from every rank's ``run_step_on_shard`` result; TP ranks must agree on the loss."""
    losses = [r["loss"] for r in results if r["loss"] is not None]
    if len(set(losses)) != 1:
        raise AssertionError(f"last-stage ranks disagree on the loss: {losses}")
    grads = merge_state_dicts(((r["tp_rank"], r["pp_rank"], layers, {k: g for k, g in grads.items() if g is not None})
                               for r in results for layers, grads in r["shards"]), tp)
    return losses[0], grads


def full_state_off_start(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s full state dict with every LoRA B and image-side weight moved off its start: at the start B is
    zero and the image side copies the text side, so layouts that mishandle them would still agree. Draws from
    torch's global generator (seed it before building the model)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_b"):
                p.normal_(0.0, 0.2)
            elif name.endswith("image_weight"):
                p.add_(0.05 * torch.randn_like(p))
    return {k: v.clone() for k, v in model.state_dict().items() if "_extra_state" not in k}
