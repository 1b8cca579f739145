"""The LLaMA-architecture language model as a megatron-core ``GPTModel`` for this rank's pipeline stage.

Megatron pads the vocabulary to a multiple of ``make_vocab_size_divisible_by * TP``; the padded columns of the
output layer are no tokens. They are set to -inf right at the output layer, so the softmax of the vocab-parallel
cross entropy, the accuracy argmax and generation all see the real vocabulary only, and the loss does not depend
on how much padding a TP size brings.
"""

from __future__ import annotations

from functools import partial
from typing import Optional

import torch
from megatron.core import parallel_state as ps
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

from megatron_visualchat.config import VisualChatConfig, to_transformer_config


def stage_flags(vp_stage: Optional[int] = None) -> tuple[bool, bool]:
    """(pre_process, post_process) for this rank (and virtual stage): embeddings first, output layer last."""
    return (ps.is_pipeline_first_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage),
            ps.is_pipeline_last_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage))


def _mask_padded_vocab(vocab_size: int, layer, args, output):
    """Forward hook on the output layer: logits of columns past ``vocab_size`` become -inf. Logits are this rank's
    vocabulary slice [s, b, V_padded/TP], or all of it when gathered (inference)."""
    logits, bias = output
    gathered = logits.shape[-1] == layer.output_size
    start = 0 if gathered else layer.tp_group.rank() * layer.output_size_per_partition
    if start + logits.shape[-1] <= vocab_size:
        return None  # no padded column here
    ids = torch.arange(start, start + logits.shape[-1], device=logits.device)
    return logits.masked_fill(ids >= vocab_size, float("-inf")), bias


def build_gpt_model(
    cfg: VisualChatConfig,
    layer_spec=None,
    *,
    params_dtype: torch.dtype = torch.float32,
    vp_stage: Optional[int] = None,
    transformer_config=None,
    scatter_embeddings: bool = True,
):
    """Build this rank's GPTModel. ``layer_spec`` defaults to megatron-core's stock local LLaMA spec (RMSNorm);
    the multimodal model passes the MMCA spec. ``scatter_embeddings=False``: under sequence parallelism the
    embedding returns the full sequence and the caller scatters it (after splicing in the images)."""
    config = transformer_config or to_transformer_config(cfg, params_dtype)
    pre, post = stage_flags(vp_stage)
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec or get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=cfg.llm.padded_vocab_size(cfg.parallel.tp),
        max_sequence_length=cfg.llm.max_position_embeddings,
        pre_process=pre,
        post_process=post,
        share_embeddings_and_output_weights=not cfg.llm.untie_embeddings,
        position_embedding_type="rope",
        rotary_base=int(cfg.llm.rope_base),
        rotary_percent=1.0,
        vp_stage=vp_stage,
        scatter_embedding_sequence_parallel=scatter_embeddings,
    )
    if post:
        model.output_layer.register_forward_hook(partial(_mask_padded_vocab, cfg.llm.vocab_size))
    return model
