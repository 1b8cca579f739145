"""Load vision-encoder weights from LOCAL files only (never the hub), strictly.

Accepted `path` (read by `checkpoint.weight_files.HFWeights`, tensor by tensor, pickles with `weights_only=True`):
  * a file: `*.safetensors`, or a torch pickle (`*.bin`, `*.pt`, `*.pth`; a top-level
    {"model"|"state_dict"|"module": state_dict} wrapper is unwrapped);
  * a HF model directory (one weight file or a sharded index); a `config.json` next to the weights is checked
    against the encoder when the encoder family knows how (hidden size, depth, heads, activation, ...).
`load_projector_weights` fills a projector from a file of its own state dict, equally strictly.

Only the keys the family converter (checkpoint_formats.py) asks for are read, so pointing at a whole Qwen-VL-Chat or
CLIPModel checkpoint only materialises the vision tensors. Then every parameter and buffer of the encoder must be
matched exactly, else a CheckpointError (a ValueError) lists a few offenders.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from megatron_visualchat.checkpoint.errors import CheckpointError
from megatron_visualchat.checkpoint.weight_files import HFWeights

if TYPE_CHECKING:
    from .encoders import VisionEncoder

_SHOWN = 5  # offending keys listed per category in error messages


def load_encoder_weights(encoder: VisionEncoder, path: str | Path) -> None:
    """Fill `encoder` (from build_encoder) with the weights at `path`; see the module docstring for formats."""
    path = Path(path)
    source = HFWeights(path)
    spec, model = encoder.spec, encoder.model
    config_file = path / "config.json"
    if path.is_dir() and config_file.is_file() and spec.check_hf_config is not None:
        spec.check_hf_config(json.loads(config_file.read_text()), model, str(config_file))
    state = spec.convert_checkpoint(source, model)
    check_state_matches(model.state_dict(), state, f"{path} -> encoder {encoder.name!r}")
    model.load_state_dict(state, strict=True)


def load_projector_weights(projector: torch.nn.Module, path: str | Path) -> None:
    """Fill `projector` strictly from a weight file holding its own state dict (what `import-hf` writes as
    projector.safetensors), so a run can start from a released projector instead of a random one."""
    source = HFWeights(Path(path))
    state = {name: source[name] for name in source}
    check_state_matches(projector.state_dict(), state, f"{path} -> projector {type(projector).__name__}")
    projector.load_state_dict(state, strict=True)


def check_state_matches(expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor], where: str) -> None:
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong_shape = [
        f"{k}: checkpoint {tuple(got[k].shape)} vs encoder {tuple(expected[k].shape)}"
        for k in expected if k in got and got[k].shape != expected[k].shape
    ]
    problems = [
        f"{len(items)} {label} (e.g. {items[:_SHOWN]})"
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatches", wrong_shape))
        if items
    ]
    if problems:
        raise CheckpointError(f"{where}: checkpoint does not match: " + "; ".join(problems))
