"""A chat model ready to talk, built from a chat checkpoint. The format, its writer and its loader live in
``checkpoint/chat.py``; building the model is inference's job, so ``checkpoint/`` never constructs one."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Union

import torch
from megatron.core import parallel_state as ps

from megatron_visualchat.checkpoint.adapters import read_adapters
from megatron_visualchat.checkpoint.chat import (
    DAMAGED_FIX,
    load_chat_checkpoint,
    read_chat_config,
    read_image_tokenizer_record,
)
from megatron_visualchat.checkpoint.errors import CheckpointError
from megatron_visualchat.config import JAM_CROSS, ConfigError, ParallelConfig
from megatron_visualchat.data import VisualChatTokenizer
from megatron_visualchat.model.jam_cross import JamCrossModel
from megatron_visualchat.model.lora import fold_adapters
from megatron_visualchat.model.visualchat import VisualChatModel


def build_chat_model(load_dir: Union[str, Path], *, dtype: torch.dtype = torch.float32,
                     device: Optional[torch.device] = None, adapters: Optional[Union[str, Path]] = None):
    """(model, tokenizer, cfg) for chat at the current TP size, weights from ``load_dir``; model in eval mode.
    ``adapters``: an ``--export-adapters`` directory folded into those weights (``checkpoint/adapters.py``)."""
    cfg = read_chat_config(load_dir)
    # The encoder's weights come from the checkpoint file, not from the path it was trained from.
    cfg = cfg.replace(vision=dataclasses.replace(cfg.vision, encoder_weights=None),
                      parallel=ParallelConfig(tp=ps.get_tensor_model_parallel_world_size())).validate()
    if cfg.fusion.kind == JAM_CROSS and adapters is not None:
        raise ConfigError(f"--adapters {adapters}: {load_dir} is a jam-cross model, which trains no LoRA adapters; "
                          "drop --adapters")
    # A jam-cross fusion (fuse --method cross, trained and exported): two text towers, no vision tower.
    model = (JamCrossModel if cfg.fusion.kind == JAM_CROSS else VisualChatModel)(cfg, params_dtype=dtype)
    load_chat_checkpoint(model, load_dir)
    if adapters is not None:
        fold_adapters(model, *read_adapters(adapters, model))
    if device is not None:
        model = model.to(device)
    return model.eval(), VisualChatTokenizer.load(str(load_dir)), cfg


def load_chat_image_tokenizer(load_dir: Union[str, Path], spec: Optional[tuple[str, str]] = None):
    """The image tokenizer that turns the model's image codes into pictures: ``spec`` = (name, directory) when
    given (``--image-tokenizer``), else the copy the chat checkpoint holds (its fingerprint checked); None when
    neither (the model then writes text only, ``image_generation.banned_image_tokens``)."""
    from megatron_visualchat.model.image_tokenizer import load_image_tokenizer

    if spec is not None:
        try:
            return load_image_tokenizer(*spec)
        except ValueError as e:
            raise ConfigError(f"--image-tokenizer {spec[0]}:{spec[1]}: {e}") from None
    record = read_image_tokenizer_record(load_dir)
    if record is None:
        return None
    name, directory, fingerprint = record
    try:
        loaded = load_image_tokenizer(name, str(directory))
    except ValueError as e:
        raise CheckpointError(f"{load_dir}: its image tokenizer cannot be read ({e}): {DAMAGED_FIX}") from None
    if loaded.fingerprint != fingerprint:
        raise CheckpointError(f"{directory}: the image tokenizer's files do not match the fingerprint recorded in "
                              f"{load_dir}: {DAMAGED_FIX}")
    return loaded
