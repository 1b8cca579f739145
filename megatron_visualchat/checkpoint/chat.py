"""The chat checkpoint: one directory a chat or eval run starts from, at any tensor-parallel size.

    <dir>/model.safetensors        full (TP=1, PP=1) VisualChatModel state dict: language model, vision encoder,
                                   projector, modality-split image weights
    <dir>/visualchat_config.json   the model's VisualChatConfig (llm, attention, vision, trainable, fusion; no parallel)
    <dir>/tokenizer.model          sentencepiece model  } written by VisualChatTokenizer.save
    <dir>/added_tokens.json        <image>/<pad> ids    }
    <dir>/image_tokenizer.json     only for a model that writes images as codes: the image tokenizer's registry
    <dir>/image_tokenizer/         name and fingerprint, and a copy of its files (config.json, *.safetensors)
    <dir>/SHA256SUMS               checksums of the files above (``checksums.py``)

``save_chat_checkpoint`` is the one writer (training's ``--export-dir``, or a chat model from Python): it merges the
shards of every TP rank, PP stage and virtual stage, writes into ``.tmp_<dir>`` beside the target and renames it
into place, so an existing export is replaced only by a complete one. ``load_chat_checkpoint`` fills a model built
for the current TP size, each rank reading only its slices, with Megatron's vocabulary padding recomputed for that
size. Loading is strict: a tensor missing from the file, an extra one, or a shape that does not fit is an error
naming the tensor; damaged bytes are caught by the checksums, checked last.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Callable, Optional, Union

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.utils import unwrap_model
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from megatron_visualchat.checkpoint.checksums import read_checksums, verify
from megatron_visualchat.checkpoint.errors import CheckpointError
from megatron_visualchat.checkpoint.layout import check_replaceable_dir, checksummed_dir
from megatron_visualchat.checkpoint.sharding import (
    merge_state_dicts,
    pad_vocab_rows,
    split_kind,
    split_tensor,
    stage_layer_range,
)
from megatron_visualchat.config import (
    AttentionConfig,
    FusionConfig,
    LLMConfig,
    TrainableConfig,
    VisionConfig,
    VisualChatConfig,
)

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "visualchat_config.json"
IMAGE_TOKENIZER_FILE, IMAGE_TOKENIZER_DIR = "image_tokenizer.json", "image_tokenizer"
_SECTIONS = {"llm": LLMConfig, "attention": AttentionConfig, "vision": VisionConfig, "trainable": TrainableConfig,
             "fusion": FusionConfig}  # files written before "fusion" existed read as the one-decoder model
_VOCAB_ROWS = ("word_embeddings.weight", "output_layer.weight")
DAMAGED_FIX = "export it again (pretrain_vchat.py --load SAVE_DIR --export-dir DIR) or restore it from a copy"


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
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is corrupt (not valid JSON: {e}): {DAMAGED_FIX}") from None
    return config_from_dict(data, str(path))


def _own_state(model) -> dict[str, torch.Tensor]:
    """The tensors the file holds: megatron's ``_extra_state`` entries are rebuilt by the model itself."""
    return {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


def check_export_dir(out_dir: Union[str, Path]) -> None:
    check_replaceable_dir(out_dir, CONFIG_FILE, "export directory")


def gather_full_state_dict(model, state_dict: Optional[Callable] = None) -> Optional[dict[str, torch.Tensor]]:
    """Collective: the full (TP=1, PP=1) state dict of ``model`` (a VisualChatModel, or this rank's list of model
    chunks; DDP / Float16Module wrappers are looked through) on global rank 0, None on the others. The data-parallel
    rank 0 of each TP/PP position sends ``state_dict(chunk)`` (default: the chunk's state dict) of every chunk with
    its stage's layer range; ``_extra_state`` entries are left out."""
    chunks = unwrap_model(model if isinstance(model, list) else [model])
    cfg = chunks[0].cfg
    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    pieces = []
    if ps.get_data_parallel_rank(with_context_parallel=True) == 0:  # one replica (CP ranks hold copies)
        for vp_stage, chunk in enumerate(chunks):
            layers = stage_layer_range(cfg.llm, cfg.parallel, pp_rank, vp_stage)
            state = (state_dict or _own_state)(chunk)
            pieces.append((tp_rank, pp_rank, layers,
                           {k: v.detach().cpu() for k, v in state.items() if not k.endswith("_extra_state")}))
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(pieces, gathered, dst=0)
    if dist.get_rank() != 0:
        return None
    merged = merge_state_dicts([p for rank_pieces in gathered for p in rank_pieces],
                               ps.get_tensor_model_parallel_world_size())
    if not cfg.llm.untie_embeddings:  # the last stage's copy of tied embeddings (PP > 1) is not in a PP=1 model
        merged = {k: v for k, v in merged.items() if not k.endswith("output_layer.weight")}
    return merged


def _image_tokenizer_record(tokenizer, image_tokenizer: Optional[tuple[str, str]]) -> Optional[dict]:
    """What ``image_tokenizer.json`` holds for ``(name, directory)``, after checking it fits ``tokenizer``."""
    if image_tokenizer is None:
        return None
    from megatron_visualchat.model.image_tokenizer import load_image_tokenizer

    name, directory = image_tokenizer
    loaded = load_image_tokenizer(name, directory)
    if tokenizer.image_codebook_size != loaded.codebook_size:
        raise CheckpointError(f"image tokenizer {name}:{directory} has {loaded.codebook_size} codes but the "
                              f"tokenizer has {tokenizer.image_codebook_size} code tokens: they do not belong together")
    return {"name": name, "fingerprint": loaded.fingerprint, "num_codes": loaded.num_codes,
            "codebook_size": loaded.codebook_size}


def _copy_image_tokenizer_files(directory: str, target: Path) -> None:
    """The files the image tokenizers read (``config.json``, ``*.safetensors``; nothing pickled)."""
    target.mkdir()
    for path in [Path(directory) / "config.json", *sorted(Path(directory).glob("*.safetensors"))]:
        shutil.copy2(path, target / path.name)


def read_image_tokenizer_record(load_dir: Union[str, Path]) -> Optional[tuple[str, Path, str]]:
    """(registry name, directory of its files, fingerprint) of the image tokenizer a chat checkpoint records, or
    None (a model that writes no images)."""
    path = Path(load_dir) / IMAGE_TOKENIZER_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        return record["name"], Path(load_dir) / IMAGE_TOKENIZER_DIR, record["fingerprint"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is corrupt ({type(e).__name__}: {e}): {DAMAGED_FIX}") from None


def save_chat_checkpoint(model, tokenizer, out_dir: Union[str, Path], *,
                         state_dict: Optional[Callable] = None,
                         image_tokenizer: Optional[tuple[str, str]] = None) -> Path:
    """Write the chat checkpoint of ``model``: a VisualChatModel, or this rank's list of model chunks (one per
    virtual pipeline stage; DDP / Float16Module wrappers are looked through). Collective: every rank calls it, the
    data-parallel rank 0 of each TP/PP position sends its shards, global rank 0 merges and writes them into a temp
    directory beside ``out_dir``, checksums last, and renames it into place. ``state_dict(chunk)`` gives the
    tensors to write; a model with LoRA adapters needs ``model.lora.merge_lora``, which folds them into the weights
    (the file then loads into a model built without LoRA, from the config written beside it).
    ``image_tokenizer``: ``(name, directory)`` of the image tokenizer whose codes the model writes (the training
    run's ``--image-tokenizer``); its files are copied in, so chat can draw the images."""
    check_export_dir(out_dir)
    image_record = _image_tokenizer_record(tokenizer, image_tokenizer)
    cfg = unwrap_model(model if isinstance(model, list) else [model])[0].cfg
    if cfg.lora.enabled and state_dict is None:
        raise CheckpointError("this model has LoRA adapters, which a chat checkpoint does not hold: pass "
                              "state_dict=megatron_visualchat.model.lora.merge_lora to fold them into the weights")
    merged = gather_full_state_dict(model, state_dict)
    if dist.get_rank() == 0:
        with checksummed_dir(out_dir) as tmp:
            save_file({k: v.contiguous() for k, v in merged.items()}, str(tmp / WEIGHTS_FILE),
                      metadata={"format": "pt", "producer": "megatron_visualchat"})
            (tmp / CONFIG_FILE).write_text(json.dumps(config_to_dict(cfg), indent=2) + "\n")
            tokenizer.save(str(tmp))
            if image_record is not None:
                _copy_image_tokenizer_files(image_tokenizer[1], tmp / IMAGE_TOKENIZER_DIR)
                (tmp / IMAGE_TOKENIZER_FILE).write_text(json.dumps(image_record, indent=2) + "\n")
    dist.barrier()
    return Path(out_dir)


def _verify_files(load_dir: Path) -> None:
    """Every file ``SHA256SUMS`` lists, hashed once per tensor-parallel group (the weights file can be hundreds of
    GB); every rank of the group raises if one is damaged."""
    problem = None
    if ps.get_tensor_model_parallel_rank() == 0:
        try:
            digests = read_checksums(load_dir, DAMAGED_FIX)
            for name in digests or ():
                verify(load_dir, name, digests, DAMAGED_FIX)
        except CheckpointError as e:
            problem = str(e)
    box = [problem]
    dist.broadcast_object_list(box, src=ps.get_tensor_model_parallel_src_rank(),
                               group=ps.get_tensor_model_parallel_group())
    if box[0] is not None:
        raise CheckpointError(box[0])


def tp_slice(name: str, full: torch.Tensor, vocab_size: int, padded_vocab: int) -> torch.Tensor:
    """This tensor-parallel rank's slice of the full-layout tensor ``name``; vocabulary rows are cut to
    ``vocab_size`` and padded again to ``padded_vocab`` (Megatron's padding depends on the TP size)."""
    if name.endswith(_VOCAB_ROWS):
        full = pad_vocab_rows(full[:vocab_size], padded_vocab)
    return split_tensor(full, split_kind(name), ps.get_tensor_model_parallel_world_size(),
                        ps.get_tensor_model_parallel_rank())


def load_chat_checkpoint(model, load_dir: Union[str, Path]) -> None:
    """Load this TP rank's slices of ``<load_dir>/model.safetensors`` into ``model`` (strict), then check the
    checkpoint's files against ``SHA256SUMS``."""
    path = Path(load_dir) / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} not found: --load expects a chat checkpoint directory ({WEIGHTS_FILE}, "
                              f"{CONFIG_FILE}, tokenizer files)")
    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    own = _own_state(model)
    vocab = model.cfg.llm.vocab_size
    try:
        f = safe_open(str(path), framework="pt")
    except SafetensorError as e:
        raise CheckpointError(f"{path} is corrupt (cannot be read: {e}): {DAMAGED_FIX}") from None
    with f:
        keys = set(f.keys())
        missing, unexpected = sorted(own.keys() - keys), sorted(keys - own.keys())
        if missing or unexpected:
            raise CheckpointError(f"{path} does not match the model built from its config: missing "
                                  f"{missing[:8]}{' ...' if len(missing) > 8 else ''}, unexpected "
                                  f"{unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        with torch.no_grad():
            for name, target in own.items():
                tensor = tp_slice(name, f.get_tensor(name), vocab, target.shape[0] * tp)
                if tensor.shape != target.shape:
                    raise CheckpointError(f"{path}: tensor {name} has shape {tuple(tensor.shape)} on TP rank "
                                          f"{tp_rank} of {tp}, the model expects {tuple(target.shape)}")
                target.copy_(tensor)
    _verify_files(Path(load_dir))  # after the checks that name a tensor: it finds what they cannot, damaged bytes
