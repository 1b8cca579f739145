"""DeepSpeed-VisualChat's MMCA as its code computes it: the eager peer of ``mmca_attention`` in the GPU suite.

Re-implemented (our code) after the computation in DS-VisualChat's modified HF ``modeling_llama.py``
(``_expand_mask`` with ``enable_mmca_attention``, ``_make_causal_mask``, ``LlamaAttention.forward``): two additive
[B, 1, L, L] masks in the activation dtype (keys that are images / keys that are text, each plus the causal mask; an
image query's image row keeps only its diagonal, set by a per-token Python loop with a host sync per position), then
dense [B, H, L, L] scores, one masked copy and one float32 softmax per mask, both cast back to the activation dtype,
added, times V. Only the prompt phase (Lq == Lk) is written, which is what training runs.

Where both branches have keys this equals ``mmca_attention_reference(image_rows="self+text", combine="sum")``.
It differs where DS-VC's masks leave a branch without keys (docs/design/mmca.md, "Differences"): such a softmax
spreads over every -finfo.min entry, e.g. a text token before the first image attends uniformly to earlier text
and to every image of the sequence, future ones included.
"""

from __future__ import annotations

import math

import torch

from megatron_visualchat.model.token_codes import MODALITY_IMAGE, MODALITY_TEXT


def dsvc_masks(modality: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """modality [B, L] (0 pad, 1 text, 2 image: DS-VC uses our codes) -> (image mask, text mask) [B, 1, L, L]."""
    bsz, length = modality.shape
    lowest = torch.finfo(dtype).min
    positions = torch.arange(length, device=modality.device)
    causal = torch.full((length, length), lowest, device=modality.device)
    causal = causal.masked_fill(positions < (positions + 1).view(length, 1), 0).to(dtype)[None, None]

    def keys_only(code: int) -> torch.Tensor:
        keep = (modality == code).to(dtype)[:, None, None, :].expand(bsz, 1, length, length)
        inverted = 1.0 - keep
        return inverted.masked_fill(inverted.to(torch.bool), lowest)

    image_mask = keys_only(MODALITY_IMAGE)
    for i in range(bsz):  # DS-VC's loop: image tokens do not attend to other image tokens
        for j in range(length):
            if modality[i, j] == MODALITY_IMAGE:
                image_mask[i, :, j, :] = lowest
                image_mask[i, :, j, j] = 0
    return image_mask + causal, keys_only(MODALITY_TEXT) + causal


def dsvc_mmca_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        masks: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """q [B, Hq, L, D]; k, v [B, Hkv, L, D] (GQA repeated as DS-VC's ``repeat_kv``); masks from ``dsvc_masks``."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    attn_weights = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(q.shape[-1])
    attn_weights_img = attn_weights + masks[0]
    attn_weights_text = attn_weights + masks[1]
    attn_weights_img = torch.softmax(attn_weights_img, dim=-1, dtype=torch.float32).to(q.dtype)
    attn_weights_text = torch.softmax(attn_weights_text, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(attn_weights_img + attn_weights_text, v)
