"""Chat checkpoint -> HF ``LlavaForConditionalGeneration`` directory that transformers loads with no custom code;
``megatron-visualchat export-hf``.

Only a model transformers' LLaVA computes exactly is exported: ``causal`` attention (LLaVA's plain causal
attention), no modality-split projections or modality norms, the ``mlp`` projector (linear_1, GELU, linear_2) and a
CLIP tower (a timm ViT with QuickGELU and a class token). Anything else is refused, naming what transformers'
LLaVA lacks; MMCA would need a trust_remote_code model, which is not built. The tensors go out under the names
transformers' own ``save_pretrained`` writes (``checkpoint/hf_llava.LAYOUTS[0]``), through the LLaMA converter's
unfusing and shard writer, one tensor at a time. CLIP's ``post_layernorm`` (unused by LLaVA, not held by our
encoder) is written as the identity so the directory loads without missing weights.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Optional, Sequence, Union

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

# our resize mode -> transformers' image processor doing the same (LLaVA's do_pad: expand to a square of the mean
# colour first, as ImagePreprocess "pad")
IMAGE_PROCESSORS = {"shortest_edge_center_crop": {"image_processor_type": "CLIPImageProcessor"},
                    "pad": {"image_processor_type": "LlavaImageProcessor", "do_pad": True}}
CHAT_LLM, CHAT_ENCODER, CHAT_PROJECTOR = CHAT_PREFIXES["llm"], CHAT_PREFIXES["encoder"], CHAT_PREFIXES["projector"]


def exportable(cfg: VisualChatConfig) -> list[str]:
    """Why transformers' LLaVA cannot compute this model (empty: it can)."""
    from megatron_visualchat.model.vision import EncoderOptions, get_encoder_spec
    from megatron_visualchat.model.vision.checkpoint_formats import convert_vit

    a, v = cfg.attention, cfg.vision
    reasons = []
    if a.mode != "causal":
        reasons.append(f"attention.mode={a.mode!r}: LLaVA attends causally over all tokens (MMCA needs a "
                       "trust_remote_code model, not built)")
    if a.modality_split != "none":
        reasons.append(f"attention.modality_split={a.modality_split!r}: LLaVA has one projection for both modalities")
    if a.modality_norms:
        reasons.append("attention.modality_norms: LLaVA has one norm for both modalities")
    if v.projector != "mlp" or v.projector_options:
        reasons.append(f"vision.projector={v.projector!r} {v.projector_options or ''}: LLaVA's projector is the "
                       "two-layer GELU 'mlp'")
    spec = get_encoder_spec(v.encoder)
    with torch.device("meta"):
        model = spec.builder()
    clip = (spec.convert_checkpoint is convert_vit and spec.has_cls and isinstance(model.norm, torch.nn.Identity)
            and type(model.blocks[0].mlp.act).__name__ == "QuickGELU")
    if not clip:
        reasons.append(f"vision.encoder={v.encoder!r}: LLaVA's tower here is CLIP (a ViT with QuickGELU, a class "
                       "token and no final norm)")
    resize = spec.image_preprocess(EncoderOptions.parse(v.encoder, v.encoder_options)).resize
    if resize not in IMAGE_PROCESSORS:
        reasons.append(f"image resize {resize!r}: transformers' LLaVA processors do {sorted(IMAGE_PROCESSORS)}")
    return reasons


def _hf_config(cfg: VisualChatConfig, tokenizer, dtype: torch.dtype) -> dict:
    from megatron_visualchat.model.vision import EncoderOptions, get_encoder_spec

    llm, v = cfg.llm, cfg.vision
    spec = get_encoder_spec(v.encoder)
    with torch.device("meta"):
        model = spec.builder()
    options = EncoderOptions.parse(v.encoder, v.encoder_options)
    tokens, _ = spec.output_tokens(options)
    name = str(dtype).removeprefix("torch.")
    text = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": llm.hidden_size,
            "intermediate_size": llm.ffn_hidden_size, "num_hidden_layers": llm.num_layers,
            "num_attention_heads": llm.num_attention_heads, "num_key_value_heads": llm.query_groups,
            "head_dim": llm.head_dim, "vocab_size": llm.vocab_size,
            "max_position_embeddings": llm.max_position_embeddings, "rms_norm_eps": llm.rms_norm_eps,
            "rope_theta": float(llm.rope_base), "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
            "tie_word_embeddings": not llm.untie_embeddings, "bos_token_id": tokenizer.bos_id,
            "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id, "dtype": name}
    block = model.blocks[0]
    vision = {"model_type": "clip_vision_model", "hidden_size": model.embed_dim,
              "intermediate_size": block.mlp.fc1.out_features, "num_hidden_layers": len(model.blocks),
              "num_attention_heads": block.attn.num_heads, "image_size": spec.image_size,
              "patch_size": model.patch_embed.patch_size[0], "hidden_act": "quick_gelu",
              "layer_norm_eps": block.norm1.eps, "num_channels": 3, "projection_dim": model.embed_dim, "dtype": name}
    drop = {d: s for s, d in SELECT_STRATEGIES.items()}
    return {"architectures": list(ARCHITECTURES), "model_type": "llava", "dtype": name,
            "image_token_index": tokenizer.image_id, "image_seq_length": tokens, "projector_hidden_act": "gelu",
            "vision_feature_layer": -1 if options.feature_layer is None else options.feature_layer,
            "vision_feature_select_strategy": drop[options.drop_cls], "multimodal_projector_bias": True,
            "tie_word_embeddings": not llm.untie_embeddings, "text_config": text, "vision_config": vision}


def _side_files(cfg: VisualChatConfig, tokenizer, load_dir: Path, out: Path) -> None:
    """tokenizer.model + a LlamaTokenizer config naming <image> and <pad>, and image processor / LlavaProcessor
    configs doing the encoder's preprocessing."""
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
    spec = get_encoder_spec(cfg.vision.encoder)
    options = EncoderOptions.parse(cfg.vision.encoder, cfg.vision.encoder_options)
    pre = spec.image_preprocess(options)
    size = pre.image_size
    (out / "preprocessor_config.json").write_text(json.dumps(
        {**IMAGE_PROCESSORS[pre.resize], "processor_class": "LlavaProcessor", "do_resize": True,
         "size": {"shortest_edge": size}, "resample": 3, "do_center_crop": True,
         "crop_size": {"height": size, "width": size}, "do_rescale": True, "rescale_factor": 1 / 255,
         "do_normalize": True, "image_mean": list(pre.mean), "image_std": list(pre.std), "do_convert_rgb": True},
        indent=2) + "\n")
    with torch.device("meta"):
        patch = spec.builder().patch_embed.patch_size[0]
    (out / "processor_config.json").write_text(json.dumps(
        {"processor_class": "LlavaProcessor", "image_token": IMAGE_TOKEN, "patch_size": patch,
         "num_additional_image_tokens": 1,
         "vision_feature_select_strategy": "default" if options.drop_cls else "full"}, indent=2) + "\n")


def export_llava(load_dir: Union[str, Path], out_dir: Union[str, Path], *, dtype: Optional[str] = None,
                 max_shard_size: Union[int, str] = "2GB") -> Path:
    """Write the chat checkpoint in ``load_dir`` as a LLaVA directory (module docstring); returns ``out_dir``."""
    from megatron_visualchat.checkpoint.chat import DAMAGED_FIX, WEIGHTS_FILE, read_chat_config
    from megatron_visualchat.checkpoint.checksums import read_checksums, verify
    from megatron_visualchat.checkpoint.convert import SafetensorsShards, parse_size
    from megatron_visualchat.checkpoint.hf_llama import hf_tensors, stage_state_keys
    from megatron_visualchat.checkpoint.layout import check_replaceable_dir, checksummed_dir
    from megatron_visualchat.checkpoint.weight_files import HFWeights
    from megatron_visualchat.config import ParallelConfig
    from megatron_visualchat.data import VisualChatTokenizer
    from megatron_visualchat.model.vision.checkpoint_formats import timm_vit_to_hf

    load_dir = Path(load_dir)
    cfg = read_chat_config(load_dir)
    reasons = exportable(cfg)
    if reasons:
        raise CheckpointError(f"{load_dir} cannot be exported as transformers' LlavaForConditionalGeneration: "
                              + "; ".join(reasons))
    check_replaceable_dir(out_dir, "config.json", "export directory")
    digests = read_checksums(load_dir, DAMAGED_FIX)
    verify(load_dir, WEIGHTS_FILE, digests, DAMAGED_FIX)
    tokenizer = VisualChatTokenizer.load(str(load_dir))
    weights = HFWeights(load_dir / WEIGHTS_FILE)
    llm, layout = cfg.llm, LAYOUTS[0]
    first = weights[next(iter(weights))]
    target = DTYPES[dtype] if dtype else first.dtype
    max_bytes = parse_size(max_shard_size) if isinstance(max_shard_size, str) else int(max_shard_size)

    with checksummed_dir(out_dir) as tmp:
        shards = SafetensorsShards(tmp, max_bytes)

        def add(name: str, tensor: torch.Tensor) -> None:  # own, contiguous storage for safetensors
            shards.add(name, tensor.to(dtype=target, memory_format=torch.contiguous_format, copy=True))

        for key, tmap in stage_state_keys(llm, ParallelConfig(), 0):
            if tmap is not None and tmap.export:
                for name, tensor in hf_tensors(tmap, [weights[CHAT_LLM + key]], llm).items():
                    add(layout.hf_name(name), tensor)
        encoder = {k.removeprefix(CHAT_ENCODER): weights[k] for k in weights if k.startswith(CHAT_ENCODER)}
        for name, tensor in timm_vit_to_hf(encoder).items():
            add(layout.vision + name, tensor)
        width = encoder["cls_token"].shape[-1]
        add(layout.vision + "post_layernorm.weight", torch.ones(width))
        add(layout.vision + "post_layernorm.bias", torch.zeros(width))
        del encoder
        for ours, theirs in PROJECTOR_TENSORS.items():
            add(layout.projector + theirs, weights[CHAT_PROJECTOR + ours])
        shards.close()
        (tmp / "config.json").write_text(json.dumps(_hf_config(cfg, tokenizer, target), indent=2) + "\n")
        _side_files(cfg, tokenizer, load_dir, tmp)
    return Path(out_dir)


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
        out = export_llava(args.load, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size)
    except (CheckpointError, ConfigError) as e:
        print(f"export-hf: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the machine failed the write; the temp directory is removed, an earlier export kept
        print(f"export-hf: error: {e.strerror or e} ({e.filename or args.out}); --out was left as it was: fix the "
              "cause and run the export again", file=sys.stderr)
        return 1
    print(f"export-hf: wrote {out} in {time.perf_counter() - start:.1f}s")
    return 0
