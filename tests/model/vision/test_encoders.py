import pytest
import torch
from PIL import Image
from timm.layers import QuickGELU

from megatron_visualchat.model.vision.encoders import ENCODERS, build_encoder, get_encoder_spec

REAL = ["clip-vit-l-14-224", "clip-vit-l-14-336", "eva-clip-vit-g-14", "siglip-so400m-14-384",
        "qwen-vl-vit-bigg-14-448"]
TINY = ["tiny", "tiny-siglip", "tiny-eva", "tiny-qwen"]

# name -> (hidden, tokens, has_cls, image, depth, heads, params in millions (rounded))
ARCH = {
    "clip-vit-l-14-224": (1024, 257, True, 224, 24, 16, 303),
    "clip-vit-l-14-336": (1024, 577, True, 336, 24, 16, 304),
    "eva-clip-vit-g-14": (1408, 1025, True, 448, 39, 16, 987),
    "siglip-so400m-14-384": (1152, 729, False, 384, 27, 16, 413),
    "qwen-vl-vit-bigg-14-448": (4096, 256, False, 448, 48, 16, 1919),
}


def test_registry_has_the_required_names():
    assert set(REAL + TINY) <= set(ENCODERS)


@pytest.mark.parametrize("name", REAL)
def test_real_encoder_configs_without_allocating(name):
    hidden, tokens, has_cls, image, depth, heads, params_m = ARCH[name]
    spec = ENCODERS[name]
    assert (spec.hidden_size, spec.num_image_tokens, spec.has_cls, spec.image_size) == (hidden, tokens, has_cls, image)
    with torch.device("meta"):
        encoder = build_encoder(name)
        out = encoder(torch.empty(1, 3, image, image))
    assert out.shape == (1, tokens, hidden) and out.is_meta
    trunk = encoder.model.trunk if name.startswith("qwen") else encoder.model
    assert (len(trunk.blocks), trunk.blocks[0].attn.num_heads) == (depth, heads)
    assert round(sum(p.numel() for p in encoder.parameters()) / 1e6) == params_m


def test_clip_is_quickgelu_without_post_norm_and_qwen_mlp_is_8192():
    with torch.device("meta"):
        clip = build_encoder("clip-vit-l-14-224").model
        qwen = build_encoder("qwen-vl-vit-bigg-14-448").model
    assert isinstance(clip.blocks[0].mlp.act, QuickGELU)
    assert isinstance(clip.norm, torch.nn.Identity) and not isinstance(clip.norm_pre, torch.nn.Identity)
    assert qwen.trunk.blocks[0].mlp.fc1.out_features == 8192
    assert qwen.trunk.cls_token is None and qwen.trunk.patch_embed.proj.bias is None
    assert qwen.attn_pool.attn.num_heads == 32 and qwen.attn_pool.kv_proj.weight.shape == (4096, 1664)


@pytest.mark.parametrize("name", TINY)
def test_tiny_encoders_run(name):
    torch.manual_seed(0)
    encoder = build_encoder(name)
    spec = encoder.spec
    out = encoder(torch.randn(2, 3, spec.image_size, spec.image_size))
    assert out.shape == (2, spec.num_image_tokens, spec.hidden_size) and torch.isfinite(out).all()


def test_tiny_is_clip_shaped_with_17_tokens():
    spec = ENCODERS["tiny"]
    assert (spec.image_size, spec.num_image_tokens, spec.hidden_size, spec.has_cls) == (32, 17, 32, True)


@pytest.mark.parametrize("name", REAL + TINY)
def test_image_transform_matches_encoder_input(name):
    spec = ENCODERS[name]
    out = spec.preprocess.transform()(Image.new("RGB", (spec.image_size + 30, spec.image_size + 7), (10, 200, 90)))
    assert out.shape == (3, spec.image_size, spec.image_size) and out.dtype == torch.float32


def test_encoder_exposes_image_transform_and_casts_pixels_to_its_dtype():
    encoder = build_encoder("tiny").to(torch.bfloat16)
    pixels = encoder.image_transform(Image.new("RGB", (40, 32))).unsqueeze(0)
    assert pixels.dtype == torch.float32
    assert encoder(pixels).dtype == torch.bfloat16


def test_wrong_pixel_shape_is_refused():
    encoder = build_encoder("tiny")
    with pytest.raises(ValueError, match=r"'tiny' expects pixel_values \[N, 3, 32, 32\], got \(2, 3, 64, 64\)"):
        encoder(torch.zeros(2, 3, 64, 64))


def test_unknown_encoder_lists_the_registry():
    with pytest.raises(ValueError, match=r"unknown vision encoder 'clip'.*'clip-vit-l-14-224'.*'tiny'"):
        get_encoder_spec("clip")
    with pytest.raises(ValueError, match="registered"):
        build_encoder("vit-huge")
