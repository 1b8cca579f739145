"""Image preprocessing, declared once per encoder (see encoders.ENCODERS) and exposed as `image_transform`.

The data collator calls `ENCODERS[name].preprocess.transform()` (no model needed) or `encoder.image_transform`;
both give the same picklable callable PIL.Image -> FloatTensor[3, S, S], usable in DataLoader workers.
`default_image_transform(size)` is a plain CLIP-statistics one of any size, for tests and tools with no encoder.
The geometric steps (pad, resize, crop) are computed once per image by `ImagePreprocess.geometry`, which both the
transform and the box mapping of grounding data (`data/boxes.py`) use, so a box follows its image exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

RESIZE_MODES = ("shortest_edge_center_crop", "squash", "pad")


@dataclass(frozen=True)
class ImageGeometry:
    """Where a (W, H) source image lands in the S x S encoder input: pasted at ``pad`` (left, top) on a canvas of
    ``canvas`` (w, h), the canvas resized to ``resized`` (w, h), then the S x S window at ``crop`` (left, top) kept.
    Coordinates are continuous (pixel edges), so a box maps by the same scale and shifts as the pixels."""

    source: tuple[int, int]
    pad: tuple[int, int]
    canvas: tuple[int, int]
    resized: tuple[int, int]
    crop: tuple[int, int]
    size: int

    def to_output(self, x: float, y: float) -> tuple[float, float]:
        return ((x + self.pad[0]) * self.resized[0] / self.canvas[0] - self.crop[0],
                (y + self.pad[1]) * self.resized[1] / self.canvas[1] - self.crop[1])

    def to_source(self, x: float, y: float) -> tuple[float, float]:
        return ((x + self.crop[0]) * self.canvas[0] / self.resized[0] - self.pad[0],
                (y + self.crop[1]) * self.canvas[1] / self.resized[1] - self.pad[1])


@dataclass(frozen=True)
class ImagePreprocess:
    """How an encoder wants its pixels.

    resize: "shortest_edge_center_crop" = HF CLIPImageProcessor (resize the short side to `image_size`, keep the
    aspect ratio, center-crop a square); "squash" = resize both sides to `image_size` (SigLIP, BLIP-2/EVA);
    "pad" = LLaVA-1.5's ``image_aspect_ratio=pad``: centre the image on a square canvas of the mean colour, then
    resize (nothing is cropped away, which grounding needs).
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

    def geometry(self, width: int, height: int) -> ImageGeometry:
        """The pad/resize/crop parameters for a ``width`` x ``height`` image (HF image processors' arithmetic:
        the long side truncated, the crop offset rounded down)."""
        if width <= 0 or height <= 0:
            raise ValueError(f"image size {width}x{height} must be positive")
        size, pad, canvas = self.image_size, (0, 0), (width, height)
        if self.resize == "pad":
            side = max(width, height)  # LLaVA's expand2square: the image centred, rounding down
            pad, canvas = ((side - width) // 2, (side - height) // 2), (side, side)
        if self.resize == "shortest_edge_center_crop":
            short, long = sorted(canvas)
            new_short, new_long = size, int(size * long / short)
            resized = (new_short, new_long) if canvas[0] <= canvas[1] else (new_long, new_short)
        else:
            resized = (size, size)
        crop = ((resized[0] - size) // 2, (resized[1] - size) // 2)
        return ImageGeometry((width, height), pad, canvas, resized, crop, size)


class ImageTransform:
    """PIL.Image (any mode) -> normalised FloatTensor[3, S, S], step for step as transformers' image processors
    (CLIPImageProcessor, SiglipImageProcessor) do it, so the pixels are theirs to float32 rounding: transparency
    composited onto white, bicubic antialiased resize of the uint8 tensor (rounded back to uint8), crop, then
    (x - 255 mean) / (255 std) in float32."""

    def __init__(self, preprocess: ImagePreprocess) -> None:
        self.preprocess = preprocess
        self._fill = tuple(int(m * 255) for m in preprocess.mean)  # LLaVA's pad colour
        self._mean = torch.tensor(preprocess.mean) * 255.0
        self._std = torch.tensor(preprocess.std) * 255.0

    @property
    def image_size(self) -> int:
        """Side of the square output (the data collator sizes empty pixel batches from it)."""
        return self.preprocess.image_size

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = to_rgb(image)
        g = self.preprocess.geometry(*image.size)
        if g.canvas != g.source:
            canvas = Image.new("RGB", g.canvas, self._fill)
            canvas.paste(image, g.pad)
            image = canvas
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)
        pixels = TF.resize(pixels, [g.resized[1], g.resized[0]], interpolation=InterpolationMode.BICUBIC,
                           antialias=True)
        if g.resized != (g.size, g.size):
            pixels = TF.crop(pixels, g.crop[1], g.crop[0], g.size, g.size)
        return TF.normalize(pixels.float(), self._mean, self._std)

    def __repr__(self) -> str:
        return f"ImageTransform({self.preprocess})"


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency (an alpha band, a palette's transparent index) composited onto white, as
    transformers' ``convert_to_rgb`` does; a plain ``convert("RGB")`` would keep the colour under alpha 0."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def default_image_transform(size: int, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD) -> ImageTransform:
    """Resize the short side (bicubic), center-crop ``size``, normalise (OpenAI CLIP statistics by default)."""
    if size <= 0:
        raise ValueError(f"image size={size} must be positive")
    return ImagePreprocess(size, tuple(mean), tuple(std)).transform()
