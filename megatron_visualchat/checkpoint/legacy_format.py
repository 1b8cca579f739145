"""Megatron-LM's legacy ``torch`` checkpoint layout, written and read tensor by tensor, and the one-call loader.

Layout (Megatron-LM's ``--ckpt-format torch``, directory conventions in ``layout.py``)::

    <dir>/latest_checkpointed_iteration.txt          "0"
    <dir>/iter_0000000/mp_rank_{tp:02d}[_{pp:03d}]/model_optim_rng.pt   (the _{pp:03d} suffix only when PP > 1)
    <dir>/megatron_visualchat_config.json            our record: LLMConfig, tp/pp/pp_layers, dtype, HF config

Each ``model_optim_rng.pt`` is a ``torch.save`` dict {"model": state_dict, "checkpoint_version": 3.0,
"iteration": 0, "args": dict}; ``args`` is a plain dict so ``torch.load(weights_only=True)`` reads it (Megatron-LM
itself stores an ``argparse.Namespace``: load these with ``--no-load-optim --no-load-rng --finetune``).

Bounded memory: ``RankFileWriter`` lets ``torch.save`` lay the file out from shapes alone (``skip_data`` + fake
tensors), then writes each tensor's bytes at its offset as it is produced, so a rank file never sits in memory.
Like ``torch.serialization.set_crc32_options(False)``, the zip CRC fields stay unset; ``torch.load`` does not
check them. ``weight_files.TorchFile`` reads single tensors back by offset the same way.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from megatron_visualchat.checkpoint.errors import CheckpointError
from megatron_visualchat.checkpoint.layout import Iteration, iteration_dir, rank_dir, read_tracker
from megatron_visualchat.checkpoint.sharding import (
    merge_state_dicts,
    pad_vocab_rows,
    shard_state_dict,
    stage_layer_range,
)
from megatron_visualchat.checkpoint.weight_files import TorchFile, tensor_offset
from megatron_visualchat.config import DTYPES, LLMConfig, ParallelConfig, check_choice

logger = logging.getLogger(__name__)

RECORD_FILE = "megatron_visualchat_config.json"
CHECKPOINT_FILE = "model_optim_rng.pt"
CHECKPOINT_VERSION = 3.0
RECORD_FORMAT = "megatron_visualchat.legacy/1"
VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")
# The transformer-engine spec fuses the norms into the following linear layer under these names.
TE_NORM_KEYS = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
                "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}


def dtype_from_name(name: str) -> torch.dtype:
    check_choice("dtype", name, DTYPES)
    return DTYPES[name]


def rank_file(load_dir: Union[str, Path], iteration: Iteration, tp_rank: int, pp_rank: int, pp: int) -> Path:
    return rank_dir(iteration_dir(load_dir, iteration), tp_rank, pp_rank, pp_suffix=pp > 1) / CHECKPOINT_FILE


# ------------------------------------------------------------------------------------------------ record

@dataclass(frozen=True)
class ConversionRecord:
    """What the loader needs to know about a converted checkpoint: model, layout, dtype, the source HF config."""

    llm: LLMConfig
    tp: int
    pp: int
    pp_layers: Optional[tuple[int, ...]]
    dtype: str
    iteration: int = 0
    hf_config: Optional[dict] = None

    @property
    def parallel(self) -> ParallelConfig:
        return ParallelConfig(tp=self.tp, pp=self.pp, pp_layers=self.pp_layers)

    def save(self, load_dir: Union[str, Path]) -> None:
        data = {"format": RECORD_FORMAT, **dataclasses.asdict(self)}
        data["pp_layers"] = list(self.pp_layers) if self.pp_layers else None
        (Path(load_dir) / RECORD_FILE).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, load_dir: Union[str, Path]) -> "ConversionRecord":
        path = Path(load_dir) / RECORD_FILE
        if not path.is_file():
            raise CheckpointError(f"{path} not found: {load_dir} was not written by hf-to-megatron "
                                  "(or its conversion did not finish)")
        data = json.loads(path.read_text())
        if data.get("format") != RECORD_FORMAT:
            raise CheckpointError(f"{path}: format={data.get('format')!r}, expected {RECORD_FORMAT!r}")
        try:
            llm = LLMConfig(**data["llm"])
            record = cls(llm=llm, tp=int(data["tp"]), pp=int(data["pp"]),
                         pp_layers=tuple(data["pp_layers"]) if data.get("pp_layers") else None,
                         dtype=data["dtype"], iteration=int(data.get("iteration", 0)),
                         hf_config=data.get("hf_config"))
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"{path}: malformed record ({e})") from None
        dtype_from_name(record.dtype)
        record.parallel.validate(llm)
        return record


def megatron_args(record: ConversionRecord) -> dict:
    """The ``args`` entry of each rank file, under Megatron-LM's argument names (plain values only)."""
    llm, par = record.llm, record.parallel
    return dict(
        num_layers=llm.num_layers, hidden_size=llm.hidden_size, ffn_hidden_size=llm.ffn_hidden_size,
        num_attention_heads=llm.num_attention_heads, group_query_attention=llm.query_groups != llm.num_attention_heads,
        num_query_groups=llm.query_groups, kv_channels=llm.head_dim,
        max_position_embeddings=llm.max_position_embeddings, seq_length=llm.max_position_embeddings,
        padded_vocab_size=llm.padded_vocab_size(par.tp), make_vocab_size_divisible_by=llm.make_vocab_size_divisible_by,
        vocab_size=llm.vocab_size,
        tensor_model_parallel_size=par.tp, pipeline_model_parallel_size=par.pp,
        normalization="RMSNorm", norm_epsilon=llm.rms_norm_eps, swiglu=True, add_bias_linear=False,
        add_qkv_bias=False, position_embedding_type="rope", rotary_base=int(llm.rope_base), rotary_percent=1.0,
        untie_embeddings_and_output_weights=llm.untie_embeddings, transformer_impl="local", ckpt_format="torch",
        params_dtype=DTYPES[record.dtype], bf16=record.dtype == "bf16", fp16=record.dtype == "fp16",
        consumed_train_samples=0, consumed_valid_samples=0,
    )


# -------------------------------------------------------------------------------------- rank file writer

class RankFileWriter:
    """One rank's ``model_optim_rng.pt``, filled tensor by tensor. ``layout`` maps every state-dict key to
    (shape, dtype), or to None for a None value (megatron's empty ``_extra_state``); ``extra`` are the other
    top-level entries (args, iteration, ...)."""

    def __init__(self, path: Path, layout: Mapping[str, Optional[tuple[Sequence[int], torch.dtype]]],
                 extra: Mapping):
        path.parent.mkdir(parents=True, exist_ok=True)
        with FakeTensorMode():
            skeleton = {k: None if spec is None else torch.empty(tuple(spec[0]), dtype=spec[1])
                        for k, spec in layout.items()}
        with torch.serialization.skip_data(materialize_fake_tensors=True):
            torch.save({"model": skeleton, **extra}, path)
        placed = torch.load(path, map_location="meta", weights_only=True)["model"]
        self.path = path
        self._slots = {k: (tensor_offset(t, path, k), t.shape, t.dtype)
                       for k, t in placed.items() if t is not None}
        self._written: set[str] = set()
        self._file = open(path, "r+b")

    def write(self, name: str, parts: Sequence[torch.Tensor]) -> None:
        """Write tensor ``name`` given as row blocks that concatenate (dim 0) to its shape."""
        offset, shape, dtype = self._slots[name]
        rows = sum(p.shape[0] for p in parts)
        bad = [tuple(p.shape) for p in parts if p.dtype != dtype or tuple(p.shape[1:]) != tuple(shape[1:])]
        if rows != shape[0] or bad:
            raise ValueError(f"{self.path}: {name} expects {tuple(shape)} {dtype}, got row blocks "
                             f"{[tuple(p.shape) for p in parts]} of {[p.dtype for p in parts]}")
        self._file.seek(offset)
        for part in parts:
            self._file.write(part.contiguous().reshape(-1).view(torch.uint8).numpy())
        self._written.add(name)

    def close(self) -> None:
        self._file.close()
        missing = sorted(set(self._slots) - self._written)
        if missing:
            raise RuntimeError(f"{self.path}: tensors never written: {missing}")

    def __enter__(self) -> "RankFileWriter":
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()
        else:
            self._file.close()


# ------------------------------------------------------------------------------------------------ loader

def _model_layers(model) -> range:
    """Global indices of the decoder layers this model chunk holds (megatron numbers layers globally from 1)."""
    numbers = [layer.layer_number for layer in model.decoder.layers]
    if not numbers:
        return range(0)
    return range(numbers[0] - 1, numbers[-1])


def _check_model(llm: LLMConfig, model, load_dir) -> None:
    cfg = model.config
    pairs = [
        ("num_layers", llm.num_layers, cfg.num_layers),
        ("hidden_size", llm.hidden_size, cfg.hidden_size),
        ("num_attention_heads", llm.num_attention_heads, cfg.num_attention_heads),
        ("num_query_groups", llm.query_groups, cfg.num_query_groups or cfg.num_attention_heads),
        ("ffn_hidden_size", llm.ffn_hidden_size, cfg.ffn_hidden_size),
        ("kv_channels", llm.head_dim, cfg.kv_channels),
        ("rms_norm_eps", llm.rms_norm_eps, cfg.layernorm_epsilon),
        ("rope_base", int(llm.rope_base), getattr(model, "rotary_base", int(llm.rope_base))),
        ("untie_embeddings", llm.untie_embeddings, not model.share_embeddings_and_output_weights),
    ]
    wrong = [f"{name}={saved} in the checkpoint but {actual} in the model" for name, saved, actual in pairs
             if saved != actual]
    if model.vocab_size < llm.vocab_size:
        wrong.append(f"vocab_size={llm.vocab_size} in the checkpoint but the model has only {model.vocab_size} rows")
    if wrong:
        raise CheckpointError(f"{load_dir} does not match the model: " + "; ".join(wrong))


def _reshard(load_dir, record: ConversionRecord, iteration, model_keys, *, tp, tp_rank, layers, pre, post,
             vocab_rows) -> dict:
    """This rank's state dict at the model's layout, merged from the saved shards that hold its tensors."""
    llm, saved = record.llm, record.parallel
    tied_copy = post and not llm.untie_embeddings and "output_layer.weight" in model_keys
    shards = []
    for s in range(saved.pp):
        s_layers = stage_layer_range(llm, saved, s)
        keep = tuple(f"decoder.layers.{i}." for i, g in enumerate(s_layers) if g in layers)
        take_embedding = s == 0 and (pre or tied_copy)
        take_head = s == saved.pp - 1 and post

        def wanted(name: str) -> bool:
            if name.endswith("_extra_state"):
                return False
            if name.startswith("decoder.layers."):
                return name.startswith(keep) if keep else False
            return take_embedding if "word_embeddings" in name else take_head

        if not (keep or take_embedding or take_head):
            continue
        for t in range(saved.tp):
            reader = TorchFile(rank_file(load_dir, iteration, t, s, saved.pp))
            shards.append((t, s, s_layers, {n: reader.read(n) for n in reader.keys() if wanted(n)}))
    full = merge_state_dicts(shards, saved.tp)
    if not llm.untie_embeddings:
        full.pop("output_layer.weight", None)
        if tied_copy:
            full["output_layer.weight"] = full["embedding.word_embeddings.weight"]
    for key in VOCAB_KEYS:
        if key in full:
            full[key] = pad_vocab_rows(full[key][:llm.vocab_size], vocab_rows)
    return shard_state_dict(full, tp=tp, tp_rank=tp_rank, layers=layers, pre_process=pre, post_process=post)


def adapt_keys(state: dict, model_state: Mapping) -> dict:
    """Fit local-spec keys to the model: norms renamed for the transformer-engine spec, and ``_extra_state``
    entries the checkpoint lacks taken from the model itself."""
    out = {}
    for name, value in state.items():
        for local, te in TE_NORM_KEYS.items():
            if name.endswith(local) and name not in model_state:
                candidate = name[: -len(local)] + te
                if candidate in model_state:
                    name = candidate
        out[name] = value
    for name, value in model_state.items():
        if name.endswith("_extra_state") and name not in out:
            out[name] = value
    return out


def load_megatron_checkpoint(model, load_dir: Union[str, Path], *, strict: bool = True):
    """Load a converted checkpoint into this rank's megatron-core GPTModel (one pipeline stage / model chunk).

    Reads this rank's file with ``torch.load(weights_only=True)`` when the model's layout (TP, PP, layer split,
    padded vocab) is the saved one; otherwise merges the saved shards holding this rank's layers and splits them
    for the model's layout (slower, logged). Raises ``CheckpointError`` naming both values when the model's
    architecture differs from the checkpoint's. Returns ``load_state_dict``'s missing/unexpected keys."""
    from megatron.core import parallel_state as ps

    load_dir = Path(load_dir)
    record = ConversionRecord.load(load_dir)
    _check_model(record.llm, model, load_dir)
    iteration = read_tracker(load_dir)
    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    pp, pp_rank = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    layers, pre, post = _model_layers(model), model.pre_process, model.post_process
    saved = record.parallel
    model_state = model.state_dict()
    same_layout = (tp == saved.tp and pp == saved.pp and model.vocab_size == record.llm.padded_vocab_size(tp)
                   and layers == stage_layer_range(record.llm, saved, pp_rank)
                   and pre == (pp_rank == 0) and post == (pp_rank == saved.pp - 1))
    if same_layout:
        state = torch.load(rank_file(load_dir, iteration, tp_rank, pp_rank, pp), weights_only=True,
                           mmap=True)["model"]
    else:
        if tp_rank == 0:
            logger.warning("%s was saved at TP=%d, PP=%d; the model is TP=%d, PP=%d (this stage: layers %d-%d): "
                           "resharding on load. Reconvert with --tp %d --pp %d to load directly.", load_dir,
                           saved.tp, saved.pp, tp, pp, layers.start, layers.stop - 1, tp, pp)
        state = _reshard(load_dir, record, iteration, model_state, tp=tp, tp_rank=tp_rank, layers=layers,
                         pre=pre, post=post, vocab_rows=model.vocab_size)
    return model.load_state_dict(adapt_keys(state, model_state), strict=strict)
