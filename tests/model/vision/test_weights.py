"""Weight loading: HF CLIP/SigLIP equal HF's last_hidden_state; QWen-VL keys equal an independent QWen forward."""

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch.nn import functional as F
from transformers import CLIPVisionConfig, CLIPVisionModel

from megatron_visualchat.checkpoint.errors import CheckpointError
from megatron_visualchat.model.vision import build_encoder, load_encoder_weights

from .tiny_configs import TINY_VIT


def _same(encoder, hf_model, pixels):
    with torch.no_grad():
        torch.testing.assert_close(encoder.eval()(pixels), hf_model(pixel_values=pixels).last_hidden_state,
                                   rtol=1e-5, atol=1e-5)


def test_hf_clip_directory_matches_last_hidden_state(hf_clip, hf_clip_dir, pixels):
    _same(build_encoder("tiny", weights=hf_clip_dir), hf_clip, pixels)


def test_hf_siglip_directory_matches_last_hidden_state(hf_siglip, tmp_path, pixels):
    hf_siglip.save_pretrained(tmp_path / "siglip")
    _same(build_encoder("tiny-siglip", weights=tmp_path / "siglip"), hf_siglip, pixels)


def test_full_clipmodel_layout_in_a_torch_bin(hf_clip, tmp_path, pixels):
    """CLIPModel checkpoints prefix the tower with `vision_model.` and carry a text tower, which is ignored."""
    state = {f"vision_model.{k}": v for k, v in hf_clip.state_dict().items()}
    state |= {"text_model.embeddings.token_embedding.weight": torch.zeros(10, 32),
              "visual_projection.weight": torch.zeros(16, 32), "logit_scale": torch.tensor(2.6)}
    torch.save(state, tmp_path / "pytorch_model.bin")
    _same(build_encoder("tiny", weights=tmp_path), hf_clip, pixels)


_OPEN_CLIP_BLOCK = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
                    "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def test_open_clip_openai_layout(hf_clip, tmp_path, pixels):
    """open_clip's `visual.*` names (OpenAI layout, fused in_proj), handled by timm's own converter."""
    hf = hf_clip.state_dict()
    state = {"visual.class_embedding": hf["embeddings.class_embedding"],
             "visual.positional_embedding": hf["embeddings.position_embedding.weight"],
             "visual.conv1.weight": hf["embeddings.patch_embedding.weight"],
             "visual.proj": torch.randn(32, 16), "text_projection": torch.randn(8, 8)}
    for kind in ("weight", "bias"):
        state[f"visual.ln_pre.{kind}"] = hf[f"pre_layrnorm.{kind}"]
        state[f"visual.ln_post.{kind}"] = hf[f"post_layernorm.{kind}"]
        for i in range(2):
            ours, theirs = f"encoder.layers.{i}", f"visual.transformer.resblocks.{i}"
            state[f"{theirs}.attn.in_proj_{kind}"] = torch.cat([hf[f"{ours}.self_attn.{p}_proj.{kind}"] for p in "qkv"])
            state |= {f"{theirs}.{new}.{kind}": hf[f"{ours}.{old}.{kind}"] for old, new in _OPEN_CLIP_BLOCK.items()}
    torch.save(state, tmp_path / "open_clip.pt")
    _same(build_encoder("tiny", weights=tmp_path / "open_clip.pt"), hf_clip, pixels)


def test_sharded_safetensors_index(hf_clip, tmp_path, pixels):
    state = {k: v.contiguous() for k, v in hf_clip.state_dict().items()}
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, tmp_path / file)
    weight_map = {k: file for file, keys in shards.items() for k in keys}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _same(build_encoder("tiny", weights=tmp_path), hf_clip, pixels)


def test_native_round_trip_single_file(tmp_path, pixels):
    torch.manual_seed(3)
    source = build_encoder("tiny-siglip").eval()
    save_file(source.model.state_dict(), tmp_path / "native.safetensors")
    target = build_encoder("tiny-siglip", weights=tmp_path / "native.safetensors").eval()
    torch.testing.assert_close(target(pixels), source(pixels), rtol=0, atol=0)


def test_hf_config_with_other_heads_or_activation_is_refused(tmp_path):
    # Same weight shapes as "tiny", so only the config can tell: 4 heads, exact GELU.
    torch.manual_seed(0)
    wrong = CLIPVisionModel(CLIPVisionConfig(**{**TINY_VIT, "num_attention_heads": 4}, hidden_act="gelu"))
    wrong.save_pretrained(tmp_path / "wrong")
    expected = r"num_attention_heads=4 \(encoder has 2\).*hidden_act='gelu' \(encoder has 'quick_gelu'\)"
    with pytest.raises(ValueError, match=expected):
        build_encoder("tiny", weights=tmp_path / "wrong")


def test_mismatched_keys_are_listed(hf_clip, tmp_path):
    state = {k: v for k, v in hf_clip.state_dict().items() if "layers.1.mlp.fc2" not in k}
    state["embeddings.extra_token"] = torch.zeros(32)
    torch.save(state, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError) as error:
        build_encoder("tiny", weights=tmp_path / "broken.pt")
    message = str(error.value)
    assert "broken.pt -> encoder 'tiny'" in message
    assert "2 missing" in message and "blocks.1.mlp.fc2.weight" in message
    assert "1 unexpected" in message and "embeddings.extra_token" in message


def test_shape_mismatch_is_listed(tmp_path):
    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(**{**TINY_VIT, "intermediate_size": 96}, hidden_act="quick_gelu")).save_pretrained(
        tmp_path / "wide")
    (tmp_path / "wide" / "config.json").unlink()  # let the weight check, not the config check, catch it
    expected = r"shape mismatches.*blocks.0.mlp.fc1.weight: checkpoint \(96, 32\) vs encoder \(128, 32\)"
    with pytest.raises(ValueError, match=expected):
        build_encoder("tiny", weights=tmp_path / "wide")


def test_missing_paths(tmp_path):
    with pytest.raises(CheckpointError, match="nope.safetensors not found"):
        build_encoder("tiny", weights=tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="no weights .*model.safetensors"):
        build_encoder("tiny", weights=tmp_path)


def test_pickles_are_loaded_weights_only(tmp_path):
    torch.save({"model": {"w": torch.zeros(1)}, "step": 3, "callback": print}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        build_encoder("tiny", weights=tmp_path / "evil.pt")


# ------------------------------------------------------------------------------------------------------- EVA
def _randomised(name: str, seed: int):
    torch.manual_seed(seed)
    encoder = build_encoder(name).eval()
    with torch.no_grad():
        for param in encoder.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return encoder


def test_eva_lavis_infmllm_layout(tmp_path, pixels):
    source = _randomised("tiny-eva", 4)
    state = {f"visual_encoder.{k}": v for k, v in source.model.state_dict().items() if not k.startswith("norm.")}
    state |= {f"ln_vision.{k}": v for k, v in source.model.norm.state_dict().items()}
    state |= {"Qformer.bert.embeddings.word_embeddings.weight": torch.zeros(4, 4), "query_tokens": torch.zeros(1, 2, 4)}
    torch.save(state, tmp_path / "infmllm.pth")
    target = build_encoder("tiny-eva", weights=tmp_path / "infmllm.pth").eval()
    torch.testing.assert_close(target(pixels), source(pixels), rtol=0, atol=0)


def test_eva_deeper_tower_is_truncated_like_blip2(tmp_path, caplog):
    deep = _randomised("tiny-eva", 5).model
    state = dict(deep.state_dict())
    state |= {k.replace("blocks.1.", "blocks.2."): v for k, v in state.items() if k.startswith("blocks.1.")}
    torch.save(state, tmp_path / "eva3.pth")
    with caplog.at_level(logging.WARNING):
        target = build_encoder("tiny-eva", weights=tmp_path / "eva3.pth").model
    assert "keeping the first 2" in caplog.text
    torch.testing.assert_close(target.blocks[1].mlp.fc2.weight, deep.blocks[1].mlp.fc2.weight)
    assert torch.equal(target.norm.weight, torch.ones(32)) and torch.equal(target.norm.bias, torch.zeros(32))


# ------------------------------------------------------------------------------------------------------- QWen-VL
# ENCODERS["tiny-qwen"]: image 32, patch 8 (4x4 grid), width 32, 2 blocks x 2 heads, mlp 64, 4 queries x 48, 2 heads.
QWEN = dict(width=32, layers=2, heads=2, mlp=64, patch=8, out=48, queries=4, pool_heads=2, stored_pos=4)


def _qwen_state(seed: int) -> dict[str, torch.Tensor]:
    """Random weights in QWen-VL's own names; positional_embedding on a 2x2 grid (QWen: 16x16 for a 32x32 grid)."""
    g = torch.Generator().manual_seed(seed)
    w, out = QWEN["width"], QWEN["out"]

    def r(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    def norm(prefix, dim):
        return {f"{prefix}.weight": 1 + r(dim, scale=0.1), f"{prefix}.bias": r(dim, scale=0.1)}

    s = {"conv1.weight": r(w, 3, QWEN["patch"], QWEN["patch"]), "positional_embedding": r(QWEN["stored_pos"], w),
         **norm("ln_pre", w)}
    for i in range(QWEN["layers"]):
        b = f"transformer.resblocks.{i}"
        s |= {**norm(f"{b}.ln_1", w), **norm(f"{b}.ln_2", w),
              f"{b}.attn.in_proj.weight": r(3 * w, w), f"{b}.attn.in_proj.bias": r(3 * w),
              f"{b}.attn.out_proj.weight": r(w, w), f"{b}.attn.out_proj.bias": r(w),
              f"{b}.mlp.c_fc.weight": r(QWEN["mlp"], w), f"{b}.mlp.c_fc.bias": r(QWEN["mlp"]),
              f"{b}.mlp.c_proj.weight": r(w, QWEN["mlp"]), f"{b}.mlp.c_proj.bias": r(w)}
    s |= {"attn_pool.query": r(QWEN["queries"], out), "attn_pool.pos_embed": r(QWEN["queries"], out),
          "attn_pool.kv_proj.weight": r(out, w), "attn_pool.attn.in_proj_weight": r(3 * out, out),
          "attn_pool.attn.in_proj_bias": r(3 * out), "attn_pool.attn.out_proj.weight": r(out, out),
          "attn_pool.attn.out_proj.bias": r(out), **norm("attn_pool.ln_q", out), **norm("attn_pool.ln_kv", out),
          **norm("ln_post", out), "proj": r(out, out)}
    return s


def _get_abs_pos(table, tokens):
    src, dst = math.isqrt(table.shape[0]), math.isqrt(tokens)
    if src == dst:
        return table
    return F.interpolate(table.reshape(1, src, src, -1).permute(0, 3, 1, 2), size=(dst, dst), mode="bicubic",
                         align_corners=False).permute(0, 2, 3, 1).flatten(0, 2)


def _qwen_reference(s, pixels):
    """QWen-VL's visual forward (minus the final `proj`), transcribed from its structure, seq-first like upstream."""
    ln = lambda x, p: F.layer_norm(x, x.shape[-1:], s[f"{p}.weight"], s[f"{p}.bias"], eps=1e-6)  # noqa: E731
    w, heads = QWEN["width"], QWEN["heads"]
    hd = w // heads
    x = F.conv2d(pixels, s["conv1.weight"], stride=QWEN["patch"]).flatten(2).permute(0, 2, 1)
    x = ln(x + _get_abs_pos(s["positional_embedding"], x.shape[1]), "ln_pre").permute(1, 0, 2)  # [L, N, W]
    seq, n = x.shape[:2]
    for i in range(QWEN["layers"]):
        b = f"transformer.resblocks.{i}"
        mixed = F.linear(ln(x, f"{b}.ln_1"), s[f"{b}.attn.in_proj.weight"], s[f"{b}.attn.in_proj.bias"])
        q, k, v = mixed.view(seq, n, heads, 3 * hd).split(hd, dim=-1)  # per-head interleaved q/k/v
        q, k, v = (t.reshape(seq, n * heads, hd).transpose(0, 1) for t in (q, k, v))
        ctx = torch.bmm(torch.softmax(torch.bmm(q / math.sqrt(hd), k.transpose(1, 2)), -1), v)
        ctx = ctx.view(n, heads, seq, hd).permute(2, 0, 1, 3).reshape(seq, n, w)
        x = x + F.linear(ctx, s[f"{b}.attn.out_proj.weight"], s[f"{b}.attn.out_proj.bias"])
        hidden = F.gelu(F.linear(ln(x, f"{b}.ln_2"), s[f"{b}.mlp.c_fc.weight"], s[f"{b}.mlp.c_fc.bias"]))
        x = x + F.linear(hidden, s[f"{b}.mlp.c_proj.weight"], s[f"{b}.mlp.c_proj.bias"])
    x = x.permute(1, 0, 2)  # [N, L, W]
    key_pos = _get_abs_pos(s["attn_pool.pos_embed"], x.shape[1])
    kv = ln(F.linear(x, s["attn_pool.kv_proj.weight"]), "attn_pool.ln_kv").permute(1, 0, 2)
    query = ln(s["attn_pool.query"], "attn_pool.ln_q").unsqueeze(1).repeat(1, n, 1)
    query = query + s["attn_pool.pos_embed"].unsqueeze(1)
    out, _ = F.multi_head_attention_forward(
        query, kv + key_pos.unsqueeze(1), kv, QWEN["out"], QWEN["pool_heads"], s["attn_pool.attn.in_proj_weight"],
        s["attn_pool.attn.in_proj_bias"], None, None, False, 0.0, s["attn_pool.attn.out_proj.weight"],
        s["attn_pool.attn.out_proj.bias"], training=False, need_weights=False)
    return ln(out.permute(1, 0, 2), "ln_post")


def test_qwen_vl_checkpoint_matches_reference_forward(tmp_path, pixels):
    state = _qwen_state(6)
    full = {f"transformer.visual.{k}": v for k, v in state.items()}
    full |= {"transformer.wte.weight": torch.zeros(5, 4), "transformer.h.0.attn.c_attn.weight": torch.zeros(4, 4),
             "lm_head.weight": torch.zeros(5, 4)}
    save_file(full, tmp_path / "qwen_vl_chat.safetensors")
    encoder = build_encoder("tiny-qwen", weights=tmp_path / "qwen_vl_chat.safetensors").eval()
    with torch.no_grad():
        expected = _qwen_reference(state, pixels)
        torch.testing.assert_close(encoder(pixels), expected, rtol=1e-5, atol=1e-5)
    assert encoder(pixels).shape == (3, 4, 48)


def test_qwen_vl_dsvc_extracted_layout_with_config(tmp_path, pixels):
    """DS-VisualChat's extract_qwen_vl.py strips `transformer.visual.` and drops `proj`."""
    state = {k: v for k, v in _qwen_state(7).items() if k != "proj"}
    (tmp_path / "qwen_clip").mkdir()
    torch.save(state, tmp_path / "qwen_clip" / "pytorch_model.bin")
    config = {"visual": {"width": 32, "layers": 2, "heads": 2, "patch_size": 8, "output_dim": 48, "image_size": 32}}
    (tmp_path / "qwen_clip" / "config.json").write_text(json.dumps(config))
    encoder = build_encoder("tiny-qwen", weights=tmp_path / "qwen_clip").eval()
    with torch.no_grad():
        torch.testing.assert_close(encoder(pixels), _qwen_reference(state, pixels), rtol=1e-5, atol=1e-5)
    config["visual"]["heads"] = 4
    (tmp_path / "qwen_clip" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"visual.heads=4 \(encoder has 2\)"):
        build_encoder("tiny-qwen", weights=tmp_path / "qwen_clip")


def test_clip_weights_into_qwen_are_refused(hf_clip_dir: Path):
    encoder = build_encoder("tiny-qwen")
    with pytest.raises(ValueError, match=r"missing .*unexpected"):
        load_encoder_weights(encoder, hf_clip_dir / "model.safetensors")
