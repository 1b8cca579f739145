"""``SelfAttention`` that routes image tokens through modality-split projections.

The only difference from megatron-core's ``SelfAttention``: before the stock forward it tells its split linears
which tokens are images (from the token codes in ``attention_mask``), and clears that afterwards. Everything else
(RoPE, GQA head split, TP, recompute) is upstream code.
"""

from __future__ import annotations

from megatron.core.transformer.attention import SelfAttention

from megatron_visualchat.model.mmca.split_linear import (
    ModalitySplitColumnParallelLinear,
    ModalitySplitRowParallelLinear,
)
from megatron_visualchat.model.token_codes import image_routing


class ModalitySplitSelfAttention(SelfAttention):
    def _split_linears(self):
        return [m for m in (self.linear_qkv, self.linear_proj)
                if isinstance(m, (ModalitySplitColumnParallelLinear, ModalitySplitRowParallelLinear))]

    def forward(self, hidden_states, attention_mask, *args, **kwargs):
        split = self._split_linears()
        if attention_mask is not None and split:
            # Codes cover all key positions; the hidden states are the last sq of them (all, except in decode).
            routing = image_routing(attention_mask, hidden_states.shape[0])
            for m in split:
                m.routing = routing
        try:
            return super().forward(hidden_states, attention_mask, *args, **kwargs)
        finally:
            for m in split:
                m.routing = None
