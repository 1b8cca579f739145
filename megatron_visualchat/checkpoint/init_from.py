"""``--init-from``: start a run from the weights another run's training checkpoint holds (a recipe's next stage
from the earlier ones), whatever either run trains. Only weights move; optimizer, scheduler, RNG and data position
start fresh. The checkpoint must be at this run's TP / PP layout (its files are per rank) and of the same model, up
to what trains and the LoRA adapters (a later stage may train other parts, or add adapters).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Union

import torch.distributed as dist
from megatron.core.utils import unwrap_model

from megatron_visualchat.checkpoint.checksums import read_checksums, verify
from megatron_visualchat.checkpoint.errors import CheckpointError
from megatron_visualchat.checkpoint.layout import TRACKER_FILE, iteration_dir, latest_iteration
from megatron_visualchat.checkpoint.training_state import (
    META_FILE, RESUME_KEYS, differences, read_trainable_rank_file, repair_hint, trainable_rank_file,
)

LAYOUT = ("tp", "pp", "vpp", "pp_layers")
FREE = ("trainable", "lora")  # model record entries a later stage may change


def init_iteration(root: Union[str, Path]) -> int:
    """The iteration an ``--init-from`` directory offers: its latest save."""
    if not (Path(root) / TRACKER_FILE).is_file():
        raise CheckpointError(f"--init-from {root} holds no training checkpoint ({TRACKER_FILE} not found): pass the "
                              "--save directory of a run that saved one")
    return latest_iteration(root)


def _architecture(record: dict) -> dict:
    kept = {key: record.get(key) for key in (*RESUME_KEYS, *LAYOUT)}
    kept["model"] = {k: v for k, v in (kept.get("model") or {}).items() if k not in FREE}
    return json.loads(json.dumps(kept))  # tuples as in JSON


def load_weights(root: Union[str, Path], chunks: list, config_record: dict) -> int:
    """Copy every tensor of ``root``'s latest checkpoint into this rank's model chunks; returns its iteration."""
    root = Path(root)
    iteration = init_iteration(root)
    directory = iteration_dir(root, iteration)
    fix = repair_hint(root, iteration)
    digests = read_checksums(directory, fix, warn=dist.get_rank() == 0)
    verify(directory, META_FILE, digests, fix)
    try:
        meta = json.loads((directory / META_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"--init-from {root}: {directory / META_FILE} cannot be read ({e}): {fix}") from None
    diffs = differences(_architecture(meta), _architecture(config_record))
    if diffs:
        raise CheckpointError(f"--init-from {root} was saved with another model or TP/PP layout (only what trains may "
                              f"differ): {'; '.join(diffs)}")
    path = trainable_rank_file(directory)
    state = read_trainable_rank_file(directory, path, digests, fix)
    for model, saved in zip(unwrap_model(chunks), state["model"]):
        own = model.state_dict()
        wrong = [f"{k} (absent here)" if k not in own else f"{k} (saved {tuple(v.shape)}, here {tuple(own[k].shape)})"
                 for k, v in saved.items() if k not in own or own[k].shape != v.shape]
        if wrong:
            raise CheckpointError(f"--init-from {root}: {path} holds tensors this model cannot take (LoRA adapters "
                                  f"into a model without them? another tokenizer?): {', '.join(wrong[:5])}")
        model.load_state_dict(saved, strict=False)
    return iteration
