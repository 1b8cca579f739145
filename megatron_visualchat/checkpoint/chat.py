"""The chat checkpoint: one directory a chat or eval run starts from, at any tensor-parallel size.

    <dir>/model.safetensors        full (TP=1, PP=1) VisualChatModel state dict: language model, vision encoder,
                                   projector, modality-split image weights
    <dir>/visualchat_config.json   the model's VisualChatConfig (llm, attention, vision, trainable; no parallel)
    <dir>/tokenizer.model          sentencepiece model  } written by VisualChatTokenizer.save
    <dir>/added_tokens.json        <image>/<pad> ids    }

``save_chat_checkpoint`` is the one writer (training's ``--export-dir``, or a chat model from Python): it merges the
shards of every TP rank, PP stage and virtual stage. ``load_chat_checkpoint`` fills a model built for the current
TP size, each rank reading only its slices, with Megatron's vocabulary padding recomputed for that size. Loading is
strict: a tensor missing from the file, an extra one, or a shape that does not fit is an error naming the tensor.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Union

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.utils import unwrap_model
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_visualchat.checkpoint.errors import CheckpointError
from megatron_visualchat.checkpoint.sharding import (
    merge_state_dicts,
    pad_vocab_rows,
    split_kind,
    split_tensor,
    stage_layer_range,
)
from megatron_visualchat.config import (
    AttentionConfig,
    LLMConfig,
    TrainableConfig,
    VisionConfig,
    VisualChatConfig,
)

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "visualchat_config.json"
_SECTIONS = {"llm": LLMConfig, "attention": AttentionConfig, "vision": VisionConfig, "trainable": TrainableConfig}
_VOCAB_ROWS = ("word_embeddings.weight", "output_layer.weight")


def config_to_dict(cfg: VisualChatConfig) -> dict:
    """The model-defining parts of ``cfg`` (the parallel layout is chosen at load time)."""
    return {name: dataclasses.asdict(getattr(cfg, name)) for name in _SECTIONS}


def config_from_dict(data: dict, source: str = "config") -> VisualChatConfig:
    unknown = set(data) - set(_SECTIONS)
    if unknown:
        raise CheckpointError(f"{source}: unknown section(s) {sorted(unknown)}; allowed: {sorted(_SECTIONS)}")
    parts = {}
    for name, cls in _SECTIONS.items():
        values = dict(data.get(name, {}))
        allowed = {f.name for f in dataclasses.fields(cls)}
        if set(values) - allowed:
            raise CheckpointError(f"{source}: unknown key(s) {sorted(set(values) - allowed)} in section {name!r}")
        try:
            parts[name] = cls(**values)
        except TypeError as e:  # a required field is missing
            raise CheckpointError(f"{source}: section {name!r} is incomplete ({e})") from None
    return VisualChatConfig(**parts).validate()


def read_chat_config(load_dir: Union[str, Path]) -> VisualChatConfig:
    path = Path(load_dir) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} not found: --load expects a chat checkpoint directory")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    return config_from_dict(data, str(path))


def _own_state(model) -> dict[str, torch.Tensor]:
    """The tensors the file holds: megatron's ``_extra_state`` entries are rebuilt by the model itself."""
    return {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


def save_chat_checkpoint(model, tokenizer, out_dir: Union[str, Path]) -> Path:
    """Write the chat checkpoint of ``model``: a VisualChatModel, or this rank's list of model chunks (one per
    virtual pipeline stage; DDP / Float16Module wrappers are looked through). Collective: every rank calls it, the
    data-parallel rank 0 of each TP/PP position sends its shards, global rank 0 merges and writes."""
    chunks = unwrap_model(model if isinstance(model, list) else [model])
    cfg = chunks[0].cfg
    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    pieces = []
    if ps.get_data_parallel_rank() == 0:
        for vp_stage, chunk in enumerate(chunks):
            layers = stage_layer_range(cfg.llm, cfg.parallel, pp_rank, vp_stage)
            pieces.append((tp_rank, pp_rank, layers, {k: v.detach().cpu() for k, v in _own_state(chunk).items()}))
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(pieces, gathered, dst=0)
    out_dir = Path(out_dir)
    if dist.get_rank() == 0:
        merged = merge_state_dicts([p for rank_pieces in gathered for p in rank_pieces],
                                   ps.get_tensor_model_parallel_world_size())
        if not cfg.llm.untie_embeddings:  # the last stage's copy of tied embeddings (PP > 1) is not in a PP=1 model
            merged = {k: v for k, v in merged.items() if not k.endswith("output_layer.weight")}
        out_dir.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in merged.items()}, str(out_dir / WEIGHTS_FILE),
                  metadata={"format": "pt", "producer": "megatron_visualchat"})
        (out_dir / CONFIG_FILE).write_text(json.dumps(config_to_dict(cfg), indent=2) + "\n")
        tokenizer.save(str(out_dir))
    dist.barrier()
    return out_dir


def load_chat_checkpoint(model, load_dir: Union[str, Path]) -> None:
    """Load this TP rank's slices of ``<load_dir>/model.safetensors`` into ``model`` (strict)."""
    path = Path(load_dir) / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} not found: --load expects a chat checkpoint directory ({WEIGHTS_FILE}, "
                              f"{CONFIG_FILE}, tokenizer files)")
    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    own = _own_state(model)
    vocab = model.cfg.llm.vocab_size
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        missing, unexpected = sorted(own.keys() - keys), sorted(keys - own.keys())
        if missing or unexpected:
            raise CheckpointError(f"{path} does not match the model built from its config: missing "
                                  f"{missing[:8]}{' ...' if len(missing) > 8 else ''}, unexpected "
                                  f"{unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        with torch.no_grad():
            for name, target in own.items():
                tensor = f.get_tensor(name)
                if name.endswith(_VOCAB_ROWS):  # Megatron's padding depends on the TP size
                    tensor = pad_vocab_rows(tensor[:vocab], target.shape[0] * tp)
                tensor = split_tensor(tensor, split_kind(name), tp, tp_rank)
                if tensor.shape != target.shape:
                    raise CheckpointError(f"{path}: tensor {name} has shape {tuple(tensor.shape)} on TP rank "
                                          f"{tp_rank} of {tp}, the model expects {tuple(target.shape)}")
                target.copy_(tensor)
