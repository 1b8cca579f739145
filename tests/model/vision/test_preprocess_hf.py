"""The image transform gives transformers' CLIPImageProcessor / SiglipImageProcessor pixels (to 1e-6; measured
bit-exact) on random images of odd sizes and every common mode, transparency included."""

import numpy as np
import pytest
from PIL import Image

from megatron_visualchat.model.vision.preprocess import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    SIGLIP_MEAN,
    SIGLIP_STD,
    ImagePreprocess,
)

transformers = pytest.importorskip("transformers")

SIZES = ((37, 53), (61, 29), (45, 45), (29, 31), (30, 30), (83, 30))
MODES = ("RGB", "L", "RGBA", "P", "LA", "P+transparency")


def _image(rng, size, mode) -> Image.Image:
    w, h = size
    rgba = Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA")
    if mode == "P+transparency":  # a palette image with a transparent index
        image = rgba.convert("RGB").convert("P")
        image.info["transparency"] = 7
        return image
    return rgba if mode == "RGBA" else rgba.convert(mode)


@pytest.mark.parametrize("resize", ["shortest_edge_center_crop", "squash"])
def test_pixels_equal_transformers(resize):
    size = 30
    if resize == "squash":
        ours = ImagePreprocess(size, SIGLIP_MEAN, SIGLIP_STD, resize=resize).transform()
        theirs = transformers.SiglipImageProcessor(size={"height": size, "width": size})
    else:
        ours = ImagePreprocess(size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD).transform()
        theirs = transformers.CLIPImageProcessor(size={"shortest_edge": size},
                                                 crop_size={"height": size, "width": size})
    rng = np.random.default_rng(0)
    for image_size in SIZES:
        for mode in MODES:
            image = _image(rng, image_size, mode)
            expected = theirs(images=image, return_tensors="pt")["pixel_values"][0]
            got = ours(image)
            assert got.shape == expected.shape == (3, size, size)
            assert float((got - expected).abs().max()) <= 1e-6, (image_size, mode)
