"""Load vision-encoder weights from LOCAL files only (never the hub), strictly.

Accepted `path`:
  * a file: `*.safetensors`, or a torch pickle (`*.bin`, `*.pt`, `*.pth`) read with `weights_only=True`
    (a top-level {"model"|"state_dict"|"module": state_dict} wrapper is unwrapped);
  * a directory (HF layout): `model.safetensors`, `pytorch_model.bin`, or a sharded
    `model.safetensors.index.json` / `pytorch_model.bin.index.json`; a `config.json` next to them is checked
    against the encoder when the encoder family knows how (hidden size, depth, heads, activation, ...).
Tensors are read lazily (safetensors `safe_open`, torch `mmap=True`), so pointing at a whole Qwen-VL-Chat or
CLIPModel checkpoint only materialises the vision keys. The family converter (checkpoint_formats.py) maps the keys;
then every parameter and buffer of the encoder must be matched exactly, else a ValueError lists a few offenders.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open

if TYPE_CHECKING:
    from .encoders import VisionEncoder

_SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")
_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_WRAPPER_KEYS = ("model", "state_dict", "module")
_SHOWN = 5  # offending keys listed per category in error messages


def checkpoint_files(path: Path) -> list[Path]:
    """The weight file(s) that `path` (a file or an HF-style directory) stands for."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"encoder weights not found: {path}")
    for name in _SINGLE_FILES:
        if (path / name).is_file():
            return [path / name]
    for name in _INDEX_FILES:
        if (path / name).is_file():
            weight_map = json.loads((path / name).read_text())["weight_map"]
            return [path / shard for shard in sorted(set(weight_map.values()))]
    raise FileNotFoundError(f"no weights in directory {path}: looked for {_SINGLE_FILES + _INDEX_FILES}")


class LazyStateDict(Mapping[str, torch.Tensor]):
    """name -> tensor over one or more checkpoint files; safetensors tensors are read only when indexed."""

    def __init__(self, files: list[Path]) -> None:
        self._source: dict[str, object] = {}
        for file in files:
            if file.suffix == ".safetensors":
                handle = safe_open(str(file), framework="pt", device="cpu")
                self._source.update(dict.fromkeys(handle.keys(), handle))
            else:
                self._source.update(_load_pickle(file))

    def __getitem__(self, key: str) -> torch.Tensor:
        value = self._source[key]
        return value if isinstance(value, torch.Tensor) else value.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._source)

    def __len__(self) -> int:
        return len(self._source)


def _load_pickle(file: Path) -> dict[str, torch.Tensor]:
    obj = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    for key in _WRAPPER_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ValueError(f"{file}: expected a state dict, found {type(obj).__name__}")
    non_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if non_tensors:
        raise ValueError(f"{file}: not a plain state dict, non-tensor entries {non_tensors[:_SHOWN]}")
    return obj


def load_encoder_weights(encoder: VisionEncoder, path: str | Path) -> None:
    """Fill `encoder` (from build_encoder) with the weights at `path`; see the module docstring for formats."""
    path = Path(path)
    source = LazyStateDict(checkpoint_files(path))
    spec, model = encoder.spec, encoder.model
    config_file = path / "config.json"
    if path.is_dir() and config_file.is_file() and spec.check_hf_config is not None:
        spec.check_hf_config(json.loads(config_file.read_text()), model, str(config_file))
    state = spec.convert_checkpoint(source, model)
    _check_matches(model.state_dict(), state, f"{path} -> encoder {encoder.name!r}")
    model.load_state_dict(state, strict=True)


def _check_matches(expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor], where: str) -> None:
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
        raise ValueError(f"{where}: checkpoint does not match: " + "; ".join(problems))
