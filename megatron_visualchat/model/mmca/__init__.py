"""Multi-Modal Causal Attention (MMCA): dense reference (oracle, CPU path) and FlexAttention fast path."""

from megatron_visualchat.model.mmca.codes import (
    COMBINE,
    IMAGE_ROWS,
    MODALITY_IMAGE,
    MODALITY_PAD,
    MODALITY_TEXT,
    MODES,
    codes_from_layout,
)
from megatron_visualchat.model.mmca.fast import mmca_attention
from megatron_visualchat.model.mmca.reference import mmca_attention_reference

__all__ = [
    "COMBINE",
    "IMAGE_ROWS",
    "MODALITY_IMAGE",
    "MODALITY_PAD",
    "MODALITY_TEXT",
    "MODES",
    "codes_from_layout",
    "mmca_attention",
    "mmca_attention_reference",
]
