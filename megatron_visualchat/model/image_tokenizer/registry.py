"""Image tokenizers by name: ``load_image_tokenizer(name, directory)``; classes import lazily (transformers)."""

from __future__ import annotations

import importlib

from .base import ImageTokenizer

# name -> "module:class" with a ``load(directory)`` classmethod
IMAGE_TOKENIZERS: dict[str, str] = {
    "tiny_vqvae": "megatron_visualchat.model.image_tokenizer.tiny_vqvae:TinyVQVAETokenizer",
    "chameleon": "megatron_visualchat.model.image_tokenizer.chameleon:ChameleonImageTokenizer",
}


def image_tokenizer_class(name: str) -> type[ImageTokenizer]:
    if name not in IMAGE_TOKENIZERS:
        raise ValueError(f"image tokenizer {name!r} is not one of {sorted(IMAGE_TOKENIZERS)}")
    module, cls = IMAGE_TOKENIZERS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def parse_image_tokenizer_spec(text: str) -> tuple[str, str]:
    """``NAME:DIR`` (a command line's ``--image-tokenizer``) -> (name, directory); the name is checked here."""
    name, sep, directory = text.partition(":")
    if not sep or not directory:
        raise ValueError(f"image tokenizer {text!r}: expected NAME:DIR, e.g. tiny_vqvae:runs/vq")
    image_tokenizer_class(name)
    return name, directory


def load_image_tokenizer(name: str, directory: str) -> ImageTokenizer:
    """The tokenizer ``name`` with its weights from ``directory`` (safetensors + JSON config; nothing downloaded)."""
    return image_tokenizer_class(name).load(directory)
