"""What every image tokenizer is: images <-> a fixed number of discrete codes per image.

Images are float ``[B, 3, H, W]`` in ``[0, 1]`` at the tokenizer's ``image_size`` (each implementation maps that to
its own normalisation); codes are int64 ``[B, num_codes]`` in ``[0, codebook_size)``, row-major over the latent
grid. ``fingerprint`` names the exact weights and config, so cached codes are reused only for the same tokenizer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class ImageTokenizer(ABC):
    name: str  # registry name
    image_size: int
    codebook_size: int
    num_codes: int  # tokens per image
    fingerprint: str  # sha256 over config and weights

    @abstractmethod
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S]`` in [0, 1] -> ``[B, num_codes]`` int64."""

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """``[B, num_codes]`` -> ``[B, 3, S, S]`` in [0, 1]."""
        raise NotImplementedError(f"image tokenizer {self.name!r} cannot decode codes to images")

    def check_images(self, images: torch.Tensor) -> None:
        size = self.image_size
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, size, size):
            raise ValueError(f"{self.name}: expected images [B, 3, {size}, {size}], got {tuple(images.shape)}; "
                             f"resize to the tokenizer's image_size first")

    def check_codes(self, codes: torch.Tensor) -> None:
        if codes.dim() != 2 or codes.shape[1] != self.num_codes:
            raise ValueError(f"{self.name}: expected codes [B, {self.num_codes}], got {tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(f"{self.name}: codes must lie in [0, {self.codebook_size}), got "
                             f"[{int(codes.min())}, {int(codes.max())}]")
