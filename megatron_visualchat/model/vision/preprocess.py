"""Image preprocessing, declared once per encoder (see encoders.ENCODERS) and exposed as `image_transform`.

The data collator calls `ENCODERS[name].preprocess.transform()` (no model needed) or `encoder.image_transform`;
both give the same picklable callable PIL.Image -> FloatTensor[3, S, S], usable in DataLoader workers.
`default_image_transform(size)` is a plain CLIP-statistics one of any size, for tests and tools with no encoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import InterpolationMode

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

RESIZE_MODES = ("shortest_edge_center_crop", "squash")


@dataclass(frozen=True)
class ImagePreprocess:
    """How an encoder wants its pixels.

    resize: "shortest_edge_center_crop" = HF CLIPImageProcessor (resize the short side to `image_size`, keep the
    aspect ratio, center-crop a square); "squash" = resize both sides to `image_size` (SigLIP, BLIP-2/EVA).
    """

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: str = "shortest_edge_center_crop"

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"unknown resize mode {self.resize!r}; allowed: {RESIZE_MODES}")

    def transform(self) -> ImageTransform:
        return ImageTransform(self)


class ImageTransform:
    """PIL.Image (any mode) -> normalised FloatTensor[3, S, S]; bicubic resampling as all our encoders use."""

    def __init__(self, preprocess: ImagePreprocess) -> None:
        size = preprocess.image_size
        resize = (
            [transforms.Resize(size, interpolation=InterpolationMode.BICUBIC), transforms.CenterCrop(size)]
            if preprocess.resize == "shortest_edge_center_crop"
            else [transforms.Resize((size, size), interpolation=InterpolationMode.BICUBIC)]
        )
        self.preprocess = preprocess
        self._pipeline = transforms.Compose(
            [*resize, transforms.ToTensor(), transforms.Normalize(preprocess.mean, preprocess.std)]
        )

    @property
    def image_size(self) -> int:
        """Side of the square output (the data collator sizes empty pixel batches from it)."""
        return self.preprocess.image_size

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self._pipeline(image.convert("RGB"))

    def __repr__(self) -> str:
        return f"ImageTransform({self.preprocess})"


def default_image_transform(size: int, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD) -> ImageTransform:
    """Resize the short side (bicubic), center-crop ``size``, normalise (OpenAI CLIP statistics by default)."""
    if size <= 0:
        raise ValueError(f"image size={size} must be positive")
    return ImagePreprocess(size, tuple(mean), tuple(std)).transform()
