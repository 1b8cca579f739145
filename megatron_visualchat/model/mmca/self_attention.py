"""``SelfAttention`` that routes image tokens through modality-split projections.

The only difference from megatron-core's ``SelfAttention``: before the stock forward it tells its split linears
which tokens are images (from the token codes in ``attention_mask``), and clears that afterwards. Everything else
(RoPE, GQA head split, TP, recompute) is upstream code. Under sequence parallelism the hidden states are this TP
rank's sequence shard, but the split matmuls run over the whole sequence (``split_linear.py``): their routing
covers all ``tp x`` shard positions, and the output projection's ``out_routing`` this rank's shard.
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
            # Codes cover all key positions; the hidden states are the last sq of them (all, except in decode),
            # or under sequence parallelism this rank's shard of them.
            group = split[0].tp_group
            shards = group.size() if self.config.sequence_parallel else 1
            sq = hidden_states.shape[0] * shards
            routing = image_routing(attention_mask, sq)
            for m in split:
                m.routing = routing
                if isinstance(m, ModalitySplitRowParallelLinear):
                    m.out_routing = routing if shards == 1 else image_routing(attention_mask, sq,
                                                                              (group.rank(), shards))
        try:
            return super().forward(hidden_states, attention_mask, *args, **kwargs)
        finally:
            for m in split:
                m.routing = None
                if isinstance(m, ModalitySplitRowParallelLinear):
                    m.out_routing = None
