import pytest
import torch
from PIL import Image

from megatron_visualchat.model.vision import PROJECTORS, build_vision_tower

from .tiny_configs import FITS_TINY

LM = 24


@pytest.mark.parametrize("projector", sorted(PROJECTORS))
def test_frozen_encoder_gets_no_grads_projector_does(projector, pixels):
    torch.manual_seed(0)
    tower = build_vision_tower("tiny", projector, LM, projector_options=FITS_TINY[projector]).train()
    assert not tower.encoder.training and tower.projector.training
    assert all(not p.requires_grad for p in tower.encoder.parameters())
    out = tower(pixels)
    assert out.shape == (3, tower.num_output_tokens, LM)
    out.sum().backward()
    assert all(p.grad is None for p in tower.encoder.parameters())
    assert all(p.grad is not None for p in tower.projector.parameters())


def test_frozen_encoder_runs_without_autograd(pixels):
    tower = build_vision_tower("tiny", "linear", LM)
    seen = []
    tower.encoder.register_forward_hook(lambda module, args, out: seen.append(out))
    tower(pixels)
    assert seen[0].grad_fn is None and not seen[0].requires_grad


def test_unfrozen_encoder_trains(pixels):
    tower = build_vision_tower("tiny", "mlp", LM, freeze_encoder=False).train()
    assert tower.encoder.training
    tower(pixels).sum().backward()
    assert all(p.grad is not None for p in tower.encoder.parameters())
    tower.eval()
    assert not tower.encoder.training


@pytest.mark.parametrize("projector", sorted(PROJECTORS))
@pytest.mark.parametrize("freeze", [True, False])
def test_zero_images_give_zero_grads_not_none(projector, freeze):
    tower = build_vision_tower("tiny", projector, LM, freeze_encoder=freeze, projector_options=FITS_TINY[projector])
    out = tower(torch.zeros(0, 3, 32, 32))
    assert out.shape == (0, tower.num_output_tokens, LM)
    out.sum().backward()
    trainable = [p for p in tower.parameters() if p.requires_grad]
    expected = list(tower.projector.parameters()) + ([] if freeze else list(tower.encoder.parameters()))
    assert len(trainable) == len(expected)
    for param in trainable:
        assert param.grad is not None and torch.equal(param.grad, torch.zeros_like(param))


def test_loaded_weights_reach_the_projector(hf_clip, hf_clip_dir, pixels):
    tower = build_vision_tower("tiny", "linear", LM, encoder_weights=hf_clip_dir)
    with torch.no_grad():
        expected = tower.projector(hf_clip(pixel_values=pixels).last_hidden_state)
        torch.testing.assert_close(tower(pixels), expected, rtol=1e-5, atol=1e-5)


def test_pil_images_end_to_end_on_qwen_shaped_tower():
    tower = build_vision_tower("tiny-qwen", "linear", LM)
    images = [Image.new("RGB", (50, 40), (255, 0, 0)), Image.new("L", (32, 90))]
    pixels = torch.stack([tower.image_transform(image) for image in images])
    assert tower(pixels).shape == (2, 4, LM)


def test_bad_inputs_are_refused():
    tower = build_vision_tower("tiny", "linear", LM)
    with pytest.raises(ValueError, match=r"expects pixel_values \[N, 3, 32, 32\], got \(1, 3, 224, 224\)"):
        tower(torch.zeros(1, 3, 224, 224))
    with pytest.raises(ValueError, match=r"got \(0, 3, 224, 224\)"):
        tower(torch.zeros(0, 3, 224, 224))
    with pytest.raises(ValueError, match="unknown projector 'qformer'"):
        build_vision_tower("tiny", "qformer", LM)
    with pytest.raises(ValueError, match=r"'pool_adapter': pool_out=16 does not divide the 4x4 patch grid"):
        build_vision_tower("tiny", "pool_adapter", LM)
