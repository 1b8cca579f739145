"""Option and shape checks shared by the MMCA implementations (reference and fast), before any device work.

The option names and allowed values are config.py's, so a direct call fails like a bad config does.
"""

from __future__ import annotations

import torch

from megatron_visualchat.config import COMBINES, CORE_ATTENTION_MODES, IMAGE_ROWS, check_choice


def check_attention_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    modality: torch.Tensor,
    image_id: torch.Tensor,
    sample_id: torch.Tensor | None,
    *,
    image_rows: str,
    combine: str,
    mode: str,
    query_positions: torch.Tensor | None = None,
) -> None:
    """Validate options and shapes (no device sync): q [B,Hq,Lq,D], k/v [B,Hkv,Lk,D], codes [B,Lk], Lq <= Lk,
    ``query_positions`` (the queries' key positions, when given) [Lq] integer on q's device."""
    check_choice("mode", mode, CORE_ATTENTION_MODES)
    check_choice("image_rows", image_rows, IMAGE_ROWS)
    check_choice("combine", combine, COMBINES)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [batch, heads, length, head_dim], got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    batch, heads_q, len_q, dim = q.shape
    _, heads_kv, len_k, dim_k = k.shape
    if k.shape[0] != batch:
        raise ValueError(f"batch size differs: q has {batch}, k/v have {k.shape[0]}")
    if dim_k != dim:
        raise ValueError(f"head_dim differs: q has {dim}, k/v have {dim_k}")
    if heads_q % heads_kv != 0:
        raise ValueError(f"query heads ({heads_q}) must be a multiple of key/value heads ({heads_kv})")
    if len_q > len_k:
        raise ValueError(f"query length {len_q} exceeds key length {len_k}: queries are the last Lq key positions")
    pos = query_positions
    if pos is not None and (tuple(pos.shape) != (len_q,) or pos.dtype.is_floating_point or pos.device != q.device):
        raise ValueError(f"query_positions must be a 1-D integer tensor of the {len_q} query positions on {q.device}, "
                         f"got {tuple(pos.shape)} {pos.dtype} on {pos.device}")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    codes = {"modality": modality, "image_id": image_id}
    if sample_id is not None:
        codes["sample_id"] = sample_id
    for name, t in codes.items():
        if tuple(t.shape) != (batch, len_k):
            raise ValueError(f"{name} must have shape [batch, key_length] = {(batch, len_k)}, got {tuple(t.shape)}")
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
