"""Vision side of the model: encoders (timm-backed, frozen by default), projectors, and the VisionTower combining them.

    tower = build_vision_tower("clip-vit-l-14-224", "linear", lm_hidden=4096, encoder_weights="/ckpt/clip-vit-l-14")
    pixels = torch.stack([tower.image_transform(img) for img in images])    # [N, 3, 224, 224]
    image_embeds = tower(pixels)                                              # [N, 257, 4096]
"""

from .encoders import ENCODERS, EncoderOptions, EncoderSpec, VisionEncoder, build_encoder, get_encoder_spec
from .preprocess import ImagePreprocess, ImageTransform, default_image_transform
from .projectors import PROJECTORS, build_projector, projector_options
from .tower import VisionTower, build_vision_tower
from .weights import load_encoder_weights

__all__ = [
    "ENCODERS",
    "PROJECTORS",
    "EncoderOptions",
    "EncoderSpec",
    "ImagePreprocess",
    "ImageTransform",
    "VisionEncoder",
    "VisionTower",
    "build_encoder",
    "build_projector",
    "build_vision_tower",
    "default_image_transform",
    "get_encoder_spec",
    "load_encoder_weights",
    "projector_options",
]
