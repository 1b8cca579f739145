"""A plain CLIP-style image transform for tests, the synthetic quickstart and encoders without their own."""

from __future__ import annotations

from torchvision import transforms as T

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageTransform:
    """Resize (bicubic, short side) -> center crop -> tensor -> normalise. Declares ``image_size`` = (H, W)."""

    def __init__(self, size: int, mean=CLIP_MEAN, std=CLIP_STD):
        if size <= 0:
            raise ValueError(f"image size={size} must be positive")
        self.image_size = (size, size)
        self._transform = T.Compose(
            [
                T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
                T.CenterCrop(size),
                T.ToTensor(),
                T.Normalize(mean, std),
            ]
        )

    def __call__(self, image):
        return self._transform(image)


def default_image_transform(size: int, mean=CLIP_MEAN, std=CLIP_STD) -> ImageTransform:
    return ImageTransform(size, mean, std)
