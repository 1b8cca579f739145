"""A plain CLIP-style image transform for tests and data tools that have no encoder at hand; the encoders'
own preprocessing (``model/vision/preprocess.py``) does the work."""

from __future__ import annotations

from megatron_visualchat.model.vision.preprocess import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ImagePreprocess,
    ImageTransform,
)


def default_image_transform(size: int, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD) -> ImageTransform:
    """Resize the short side (bicubic), center-crop ``size``, normalise."""
    if size <= 0:
        raise ValueError(f"image size={size} must be positive")
    return ImagePreprocess(size, tuple(mean), tuple(std)).transform()
