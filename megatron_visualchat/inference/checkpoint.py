"""The chat checkpoint: one directory a chat or eval run can be started from, at any tensor-parallel size.

    <dir>/model.safetensors        full (TP=1) VisualChatModel state dict: language model, vision encoder, projector
    <dir>/visualchat_config.json   the model's VisualChatConfig (llm, attention, vision, trainable; no parallel)
    <dir>/tokenizer.model          sentencepiece model  } written by VisualChatTokenizer.save
    <dir>/added_tokens.json        <image>/<pad> ids    }

``save_chat_checkpoint`` writes it from a (possibly TP-sharded) model; ``build_chat_model`` builds the model for
the current TP layout and loads it, each rank reading only its own slices, with Megatron's vocabulary padding
recomputed for the new TP size. Loading is strict: a tensor missing from the file, an extra one, or a shape that
does not fit is an error naming the tensor.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional, Union

import torch

from megatron_visualchat.checkpoint.hf_llama import CheckpointError
from megatron_visualchat.checkpoint.sharding import merge_state_dicts, pad_vocab_rows, split_kind, split_tensor
from megatron_visualchat.config import (
    AttentionConfig,
    LLMConfig,
    ParallelConfig,
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


def _tensor_parallel() -> tuple[int, int]:
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()


def _own_state(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


def save_chat_checkpoint(model, tokenizer, out_dir: Union[str, Path]) -> Path:
    """Gather the TP shards and write the chat checkpoint (global rank 0 writes; every TP rank must call this)."""
    from megatron.core import parallel_state as ps

    tp, tp_rank = _tensor_parallel()
    if ps.get_pipeline_model_parallel_world_size() != 1:
        raise ValueError("save_chat_checkpoint needs the whole model on one pipeline stage (pp=1)")
    local = {k: v.detach().cpu().contiguous() for k, v in _own_state(model).items()}
    if tp > 1:
        shards = [None] * tp
        torch.distributed.all_gather_object(shards, local, group=ps.get_tensor_model_parallel_group())
        layers = range(model.cfg.llm.num_layers)
        local = merge_state_dicts([(r, 0, layers, sd) for r, sd in enumerate(shards)], tp)
    out_dir = Path(out_dir)
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        from safetensors.torch import save_file

        out_dir.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in local.items()}, str(out_dir / WEIGHTS_FILE))
        (out_dir / CONFIG_FILE).write_text(json.dumps(config_to_dict(model.cfg), indent=2) + "\n")
        tokenizer.save(str(out_dir))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return out_dir


def load_chat_checkpoint(model, load_dir: Union[str, Path]) -> None:
    """Load this TP rank's slices of ``<load_dir>/model.safetensors`` into ``model`` (strict)."""
    from safetensors import safe_open

    path = Path(load_dir) / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} not found: --load expects a chat checkpoint directory ({WEIGHTS_FILE}, "
                              f"{CONFIG_FILE}, tokenizer files)")
    tp, tp_rank = _tensor_parallel()
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


def read_chat_config(load_dir: Union[str, Path]) -> VisualChatConfig:
    path = Path(load_dir) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} not found: --load expects a chat checkpoint directory")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    return config_from_dict(data, str(path))


def build_chat_model(load_dir: Union[str, Path], *, dtype: torch.dtype = torch.float32,
                     device: Optional[torch.device] = None):
    """(model, tokenizer, cfg) for chat at the current TP size, weights from ``load_dir``; model in eval mode."""
    from megatron_visualchat.data import VisualChatTokenizer
    from megatron_visualchat.model.visualchat import VisualChatModel

    tp, _ = _tensor_parallel()
    cfg = read_chat_config(load_dir)
    # The encoder's weights come from the checkpoint file, not from the path it was trained from.
    cfg = cfg.replace(vision=dataclasses.replace(cfg.vision, encoder_weights=None),
                      parallel=ParallelConfig(tp=tp)).validate()
    model = VisualChatModel(cfg, params_dtype=dtype)
    # Training writes this format with --export-dir (training/export.py).
    load_chat_checkpoint(model, load_dir)
    if device is not None:
        model = model.to(device)
    return model.eval(), VisualChatTokenizer.load(str(load_dir)), cfg
