"""HF LLaMA <-> megatron-core GPT: what a ``config.json`` means, which HF tensors make each megatron tensor, and
how they fuse.

megatron-core (local spec) stores attention as one ``linear_qkv`` whose rows are, per query group g,
[q heads of g; k_g; v_g], and the SwiGLU input as ``linear_fc1`` = [gate; up]. HF q/k need no RoPE permutation:
megatron-core's default non-interleaved rotary is HF's rotate-half. Fusing is expressed as a list of row blocks
(views of the HF tensors) so the converter writes a shard without ever concatenating a full fused tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

import torch

from megatron_visualchat.checkpoint.errors import CheckpointError
from megatron_visualchat.checkpoint.sharding import (
    merge_tensors,
    pad_vocab_rows,
    split_kind,
    split_tensor,
    stage_layer_range,
)
from megatron_visualchat.config import LLMConfig, ParallelConfig


SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
SUPPORTED_MODEL_TYPES = ("llama", "mistral")


def _refuse(source: str, key: str, value, why: str) -> CheckpointError:
    return CheckpointError(f"{source}: {key}={value!r} is not supported ({why})")


def _rope_base(hf: Mapping, source: str) -> float:
    """RoPE theta from either config style (``rope_theta`` + ``rope_scaling``, or transformers 5's
    ``rope_parameters``); any scaled/partial rotary is refused: megatron's plain rope would silently differ."""
    params = hf.get("rope_parameters") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise _refuse(source, "rope_parameters.rope_type", rope_type, "only plain RoPE ('default') converts")
    scaling = hf.get("rope_scaling")
    if scaling:
        scaling_type = scaling.get("rope_type", scaling.get("type"))
        if scaling_type != "default":
            raise _refuse(source, "rope_scaling", scaling, "scaled RoPE (llama3/linear/dynamic/yarn) is not built")
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):
        raise _refuse(source, "partial_rotary_factor", partial, "rotary must cover the whole head")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def llm_config_from_hf(hf: Mapping, *, make_vocab_size_divisible_by: int = 128,
                       source: str = "config.json") -> LLMConfig:
    """The ``LLMConfig`` of a HF LLaMA-architecture ``config.json`` (LLaMA-2/3, Mistral without sliding window).
    Everything that would make megatron's model differ from the HF one is refused with the key and value."""
    archs = hf.get("architectures") or []
    if archs:
        unsupported = [a for a in archs if a not in SUPPORTED_ARCHITECTURES]
        if unsupported:
            raise _refuse(source, "architectures", archs, f"supported: {list(SUPPORTED_ARCHITECTURES)}")
    elif hf.get("model_type") not in SUPPORTED_MODEL_TYPES:
        raise _refuse(source, "model_type", hf.get("model_type"), f"supported: {list(SUPPORTED_MODEL_TYPES)}")
    if hf.get("hidden_act", "silu") != "silu":
        raise _refuse(source, "hidden_act", hf["hidden_act"], "LLaMA uses SwiGLU with silu")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise _refuse(source, key, hf[key], "the model is built without linear biases")
    if hf.get("sliding_window") is not None:
        raise _refuse(source, "sliding_window", hf["sliding_window"], "only full causal attention is built")
    if hf.get("quantization_config"):
        raise _refuse(source, "quantization_config", hf["quantization_config"].get("quant_method", "?"),
                      "convert an unquantized checkpoint")
    rope_base = _rope_base(hf, source)
    try:
        hidden, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        llm = LLMConfig(
            num_layers=int(hf["num_hidden_layers"]),
            hidden_size=hidden,
            num_attention_heads=heads,
            num_query_groups=int(hf.get("num_key_value_heads") or heads),
            ffn_hidden_size=int(hf["intermediate_size"]),
            vocab_size=int(hf["vocab_size"]),
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_base=rope_base,
            make_vocab_size_divisible_by=make_vocab_size_divisible_by,
            untie_embeddings=not hf.get("tie_word_embeddings", False),
        )
    except KeyError as e:
        raise CheckpointError(f"{source}: missing key {e.args[0]!r}") from None
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim * heads != hidden:
        raise _refuse(source, "head_dim", head_dim,
                      f"head_dim x num_attention_heads must equal hidden_size={hidden}")
    if rope_base != int(rope_base):
        raise _refuse(source, "rope_theta", rope_base, "megatron-core's GPTModel takes an integer rotary base")
    llm.validate()
    return llm


# ----------------------------------------------------------------------------------------------- fusions

def _qkv_parts(sources: Sequence[torch.Tensor], llm: LLMConfig) -> list[torch.Tensor]:
    """Row blocks of ``linear_qkv`` for the query groups present in (q, k, v): [q_g; k_g; v_g] per group."""
    q, k, v = sources
    groups = k.shape[0] // llm.head_dim
    q_rows = q.shape[0] // groups
    parts = []
    for g in range(groups):
        parts += [q[g * q_rows:(g + 1) * q_rows], k[g * llm.head_dim:(g + 1) * llm.head_dim],
                  v[g * llm.head_dim:(g + 1) * llm.head_dim]]
    return parts


def _qkv_unfuse(fused: torch.Tensor, llm: LLMConfig) -> list[torch.Tensor]:
    groups, hd = llm.query_groups, llm.head_dim
    q_rows = llm.num_attention_heads // groups * hd
    per_group = fused.view(groups, q_rows + 2 * hd, -1)
    q, k, v = torch.split(per_group, [q_rows, hd, hd], dim=1)
    return [t.reshape(-1, fused.shape[-1]) for t in (q, k, v)]


@dataclass(frozen=True)
class Fusion:
    """``parts``: HF tensors -> the megatron tensor's row blocks in order; ``unfuse``: full megatron tensor -> HF
    tensors. Fused tensors split by rows for TP, so a rank's shard is the fusion of the rows of each source."""

    parts: Callable[[Sequence[torch.Tensor], LLMConfig], list[torch.Tensor]]
    unfuse: Callable[[torch.Tensor, LLMConfig], list[torch.Tensor]]


FUSIONS: dict[str, Fusion] = {
    "copy": Fusion(parts=lambda s, llm: [s[0]], unfuse=lambda t, llm: [t]),
    "qkv": Fusion(parts=_qkv_parts, unfuse=_qkv_unfuse),
    "glu": Fusion(parts=lambda s, llm: list(s), unfuse=lambda t, llm: list(torch.chunk(t, 2, dim=0))),
}

# megatron-core's layer parameters (local spec, in the model's state-dict order) -> (fusion, HF layer tensors).
LAYER_TENSORS: dict[str, tuple[str, tuple[str, ...]]] = {
    "input_layernorm.weight": ("copy", ("input_layernorm.weight",)),
    "self_attention.linear_proj.weight": ("copy", ("self_attn.o_proj.weight",)),
    "self_attention.linear_qkv.weight": (
        "qkv", ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")),
    "pre_mlp_layernorm.weight": ("copy", ("post_attention_layernorm.weight",)),
    "mlp.linear_fc1.weight": ("glu", ("mlp.gate_proj.weight", "mlp.up_proj.weight")),
    "mlp.linear_fc2.weight": ("copy", ("mlp.down_proj.weight",)),
}
# Modules whose (empty, None) ``_extra_state`` megatron-core's linear layers put in the state dict.
LAYER_EXTRA_STATE = ("self_attention.linear_proj", "self_attention.linear_qkv", "mlp.linear_fc1", "mlp.linear_fc2")
HF_EMBEDDING, HF_FINAL_NORM, HF_LM_HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"
# HF tensors that carry no weights (recomputed buffers in old checkpoints).
HF_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def hf_layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}."


@dataclass(frozen=True)
class TensorMap:
    """One megatron tensor of a rank's state dict and the HF tensors it is made of. ``export`` is False for the
    last stage's copy of tied embeddings (the HF side has only ``embed_tokens``)."""

    megatron: str
    hf: tuple[str, ...]
    fusion: str = "copy"
    pad_vocab: bool = False
    export: bool = True


def stage_state_keys(llm: LLMConfig, parallel: ParallelConfig, pp_rank: int) -> list[tuple[str, Optional[TensorMap]]]:
    """Every key of pipeline stage ``pp_rank``'s state dict (what megatron-core's GPTModel produces, layers
    numbered from 0 on each stage), with its ``TensorMap``, or None for an ``_extra_state`` entry."""
    first, last = pp_rank == 0, pp_rank == parallel.pp - 1
    keys: list[tuple[str, Optional[TensorMap]]] = []
    if first:
        keys.append(("embedding.word_embeddings.weight",
                     TensorMap("embedding.word_embeddings.weight", (HF_EMBEDDING,), pad_vocab=True)))
    for local, layer in enumerate(stage_layer_range(llm, parallel, pp_rank)):
        prefix = f"decoder.layers.{local}."
        for name, (fusion, hf_names) in LAYER_TENSORS.items():
            hf = tuple(hf_layer_prefix(layer) + n for n in hf_names)
            keys.append((prefix + name, TensorMap(prefix + name, hf, fusion)))
            module = name.rsplit(".", 1)[0]
            if module in LAYER_EXTRA_STATE:
                keys.append((f"{prefix}{module}._extra_state", None))
    if last:
        keys.append(("decoder.final_layernorm.weight", TensorMap("decoder.final_layernorm.weight", (HF_FINAL_NORM,))))
        if llm.untie_embeddings:
            keys.append(("output_layer.weight", TensorMap("output_layer.weight", (HF_LM_HEAD,), pad_vocab=True)))
        elif not first:  # tied and pipelined: megatron keeps a copy of the embedding on the last stage
            keys.append(("output_layer.weight",
                         TensorMap("output_layer.weight", (HF_EMBEDDING,), pad_vocab=True, export=False)))
        keys.append(("output_layer._extra_state", None))
    return keys


def hf_tensor_shapes(llm: LLMConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a HF checkpoint of ``llm`` must hold, with its shape."""
    h, hd, ffn = llm.hidden_size, llm.head_dim, llm.ffn_hidden_size
    q, kv = llm.num_attention_heads * hd, llm.query_groups * hd
    layer = {
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h), "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, q),
        "mlp.gate_proj.weight": (ffn, h), "mlp.up_proj.weight": (ffn, h), "mlp.down_proj.weight": (h, ffn),
    }
    shapes = {HF_EMBEDDING: (llm.vocab_size, h)}
    for i in range(llm.num_layers):
        shapes.update({hf_layer_prefix(i) + n: s for n, s in layer.items()})
    shapes[HF_FINAL_NORM] = (h,)
    if llm.untie_embeddings:
        shapes[HF_LM_HEAD] = (llm.vocab_size, h)
    return shapes


def rank_parts(tmap: TensorMap, sources: Sequence[torch.Tensor], llm: LLMConfig, tp: int,
               tp_rank: int) -> list[torch.Tensor]:
    """The row blocks that make ``tp_rank``'s shard of ``tmap.megatron`` from its HF ``sources`` (views where the
    layout allows; concatenated along dim 0 they equal ``split_tensor`` of the fused full tensor)."""
    if tmap.pad_vocab:
        sources = [pad_vocab_rows(sources[0], llm.padded_vocab_size(tp))]
    if tmap.fusion == "copy":
        return [split_tensor(sources[0], split_kind(tmap.megatron), tp, tp_rank)]
    return FUSIONS[tmap.fusion].parts([split_tensor(s, "column", tp, tp_rank) for s in sources], llm)


def hf_tensors(tmap: TensorMap, shards: Sequence[torch.Tensor], llm: LLMConfig) -> dict[str, torch.Tensor]:
    """The HF tensors of ``tmap`` from its TP shards (rank order): merge, drop the vocab padding, unfuse."""
    full = merge_tensors(list(shards), split_kind(tmap.megatron))
    if tmap.pad_vocab:
        full = full[:llm.vocab_size]
    return dict(zip(tmap.hf, FUSIONS[tmap.fusion].unfuse(full, llm)))
