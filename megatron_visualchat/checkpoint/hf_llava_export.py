"""Chat checkpoint -> HF directory; ``megatron-visualchat export-hf``.

A model transformers' LLaVA computes exactly is written as an ``LlavaForConditionalGeneration`` directory that
loads with no custom code: ``causal`` attention (LLaVA's plain causal attention), no modality-split projections or
modality norms, the ``mlp`` projector (linear_1, GELU, linear_2) and a CLIP tower (a timm ViT with QuickGELU and a
class token). The tensors go out under the names transformers' own ``save_pretrained`` writes
(``checkpoint/hf_llava.LAYOUTS[0]``), through the LLaMA converter's unfusing and shard writer, one tensor at a time.
CLIP's ``post_layernorm`` (unused by LLaVA, not held by our encoder) is written as the identity so the directory
loads without missing weights. Any other model (MMCA, split projections, modality norms, the ``linear`` or
``pool_adapter`` projector, a SigLIP or QWen-VL tower) goes to ``hf_remote_export``: a directory with its own
modeling code for ``trust_remote_code=True``; what neither can compute is refused, naming each reason.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence, Union

import torch

from megatron_visualchat.checkpoint.errors import CheckpointError
from megatron_visualchat.checkpoint.convert import size_arg
from megatron_visualchat.checkpoint.hf_llava import (
    ARCHITECTURES,
    CHAT_PREFIXES,
    LAYOUTS,
    PROJECTOR_TENSORS,
    SELECT_STRATEGIES,
)
from megatron_visualchat.config import DTYPES, ConfigError, VisualChatConfig

# our resize mode -> transformers' image processor doing the same, for an image side of ``s`` (LLaVA's do_pad:
# expand to a square of the mean colour first, as ImagePreprocess "pad"; SiglipImageProcessor resizes both sides)
IMAGE_PROCESSORS = {
    "shortest_edge_center_crop": lambda s: {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": s},
                                            "do_center_crop": True, "crop_size": {"height": s, "width": s}},
    "pad": lambda s: {"image_processor_type": "LlavaImageProcessor", "do_pad": True, "size": {"shortest_edge": s},
                      "do_center_crop": True, "crop_size": {"height": s, "width": s}},
    "squash": lambda s: {"image_processor_type": "SiglipImageProcessor", "size": {"height": s, "width": s},
                         "do_center_crop": False},
}
CHAT_LLM, CHAT_ENCODER, CHAT_PROJECTOR = CHAT_PREFIXES["llm"], CHAT_PREFIXES["encoder"], CHAT_PREFIXES["projector"]
CLIP_ACT, SIGLIP_ACT = "quick_gelu", "gelu_pytorch_tanh"
QWEN_VISION = "megatron_visualchat_qwen_vision"  # hf_remote/configuration_visualchat.py's QwenVisionConfig


def exportable(cfg: VisualChatConfig) -> list[str]:
    """Why transformers' LLaVA cannot compute this model (empty: it can)."""
    a, v = cfg.attention, cfg.vision
    reasons = []
    if a.mode != "causal":
        reasons.append(f"attention.mode={a.mode!r}: LLaVA attends causally over all tokens")
    if a.modality_split != "none":
        reasons.append(f"attention.modality_split={a.modality_split!r}: LLaVA has one projection for both modalities")
    if a.modality_norms:
        reasons.append("attention.modality_norms: LLaVA has one norm for both modalities")
    if v.projector != "mlp" or v.projector_options:
        reasons.append(f"vision.projector={v.projector!r} {v.projector_options or ''}: LLaVA's projector is the "
                       "two-layer GELU 'mlp'")
    if tower_kind(v.encoder) != "clip":
        reasons.append(f"vision.encoder={v.encoder!r}: LLaVA's tower here is CLIP (a ViT with QuickGELU, a class "
                       "token and no final norm)")
    reasons += processor_reasons(cfg)
    return reasons


def tower_kind(encoder: str) -> Optional[str]:
    """Which exported vision model computes our ``encoder`` exactly: "clip" (a timm ViT with QuickGELU, a class
    token and no final norm: ``CLIPVisionModel``), "siglip" (tanh GELU, no class token, a final norm, no pooling
    head: ``SiglipVisionModel`` without its head), "qwen" (QWen-VL's encoder, which only the trust_remote_code
    model builds), or None."""
    from megatron_visualchat.model.vision import get_encoder_spec
    from megatron_visualchat.model.vision.checkpoint_formats import convert_qwen_vl, convert_vit

    spec = get_encoder_spec(encoder)
    if spec.convert_checkpoint is convert_qwen_vl:
        return "qwen"
    if spec.convert_checkpoint is not convert_vit:
        return None
    model = meta_encoder(encoder)
    act = type(model.blocks[0].mlp.act).__name__
    if spec.has_cls and isinstance(model.norm, torch.nn.Identity) and act == "QuickGELU":
        return "clip"
    if not spec.has_cls and act == "GELUTanh" and getattr(model, "attn_pool", None) is None and \
            getattr(model.norm, "eps", None) == model.blocks[0].norm1.eps:
        return "siglip"
    return None


@functools.lru_cache(maxsize=4)
def meta_encoder(encoder: str) -> torch.nn.Module:
    """``encoder``'s architecture on the meta device, built once (timm initialises even there: ~0.5 s a build)."""
    from megatron_visualchat.model.vision import get_encoder_spec

    with torch.device("meta"):
        return get_encoder_spec(encoder).builder()


def meta_projector(cfg: VisualChatConfig) -> torch.nn.Module:
    """The chat model's projector on the meta device (its token count, the pool-adapter's grid)."""
    from megatron_visualchat.model.vision import EncoderOptions, get_encoder_spec
    from megatron_visualchat.model.vision.projectors import build_projector

    v = cfg.vision
    spec = get_encoder_spec(v.encoder)
    tokens, has_cls = spec.output_tokens(EncoderOptions.parse(v.encoder, v.encoder_options))
    with torch.device("meta"):
        return build_projector(v.projector, spec.hidden_size, cfg.llm.hidden_size, tokens, has_cls,
                               **v.projector_options)


def processor_reasons(cfg: VisualChatConfig) -> list[str]:
    from megatron_visualchat.model.vision import EncoderOptions, get_encoder_spec

    v = cfg.vision
    resize = get_encoder_spec(v.encoder).image_preprocess(EncoderOptions.parse(v.encoder, v.encoder_options)).resize
    if resize not in IMAGE_PROCESSORS:
        return [f"image resize {resize!r}: the exported image processors do {sorted(IMAGE_PROCESSORS)}"]
    return []


def text_config(cfg: VisualChatConfig, tokenizer, dtype_name: str) -> dict:
    """The LLM as a ``LlamaConfig`` dict."""
    llm = cfg.llm
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": llm.hidden_size,
            "intermediate_size": llm.ffn_hidden_size, "num_hidden_layers": llm.num_layers,
            "num_attention_heads": llm.num_attention_heads, "num_key_value_heads": llm.query_groups,
            "head_dim": llm.head_dim, "vocab_size": llm.vocab_size,
            "max_position_embeddings": llm.max_position_embeddings, "rms_norm_eps": llm.rms_norm_eps,
            "rope_theta": float(llm.rope_base), "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
            "tie_word_embeddings": not llm.untie_embeddings, "bos_token_id": tokenizer.bos_id,
            "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id, "dtype": dtype_name}


def vision_config(cfg: VisualChatConfig, dtype_name: str) -> dict:
    """The tower as a ``CLIPVisionConfig``, (no pooling head) ``SiglipVisionConfig`` or (trust_remote_code only)
    ``QwenVisionConfig`` dict (``tower_kind``)."""
    from megatron_visualchat.model.vision import get_encoder_spec

    spec = get_encoder_spec(cfg.vision.encoder)
    model = meta_encoder(cfg.vision.encoder)
    if tower_kind(cfg.vision.encoder) == "qwen":
        trunk, pool = model.trunk, model.attn_pool
        return {"model_type": QWEN_VISION, "image_size": spec.image_size,
                "patch_size": trunk.patch_embed.patch_size[0], "width": trunk.embed_dim,
                "num_hidden_layers": len(trunk.blocks), "num_attention_heads": trunk.blocks[0].attn.num_heads,
                "intermediate_size": trunk.blocks[0].mlp.fc1.out_features,
                "hidden_size": model.ln_post.normalized_shape[0], "num_queries": pool.num_queries,
                "resampler_heads": pool.attn.num_heads, "layer_norm_eps": model.ln_post.eps, "dtype": dtype_name}
    block = model.blocks[0]
    common = {"hidden_size": model.embed_dim, "intermediate_size": block.mlp.fc1.out_features,
              "num_hidden_layers": len(model.blocks), "num_attention_heads": block.attn.num_heads,
              "image_size": spec.image_size, "patch_size": model.patch_embed.patch_size[0],
              "layer_norm_eps": block.norm1.eps, "num_channels": 3, "dtype": dtype_name}
    if tower_kind(cfg.vision.encoder) == "siglip":
        return {"model_type": "siglip_vision_model", **common, "hidden_act": SIGLIP_ACT, "vision_use_head": False}
    return {"model_type": "clip_vision_model", **common, "hidden_act": CLIP_ACT, "projection_dim": model.embed_dim}


def image_tokens(cfg: VisualChatConfig) -> int:
    """<image> positions per image: the projector's output tokens."""
    return meta_projector(cfg).num_output_tokens


def _hf_config(cfg: VisualChatConfig, tokenizer, dtype_name: str) -> dict:
    from megatron_visualchat.model.vision import EncoderOptions

    options = EncoderOptions.parse(cfg.vision.encoder, cfg.vision.encoder_options)
    drop = {d: s for s, d in SELECT_STRATEGIES.items()}
    return {"architectures": list(ARCHITECTURES), "model_type": "llava", "dtype": dtype_name,
            "image_token_index": tokenizer.image_id, "image_seq_length": image_tokens(cfg),
            "projector_hidden_act": "gelu",
            "vision_feature_layer": -1 if options.feature_layer is None else options.feature_layer,
            "vision_feature_select_strategy": drop[options.drop_cls], "multimodal_projector_bias": True,
            "tie_word_embeddings": not cfg.llm.untie_embeddings, "text_config": text_config(cfg, tokenizer, dtype_name),
            "vision_config": vision_config(cfg, dtype_name)}


def _side_files(cfg: VisualChatConfig, tokenizer, load_dir: Path, out: Path, image_count: dict) -> None:
    """tokenizer.model + a LlamaTokenizer config naming <image> and <pad>, an image processor config doing the
    encoder's preprocessing, and a LlavaProcessor config whose ``image_count`` fields (``patch_size``,
    ``num_additional_image_tokens``, ``vision_feature_select_strategy``) expand <image> to the model's count."""
    from megatron_visualchat.data.tokenizer import IMAGE_TOKEN, MODEL_FILE, PAD_TOKEN
    from megatron_visualchat.model.vision import EncoderOptions, get_encoder_spec

    shutil.copy2(load_dir / MODEL_FILE, out / MODEL_FILE)
    added = {str(i): {"content": t, "special": True, "normalized": False, "lstrip": False, "rstrip": False,
                      "single_word": False} for t, i in tokenizer.added_tokens.items()}
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
         "pad_token": PAD_TOKEN, "add_bos_token": True, "add_eos_token": False, "legacy": True,
         "model_max_length": cfg.llm.max_position_embeddings, "added_tokens_decoder": added,
         "processor_class": "LlavaProcessor"}, indent=2) + "\n")
    pre = get_encoder_spec(cfg.vision.encoder).image_preprocess(
        EncoderOptions.parse(cfg.vision.encoder, cfg.vision.encoder_options))
    (out / "preprocessor_config.json").write_text(json.dumps(
        {**IMAGE_PROCESSORS[pre.resize](pre.image_size), "processor_class": "LlavaProcessor", "do_resize": True,
         "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
         "image_mean": list(pre.mean), "image_std": list(pre.std), "do_convert_rgb": True}, indent=2) + "\n")
    (out / "processor_config.json").write_text(json.dumps(
        {"processor_class": "LlavaProcessor", "image_token": IMAGE_TOKEN, **image_count}, indent=2) + "\n")


def llm_tensors(cfg: VisualChatConfig, weights) -> Iterator[tuple[str, torch.Tensor]]:
    """The chat checkpoint's language model under HF LLaMA names (``model.layers.0...``, ``lm_head.weight``)."""
    from megatron_visualchat.checkpoint.hf_llama import hf_tensors, stage_state_keys
    from megatron_visualchat.config import ParallelConfig

    for key, tmap in stage_state_keys(cfg.llm, ParallelConfig(), 0):
        if tmap is not None and tmap.export:
            yield from hf_tensors(tmap, [weights[CHAT_LLM + key]], cfg.llm).items()


def tower_tensors(cfg: VisualChatConfig, weights) -> Iterator[tuple[str, torch.Tensor]]:
    """The vision encoder under transformers' CLIP/SigLIP vision-model names; CLIP's ``post_layernorm`` (not held
    by our encoder, unused by the features) as the identity. QWen-VL's keeps our names, plus the resampler's key
    positions resized once to the patch grid (``attn_pool.key_pos``: the remote model does not resize)."""
    from megatron_visualchat.model.vision.checkpoint_formats import timm_vit_to_hf
    from megatron_visualchat.model.vision.positions import resample_grid

    encoder = {k.removeprefix(CHAT_ENCODER): weights[k] for k in weights if k.startswith(CHAT_ENCODER)}
    if tower_kind(cfg.vision.encoder) == "qwen":
        yield from encoder.items()
        yield "attn_pool.key_pos", resample_grid(encoder["attn_pool.pos_embed"].float(),
                                                 encoder["trunk.pos_embed"].shape[1])
        return
    yield from timm_vit_to_hf(encoder).items()
    if tower_kind(cfg.vision.encoder) == "clip":
        width = encoder["cls_token"].shape[-1]
        yield "post_layernorm.weight", torch.ones(width)
        yield "post_layernorm.bias", torch.zeros(width)


def write_export(load_dir: Path, cfg: VisualChatConfig, out_dir: Union[str, Path], *, dtype: Optional[str],
                 max_shard_size: Union[int, str], tensors: Callable[[object], Iterable[tuple[str, torch.Tensor]]],
                 config: Callable[[object, str], dict], image_count: Callable[[object], dict],
                 files: Sequence[Path] = (), extra_json: Optional[dict[str, Callable[[object], dict]]] = None) -> Path:
    """What every export does: the chat checkpoint's weights checked against its checksums, then, in a temp
    directory renamed into place, safetensors shards of ``tensors(weights)`` in ``dtype`` (default: the
    checkpoint's), ``config(tokenizer, dtype name)`` as config.json, the tokenizer and processor files
    (``image_count(tokenizer)``, see ``_side_files``), copies of ``files`` and each ``extra_json`` file
    (name -> its content from the tokenizer)."""
    from megatron_visualchat.checkpoint.chat import CONFIG_FILE, DAMAGED_FIX, WEIGHTS_FILE
    from megatron_visualchat.checkpoint.checksums import read_checksums, verify
    from megatron_visualchat.checkpoint.convert import SafetensorsShards, parse_size
    from megatron_visualchat.checkpoint.layout import check_replaceable_dir, checksummed_dir
    from megatron_visualchat.checkpoint.weight_files import HFWeights
    from megatron_visualchat.data import VisualChatTokenizer

    check_replaceable_dir(out_dir, "config.json", "export directory")
    digests = read_checksums(load_dir, DAMAGED_FIX)
    verify(load_dir, WEIGHTS_FILE, digests, DAMAGED_FIX)
    tokenizer = VisualChatTokenizer.load(str(load_dir))
    weights = HFWeights(load_dir / WEIGHTS_FILE)
    target = DTYPES[dtype] if dtype else weights[next(iter(weights))].dtype
    max_bytes = parse_size(max_shard_size) if isinstance(max_shard_size, str) else int(max_shard_size)
    with checksummed_dir(out_dir) as tmp:
        shards = SafetensorsShards(tmp, max_bytes)
        try:
            for name, tensor in tensors(weights):  # own, contiguous storage for safetensors
                shards.add(name, tensor.to(dtype=target, memory_format=torch.contiguous_format, copy=True))
        except KeyError as e:
            raise CheckpointError(f"{load_dir / WEIGHTS_FILE} has no tensor {e.args[0]}, which its {CONFIG_FILE} "
                                  f"implies: the weights do not match the config; {DAMAGED_FIX}") from None
        shards.close()
        config_json = config(tokenizer, str(target).removeprefix("torch."))
        (tmp / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
        _side_files(cfg, tokenizer, load_dir, tmp, image_count(tokenizer))
        for file in files:
            shutil.copy2(file, tmp / file.name)
        for name, content in (extra_json or {}).items():
            (tmp / name).write_text(json.dumps(content(tokenizer), indent=2) + "\n")
    return Path(out_dir)


def export_llava(load_dir: Union[str, Path], out_dir: Union[str, Path], *, dtype: Optional[str] = None,
                 max_shard_size: Union[int, str] = "2GB") -> Path:
    """Write the chat checkpoint in ``load_dir`` as a LLaVA directory (module docstring); returns ``out_dir``."""
    from megatron_visualchat.checkpoint.chat import read_chat_config
    from megatron_visualchat.model.vision import EncoderOptions

    load_dir = Path(load_dir)
    cfg = read_chat_config(load_dir)
    reasons = exportable(cfg)
    if reasons:
        raise CheckpointError(f"{load_dir} cannot be exported as transformers' LlavaForConditionalGeneration: "
                              + "; ".join(reasons))
    layout = LAYOUTS[0]

    def tensors(weights):
        for name, tensor in llm_tensors(cfg, weights):
            yield layout.hf_name(name), tensor
        for name, tensor in tower_tensors(cfg, weights):
            yield layout.vision + name, tensor
        for ours, theirs in PROJECTOR_TENSORS.items():
            yield layout.projector + theirs, weights[CHAT_PROJECTOR + ours]

    options = EncoderOptions.parse(cfg.vision.encoder, cfg.vision.encoder_options)
    count = {"patch_size": meta_encoder(cfg.vision.encoder).patch_embed.patch_size[0], "num_additional_image_tokens": 1,
             "vision_feature_select_strategy": "default" if options.drop_cls else "full"}
    return write_export(load_dir, cfg, out_dir, dtype=dtype, max_shard_size=max_shard_size, tensors=tensors,
                        config=lambda tok, name: _hf_config(cfg, tok, name), image_count=lambda tok: count)


def export_hf(load_dir: Union[str, Path], out_dir: Union[str, Path], *, dtype: Optional[str] = None,
              max_shard_size: Union[int, str] = "2GB") -> Path:
    """``export-hf``: a LLaVA directory when transformers' LLaVA computes the model, else a trust_remote_code
    directory (``hf_remote_export``); a model neither computes is refused with both lists of reasons."""
    from megatron_visualchat.checkpoint.chat import IMAGE_TOKENIZER_FILE, read_chat_config, read_image_tokenizer_record
    from megatron_visualchat.checkpoint.hf_remote_export import export_remote, remote_exportable

    cfg = read_chat_config(load_dir)
    if read_image_tokenizer_record(load_dir) is not None:
        raise CheckpointError(f"{Path(load_dir) / IMAGE_TOKENIZER_FILE}: this model writes images as codes, which "
                              "no exported transformers model decodes; draw with chat / serve instead")
    llava = exportable(cfg)
    if not llava:
        return export_llava(load_dir, out_dir, dtype=dtype, max_shard_size=max_shard_size)
    remote = remote_exportable(cfg)
    if remote:
        raise CheckpointError(f"{load_dir} cannot be exported: not as transformers' LlavaForConditionalGeneration ("
                              + "; ".join(llava) + ") nor as the trust_remote_code model (" + "; ".join(remote) + ")")
    return export_remote(load_dir, out_dir, dtype=dtype, max_shard_size=max_shard_size)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megatron-visualchat export-hf", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="chat checkpoint directory (--export-dir, import-hf --chat)")
    p.add_argument("--out", required=True, help="output directory (new, empty, or an earlier export: replaced)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: the checkpoint's dtype")
    p.add_argument("--max-shard-size", type=size_arg, default="2GB", help="per safetensors file, e.g. 2GB, 500MB")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    try:
        out = export_hf(args.load, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size)
    except (CheckpointError, ConfigError) as e:
        print(f"export-hf: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the machine failed the write; the temp directory is removed, an earlier export kept
        print(f"export-hf: error: {e.strerror or e} ({e.filename or args.out}); --out was left as it was: fix the "
              "cause and run the export again", file=sys.stderr)
        return 1
    print(f"export-hf: wrote {out} in {time.perf_counter() - start:.1f}s")
    return 0
