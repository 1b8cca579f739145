"""Dense O(L^2) MMCA attention: the test oracle and the CPU path.

Every attention mode is written as a list of *branches*; a branch is a boolean key set per query
([B, Lq, Lk]) with its own softmax. The output is the sum of the branch outputs ("sum") or their mean
over the non-empty branches ("mean"). An empty branch contributes exactly 0, so pad queries (no branch
at all) get 0 and no row ever produces NaN, in the forward or the backward pass.

MMCA branches (docs/design/mmca.md), for a query at absolute position i and keys j of the same sample:
- text branch: text keys j <= i, for text queries (and image queries when image_rows="self+text");
- image branch: for text queries, all image keys j < i under ONE joint softmax; for image queries,
  the query itself (image_rows "self" / "self+text": o_i = v_i) or every token of its own image
  (image_rows="image", bidirectional).
Causal mode has one branch: every non-pad key j <= i of the same sample; image_rows and combine are ignored.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from megatron_visualchat.model.mmca.inputs import check_attention_inputs
from megatron_visualchat.model.token_codes import MODALITY_IMAGE, MODALITY_PAD, MODALITY_TEXT, check_code_values


class _Layout:
    """Broadcastable query-vs-key views of the token codes: query side [B, Lq, 1], key side [B, 1, Lk]."""

    def __init__(self, modality, image_id, sample_id, len_q: int, query_positions=None):
        len_k = modality.shape[1]
        if sample_id is None:
            sample_id = torch.zeros_like(modality)
        pos_k = torch.arange(len_k, device=modality.device)
        pos_q = pos_k[len_k - len_q :] if query_positions is None else query_positions
        self.q_modality = modality[:, pos_q, None]
        self.k_modality = modality[:, None, :]
        self.q_image_id = image_id[:, pos_q, None]
        self.k_image_id = image_id[:, None, :]
        self.same_sample = sample_id[:, pos_q, None] == sample_id[:, None, :]
        self.key_not_after = pos_k[None, None, :] <= pos_q[None, :, None]
        self.key_before = pos_k[None, None, :] < pos_q[None, :, None]
        self.key_is_query = pos_k[None, None, :] == pos_q[None, :, None]


def _image_query_keys_self(layout: _Layout) -> torch.Tensor:
    return layout.key_is_query


def _image_query_keys_same_image(layout: _Layout) -> torch.Tensor:
    return layout.q_image_id == layout.k_image_id


# image_rows -> (key set of the image branch for image queries, whether image queries also get the text branch)
_IMAGE_ROWS: dict[str, tuple[Callable[[_Layout], torch.Tensor], bool]] = {
    "self": (_image_query_keys_self, False),
    "self+text": (_image_query_keys_self, True),
    "image": (_image_query_keys_same_image, False),
}


def _mmca_branches(layout: _Layout, image_rows: str) -> list[torch.Tensor]:
    image_query_keys, image_rows_see_text = _IMAGE_ROWS[image_rows]
    text_q = layout.q_modality == MODALITY_TEXT
    image_q = layout.q_modality == MODALITY_IMAGE
    text_k = layout.k_modality == MODALITY_TEXT
    image_k = layout.k_modality == MODALITY_IMAGE

    text_rows = (text_q | image_q) if image_rows_see_text else text_q
    text_branch = text_rows & text_k & layout.key_not_after & layout.same_sample
    image_branch = (
        image_k
        & layout.same_sample
        & ((text_q & layout.key_before) | (image_q & image_query_keys(layout)))
    )
    return [text_branch, image_branch]


def _causal_branches(layout: _Layout, image_rows: str) -> list[torch.Tensor]:
    del image_rows  # causal attention treats every non-pad token alike
    real_q = layout.q_modality != MODALITY_PAD
    real_k = layout.k_modality != MODALITY_PAD
    return [real_q & real_k & layout.key_not_after & layout.same_sample]


_MODES: dict[str, Callable[[_Layout, str], list[torch.Tensor]]] = {
    "mmca": _mmca_branches,
    "causal": _causal_branches,
}


def _branch_attention(scores: torch.Tensor, keys: torch.Tensor, v: torch.Tensor):
    """Softmax over one key set per row, NaN-free: an empty row gives output 0 (and zero gradients).

    scores [B,H,Lq,Lk] float32, keys [B,Lq,Lk] bool, v [B,H,Lk,D] float32 -> (out [B,H,Lq,D], non_empty [B,1,Lq]).
    """
    keys = keys[:, None]
    non_empty = keys.any(dim=-1)
    # Rows without keys get all-zero scores (finite softmax), then every weight is zeroed by the mask.
    masked = scores.masked_fill(~keys, float("-inf")).masked_fill(~non_empty[..., None], 0.0)
    weights = torch.softmax(masked, dim=-1).masked_fill(~keys, 0.0)
    return weights @ v, non_empty


def mmca_attention_reference(
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
    """Dense MMCA (or causal) attention; math in float32, result in q's dtype.

    q [B,Hq,Lq,D]; k, v [B,Hkv,Lk,D] (GQA: query head h uses kv head h // (Hq // Hkv), as megatron);
    modality / image_id / sample_id [B,Lk] describe the key positions; the queries are the last Lq of them, or
    the key positions ``query_positions`` [Lq] (context parallelism: this rank's chunks, keys gathered).
    Pad keys are never attended; pad queries output exactly 0. combine="mean" divides each row by its number
    of non-empty branches (text rows with earlier images; image rows with earlier text under "self+text").
    mode="causal" ignores image_rows and combine. Returns [B,Hq,Lq,D].
    """
    check_attention_inputs(
        q, k, v, modality, image_id, sample_id, image_rows=image_rows, combine=combine, mode=mode,
        query_positions=query_positions,
    )
    check_code_values(modality, image_id)
    group = q.shape[1] // k.shape[1]
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale

    k = k.float().repeat_interleave(group, dim=1)
    v = v.float().repeat_interleave(group, dim=1)
    scores = (q.float() @ k.transpose(-1, -2)) * scale

    layout = _Layout(modality, image_id, sample_id, q.shape[2], query_positions)
    outputs, non_empty = zip(*(_branch_attention(scores, keys, v) for keys in _MODES[mode](layout, image_rows)))
    out = sum(outputs)
    if combine == "mean" and mode == "mmca":
        out = out / sum(n.float() for n in non_empty).clamp(min=1.0)[..., None]
    return out.to(q.dtype)
