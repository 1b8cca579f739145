"""Parameters held by one GPU at a layout, in closed form for the LLaMA decoder and counted from a meta-device build
for the vision tower (whatever ENCODERS / PROJECTORS hold). Checked against meta builds of the whole model at real
layouts (tests/training/test_planner.py). Covers --modality-split none without LoRA."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from megatron_visualchat.config import LLMConfig, TrainableConfig
from megatron_visualchat.model.vision import build_vision_tower


@dataclass(frozen=True)
class VisionShape:
    """The vision tower's sizes: parameters of encoder and projector, and the encoder trunk's shape (for the
    activation estimate when the encoder trains)."""

    encoder_params: int
    projector_params: int
    depth: int
    width: int
    heads: int
    tokens: int  # tokens per image inside the trunk (patches + prefix tokens)
    features: int  # numbers per image the encoder hands the projector (its output tokens x width)


@functools.lru_cache(maxsize=None)
def vision_shape(encoder: str, projector: str, lm_hidden: int) -> VisionShape:
    """Build the tower on the meta device (no memory, no weights) and read its sizes."""
    with torch.device("meta"):
        tower = build_vision_tower(encoder, projector, lm_hidden)
    trunk = next(m for m in tower.encoder.modules() if hasattr(m, "blocks") and hasattr(m, "embed_dim"))
    return VisionShape(
        encoder_params=sum(p.numel() for p in tower.encoder.parameters()),
        projector_params=sum(p.numel() for p in tower.projector.parameters()),
        depth=len(trunk.blocks), width=trunk.embed_dim, heads=trunk.blocks[0].attn.num_heads,
        tokens=trunk.patch_embed.num_patches + getattr(trunk, "num_prefix_tokens", 0),
        features=tower.encoder.num_image_tokens * tower.encoder.hidden_size,
    )


def decoder_layer_params(llm: LLMConfig, tp: int) -> int:
    """One decoder layer on one TP rank: q, k, v, o and SwiGLU gate, up, down split over TP; the two RMSNorm
    weights whole on every rank."""
    h, kv = llm.hidden_size, llm.query_groups * llm.head_dim
    return (2 * h * h + 2 * h * kv + 3 * h * llm.ffn_hidden_size) // tp + 2 * h


@dataclass(frozen=True)
class StageParams:
    """Parameters on one GPU of a pipeline stage: all, and those that train."""

    total: int
    trainable: int


def stage_params(llm: LLMConfig, vision: VisionShape, trainable: TrainableConfig, *, tp: int, layers: int,
                 first: bool, last: bool) -> StageParams:
    """One TP rank of a stage with ``layers`` decoder layers; ``first`` adds the input embeddings and the vision
    tower (whole on every TP rank), ``last`` the final norm and the untied output layer."""
    embedding = llm.padded_vocab_size(tp) * llm.hidden_size // tp
    decoder = layers * decoder_layer_params(llm, tp)
    total, train = decoder, decoder if trainable.llm else 0
    if first:
        total += embedding + vision.encoder_params + vision.projector_params
        if trainable.llm or trainable.embeddings or trainable.new_token_rows_only:
            train += embedding  # new_token_rows_only masks gradients, but the whole table is in the optimizer
        train += vision.encoder_params * trainable.vision_encoder + vision.projector_params * trainable.projector
    if last:
        total += embedding + llm.hidden_size
        train += (embedding + llm.hidden_size) if trainable.llm else 0
    return StageParams(total, train)
