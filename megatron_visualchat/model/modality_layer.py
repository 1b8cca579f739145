"""``TransformerLayer`` that tells its modality norms which tokens are images (mPLUG-Owl2's modality-adaptive
module). Like ``ModalitySplitSelfAttention``: set the mask from the token codes, run the stock forward, clear."""

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
            # Codes cover every key position; the hidden states are the last sq of them (fewer in decode).
            routing = image_routing(codes, hidden_states.shape[0])
            for norm in norms:
                norm.routing = routing
        try:
            return super().forward(*args, **kwargs)
        finally:
            for norm in norms:
                norm.routing = None
