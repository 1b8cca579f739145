"""Chat checkpoint -> a transformers directory with its own modeling code (``trust_remote_code=True``), for the
models transformers' LLaVA cannot compute (``export-hf`` picks this path; ``hf_llava_export``).

The directory holds config.json (``auto_map``: AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText),
copies of the two template files in ``hf_remote/`` (``configuration_visualchat.py``, ``modeling_visualchat.py``:
torch + transformers only), generation_config.json, safetensors shards + index, and the tokenizer and processor
files the LLaVA export writes. Tensor names: ``language_model.*`` (transformers' LlamaModel; the image-side weights
of split projections and modality norms as ``image_weight`` beside each ``weight``), ``lm_head.weight``,
``vision_tower.*`` (CLIPVisionModel / SiglipVisionModel names; QWen-VL's encoder keeps ours),
``multi_modal_projector.*`` (our projector's own names).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional, Union

import torch

from megatron_visualchat.checkpoint.errors import CheckpointError
from megatron_visualchat.checkpoint.hf_llava_export import (
    CHAT_LLM,
    CHAT_PROJECTOR,
    processor_reasons,
    image_tokens,
    llm_tensors,
    meta_projector,
    text_config,
    tower_kind,
    tower_tensors,
    vision_config,
    write_export,
)
from megatron_visualchat.config import VisualChatConfig

TEMPLATE_DIR = Path(__file__).parent / "hf_remote"
TEMPLATE_FILES = ("configuration_visualchat.py", "modeling_visualchat.py")
MODEL_CLASS = "VisualChatForConditionalGeneration"
AUTO_MAP = {"AutoConfig": "configuration_visualchat.VisualChatConfig",
            "AutoModelForCausalLM": f"modeling_visualchat.{MODEL_CLASS}",
            "AutoModelForImageTextToText": f"modeling_visualchat.{MODEL_CLASS}"}
PROJECTORS = ("linear", "mlp", "pool_adapter")  # the projectors modeling_visualchat.py builds
# our image-side tensor under decoder.layers.N. -> its name under language_model.layers.N. (one-to-one ones)
IMAGE_NORMS = {"input_layernorm.image_weight": "input_layernorm.image_weight",
               "pre_mlp_layernorm.image_weight": "post_attention_layernorm.image_weight"}
IMAGE_QKV, IMAGE_PROJ = "self_attention.linear_qkv.image_weight", "self_attention.linear_proj.image_weight"


def remote_exportable(cfg: VisualChatConfig) -> list[str]:
    """Why the trust_remote_code model cannot compute this model (empty: it can)."""
    reasons = []
    if cfg.fusion.kind != "visualchat":
        reasons.append(f"fusion.kind={cfg.fusion.kind!r}: the remote model has one decoder, not two towers")
    if cfg.attention.mode == "cross":
        reasons.append("attention.mode='cross': the gated cross-attention layers are not in the remote model (it "
                       "computes 'mmca' and 'causal')")
    if cfg.vision.projector not in PROJECTORS:
        reasons.append(f"vision.projector={cfg.vision.projector!r}: the remote model builds {list(PROJECTORS)}")
    if tower_kind(cfg.vision.encoder) is None:
        reasons.append(f"vision.encoder={cfg.vision.encoder!r}: the remote model's towers are transformers' CLIP "
                       "and SigLIP vision models and QWen-VL's encoder (EVA-CLIP is not built)")
    if not cfg.llm.untie_embeddings:
        reasons.append("llm.untie_embeddings=False: the remote model has its own lm_head (LLaMA-2's untied layout); "
                       "tied embeddings are not built")
    return reasons + processor_reasons(cfg)


def _image_side(cfg: VisualChatConfig, weights, layer: int) -> Iterator[tuple[str, str, torch.Tensor]]:
    """Layer ``layer``'s image-side weights (``modality_split``, ``modality_norms``): (our name, HF name, tensor)."""
    from megatron_visualchat.checkpoint.hf_llama import FUSIONS

    llm, split = cfg.llm, cfg.attention.modality_split
    ours, theirs = f"{CHAT_LLM}decoder.layers.{layer}.", f"language_model.layers.{layer}."
    if split == "kv":  # [groups x (k, v) x head_dim, hidden], megatron's per-group layout
        kv = weights[ours + IMAGE_QKV].view(llm.query_groups, 2, llm.head_dim, -1)
        for i, part in enumerate("kv"):
            yield ours + IMAGE_QKV, theirs + f"self_attn.{part}_proj.image_weight", kv[:, i].reshape(-1, kv.shape[-1])
    elif split in ("qkv", "qkvo"):
        for part, tensor in zip("qkv", FUSIONS["qkv"].unfuse(weights[ours + IMAGE_QKV], llm)):
            yield ours + IMAGE_QKV, theirs + f"self_attn.{part}_proj.image_weight", tensor
    if split == "qkvo":
        yield ours + IMAGE_PROJ, theirs + "self_attn.o_proj.image_weight", weights[ours + IMAGE_PROJ]
    if cfg.attention.modality_norms:
        for mine, hf in IMAGE_NORMS.items():
            yield ours + mine, theirs + hf, weights[ours + mine]


def _projector_options(cfg: VisualChatConfig) -> dict:
    """What modeling_visualchat.py's projector needs beyond the widths (the pool-adapter's grid)."""
    if cfg.vision.projector != "pool_adapter":
        return {}
    projector = meta_projector(cfg)
    return {"pool_out": projector.pool_out, "has_cls": projector.has_cls}


def remote_config(cfg: VisualChatConfig, tokenizer, dtype_name: str) -> dict:
    """config.json of the remote model (hf_remote/configuration_visualchat.py's fields)."""
    from megatron_visualchat.model.vision import EncoderOptions

    a, v = cfg.attention, cfg.vision
    options = EncoderOptions.parse(v.encoder, v.encoder_options)
    return {"architectures": [MODEL_CLASS], "model_type": "megatron_visualchat", "auto_map": AUTO_MAP,
            "dtype": dtype_name, "attention_mode": a.mode, "image_rows": a.image_rows, "combine": a.combine,
            "modality_split": a.modality_split, "modality_norms": a.modality_norms, "projector": v.projector,
            "projector_options": _projector_options(cfg), "vision_feature_layer": options.feature_layer,
            "drop_cls": options.drop_cls, "image_token_index": tokenizer.image_id,
            "image_seq_length": image_tokens(cfg), "tie_word_embeddings": False,
            "text_config": text_config(cfg, tokenizer, dtype_name), "vision_config": vision_config(cfg, dtype_name)}


def export_remote(load_dir: Union[str, Path], out_dir: Union[str, Path], *, dtype: Optional[str] = None,
                  max_shard_size: Union[int, str] = "2GB") -> Path:
    """Write the chat checkpoint in ``load_dir`` as a trust_remote_code directory (module docstring)."""
    from megatron_visualchat.checkpoint.chat import read_chat_config

    load_dir = Path(load_dir)
    cfg = read_chat_config(load_dir)
    reasons = remote_exportable(cfg)
    if reasons:
        raise CheckpointError(f"{load_dir} cannot be exported as the trust_remote_code model: " + "; ".join(reasons))

    def tensors(weights) -> Iterator[tuple[str, torch.Tensor]]:
        read = set()
        for name, tensor in llm_tensors(cfg, weights):
            yield ("language_model." + name.removeprefix("model.")) if name.startswith("model.") else name, tensor
        for layer in range(cfg.llm.num_layers):
            for ours, name, tensor in _image_side(cfg, weights, layer):
                read.add(ours)
                yield name, tensor
        for name, tensor in tower_tensors(cfg, weights):
            yield "vision_tower." + name, tensor
        for key in weights:
            if key.startswith(CHAT_PROJECTOR):
                yield "multi_modal_projector." + key.removeprefix(CHAT_PROJECTOR), weights[key]
        unread = sorted(k for k in weights if k.endswith("image_weight") and k not in read)
        if unread:  # image-side tensors the config gives no place (the model would silently drop them)
            raise CheckpointError(f"{load_dir}: image-side tensors {unread[:4]} have no place under the config's "
                                  f"modality_split={cfg.attention.modality_split!r} / modality_norms="
                                  f"{cfg.attention.modality_norms}: the weights do not match the config")

    def generation(tokenizer) -> dict:
        return {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}

    per_image = image_tokens(cfg)
    side = vision_config(cfg, "float32")["image_size"]
    # LlavaProcessor expands <image> to (side // patch_size)^2 + num_additional_image_tokens: with patch_size the
    # whole image side, that is the projector's count, whatever it pools to.
    count = {"patch_size": side, "num_additional_image_tokens": per_image - 1, "vision_feature_select_strategy": "full"}
    files = [TEMPLATE_DIR / name for name in TEMPLATE_FILES]
    return write_export(load_dir, cfg, out_dir, dtype=dtype, max_shard_size=max_shard_size, tensors=tensors,
                        config=lambda tok, name: remote_config(cfg, tok, name), image_count=lambda tok: count,
                        files=files, extra_json={"generation_config.json": generation})
