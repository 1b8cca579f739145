"""EncoderOptions (LLaVA's feature choice as options of any ViT encoder): HF's hidden_states[k] with or without the
class token, against transformers' CLIPVisionModel; bad options refused by name; strict projector weights."""

import pytest
import torch
from safetensors.torch import save_file

from megatron_visualchat.checkpoint.errors import CheckpointError
from megatron_visualchat.model.vision import build_encoder, build_vision_tower


@pytest.mark.parametrize("layer", [-3, -2, -1, 0, 1])
@pytest.mark.parametrize("drop_cls", [False, True])
def test_feature_layer_is_hf_hidden_states(hf_clip, hf_clip_dir, layer, drop_cls):
    encoder = build_encoder("tiny", hf_clip_dir, {"feature_layer": layer, "drop_cls": drop_cls}).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        theirs = hf_clip(pixel_values=pixels, output_hidden_states=True).hidden_states[layer]
        ours = encoder(pixels)
    theirs = theirs[:, 1:] if drop_cls else theirs
    assert encoder.num_image_tokens == theirs.shape[1] and encoder.has_cls is not drop_cls
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,options,match", [
    ("tiny", {"layer": -2}, r"unknown option\(s\) \['layer'\]"),
    ("tiny", {"feature_layer": 3}, r"feature_layer=3 is outside \[-3, 2\]"),
    ("tiny", {"feature_layer": "-2"}, "must be an integer"),
    ("tiny-siglip", {"drop_cls": True}, "no class token"),
    ("tiny-qwen", {"feature_layer": -2}, "needs a ViT trunk"),
])
def test_bad_options_are_refused(name, options, match):
    with pytest.raises(ValueError, match=match):
        build_encoder(name, options=options)


def test_projector_weights_load_strictly(tmp_path):
    source = build_vision_tower("tiny", "mlp", 48, encoder_options={"drop_cls": True})
    path = tmp_path / "projector.safetensors"
    save_file(source.projector.state_dict(), str(path))
    tower = build_vision_tower("tiny", "mlp", 48, encoder_options={"drop_cls": True}, projector_weights=path)
    assert all(torch.equal(a, b) for a, b in zip(tower.projector.state_dict().values(),
                                                  source.projector.state_dict().values()))
    with pytest.raises(CheckpointError, match="missing"):
        build_vision_tower("tiny", "linear", 48, projector_weights=path)


def test_vision_lora_with_unused_blocks_is_refused():
    from megatron_visualchat.config import LoraConfig, VisionConfig, VisualChatConfig
    from megatron_visualchat.model.visualchat import VisualChatModel
    from megatron_visualchat.testing.distributed import run_parallel

    cfg = VisualChatConfig(vision=VisionConfig(encoder_options={"feature_layer": -2}), lora=LoraConfig(vision_rank=2))
    with pytest.raises(Exception, match="leaves the last 1 unused: drop --vision-lora-rank"):
        run_parallel(VisualChatModel, args=(cfg,))
    assert build_encoder("tiny", options={"feature_layer": -3}).unused_blocks == 2
