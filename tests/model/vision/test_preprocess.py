import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor, SiglipImageProcessor

from megatron_visualchat.model.vision.encoders import ENCODERS
from megatron_visualchat.model.vision.preprocess import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ImagePreprocess,
    default_image_transform,
)

CLIP_32 = ImagePreprocess(32, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)


def _white_left_third(width: int = 96, height: int = 32) -> Image.Image:
    image = Image.new("RGB", (width, height), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, width // 3, height))
    return image


def test_constant_image_is_normalised_per_channel():
    out = CLIP_32.transform()(Image.new("RGB", (50, 70), (255, 128, 0)))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    for channel, value in enumerate((255, 128, 0)):
        expected = (value / 255 - OPENAI_CLIP_MEAN[channel]) / OPENAI_CLIP_STD[channel]
        torch.testing.assert_close(out[channel], torch.full((32, 32), expected), atol=1e-5, rtol=0)


def test_center_crop_keeps_the_middle_squash_keeps_everything():
    image = _white_left_third()  # 96x32: the middle 32 columns are black
    cropped = CLIP_32.transform()(image)
    assert cropped.max() < 0  # all black (black normalises to negative values)
    squashed = ImagePreprocess(32, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, resize="squash").transform()(image)
    assert squashed.shape == (3, 32, 32)
    assert squashed[:, :, 0].min() > 1  # left columns are white


def test_grayscale_and_rgba_become_three_channels():
    for mode in ("L", "RGBA"):
        assert CLIP_32.transform()(Image.new(mode, (40, 40))).shape == (3, 32, 32)


def test_transform_is_picklable_for_dataloader_workers():
    transform = CLIP_32.transform()
    clone = pickle.loads(pickle.dumps(transform))
    image = _white_left_third(64, 48)
    torch.testing.assert_close(clone(image), transform(image))


def test_default_transform_is_clip_preprocessing_of_any_size():
    image = _white_left_third(64, 48)
    torch.testing.assert_close(default_image_transform(32)(image), CLIP_32.transform()(image))
    assert default_image_transform(8).image_size == 8
    with pytest.raises(ValueError, match="image size=0 must be positive"):
        default_image_transform(0)


def test_unknown_resize_mode_is_refused():
    with pytest.raises(ValueError, match=r"unknown resize mode 'stretch'.*squash"):
        ImagePreprocess(32, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, resize="stretch")


@pytest.mark.parametrize("encoder,processor", [
    ("clip-vit-l-14-224",
     lambda: CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})),
    ("siglip-so400m-14-384", lambda: SiglipImageProcessor(size={"height": 384, "width": 384})),
])
def test_matches_hf_image_processors(encoder, processor):
    """Same steps as HF's processors, so the same pixels (test_preprocess_hf.py covers sizes and modes)."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (75, 105, 3), dtype=np.uint8)).resize((420, 300), Image.BILINEAR)
    ours = ENCODERS[encoder].preprocess.transform()(image)
    theirs = processor()(image, return_tensors="pt").pixel_values[0]
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max() <= 1e-6
