"""LoRA adapters on disk, unmerged: what ``--export-adapters`` writes and ``chat --load BASE --adapters DIR`` applies.

    <dir>/adapters.safetensors   every tensor the run trained, in the full (TP=1, PP=1) layout:
                                   <linear>.lora_a [rank, in] and <linear>.lora_b [out, rank] for each adapted
                                   linear, named like the model's parameters, e.g.
                                   language_model.decoder.layers.3.self_attention.linear_qkv.lora_a,
                                   vision.encoder.model.blocks.0.mlp.fc1.lora_b; image_lora_a / image_lora_b adapt
                                   a modality-split linear's image_weight;
                                   the run's other trainable parts (projector, image-side weights, embeddings) whole,
                                   as PEFT's modules_to_save (vocabulary rows padded as at save time)
    <dir>/adapter_config.json    {"format": "megatron_visualchat.adapters/1", "lora": the LoraConfig (rank, alpha,
                                   dropout, targets, vision_rank, vision_targets), "base": the llm, attention and
                                   vision sections of the model the adapters were trained on}
    <dir>/SHA256SUMS             checksums of the two files (``checksums.py``)

An adapted weight is ``W + (alpha / rank) * B A`` (``model/lora.py``). The base is a chat checkpoint with the same
frozen weights (LLM, vision encoder): the ``--export-dir`` of any run from the same ``--llm-load`` and
``--vision-weights``. Its trained parts are replaced by the file's. ``save_adapters`` writes like the chat
checkpoint (collective, temp directory renamed into place); ``read_adapters`` gives this TP rank's slices after
checking the base config, every name and shape, and the checksums.
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
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from megatron_visualchat.checkpoint.chat import config_to_dict, gather_full_state_dict, tp_slice
from megatron_visualchat.checkpoint.checksums import CHECKSUM_FILE, read_checksums, verify
from megatron_visualchat.checkpoint.errors import CheckpointError
from megatron_visualchat.checkpoint.layout import check_replaceable_dir, checksummed_dir
from megatron_visualchat.config import LORA_PAIRS, LoraConfig

ADAPTERS_FILE = "adapters.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
FORMAT = "megatron_visualchat.adapters/1"
BASE_SECTIONS = ("llm", "attention", "vision")
DAMAGED_FIX = "export the adapters again (pretrain_vchat.py --load SAVE_DIR --export-adapters DIR) or restore a copy"


def _base_record(cfg) -> dict:
    """What must match between the adapters' model and the base: llm, attention and vision (the encoder's and
    projector's weights come from the base's file, not from the paths a run read them from)."""
    record = {name: section for name, section in config_to_dict(cfg).items() if name in BASE_SECTIONS}
    record["vision"] = {k: v for k, v in record["vision"].items() if k not in ("encoder_weights", "projector_weights")}
    return json.loads(json.dumps(record))  # tuples as JSON lists


def check_adapters_dir(out_dir: Union[str, Path]) -> None:
    check_replaceable_dir(out_dir, ADAPTER_CONFIG_FILE, "adapters directory")


def _trained(chunk) -> dict[str, torch.Tensor]:
    return {name: p for name, p in chunk.named_parameters() if p.requires_grad}


def save_adapters(model, out_dir: Union[str, Path]) -> Path:
    """Write the adapters and the other trained tensors of ``model`` (a VisualChatModel with LoRA, or this rank's
    chunks). Collective, like ``save_chat_checkpoint``."""
    check_adapters_dir(out_dir)
    merged = gather_full_state_dict(model, _trained)
    if dist.get_rank() == 0:
        cfg = unwrap_model(model if isinstance(model, list) else [model])[0].cfg
        with checksummed_dir(out_dir) as tmp:
            save_file({k: v.contiguous() for k, v in merged.items()}, str(tmp / ADAPTERS_FILE),
                      metadata={"format": FORMAT, "producer": "megatron_visualchat"})
            record = {"format": FORMAT, "lora": dataclasses.asdict(cfg.lora), "base": _base_record(cfg)}
            (tmp / ADAPTER_CONFIG_FILE).write_text(json.dumps(record, indent=2) + "\n")
    dist.barrier()
    return Path(out_dir)


def read_adapter_config(load_dir: Union[str, Path]) -> dict:
    path = Path(load_dir) / ADAPTER_CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} not found: --adapters expects a directory written by --export-adapters")
    try:
        record = json.loads(path.read_text())
        lora = LoraConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in record["lora"].items()})
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is corrupt ({type(e).__name__}: {e}): {DAMAGED_FIX}") from None
    if record.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {record.get('format')!r} is not {FORMAT!r}")
    return {**record, "lora": lora}


def _pair_of(name: str):
    """(weight, A, B) names when ``name`` is an adapter's A or B, else None."""
    for weight, a, b in LORA_PAIRS:
        for own in (a, b):
            if name.endswith(f".{own}"):
                prefix = name[: -len(own)]
                return prefix + weight, prefix + a, prefix + b
    return None


def read_adapters(load_dir: Union[str, Path], model) -> tuple[dict[str, torch.Tensor], float]:
    """(this TP rank's slices of the file's tensors, alpha) for ``model``, built from the base chat checkpoint
    (without LoRA). Refuses a base with another llm / attention / vision config, a tensor without a place in the
    model or of another shape, and damaged files."""
    load_dir = Path(load_dir)
    digests = read_checksums(load_dir, DAMAGED_FIX, warn=False)
    if digests is None:  # every adapter export has them
        raise CheckpointError(f"{load_dir / CHECKSUM_FILE} not found: --adapters expects a directory written by "
                              "--export-adapters")
    for name in (ADAPTER_CONFIG_FILE, ADAPTERS_FILE):
        verify(load_dir, name, digests, DAMAGED_FIX)
    record = read_adapter_config(load_dir)
    base = _base_record(model.cfg)
    if record["base"] != base:
        diffs = [f"{name}: adapters {record['base'].get(name)}, base {base[name]}" for name in BASE_SECTIONS
                 if record["base"].get(name) != base[name]]
        raise CheckpointError(f"{load_dir} was trained on another model than the base checkpoint: "
                              f"{'; '.join(diffs)}")
    own = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    llm, tp = model.cfg.llm, ps.get_tensor_model_parallel_world_size()
    path = load_dir / ADAPTERS_FILE
    try:
        f = safe_open(str(path), framework="pt")
    except SafetensorError as e:
        raise CheckpointError(f"{path} is corrupt (cannot be read: {e}): {DAMAGED_FIX}") from None
    with f:
        tensors = {name: tp_slice(name, f.get_tensor(name), llm.vocab_size, llm.padded_vocab_size(tp))
                   for name in f.keys()}
    def shape(name):  # an adapter's in the file, a weight's in the base
        return tuple(tensors[name].shape) if name in tensors else tuple(own[name].shape) if name in own else "absent"

    for name, tensor in tensors.items():
        pair = _pair_of(name)
        if pair is None:
            if name not in own or own[name].shape != tensor.shape:
                raise CheckpointError(f"{path}: tensor {name} ({tuple(tensor.shape)}) has no place in the base model "
                                      f"({tuple(own[name].shape) if name in own else 'absent'})")
            continue
        weight, a, b = pair
        fits = (weight in own and a in tensors and b in tensors and tensors[a].shape[0] == tensors[b].shape[1]
                and (tensors[b].shape[0], tensors[a].shape[1]) == own[weight].shape)
        if not fits:
            raise CheckpointError(f"{path}: adapter {a} {shape(a)} / {b} {shape(b)} does not fit {weight} "
                                  f"{shape(weight)} of the base on TP rank {ps.get_tensor_model_parallel_rank()} "
                                  f"of {tp}")
    return tensors, record["lora"].alpha
