"""Split a full (TP=1, PP=1) megatron-core GPT state dict into one rank's shard, and merge shards back.

One rule table serves the converter (HF <-> Megatron), the parallel tests (equal weights at every layout) and
export. Rules follow megatron-core's layers: ColumnParallelLinear splits dim 0 (output features), RowParallelLinear
dim 1; ``linear_qkv`` is stored per query group ([q_g; k_g; v_g] for g in groups) so a contiguous dim-0 split keeps
whole groups on a rank; the SwiGLU ``linear_fc1`` is [gate; up] and every rank holds [gate_r; up_r].
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping, Optional

import torch

from megatron_visualchat.config import LLMConfig, ParallelConfig

_LAYER_KEY = re.compile(r"^(?P<prefix>(?:.*\.)?decoder\.layers\.)(?P<idx>\d+)\.(?P<rest>.+)$")

# (regex on the parameter name, split kind). First match wins; unmatched tensors are replicated.
SPLIT_RULES: tuple[tuple[re.Pattern, str], ...] = (
    # LoRA (model/lora.py): B of a column-parallel linear splits like its weight's rows, A of a row-parallel one like
    # its weight's columns; the other matrix of each pair is replicated.
    (re.compile(r"linear_fc1\.lora_b$"), "glu"),
    (re.compile(r"linear_qkv\.(image_)?lora_b$"), "column"),
    (re.compile(r"(linear_proj|linear_fc2)\.(image_)?lora_a$"), "row"),
    (re.compile(r"linear_fc1[^.]*\.weight$"), "glu"),
    (re.compile(r"linear_qkv\.image_weight$"), "column"),  # modality-split image side, same group layout
    (re.compile(r"linear_proj\.image_weight$"), "row"),
    (re.compile(r"(linear_qkv|linear_q|linear_kv)[^.]*\.(weight|bias)$"), "column"),
    (re.compile(r"linear_fc1[^.]*\.bias$"), "glu"),
    (re.compile(r"(linear_proj|linear_fc2)[^.]*\.weight$"), "row"),
    (re.compile(r"(word_embeddings|output_layer)\.weight$"), "column"),
)


def split_kind(name: str) -> str:
    """'column' | 'row' | 'glu' | 'replicated' for a parameter name."""
    for pattern, kind in SPLIT_RULES:
        if pattern.search(name):
            return kind
    return "replicated"


def split_tensor(t: torch.Tensor, kind: str, tp: int, rank: int) -> torch.Tensor:
    if kind == "replicated" or tp == 1:
        return t
    if kind == "glu":
        gate, up = torch.chunk(t, 2, dim=0)
        return torch.cat([torch.chunk(gate, tp, dim=0)[rank], torch.chunk(up, tp, dim=0)[rank]], dim=0)
    dim = 0 if kind == "column" else 1
    if t.shape[dim] % tp:
        raise ValueError(f"cannot split a tensor of shape {tuple(t.shape)} along dim {dim} into {tp} TP shards")
    return torch.chunk(t, tp, dim=dim)[rank]


def merge_tensors(parts: list[torch.Tensor], kind: str) -> torch.Tensor:
    if kind == "replicated" or len(parts) == 1:
        return parts[0]
    if kind == "glu":
        gates, ups = zip(*(torch.chunk(p, 2, dim=0) for p in parts))
        return torch.cat([*gates, *ups], dim=0)
    return torch.cat(parts, dim=0 if kind == "column" else 1)


def stage_layer_range(llm: LLMConfig, parallel: ParallelConfig, pp_rank: int, vp_stage: Optional[int] = None) -> range:
    """Global indices of the decoder layers held by pipeline rank ``pp_rank`` (and virtual stage ``vp_stage``),
    following megatron-core: an explicit ``pp_layers`` split, else an even split over pp x vpp chunks assigned
    round-robin (chunk = vp_stage * pp + pp_rank)."""
    if parallel.pp_layers is not None:
        start = sum(parallel.pp_layers[:pp_rank])
        return range(start, start + parallel.pp_layers[pp_rank])
    chunks = parallel.pp * (parallel.vpp or 1)
    per_chunk = llm.num_layers // chunks
    chunk = (vp_stage or 0) * parallel.pp + pp_rank
    return range(chunk * per_chunk, (chunk + 1) * per_chunk)


def _relabel_layer(name: str, mapping) -> Optional[str]:
    m = _LAYER_KEY.match(name)
    if not m:
        return name
    new_idx = mapping(int(m["idx"]))
    return None if new_idx is None else f"{m['prefix']}{new_idx}.{m['rest']}"


def global_layer_name(name: str, layers: range) -> str:
    """The full-model name of a stage-local tensor name (decoder layers renumbered from ``layers.start``)."""
    return _relabel_layer(name, lambda i: layers.start + i)


def shard_state_dict(
    full: Mapping[str, torch.Tensor],
    *,
    tp: int,
    tp_rank: int,
    layers: range,
    pre_process: bool,
    post_process: bool,
) -> dict[str, torch.Tensor]:
    """One rank's state dict from the full one: the stage's layers renumbered from 0, embeddings only on the first
    stage, final norm and output layer only on the last, every tensor split for ``tp_rank``."""
    out = {}
    for name, tensor in full.items():
        is_layer = _LAYER_KEY.match(name) is not None
        if not is_layer:
            if "word_embeddings" in name and not pre_process:
                continue
            if ("output_layer" in name or "final_layernorm" in name) and not post_process:
                continue
        local = _relabel_layer(name, lambda i: i - layers.start if i in layers else None)
        if local is None:
            continue
        out[local] = split_tensor(tensor, split_kind(name), tp, tp_rank).clone()
    return out


def merge_state_dicts(
    shards: Iterable[tuple[int, int, range, Mapping[str, torch.Tensor]]], tp: int
) -> dict[str, torch.Tensor]:
    """Inverse of ``shard_state_dict``: ``shards`` yields (tp_rank, pp_rank, layers, state_dict) for every rank."""
    grouped: dict[str, list] = {}
    for tp_rank, _pp_rank, layers, sd in shards:
        for name, tensor in sd.items():
            glob = global_layer_name(name, layers)
            grouped.setdefault(glob, [None] * tp)[tp_rank] = tensor
    merged = {}
    for name, parts in grouped.items():
        kind = split_kind(name)
        present = [p for p in parts if p is not None]
        if kind != "replicated" and len(present) != tp:
            missing = [r for r, p in enumerate(parts) if p is None]
            raise ValueError(f"{name}: missing the shards of TP ranks {missing}")
        merged[name] = merge_tensors(present, kind)
    return dict(sorted(merged.items()))


def pad_vocab_rows(weight: torch.Tensor, padded_size: int) -> torch.Tensor:
    """Megatron pads the vocabulary (rows of the embedding/output layer) with zeros up to a TP-friendly size."""
    if weight.shape[0] > padded_size:
        raise ValueError(f"vocabulary of {weight.shape[0]} rows does not fit the padded size {padded_size}")
    if weight.shape[0] == padded_size:
        return weight
    pad = weight.new_zeros((padded_size - weight.shape[0], *weight.shape[1:]))
    return torch.cat([weight, pad], dim=0)
