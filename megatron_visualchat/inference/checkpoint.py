"""A chat model ready to talk, built from a chat checkpoint. The format, its writer and its loader live in
``checkpoint/chat.py``; building the model is inference's job, so ``checkpoint/`` never constructs one."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Union

import torch
from megatron.core import parallel_state as ps

from megatron_visualchat.checkpoint.adapters import read_adapters
from megatron_visualchat.checkpoint.chat import load_chat_checkpoint, read_chat_config
from megatron_visualchat.config import ConfigError, ParallelConfig
from megatron_visualchat.data import VisualChatTokenizer
from megatron_visualchat.model.lora import fold_adapters
from megatron_visualchat.model.visualchat import VisualChatModel


def build_chat_model(load_dir: Union[str, Path], *, dtype: torch.dtype = torch.float32,
                     device: Optional[torch.device] = None, adapters: Optional[Union[str, Path]] = None):
    """(model, tokenizer, cfg) for chat at the current TP size, weights from ``load_dir``; model in eval mode.
    ``adapters``: an ``--export-adapters`` directory folded into those weights (``checkpoint/adapters.py``)."""
    cfg = read_chat_config(load_dir)
    if cfg.attention.mode == "cross":
        raise ConfigError(f"{load_dir} was trained with attention mode 'cross', which chat, serve and eval-replay do "
                          "not support yet (no KV-cached cross-attention decode); measure it with the trainer's "
                          "held-out accuracy (--eval-interval)")
    # The encoder's weights come from the checkpoint file, not from the path it was trained from.
    cfg = cfg.replace(vision=dataclasses.replace(cfg.vision, encoder_weights=None),
                      parallel=ParallelConfig(tp=ps.get_tensor_model_parallel_world_size())).validate()
    model = VisualChatModel(cfg, params_dtype=dtype)
    load_chat_checkpoint(model, load_dir)
    if adapters is not None:
        fold_adapters(model, *read_adapters(adapters, model))
    if device is not None:
        model = model.to(device)
    return model.eval(), VisualChatTokenizer.load(str(load_dir)), cfg
