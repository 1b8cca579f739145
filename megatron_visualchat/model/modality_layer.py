"""``TransformerLayer`` that tells its modality norms which tokens are images (mPLUG-Owl2's modality-adaptive
module). Like ``ModalitySplitSelfAttention``: set the mask from the token codes, run the stock forward, clear.
Under sequence parallelism the layer's hidden states (and so the norms' inputs) are this TP rank's sequence shard."""

from __future__ import annotations

from megatron.core.transformer.transformer_layer import TransformerLayer

from megatron_visualchat.model.norms import ModalityRMSNorm
from megatron_visualchat.model.token_codes import image_routing


class ModalityAwareTransformerLayer(TransformerLayer):
    def forward(self, *args, **kwargs):
        hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        codes = kwargs["attention_mask"] if "attention_mask" in kwargs else (args[1] if len(args) > 1 else None)
        norms = [m for m in (self.input_layernorm, self.pre_mlp_layernorm) if isinstance(m, ModalityRMSNorm)]
        if codes is not None:
            # Codes cover every key position; the hidden states are the last sq of them (fewer in decode), or under
            # sequence parallelism this rank's shard of them.
            sq, shard = hidden_states.shape[0], None
            if self.config.sequence_parallel:
                shard = (self.tp_group.rank(), self.tp_group.size())
                sq *= shard[1]
            routing = image_routing(codes, sq, shard)
            for norm in norms:
                norm.routing = routing
        try:
            return super().forward(*args, **kwargs)
        finally:
            for norm in norms:
                norm.routing = None
