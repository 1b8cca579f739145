"""Token codes (modality, image_id, sample_id) travel through megatron-core as one integer tensor.

megatron-core hands ``attention_mask`` unchanged from GPTModel through every TransformerLayer to the core
attention, on every pipeline stage (each stage's forward step reads it from the batch). Packing the three codes
into that slot as a ``[B, 3, L]`` LongTensor lets MMCA reach every layer without widening upstream signatures.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from megatron_visualchat.model.mmca.codes import MODALITY_IMAGE
from megatron_visualchat.model.per_codes_cache import PerCodesCache

MODALITY, IMAGE_ID, SAMPLE_ID = 0, 1, 2


class TokenCodes(NamedTuple):
    modality: torch.Tensor  # [B, L] 0 pad, 1 text, 2 image
    image_id: torch.Tensor  # [B, L] image index in order of appearance, -1 elsewhere
    sample_id: torch.Tensor  # [B, L] packed-sample index (all 0 when not packed)


def pack_token_codes(modality: torch.Tensor, image_id: torch.Tensor,
                     sample_id: Optional[torch.Tensor] = None) -> torch.Tensor:
    if modality.shape != image_id.shape or (sample_id is not None and sample_id.shape != modality.shape):
        raise ValueError(f"token codes must share one [B, L] shape, got modality {tuple(modality.shape)}, "
                         f"image_id {tuple(image_id.shape)}"
                         + ("" if sample_id is None else f", sample_id {tuple(sample_id.shape)}"))
    if sample_id is None:
        sample_id = torch.zeros_like(modality)
    return torch.stack([modality, image_id, sample_id], dim=1).long()


def unpack_token_codes(packed: torch.Tensor) -> TokenCodes:
    if packed.dim() != 3 or packed.shape[1] != 3 or packed.dtype != torch.long:
        raise ValueError(f"expected packed token codes of shape [B, 3, L] (int64), got {tuple(packed.shape)} "
                         f"{packed.dtype}; build them with pack_token_codes")
    return TokenCodes(packed[:, MODALITY], packed[:, IMAGE_ID], packed[:, SAMPLE_ID])


class ImageRouting(NamedTuple):
    """Which of the last ``sq`` positions are image tokens, in megatron's [s, b] layout, and their flat indices
    (row-major over [s, b]) for the modality-split projections and norms."""

    mask: torch.Tensor  # [s, b] bool
    image_idx: torch.Tensor  # flat indices of image tokens
    text_idx: torch.Tensor  # flat indices of the other tokens
    any_image: bool


_ROUTING_CACHE = PerCodesCache()


def image_routing(packed: torch.Tensor, sq: int) -> ImageRouting:
    """The routing for hidden states that are the last ``sq`` positions of ``packed`` codes (all of them, except
    in KV-cache decode). Computed once per codes tensor (one host sync) and shared by every layer."""

    def build() -> ImageRouting:
        mask = (unpack_token_codes(packed).modality[:, -sq:] == MODALITY_IMAGE).transpose(0, 1).contiguous()
        flat = mask.reshape(-1)
        image_idx, text_idx = flat.nonzero().squeeze(1), (~flat).nonzero().squeeze(1)
        return ImageRouting(mask, image_idx, text_idx, bool(image_idx.numel()))

    return _ROUTING_CACHE.get(("routing", PerCodesCache.codes_key(packed), sq), build, (packed,))
