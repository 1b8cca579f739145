"""Weight files read one tensor at a time, without unpickling code: ``torch.save`` zip files (``.bin``, ``.pt``,
``.pth``: only their pickle is loaded, with ``weights_only=True``), safetensors files, and HF model directories.

A HF directory keeps its weights in one of ``HF_WEIGHT_FILES`` (transformers' order of preference): one file, or an
index naming the shard of every tensor. Reading a tensor reads only its bytes and keeps no mapping of the file
open, so memory holds just the tensors a caller keeps, whatever the size of the checkpoint. The HF LLaMA converter
and the vision-encoder loader both read through ``HFWeights``; Megatron rank files are read through ``TorchFile``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors import safe_open

from megatron_visualchat.checkpoint.errors import CheckpointError

SAFETENSORS_INDEX = "model.safetensors.index.json"
HF_WEIGHT_FILES = ("model.safetensors", SAFETENSORS_INDEX, "pytorch_model.bin", "pytorch_model.bin.index.json")
# Wrappers around a state dict (Megatron rank files, training scripts' checkpoints), unwrapped in this order.
_WRAPPER_KEYS = ("model", "state_dict", "module")


def tensor_offset(t: torch.Tensor, path: Path, name: str) -> int:
    """Where the bytes of ``t`` (loaded from ``path`` with ``map_location="meta"``) start in that file."""
    offset = getattr(t.untyped_storage(), "_checkpoint_offset", None)
    if offset is None:
        raise RuntimeError(f"{path}: torch {torch.__version__} does not report where {name} is stored "
                           "(torch.load(map_location='meta') sets storage._checkpoint_offset for zip-format files "
                           "since torch 2.6)")
    return offset + t.storage_offset() * t.element_size()


class TorchFile:
    """The state dict of one ``torch.save`` file, its entries read one at a time: the pickle is loaded on the meta
    device up front, a tensor's bytes are read at their offset when asked for."""

    def __init__(self, path: Path):
        if not path.is_file():
            raise CheckpointError(f"missing checkpoint file {path}")
        try:
            obj = torch.load(path, map_location="meta", weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch raises several types for unreadable/unsafe files
            raise CheckpointError(f"{path}: cannot be read with torch.load(weights_only=True) ({e}); re-save it "
                                  "with a recent torch or convert it to safetensors") from None
        for key in _WRAPPER_KEYS:
            if isinstance(obj, dict) and isinstance(obj.get(key), dict):
                obj = obj[key]
        if not isinstance(obj, dict):
            raise CheckpointError(f"{path}: expected a state dict, found {type(obj).__name__}")
        self.path = path
        self._meta: dict = obj

    def keys(self) -> list[str]:
        return list(self._meta)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """The tensor entries (others, such as megatron's empty ``_extra_state``, are left out)."""
        return {k: tuple(v.shape) for k, v in self._meta.items() if isinstance(v, torch.Tensor)}

    def read(self, name: str) -> Optional[torch.Tensor]:
        if name not in self._meta:
            raise CheckpointError(f"{self.path}: tensor {name} is missing")
        meta = self._meta[name]
        if not isinstance(meta, torch.Tensor):
            return meta
        span = 1 + sum((s - 1) * st for s, st in zip(meta.shape, meta.stride())) if meta.numel() else 0
        out = torch.empty(span, dtype=meta.dtype)
        with open(self.path, "rb") as f:
            f.seek(tensor_offset(meta, self.path, name))
            if f.readinto(out.view(torch.uint8).numpy()) != span * meta.element_size():
                raise CheckpointError(f"{self.path}: file ends inside tensor {name} (truncated?)")
        return out.as_strided(meta.shape, meta.stride())


class HFWeights(Mapping[str, torch.Tensor]):
    """name -> tensor of a weight file (safetensors, else ``torch.save``) or of a HF model directory; a tensor is
    read from disk each time it is indexed. ``weight_map`` says which file holds each tensor."""

    def __init__(self, path: Union[str, Path]):
        self.path = Path(path)
        self._torch_files: dict[Path, TorchFile] = {}
        self.weight_map: dict[str, Path] = self._weight_map()

    def _weight_map(self) -> dict[str, Path]:
        if self.path.is_file():
            return dict.fromkeys(self.shapes(self.path), self.path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path} not found")
        for name in HF_WEIGHT_FILES:
            file = self.path / name
            if not file.is_file():
                continue
            if not name.endswith(".index.json"):
                return dict.fromkeys(self.shapes(file), file)
            try:
                weight_map = json.loads(file.read_text()).get("weight_map")
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{file}: invalid JSON ({e})") from None
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{file}: no 'weight_map'")
            missing = sorted({f for f in weight_map.values() if not (self.path / f).is_file()})
            if missing:
                raise CheckpointError(f"{file} names shard files that are missing in {self.path}: {missing}")
            return {tensor: self.path / f for tensor, f in weight_map.items()}
        raise CheckpointError(f"{self.path}: no weights (looked for {' / '.join(HF_WEIGHT_FILES)})")

    def shapes(self, file: Path) -> dict[str, tuple[int, ...]]:
        """The tensors ``file`` really holds, with their shapes (an index may claim otherwise)."""
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        return self._torch_file(file).shapes()

    def _torch_file(self, file: Path) -> TorchFile:
        if file not in self._torch_files:
            self._torch_files[file] = TorchFile(file)
        return self._torch_files[file]

    def __getitem__(self, name: str) -> torch.Tensor:
        file = self.weight_map[name]
        if file.suffix == ".safetensors":
            # Opened per tensor, so that no mapping of an earlier shard stays resident.
            with safe_open(str(file), framework="pt") as f:
                return f.get_tensor(name)
        return self._torch_file(file).read(name)

    def __contains__(self, name: object) -> bool:  # without reading the tensor, unlike Mapping's default
        return name in self.weight_map

    def __iter__(self) -> Iterator[str]:
        return iter(self.weight_map)

    def __len__(self) -> int:
        return len(self.weight_map)
