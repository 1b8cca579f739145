"""Images written inline as VQ codes (the output side of interleaved image-and-text generation).

An answer may contain an image the model must *write*: the reader (``ImageOutputJsonlSource``, the
``jsonl_images_out`` format in ``formats/images_out.py``) puts a marker in the answer text, and
``CodeWritingTokenizer`` turns it into ``<boi> code tokens <eoi>`` (ids from ``ImageCodeVocab``) while the rest of
the text is tokenized as usual. Input images in the same record still go through the vision
encoder as ``<image>`` placeholders. Images are tokenized once: ``ImageCodeCache`` keeps each image's codes on disk
under ``sha256(image bytes)`` + the image tokenizer's ``fingerprint`` (config and weights), so editing a file or
retraining the tokenizer never reuses stale codes.

The code tokens are ordinary vocabulary ids, so the collator marks them modality TEXT: MMCA treats them as text
(they attend causally to text and to images), and they are never spliced.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import torch
from PIL import Image

from .formats.images_out import OUTPUT_PATTERN, ImageOutputJsonlSource, output_image_marker, output_images
from .images import FileImage, decode_image


class ImageCodeCache:
    """Codes of image files, computed once per (image bytes, image tokenizer) and kept as ``.npy`` files."""

    def __init__(self, directory: str, image_tokenizer):
        os.makedirs(directory, exist_ok=True)
        self.directory, self.image_tokenizer = directory, image_tokenizer
        self.hits = self.misses = 0

    def path(self, data: bytes) -> str:
        key = f"{hashlib.sha256(data).hexdigest()}-{self.image_tokenizer.fingerprint[:16]}"
        return os.path.join(self.directory, key + ".npy")

    def codes(self, image: FileImage) -> list[int]:
        data = image.read_bytes()
        path = self.path(data)
        if os.path.exists(path):
            self.hits += 1
            return np.load(path, allow_pickle=False).tolist()
        self.misses += 1
        size = self.image_tokenizer.image_size
        im = decode_image(data, image.name).resize((size, size), Image.BICUBIC)
        pixels = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1)[None]
        codes = self.image_tokenizer.encode(pixels)[0].numpy().astype(np.int64)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            np.save(f, codes, allow_pickle=False)
        os.replace(tmp, path)  # atomic: concurrent loader workers may write the same entry
        return codes.tolist()


def with_image_vocab_of(tokenizer, image_tokenizer, where: str = "the tokenizer"):
    """``tokenizer`` with the image vocabulary of ``image_tokenizer``'s codebook: one saved without an image
    vocabulary gains it; one saved with another codebook size is refused (its code ids would mean other codes)."""
    saved, size = tokenizer.image_codebook_size, image_tokenizer.codebook_size
    if saved and saved != size:
        raise ValueError(f"{where} has an image vocabulary of {saved} codes but image tokenizer "
                         f"{image_tokenizer.name!r} has a codebook of {size}: use that image tokenizer, or a "
                         f"tokenizer saved without an image vocabulary")
    return tokenizer if saved else tokenizer.with_image_vocab(size)


class CodeWritingTokenizer:
    """A VisualChatTokenizer whose ``encode`` writes output-image markers as ``<boi> codes <eoi>``; everything else
    (ids, decode, vocab size) is the wrapped tokenizer's. Pass it to ``ConversationEncoder`` in place of the
    tokenizer: answer text is supervised, so the code tokens are too."""

    def __init__(self, tokenizer, cache: ImageCodeCache):
        vocab = tokenizer.image_vocab
        if vocab is None:
            raise ValueError("the tokenizer has no image vocabulary; build it with image_codebook_size="
                             f"{cache.image_tokenizer.codebook_size} (the image tokenizer's codebook)")
        if vocab.codebook_size != cache.image_tokenizer.codebook_size:
            raise ValueError(f"tokenizer image vocabulary has {vocab.codebook_size} codes but image tokenizer "
                             f"{cache.image_tokenizer.name!r} has {cache.image_tokenizer.codebook_size}")
        self._tokenizer, self.cache = tokenizer, cache

    def __getattr__(self, name):
        if name.startswith("_"):  # not during unpickling (DataLoader workers), before _tokenizer exists
            raise AttributeError(name)
        return getattr(self._tokenizer, name)

    def encode(self, text: str) -> list[int]:
        ids, start = [], 0
        for m in OUTPUT_PATTERN.finditer(text):
            ids += self._tokenizer.encode(text[start:m.start()])
            ids += self._tokenizer.image_vocab.image_tokens(self.cache.codes(FileImage(m.group(1), m.group(2) or None)))
            start = m.end()
        return ids + self._tokenizer.encode(text[start:])


__all__ = ["CodeWritingTokenizer", "ImageCodeCache", "ImageOutputJsonlSource", "output_image_marker", "output_images",
           "with_image_vocab_of"]
