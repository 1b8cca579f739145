import pytest
import torch
from timm.layers import SwiGLU

from megatron_visualchat.model.vision import PROJECTORS, build_encoder, build_projector, projector_options

from .tiny_configs import FITS_TINY

LM = 24
EXPECTED_TOKENS = {"linear": 17, "mlp": 17, "pool_adapter": 4, "perceiver": 4, "abstractor": 64}


@pytest.fixture(scope="module")
def tiny_features() -> torch.Tensor:
    torch.manual_seed(0)
    with torch.no_grad():
        return build_encoder("tiny")(torch.randn(2, 3, 32, 32))


def _build(name, **options):
    return build_projector(name, vision_hidden=32, lm_hidden=LM, num_input_tokens=17, has_cls=True, **options)


def test_registry_names():
    assert set(PROJECTORS) == {"linear", "mlp", "pool_adapter", "perceiver", "abstractor"}


@pytest.mark.parametrize("name", sorted(FITS_TINY))
def test_shapes_tokens_forward_backward(name, tiny_features):
    torch.manual_seed(0)
    projector = _build(name, **FITS_TINY[name])
    assert projector.num_output_tokens == EXPECTED_TOKENS[name] and projector.lm_hidden == LM
    features = tiny_features.clone().requires_grad_(True)
    out = projector(features)
    assert out.shape == (2, EXPECTED_TOKENS[name], LM) and torch.isfinite(out).all()
    out.pow(2).mean().backward()
    for pname, param in projector.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), pname
    assert features.grad.abs().sum() > 0


def test_linear_is_dsvc_baseline():
    projector = _build("linear")
    assert projector.proj.in_features == 32 and projector.proj.out_features == LM and projector.norm.eps == 1e-12


def test_mlp_is_two_layer_gelu():
    mlp = _build("mlp").mlp
    assert (mlp.fc1.in_features, mlp.fc1.out_features, mlp.fc2.out_features) == (32, LM, LM)
    assert isinstance(mlp.act, torch.nn.GELU)


def test_pool_adapter_keeps_raster_order_and_drops_cls():
    projector = _build("pool_adapter", pool_out=2)
    seen = []
    projector.mlp.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    tokens = torch.zeros(1, 17, 32)
    tokens[0, 0, 0] = 1000.0  # CLS: must not leak into any pooled cell
    for row in range(4):
        for col in range(4):
            tokens[0, 1 + 4 * row + col, 0] = 10 * row + col  # patch (row, col) in raster order
    projector(tokens)
    pooled = seen[0][0, :, 0]
    # cell (R, C) averages rows 2R..2R+1 and cols 2C..2C+1: 10 * (2R + 0.5) + (2C + 0.5); raster order of cells
    torch.testing.assert_close(pooled, torch.tensor([5.5, 7.5, 25.5, 27.5]))


def test_pool_adapter_without_cls_and_full_grid():
    projector = build_projector("pool_adapter", 8, LM, num_input_tokens=16, has_cls=False, pool_out=4)
    assert projector.num_output_tokens == 16 and projector(torch.randn(3, 16, 8)).shape == (3, 16, LM)


def test_perceiver_defaults_are_dsvc_perceiver():
    projector = _build("perceiver")
    assert projector.num_output_tokens == 256 and projector.queries.shape == (256, LM)
    assert len(projector.layers) == 1 and projector.layers[0].ffn is None and projector.drop_cls
    assert projector.query_pos.shape == (256, LM) and projector.key_pos.shape == (16, LM)
    assert projector(torch.randn(1, 17, 32)).shape == (1, 256, LM)


def test_abstractor_preset_dims_without_allocating():
    with torch.device("meta"):
        projector = build_projector("abstractor", vision_hidden=1024, lm_hidden=4096, num_input_tokens=257,
                                    has_cls=True)
        out = projector(torch.empty(2, 257, 1024))
    assert projector.num_output_tokens == 64 and out.shape == (2, 64, 4096)
    assert projector.queries.shape == (64, 1024) and len(projector.layers) == 6
    layer = projector.layers[0]
    assert layer.attn.num_heads == 16 and layer.latents_in_kv and isinstance(layer.ffn, SwiGLU)
    assert layer.ffn.fc1_g.out_features == 2816 and not projector.drop_cls and projector.query_pos is None


def test_abstractor_with_sincos_positions_gives_kept_cls_a_zero_position():
    projector = _build("abstractor", width=64, num_heads=4, num_queries=4, num_layers=2, pos_embed="sincos2d")
    assert projector.key_pos.shape == (17, 64) and torch.equal(projector.key_pos[0], torch.zeros(64))
    assert projector(torch.randn(2, 17, 32)).shape == (2, 4, LM)


def test_perceiver_mlp_ffn_option():
    projector = _build("perceiver", num_queries=9, num_layers=2, ffn="mlp", ffn_hidden=40, width=48, num_heads=3)
    assert projector.layers[1].ffn.fc1.out_features == 40
    assert projector(torch.randn(2, 17, 32)).shape == (2, 9, LM)


@pytest.mark.parametrize("name,options,message", [
    ("pool_adapter", {"pool_out": 3},
     r"'pool_adapter': pool_out=3 does not divide the 4x4 patch grid; allowed: \[1, 2, 4\]"),
    ("pool_adapter", {"pool_out": 0}, r"pool_out=0 must be a positive integer"),
    ("pool_adapter", {"pool_out": True}, r"pool_out=True must be a positive integer"),
    ("pool_adapter", {"pool_size": 2}, r"unknown option\(s\) \['pool_size'\]; allowed: \['pool_out'\]"),
    ("linear", {"pool_out": 2}, r"'linear': unknown option\(s\) \['pool_out'\]; allowed: none"),
    ("perceiver", {"num_queries": 5}, r"'perceiver'.*square num_queries.*5 tokens"),
    ("perceiver", {"ffn": "relu"}, r"ffn='relu' not in \('none', 'mlp', 'swiglu'\)"),
    ("perceiver", {"pos_embed": "rope"}, r"pos_embed='rope' not in \('sincos2d', 'none'\)"),
    ("perceiver", {"width": 30, "num_heads": 4}, r"width=30 is not divisible by num_heads=4"),
    ("abstractor", {"num_layers": -1}, r"'abstractor': num_layers=-1 must be a positive integer"),
])
def test_bad_options_are_refused(name, options, message):
    with pytest.raises(ValueError, match=message):
        _build(name, **options)


def test_grid_that_is_not_square_is_refused():
    with pytest.raises(ValueError, match=r"'pool_adapter': patch grid \(CLS excluded\): 18 tokens do not form"):
        build_projector("pool_adapter", 32, LM, num_input_tokens=19, has_cls=True, pool_out=1)
    # without positions the perceiver does not care about the grid
    projector = build_projector("perceiver", 32, LM, 19, True, num_queries=3, pos_embed="none")
    assert projector(torch.randn(1, 19, 32)).shape == (1, 3, LM)


def test_bad_sizes_and_unknown_names_are_refused():
    with pytest.raises(ValueError, match=r"'linear': lm_hidden=0 must be a positive integer"):
        build_projector("linear", 32, 0, 17, True)
    registry = r"\['abstractor', 'linear', 'mlp', 'perceiver', 'pool_adapter'\]"
    with pytest.raises(ValueError, match=r"unknown projector 'resampler'; registered: " + registry):
        build_projector("resampler", 32, LM, 17, True)


def test_projector_options_lists_defaults():
    assert projector_options("pool_adapter") == {"pool_out": 16}
    assert projector_options("linear") == {}
    assert projector_options("abstractor")["num_queries"] == 64 and projector_options("perceiver")["num_queries"] == 256
