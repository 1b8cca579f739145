"""The LLaMA-architecture language model as a megatron-core ``GPTModel`` for this rank's pipeline stage."""

from __future__ import annotations

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


def build_gpt_model(
    cfg: VisualChatConfig,
    layer_spec=None,
    *,
    params_dtype: torch.dtype = torch.float32,
    vp_stage: Optional[int] = None,
    transformer_config=None,
):
    """Build this rank's GPTModel. ``layer_spec`` defaults to megatron-core's stock local LLaMA spec (RMSNorm);
    the multimodal model passes the MMCA spec."""
    config = transformer_config or to_transformer_config(cfg, params_dtype)
    pre, post = stage_flags(vp_stage)
    return GPTModel(
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
    )
