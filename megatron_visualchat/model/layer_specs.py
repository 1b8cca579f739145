"""``get_mmca_layer_spec``: megatron-core's LLaMA TransformerLayer recipe with MMCA plugged into its slots.

Built from a validated ``AttentionConfig`` (``config.py`` checks the options and their combinations; nothing is
checked again here except what only this machine can tell: whether Transformer-Engine is installed).
The slots that change: ``self_attention`` (a narrow subclass that routes image tokens when projections are split),
its ``core_attention`` (MMCA or causal over token codes), per ``modality_split`` ``linear_qkv`` / ``linear_proj``,
and for the local backend the norms (``model/norms.py``: weights and outputs in the activation dtype). The MLP is
the stock module; state-dict keys stay those of megatron-core's GPT spec, so converted LLaMA checkpoints load
unchanged.
``modality_norms`` (mPLUG-Owl2) swaps in per-modality norms and a layer that tells them which tokens are images.
A ``LoraConfig`` with rank > 0 swaps each target linear for its LoRA subclass (``model/lora.py``), split or not.
``cross`` mode (the CrA baseline, docs/design/cross_attention.md): self-attention is plain causal, and every
``cross_attention_interval``-th layer fills the layer's cross-attention slots (``with_cross_attention``); the other
layers keep megatron-core's IdentityOp there.
"""

from __future__ import annotations

import copy

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import CrossAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from megatron_visualchat.config import AttentionConfig, ConfigError, LoraConfig
from megatron_visualchat.model.cross_attention import CrossCoreAttention, GatedCrossAttention, has_cross_attention
from megatron_visualchat.model.lora import lora_linear_spec
from megatron_visualchat.model.mmca.core_attention import MMCACoreAttention
from megatron_visualchat.model.mmca.self_attention import ModalitySplitSelfAttention
from megatron_visualchat.model.mmca.split_linear import (
    ModalitySplitColumnParallelLinear,
    ModalitySplitRowParallelLinear,
)
from megatron_visualchat.model.modality_layer import ModalityAwareTransformerLayer
from megatron_visualchat.model.norms import ModalityRMSNorm, RMSNorm


def _base_spec(backend: str) -> ModuleSpec:
    if backend == "local":
        return get_gpt_layer_local_spec(normalization="RMSNorm")
    from megatron.core.extensions import transformer_engine as te  # imports Transformer-Engine when installed

    if not getattr(te, "HAVE_TE", False):
        raise ConfigError("attention.backend='te' needs Transformer-Engine, which is not installed here; "
                          "install transformer-engine[pytorch] (NGC images carry it) or use backend='local'")
    return get_gpt_layer_with_transformer_engine_spec()


def get_mmca_layer_spec(attention: AttentionConfig, lora: LoraConfig = LoraConfig()) -> ModuleSpec:
    """A TransformerLayer spec for GPTModel from a validated ``AttentionConfig`` (``VisualChatConfig.validate``):
    ``mode`` mmca | causal picks the core attention; ``modality_split`` kv | qkv | qkvo adds image-side
    projections; ``backend`` local | te picks the base recipe; ``modality_norms`` adds per-modality input and
    pre-MLP norms (mPLUG-Owl2; with ``causal`` + ``kv`` this is Owl2's modality-adaptive module). ``lora.rank``
    > 0 puts LoRA adapters on the ``lora.targets`` linears."""
    split, backend = attention.modality_split, attention.backend
    spec = copy.deepcopy(_base_spec(backend))
    attn = spec.submodules.self_attention
    attn.module = ModalitySplitSelfAttention
    attn.params = {**attn.params, "attn_mask_type": AttnMaskType.arbitrary}
    subs = attn.submodules
    subs.core_attention = ModuleSpec(MMCACoreAttention, params=dict(
        mode="causal" if attention.mode == "cross" else attention.mode, image_rows=attention.image_rows,
        combine=attention.combine))
    if split in ("kv", "qkv", "qkvo"):
        subs.linear_qkv = ModuleSpec(ModalitySplitColumnParallelLinear,
                                     params={"split": "kv" if split == "kv" else "qkv"})
    if split == "qkvo":
        subs.linear_proj = ModalitySplitRowParallelLinear
    if backend == "local":
        norm = ModalityRMSNorm if attention.modality_norms else RMSNorm
        spec.submodules.input_layernorm = norm
        spec.submodules.pre_mlp_layernorm = norm
    if attention.modality_norms:
        spec.module = ModalityAwareTransformerLayer
    if lora.rank:
        mlp = spec.submodules.mlp.submodules
        slots = {"qkv": (subs, "linear_qkv"), "proj": (subs, "linear_proj"), "fc1": (mlp, "linear_fc1"),
                 "fc2": (mlp, "linear_fc2")}
        for target in lora.targets:
            owner, name = slots[target]
            setattr(owner, name, lora_linear_spec(getattr(owner, name), lora))
    return spec


def with_cross_attention(layer_spec: ModuleSpec, rope_base: float) -> ModuleSpec:
    """``layer_spec`` plus a gated cross-attention sub-layer after self-attention: RMSNorm, megatron-core's
    CrossAttention (column-parallel q / kv, row-parallel output) gated by ``tanh(gate)``, stock bias-dropout-add;
    ``rope_base`` of the LLM's rotary embedding places the images (``CrossCoreAttention``)."""
    spec = copy.deepcopy(layer_spec)
    spec.submodules.pre_cross_attn_layernorm = RMSNorm
    core = ModuleSpec(CrossCoreAttention, params={"rope_base": rope_base})
    spec.submodules.cross_attention = ModuleSpec(
        GatedCrossAttention, params={"attn_mask_type": AttnMaskType.arbitrary},
        submodules=CrossAttentionSubmodules(linear_q=ColumnParallelLinear, linear_kv=ColumnParallelLinear,
                                            core_attention=core, linear_proj=RowParallelLinear))
    spec.submodules.cross_attn_bda = get_bias_dropout_add
    return spec


def get_mmca_block_spec(config, layer_spec: ModuleSpec, vp_stage=None, cross_attention_interval=None,
                        rope_base: float = 10000.0):
    """This stage's decoder block: ``layer_spec`` for each of its layers and, for the local backend, our RMSNorm
    as the final norm (megatron-core would pick its own torch norm for a bare layer spec). With
    ``cross_attention_interval`` K (mode ``cross``) the layers whose global number is a multiple of K get
    ``with_cross_attention``."""
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    final_norm = RMSNorm if layer_spec.submodules.input_layernorm in (RMSNorm, ModalityRMSNorm) else None
    if final_norm is None:
        return layer_spec
    specs = [layer_spec] * num_layers
    if cross_attention_interval is not None:
        offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
        cross = with_cross_attention(layer_spec, rope_base)
        specs = [cross if has_cross_attention(offset + i + 1, cross_attention_interval) else layer_spec
                 for i in range(num_layers)]
    return TransformerBlockSubmodules(layer_specs=specs, layer_norm=final_norm)
