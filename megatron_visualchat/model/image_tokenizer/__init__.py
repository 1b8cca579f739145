"""Discrete image tokenizers (VQ codes) for reading and writing images as vocabulary tokens (JAM / CM3leon style).

``base.py`` the interface, ``registry.py`` names -> implementations, ``tiny_vqvae.py`` a small VQ-VAE trained on the
synthetic images (``train.py``: ``megatron-visualchat train-image-tokenizer``), ``chameleon.py`` transformers'
Chameleon VQ-VAE (encoder only), ``vocab.py`` the one mapping between codes and token ids.
"""

from .base import ImageTokenizer
from .registry import IMAGE_TOKENIZERS, image_tokenizer_class, load_image_tokenizer, parse_image_tokenizer_spec
from .vocab import ImageCodeVocab

__all__ = ["IMAGE_TOKENIZERS", "ImageCodeVocab", "ImageTokenizer", "image_tokenizer_class", "load_image_tokenizer",
           "parse_image_tokenizer_spec"]
