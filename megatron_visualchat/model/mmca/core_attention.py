"""MMCA as a megatron-core core-attention module (the ``core_attention`` slot of ``SelfAttentionSubmodules``).

megatron-core hands it query ``[sq, b, np, hn]`` and key/value ``[sk, b, ng, hn]`` for this TP rank's heads, and
the ``attention_mask`` slot, which carries our packed token codes (see ``model/token_codes.py``). Heads are split
across TP ranks; codes are replicated, so tensor parallelism needs no communication here. Under context
parallelism the query, key, value and codes are this rank's two sequence chunks: keys, values and key codes are
all-gathered over the CP group and the queries attend at their global positions (``context_parallel.py``).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from megatron.core.transformer.module import MegatronModule

from megatron_visualchat.model.mmca.context_parallel import gather_sequence, whole_sequence_codes
from megatron_visualchat.model.mmca.fast import mmca_attention
from megatron_visualchat.model.token_codes import unpack_token_codes


class MMCACoreAttention(MegatronModule):
    """Core attention for ``mode`` "mmca" (two-branch multi-modal causal attention) or "causal" (the CA baseline)
    over the spliced sequence; ``image_rows``/``combine`` follow docs/design/mmca.md."""

    def __init__(self, config, layer_number: int, attn_mask_type=None, attention_type: str = "self",
                 cp_comm_type: Optional[str] = None, softmax_scale: Optional[float] = None, pg_collection=None,
                 *, mode: str = "mmca", image_rows: str = "self", combine: str = "sum"):
        super().__init__(config=config)
        if config.attention_dropout:
            raise ValueError(f"attention_dropout={config.attention_dropout}: MMCA has no attention dropout "
                             "(LLaMA-2 trains without it); set it to 0")
        self.mode, self.image_rows, self.combine = mode, image_rows, combine
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor,
                attn_mask_type=None, attention_bias=None, packed_seq_params=None) -> torch.Tensor:
        if attention_bias is not None or packed_seq_params is not None:
            raise ValueError("MMCA core attention takes packing through sample_id codes, not packed_seq_params "
                             "or attention_bias")
        if attention_mask is None:
            raise ValueError("MMCA core attention needs token codes in attention_mask (pack_token_codes)")
        sq, b, heads, head_dim = query.shape
        packed, query_positions = whole_sequence_codes(attention_mask)
        if query_positions is not None:  # context parallelism: this rank's queries against every key
            if attention_mask.shape[2] != sq or key.shape[0] != sq:
                raise ValueError(f"context parallelism needs the codes, queries and keys of this rank's chunks "
                                 f"(got {attention_mask.shape[2]} codes, {sq} queries, {key.shape[0]} keys); "
                                 "KV-cache decode runs with context_parallel_size=1")
            key, value = gather_sequence(key, 0), gather_sequence(value, 0)
        codes = unpack_token_codes(packed)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, hn]
        out = mmca_attention(q, k, v, codes.modality, codes.image_id, image_rows=self.image_rows,
                             combine=self.combine, sample_id=codes.sample_id, mode=self.mode,
                             softmax_scale=self.softmax_scale, query_positions=query_positions)
        return out.permute(2, 0, 1, 3).reshape(sq, b, heads * head_dim)
