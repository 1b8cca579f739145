"""Checkpoint layouts -> our encoders' own (timm) parameter names. One converter per encoder family.

Each converter takes a (lazy) mapping name -> tensor and the encoder's inner module and returns a state dict meant
to match that module exactly; `weights.load_encoder_weights` then loads it strictly. Keys a converter does not
recognise are passed through unchanged so that the strict check reports them instead of silently dropping them.

What is mapped (and what is dropped on purpose):

* ViT family (CLIP, SigLIP; `convert_vit`):
  - HF `CLIPVisionModel` / `CLIPModel` / `SiglipVisionModel` / `SiglipModel` (`vision_model.` prefix optional,
    transformers>=5 saves CLIPVisionModel without it): class_embedding -> cls_token,
    patch_embedding -> patch_embed.proj, position_embedding -> pos_embed, pre_layrnorm -> norm_pre,
    layers.i.layer_norm{1,2} -> blocks.i.norm{1,2}, self_attn.{q,k,v}_proj -> blocks.i.attn.qkv (concatenated),
    out_proj -> attn.proj, mlp.fc{1,2} -> mlp.fc{1,2}, post_layernorm -> norm. Text tower, projections and logit
    scale are ignored.
  - then timm's own `vision_transformer.checkpoint_filter_fn`, which also accepts timm and open_clip (`visual.*`,
    `visual.trunk.*`) state dicts and resamples pos_embed / patch_embed to the encoder's resolution.
  - dropped: pooling heads we do not use (`head.*`, SigLIP `attn_pool.*` MAP head, `fc_norm.*`) and, for CLIP,
    `norm.*` (= HF post_layernorm / open_clip ln_post): our CLIP encoders return HF `last_hidden_state`, which is
    taken *before* post_layernorm (as DS-VisualChat uses it). SigLIP keeps `norm` since HF SigLIP's
    `last_hidden_state` is *after* its post_layernorm.
* EVA-CLIP g/14 (`convert_eva`): LAVIS / InfMLLM checkpoints (`visual_encoder.*` + `ln_vision.*`; ln_vision -> our
  final `norm`), bare EVA / open_clip EVA-CLIP / timm Eva state dicts via timm's `eva.checkpoint_filter_fn`
  (q_bias/v_bias layout). A tower deeper than ours (EVA-CLIP g has 40 blocks, BLIP-2/InfMLLM keep 39) is truncated
  like BLIP-2 does: extra blocks and that tower's own final norm/head are dropped and `norm` (ln_vision) starts as
  identity, with a warning.
* QWen-VL (`convert_qwen_vl`): `transformer.visual.*` keys of a Qwen-VL(-Chat) checkpoint (other keys ignored) or
  the same names without the prefix (DS-VisualChat's helper/extract_qwen_vl.py output). conv1 -> trunk.patch_embed.proj,
  positional_embedding (16x16) -> trunk.pos_embed resized once to the trunk grid with QWen's own bicubic arithmetic,
  ln_pre -> trunk.norm_pre, transformer.resblocks.i.{ln_1,ln_2,attn.out_proj,mlp.c_fc,mlp.c_proj} ->
  trunk.blocks.i.{norm1,norm2,attn.proj,mlp.fc1,mlp.fc2}, attn.in_proj -> attn.qkv with QWen's per-head
  [q_h, k_h, v_h] interleave reordered to timm's [q, k, v]; attn_pool.* and ln_post.* keep their names.
  Dropped: `proj` (QWen-VL's final 4096x4096 projection, as DS-VisualChat does).
* Every family also accepts its own native layout (a saved `encoder.model.state_dict()`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

import torch
from timm.models import eva as timm_eva
from timm.models import vision_transformer as timm_vit
from torch import nn

from .positions import resample_grid

_logger = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]

# Heads that timm checkpoints may carry but our feature extractors never build.
_POOLING_PREFIXES = ("norm.", "fc_norm.", "head.", "attn_pool.")


def _drop_absent_heads(state: StateDict, model: nn.Module) -> StateDict:
    """Remove pooling/head keys for submodules the model does not have (e.g. CLIP's post-norm, SigLIP's MAP head)."""
    own = model.state_dict().keys()
    absent = tuple(p for p in _POOLING_PREFIXES if not any(k.startswith(p) for k in own))
    return {k: v for k, v in state.items() if not k.startswith(absent)}


# ---------------------------------------------------------------------------------------------------- ViT family
_HF_LAYER = re.compile(r"encoder\.layers\.(\d+)\.(.+)")
_HF_LAYER_RENAMES = {
    "layer_norm1.": "norm1.",
    "layer_norm2.": "norm2.",
    "self_attn.out_proj.": "attn.proj.",
    "mlp.fc1.": "mlp.fc1.",
    "mlp.fc2.": "mlp.fc2.",
}
_HF_TOP_RENAMES = {
    "embeddings.patch_embedding.": "patch_embed.proj.",
    "pre_layrnorm.": "norm_pre.",
    "post_layernorm.": "norm.",
    "head.": "head.",
}


def is_hf_vision_layout(keys: Mapping[str, object]) -> bool:
    return any(k.removeprefix("vision_model.") == "embeddings.patch_embedding.weight" for k in keys)


def hf_vit_to_timm(state: Mapping[str, torch.Tensor]) -> StateDict:
    """HF CLIP/SigLIP vision tower keys -> timm VisionTransformer keys (see module docstring)."""
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in state) else ""
    out: StateDict = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key in state:
        if not key.startswith(prefix):
            continue  # text tower, projections, logit scale of a full CLIPModel/SiglipModel
        name = key[len(prefix):]
        if name == "embeddings.position_ids":
            continue  # legacy non-learned buffer
        value = state[key]
        if name == "embeddings.class_embedding":
            out["cls_token"] = value.reshape(1, 1, -1)
        elif name == "embeddings.position_embedding.weight":
            out["pos_embed"] = value.unsqueeze(0)
        elif match := _HF_LAYER.fullmatch(name):
            layer, rest = int(match.group(1)), match.group(2)
            if qkv_match := re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest):
                qkv.setdefault((layer, qkv_match.group(2)), {})[qkv_match.group(1)] = value
                continue
            out[f"blocks.{layer}.{_rename(rest, _HF_LAYER_RENAMES)}"] = value
        else:
            out[_rename(name, _HF_TOP_RENAMES)] = value
    for (layer, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"HF checkpoint layer {layer}: self_attn {kind} has only {sorted(parts)} of q/k/v")
        out[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def timm_vit_to_hf(state: Mapping[str, torch.Tensor]) -> StateDict:
    """The inverse of `hf_vit_to_timm` for a CLIP or SigLIP tower (HF `CLIPVisionModel` / `SiglipVisionModel` names):
    qkv split back into q/k/v, cls_token / pos_embed reshaped. Keys it does not know raise, naming them."""
    layer_renames = {new: old for old, new in _HF_LAYER_RENAMES.items()}
    top_renames = {new: old for old, new in _HF_TOP_RENAMES.items()}
    out: StateDict = {}
    for key, value in state.items():
        if key == "cls_token":
            out["embeddings.class_embedding"] = value.reshape(-1)
        elif key == "pos_embed":
            out["embeddings.position_embedding.weight"] = value.squeeze(0)
        elif match := re.fullmatch(r"blocks\.(\d+)\.(.+)", key):
            layer, rest = match.group(1), match.group(2)
            if qkv := re.fullmatch(r"attn\.qkv\.(weight|bias)", rest):
                for part, tensor in zip("qkv", value.chunk(3, dim=0)):
                    out[f"encoder.layers.{layer}.self_attn.{part}_proj.{qkv.group(1)}"] = tensor
            elif (renamed := _rename(rest, layer_renames)) != rest or rest.startswith("mlp."):
                out[f"encoder.layers.{layer}.{renamed}"] = value
            else:
                raise ValueError(f"timm ViT tensor {key} has no HF CLIP name")
        elif (renamed := _rename(key, top_renames)) != key:
            out[renamed] = value
        else:
            raise ValueError(f"timm ViT tensor {key} has no HF CLIP name")
    return out


def _rename(name: str, table: Mapping[str, str]) -> str:
    for old, new in table.items():
        if name.startswith(old):
            return new + name[len(old):]
    return name


def convert_vit(state: Mapping[str, torch.Tensor], model: nn.Module) -> StateDict:
    timm_state = hf_vit_to_timm(state) if is_hf_vision_layout(state) else dict(state.items())
    return _drop_absent_heads(timm_vit.checkpoint_filter_fn(timm_state, model), model)


# ---------------------------------------------------------------------------------------------------- EVA
def convert_eva(state: Mapping[str, torch.Tensor], model: nn.Module) -> StateDict:
    if any(k.startswith("visual_encoder.") for k in state):  # LAVIS / InfMLLM: ViT + separate ln_vision
        raw = {k.removeprefix("visual_encoder."): state[k] for k in state if k.startswith("visual_encoder.")}
        raw.update({"norm." + k.removeprefix("ln_vision."): state[k] for k in state if k.startswith("ln_vision.")})
    else:
        raw = dict(state.items())
    converted = timm_eva.checkpoint_filter_fn(raw, model)
    depth = len(model.blocks)
    block_ids = {int(m.group(1)) for k in converted if (m := re.match(r"blocks\.(\d+)\.", k))}
    extra = sorted(i for i in block_ids if i >= depth)
    if extra:
        _logger.warning(
            "EVA checkpoint has %d blocks; keeping the first %d as BLIP-2/InfMLLM do, dropping its final norm/head "
            "and starting the output LayerNorm (ln_vision) from identity", extra[-1] + 1, depth,
        )
        converted = {
            k: v for k, v in converted.items()
            if not k.startswith(tuple(f"blocks.{i}." for i in extra) + _POOLING_PREFIXES)
        }
        converted["norm.weight"] = torch.ones_like(model.norm.weight, device="cpu")
        converted["norm.bias"] = torch.zeros_like(model.norm.bias, device="cpu")
    return _drop_absent_heads(converted, model)


# ---------------------------------------------------------------------------------------------------- QWen-VL
_QWEN_BLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")
_QWEN_BLOCK_RENAMES = {
    "ln_1.": "norm1.",
    "ln_2.": "norm2.",
    "attn.out_proj.": "attn.proj.",
    "mlp.c_fc.": "mlp.fc1.",
    "mlp.c_proj.": "mlp.fc2.",
}
_QWEN_TOP_RENAMES = {"conv1.": "trunk.patch_embed.proj.", "ln_pre.": "trunk.norm_pre."}


def _qwen_qkv_to_timm(value: torch.Tensor, num_heads: int) -> torch.Tensor:
    """QWen's in_proj rows are [head0: q,k,v | head1: q,k,v | ...]; timm's qkv rows are [q (all heads) | k | v]."""
    rows = value.shape[0]
    per_head = value.reshape(num_heads, 3, rows // (3 * num_heads), *value.shape[1:])
    return per_head.transpose(0, 1).reshape(value.shape)


def convert_qwen_vl(state: Mapping[str, torch.Tensor], model: nn.Module) -> StateDict:
    if "trunk.patch_embed.proj.weight" in state:  # native layout
        return dict(state.items())
    prefix = "transformer.visual." if any(k.startswith("transformer.visual.") for k in state) else ""
    num_heads = model.trunk.blocks[0].attn.num_heads
    out: StateDict = {}
    for key in state:
        if not key.startswith(prefix):
            continue  # the language model of a full Qwen-VL checkpoint
        name = key[len(prefix):]
        if name == "proj":
            continue  # QWen-VL's final projection; DS-VisualChat replaces it with its own trained projector
        value = state[key]
        if name == "positional_embedding":
            out["trunk.pos_embed"] = resample_grid(value, model.trunk.pos_embed.shape[1]).unsqueeze(0)
        elif match := _QWEN_BLOCK.fullmatch(name):
            layer, rest = match.group(1), match.group(2)
            if rest.startswith("attn.in_proj."):
                out[f"trunk.blocks.{layer}.attn.qkv.{rest.removeprefix('attn.in_proj.')}"] = _qwen_qkv_to_timm(
                    value, num_heads
                )
            else:
                out[f"trunk.blocks.{layer}.{_rename(rest, _QWEN_BLOCK_RENAMES)}"] = value
        else:
            out[_rename(name, _QWEN_TOP_RENAMES)] = value  # attn_pool.* and ln_post.* keep their names
    return out


# ---------------------------------------------------------------------------------------------------- config checks
def _compare(source: str, pairs: Mapping[str, tuple[object, object]]) -> None:
    wrong = [
        f"{k}={got!r} (encoder has {want!r})" for k, (got, want) in pairs.items() if got is not None and got != want
    ]
    if wrong:
        raise ValueError(f"{source} does not describe this encoder: " + ", ".join(wrong))


def check_hf_vit_config(config: Mapping, model: nn.Module, source: str, *, hidden_act: str) -> None:
    """Reject an HF CLIP/SigLIP config whose architecture differs in ways a weight-shape check cannot see."""
    vision = config.get("vision_config", config)  # full CLIPModel/SiglipModel configs nest the vision tower
    block = model.blocks[0]
    _compare(source, {
        "hidden_size": (vision.get("hidden_size"), model.embed_dim),
        "num_hidden_layers": (vision.get("num_hidden_layers"), len(model.blocks)),
        "num_attention_heads": (vision.get("num_attention_heads"), block.attn.num_heads),
        "intermediate_size": (vision.get("intermediate_size"), block.mlp.fc1.out_features),
        "patch_size": (vision.get("patch_size"), model.patch_embed.patch_size[0]),
        "hidden_act": (vision.get("hidden_act"), hidden_act),
    })


def check_qwen_vl_config(config: Mapping, model: nn.Module, source: str) -> None:
    """Qwen-VL's config.json describes its ViT under "visual"."""
    visual = config.get("visual", {})
    trunk = model.trunk
    _compare(source, {
        "visual.width": (visual.get("width"), trunk.embed_dim),
        "visual.layers": (visual.get("layers"), len(trunk.blocks)),
        "visual.heads": (visual.get("heads"), trunk.blocks[0].attn.num_heads),
        "visual.patch_size": (visual.get("patch_size"), trunk.patch_embed.patch_size[0]),
        "visual.n_queries": (visual.get("n_queries"), model.attn_pool.num_queries),
        "visual.output_dim": (visual.get("output_dim"), model.ln_post.normalized_shape[0]),
    })
