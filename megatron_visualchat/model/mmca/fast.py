"""Fast MMCA attention: FlexAttention with block masks built from the token codes; no [B, H, L, L] tensor.

MMCA needs two separately normalised softmaxes per text row, so it runs two flex_attention calls:
- text call: text keys j <= i (text rows; also image rows when image_rows="self+text");
- image call: image keys j < i for text rows (one joint softmax over all earlier images); image keys of the
  row's own image for image rows when image_rows="image".
Image rows under "self" / "self+text" add their own value vector v_i (a gather, no attention work).
flex_attention returns 0 for a row whose key set is empty, with logsumexp -inf; the finite-lse flags count
the non-empty branches for combine="mean". Masks read the query rows' codes and positions from tensors, not
Python ints, so KV-cache decode steps (growing Lk) do not recompile.

Causal mode uses torch SDPA (is_causal) when there is no padding, one sample per row and Lq == Lk, else flex.
Block masks (two per MMCA call) and the code-value check are cached per codes tensor (``PerCodesCache``): every
layer of a forward gets the same codes, so they are built by the first layer and reused by the others.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import AuxRequest, BlockMask, create_block_mask, flex_attention

from megatron_visualchat.model.mmca.inputs import check_attention_inputs
from megatron_visualchat.model.mmca.reference import mmca_attention_reference
from megatron_visualchat.model.token_codes import (
    MODALITY_IMAGE,
    MODALITY_PAD,
    MODALITY_TEXT,
    NUM_MODALITIES,
    PerCodesCache,
    check_code_values,
)


@dataclass(frozen=True)
class _Codes:
    """Key codes [B, Lk] and the query rows' codes [B, Lq] / absolute positions [Lq], all tensors; ``q_key``
    names the query positions in cache keys (the default "last Lq" needs no tensor in the key)."""

    modality: torch.Tensor
    image_id: torch.Tensor
    sample_id: torch.Tensor
    q_modality: torch.Tensor
    q_image_id: torch.Tensor
    q_sample_id: torch.Tensor
    q_pos: torch.Tensor
    q_key: tuple

    @classmethod
    def build(cls, modality, image_id, sample_id, len_q: int, query_positions=None) -> "_Codes":
        len_k = modality.shape[1]
        if sample_id is None:
            sample_id = torch.zeros_like(modality)
        if query_positions is None:
            q_pos, q_key = torch.arange(len_k - len_q, len_k, device=modality.device), ("last", len_q)
        else:
            q_pos, q_key = query_positions, PerCodesCache.codes_key(query_positions)
        return cls(
            modality, image_id, sample_id,
            modality[:, q_pos], image_id[:, q_pos], sample_id[:, q_pos], q_pos, q_key,
        )


# A branch is a table rules[query modality code, key modality code] of how a query may see a key
# of the same sample. One mask_mod code object serves every branch and mode, with the table as a captured
# tensor: torch.compile guards on code objects and Python constants, so this keeps recompilations to shapes.
NEVER, UP_TO_SELF, BEFORE, SAME_IMAGE = 0, 1, 2, 3
_Rules = dict[tuple[int, int], int]

_MMCA_TEXT_RULES: _Rules = {(MODALITY_TEXT, MODALITY_TEXT): UP_TO_SELF}
_MMCA_IMAGE_RULES: _Rules = {(MODALITY_TEXT, MODALITY_IMAGE): BEFORE}
_CAUSAL_RULES: _Rules = {
    (query, key): UP_TO_SELF for query in (MODALITY_TEXT, MODALITY_IMAGE) for key in (MODALITY_TEXT, MODALITY_IMAGE)
}


class _ImageRows(NamedTuple):
    """What image queries get under one image_rows option, on top of the text-row rules."""

    text_rules: _Rules
    image_rules: _Rules
    add_own_value: bool  # o_i += v_i (a gather, no attention work)


_IMAGE_ROWS: dict[str, _ImageRows] = {
    "self": _ImageRows({}, {}, add_own_value=True),
    "self+text": _ImageRows({(MODALITY_IMAGE, MODALITY_TEXT): BEFORE}, {}, add_own_value=True),
    "image": _ImageRows({}, {(MODALITY_IMAGE, MODALITY_IMAGE): SAME_IMAGE}, add_own_value=False),
}


def _rule_table(rules: _Rules, device: torch.device) -> torch.Tensor:
    table = torch.full((NUM_MODALITIES, NUM_MODALITIES), NEVER, dtype=torch.int32)
    for (query_modality, key_modality), rule in rules.items():
        table[query_modality, key_modality] = rule
    return table.to(device)


def _mask_mod(c: _Codes, rules: torch.Tensor):
    def mask_mod(b, h, q_idx, kv_idx):
        pos = c.q_pos[q_idx]
        rule = rules[c.q_modality[b, q_idx], c.modality[b, kv_idx]]
        allowed = (
            ((rule == UP_TO_SELF) & (kv_idx <= pos))
            | ((rule == BEFORE) & (kv_idx < pos))
            | ((rule == SAME_IMAGE) & (c.image_id[b, kv_idx] == c.q_image_id[b, q_idx]))
        )
        return allowed & (c.sample_id[b, kv_idx] == c.q_sample_id[b, q_idx])

    return mask_mod


@functools.cache
def _compiled_flex_attention():
    return torch.compile(flex_attention)


@functools.cache
def _compiled_create_block_mask():
    # Compiled, the mask_mod is evaluated block by block: no dense [B, Lq, Lk] mask is materialised.
    return torch.compile(create_block_mask)


def _flex_op_eager(q, k, v, block_mask: BlockMask, scale: float):
    """flex_attention's higher-order op called directly, for CPU inputs that require grad.

    The public frontend refuses them ("FlexAttention does not support backward on CPU"), yet the op it wraps
    has a dense math forward and an autograd backward that run on CPU. This keeps the flex code path,
    backward included, testable without a GPU. Its logsumexp is in base 2; only its finiteness is used.
    """
    # Private torch API, imported here so that a torch upgrade moving it breaks only this CPU test path.
    from torch._higher_order_ops.flex_attention import flex_attention as flex_attention_op
    from torch.nn.attention.flex_attention import _apply_kernel_options, _identity

    kernel_options = _apply_kernel_options(q, k, v, True, None)
    out, lse, _ = flex_attention_op(q, k, v, _identity, block_mask.as_tuple(), scale, kernel_options)
    return out, lse


_CACHE = PerCodesCache()  # block masks and code checks, shared by all layers of a forward


def _flex(q, k, v, c: _Codes, rules: _Rules, scale: float, compile: bool):
    """One flex_attention call (GQA-aware) over one branch -> (out [B,Hq,Lq,D], row_has_keys [B,Hq,Lq] bool)."""
    batch, _, len_q, _ = q.shape
    make_block_mask = _compiled_create_block_mask() if compile else create_block_mask

    def build():
        mask_mod = _mask_mod(c, _rule_table(rules, q.device))
        return make_block_mask(mask_mod, batch, None, len_q, k.shape[2], device=q.device)

    pins = (c.modality, c.image_id, c.sample_id, c.q_pos)
    key = ("mask", PerCodesCache.codes_key(*pins[:3]), c.q_key, tuple(sorted(rules.items())), k.shape[2], compile)
    block_mask = _CACHE.get(key, build, pins)
    if q.device.type == "cpu" and (q.requires_grad or k.requires_grad or v.requires_grad):
        out, lse = _flex_op_eager(q, k, v, block_mask, scale)
    else:
        attend = _compiled_flex_attention() if compile else flex_attention
        out, aux = attend(
            q, k, v, block_mask=block_mask, scale=scale, enable_gqa=True, return_aux=AuxRequest(lse=True)
        )
        lse = aux.lse
    return out, torch.isfinite(lse)


def _mmca_fast(q, k, v, c: _Codes, image_rows: str, combine: str, scale: float, compile: bool):
    rows = _IMAGE_ROWS[image_rows]
    text_out, text_has_keys = _flex(q, k, v, c, {**_MMCA_TEXT_RULES, **rows.text_rules}, scale, compile)
    image_out, image_has_keys = _flex(q, k, v, c, {**_MMCA_IMAGE_RULES, **rows.image_rules}, scale, compile)
    out = text_out.float() + image_out.float()
    branches = text_has_keys.float() + image_has_keys.float()
    if rows.add_own_value:
        is_image_q = (c.q_modality == MODALITY_IMAGE)[:, None, :]
        v_self = v.index_select(2, c.q_pos).repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        out = out + torch.where(is_image_q[..., None], v_self.float(), 0.0)
        branches = branches + is_image_q.float()
    if combine == "mean":
        out = out / branches.clamp(min=1.0)[..., None]
    return out.to(q.dtype)


def _causal_fast(q, k, v, c: _Codes, image_rows: str, combine: str, scale: float, compile: bool):
    del image_rows, combine  # causal attention treats every non-pad token alike
    one_sample = c.sample_id == c.sample_id[:, :1]
    dense = q.shape[2] == k.shape[2] and not bool((c.modality == MODALITY_PAD).any() | ~one_sample.all())
    if dense:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    out, _ = _flex(q, k, v, c, _CAUSAL_RULES, scale, compile)
    return out


_FAST_MODES: dict[str, Callable[..., torch.Tensor]] = {"mmca": _mmca_fast, "causal": _causal_fast}


def _mmca_attention_fast(
    q, k, v, modality, image_id, *,
    image_rows: str = "self",
    combine: str = "sum",
    sample_id: torch.Tensor | None = None,
    mode: str = "mmca",
    softmax_scale: float | None = None,
    compile: bool = True,
    query_positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """The flex/SDPA path on any device; compile=False runs flex eagerly (slow, dense math; used on CPU tests)."""
    check_attention_inputs(
        q, k, v, modality, image_id, sample_id, image_rows=image_rows, combine=combine, mode=mode,
        query_positions=query_positions,
    )
    _CACHE.get(("checked", PerCodesCache.codes_key(modality, image_id)),
               lambda: check_code_values(modality, image_id), (modality, image_id))
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    codes = _Codes.build(modality, image_id, sample_id, q.shape[2], query_positions)
    return _FAST_MODES[mode](q, k, v, codes, image_rows, combine, scale, compile)


def mmca_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    modality: torch.Tensor,
    image_id: torch.Tensor,
    *,
    image_rows: str = "self",
    combine: str = "sum",
    sample_id: torch.Tensor | None = None,
    mode: str = "mmca",
    softmax_scale: float | None = None,
    query_positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """MMCA (or causal) attention with the semantics of mmca_attention_reference, differentiable.
    ``query_positions``: the queries' positions among the keys (default: the last Lq; see the reference).

    On CUDA: compiled FlexAttention (block-sparse, O(L) memory) / SDPA. On other devices it falls back to the
    dense reference, which is faster than eager flex there. mode="causal" ignores image_rows and combine.
    """
    if q.device.type == "cuda":
        return _mmca_attention_fast(
            q, k, v, modality, image_id, image_rows=image_rows, combine=combine, sample_id=sample_id,
            mode=mode, softmax_scale=softmax_scale, compile=True, query_positions=query_positions,
        )
    return mmca_attention_reference(
        q, k, v, modality, image_id, image_rows=image_rows, combine=combine, sample_id=sample_id,
        mode=mode, softmax_scale=softmax_scale, query_positions=query_positions,
    )
