"""Export what training changed as HF-style files for sharing: ``model.safetensors`` (trainable weights merged
over tensor/pipeline ranks, full-size), ``config.json`` (the model config), and the tokenizer. Together with the
base LLaMA-2 checkpoint and the encoder weights they rebuild the model at any parallel layout."""

from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist

from megatron_visualchat.checkpoint.sharding import merge_state_dicts, stage_layer_range
from megatron_visualchat.training.checkpointing import trainable_state_dict

WEIGHTS, CONFIG = "model.safetensors", "config.json"


def export_trained(chunks: list, cfg, tokenizer, out_dir: str, record: dict) -> None:
    from megatron.core import parallel_state as ps
    from safetensors.torch import save_file

    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    pieces = []
    if ps.get_data_parallel_rank() == 0:
        for vp, sd in enumerate(trainable_state_dict(chunks)):
            layers = stage_layer_range(cfg.llm, cfg.parallel, pp_rank, vp if len(chunks) > 1 else None)
            pieces.append((tp_rank, pp_rank, layers, sd))
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(pieces, gathered, dst=0)
    if dist.get_rank() != 0:
        return
    merged = merge_state_dicts([p for rank_pieces in gathered for p in rank_pieces], cfg.parallel.tp)
    os.makedirs(out_dir, exist_ok=True)
    save_file({k: v.contiguous() for k, v in merged.items()}, os.path.join(out_dir, WEIGHTS),
              metadata={"format": "pt", "producer": "megatron_visualchat"})
    with open(os.path.join(out_dir, CONFIG), "w") as f:
        json.dump({"architectures": ["VisualChatModel"], **record}, f, indent=1)
    tokenizer.save(os.path.join(out_dir, "tokenizer"))


def load_exported(model: torch.nn.Module, export_dir: str) -> None:
    """Load an export into this rank's VisualChatModel (any layout): split the full tensors for this rank."""
    from megatron.core import parallel_state as ps
    from safetensors.torch import load_file

    from megatron_visualchat.checkpoint.sharding import shard_state_dict

    full = load_file(os.path.join(export_dir, WEIGHTS))
    par = model.cfg.parallel
    shard = shard_state_dict(full, tp=par.tp, tp_rank=ps.get_tensor_model_parallel_rank(),
                             layers=stage_layer_range(model.cfg.llm, par, ps.get_pipeline_model_parallel_rank()),
                             pre_process=model.pre_process, post_process=model.post_process)
    own = set(model.state_dict())
    unknown = [k for k in shard if k not in own]
    if unknown:
        raise ValueError(f"{export_dir}: export holds tensors this model does not have, e.g. {unknown[:3]}")
    model.load_state_dict(shard, strict=False)
