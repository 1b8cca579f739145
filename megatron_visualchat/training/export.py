"""Export the trained model as a chat checkpoint (``inference/checkpoint.py``'s format: one full-size
``model.safetensors`` merged over tensor and pipeline ranks, the model config, the tokenizer), loadable at any
tensor-parallel size by ``megatron-visualchat chat --load DIR`` and ``eval-replay``, and shareable as is."""

from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist

from megatron_visualchat.checkpoint.sharding import merge_state_dicts, stage_layer_range
from megatron_visualchat.inference.checkpoint import CONFIG_FILE, WEIGHTS_FILE, config_to_dict
from megatron_visualchat.training.checkpointing import unwrap


def export_trained(chunks: list, cfg, tokenizer, out_dir: str) -> None:
    """Collective: every rank sends its shard (data-parallel rank 0 of each TP/PP position), rank 0 writes."""
    from megatron.core import parallel_state as ps
    from safetensors.torch import save_file

    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    pieces = []
    if ps.get_data_parallel_rank() == 0:
        for vp, chunk in enumerate(chunks):
            state = {k: v.detach().cpu() for k, v in unwrap(chunk).state_dict().items()
                     if not k.endswith("_extra_state")}
            layers = stage_layer_range(cfg.llm, cfg.parallel, pp_rank, vp if len(chunks) > 1 else None)
            pieces.append((tp_rank, pp_rank, layers, state))
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(pieces, gathered, dst=0)
    if dist.get_rank() == 0:
        merged = merge_state_dicts([p for rank_pieces in gathered for p in rank_pieces], cfg.parallel.tp)
        os.makedirs(out_dir, exist_ok=True)
        save_file({k: v.contiguous() for k, v in merged.items()}, os.path.join(out_dir, WEIGHTS_FILE),
                  metadata={"format": "pt", "producer": "megatron_visualchat"})
        with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
            json.dump(config_to_dict(cfg), f, indent=2)
        tokenizer.save(out_dir)
    dist.barrier()
