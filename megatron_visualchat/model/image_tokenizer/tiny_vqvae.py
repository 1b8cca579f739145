"""A small VQ-VAE (van den Oord et al. 2017) that learns the synthetic shape images on CPU in a minute or two.

Two stride-2 convolutions take an ``S x S`` image to an ``S/4 x S/4`` grid of ``embed_dim`` vectors; each is
replaced by its nearest codebook entry (straight-through gradient), and two transposed convolutions draw the image
back. Files: ``config.json`` (``TinyVQVAEConfig``) + ``model.safetensors``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from .base import ImageTokenizer

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
DOWNSAMPLE = 4  # two stride-2 convolutions


@dataclass(frozen=True)
class TinyVQVAEConfig:
    image_size: int = 32
    codebook_size: int = 128
    embed_dim: int = 16
    channels: int = 16
    beta: float = 0.25  # commitment weight

    def __post_init__(self):
        if self.image_size < 8 or self.image_size % DOWNSAMPLE:
            raise ValueError(f"image_size={self.image_size} must be a multiple of {DOWNSAMPLE} and >= 8")
        if self.codebook_size < 2 or self.embed_dim < 1 or self.channels < 1:
            raise ValueError(f"need codebook_size >= 2, embed_dim >= 1, channels >= 1; got {self}")

    @property
    def num_codes(self) -> int:
        return (self.image_size // DOWNSAMPLE) ** 2


class TinyVQVAE(nn.Module):
    def __init__(self, cfg: TinyVQVAEConfig):
        super().__init__()
        self.cfg = cfg
        c = cfg.channels
        self.encoder = nn.Sequential(
            nn.Conv2d(3, c, 4, 2, 1), nn.ReLU(), nn.Conv2d(c, 2 * c, 4, 2, 1), nn.ReLU(),
            nn.Conv2d(2 * c, 2 * c, 3, 1, 1), nn.ReLU(), nn.Conv2d(2 * c, cfg.embed_dim, 1))
        self.codebook = nn.Embedding(cfg.codebook_size, cfg.embed_dim)
        self.decoder = nn.Sequential(
            nn.Conv2d(cfg.embed_dim, 2 * c, 3, 1, 1), nn.ReLU(), nn.ConvTranspose2d(2 * c, c, 4, 2, 1), nn.ReLU(),
            nn.ConvTranspose2d(c, 3, 4, 2, 1))

    def latents(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] in [0, 1] -> [B, g, g, D]."""
        return self.encoder(images * 2 - 1).permute(0, 2, 3, 1)

    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        """Nearest codebook index of every latent vector: [..., D] -> [...]."""
        flat = z.reshape(-1, z.shape[-1])
        dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ self.codebook.weight.t() + \
            self.codebook.weight.pow(2).sum(1)
        return dist.argmin(1).view(z.shape[:-1])

    def draw(self, quantized: torch.Tensor) -> torch.Tensor:
        """[B, g, g, D] -> [B, 3, S, S] in [0, 1] (unclamped while training)."""
        return (self.decoder(quantized.permute(0, 3, 1, 2)) + 1) / 2

    def forward(self, images: torch.Tensor):
        """Reconstruction, the VQ loss (codebook + beta * commitment) and the codes."""
        z = self.latents(images)
        codes = self.quantize(z)
        q = self.codebook(codes)
        vq_loss = F.mse_loss(q, z.detach()) + self.cfg.beta * F.mse_loss(z, q.detach())
        q = z + (q - z).detach()  # straight-through estimator
        return self.draw(q), vq_loss, codes


class TinyVQVAETokenizer(ImageTokenizer):
    name = "tiny_vqvae"

    def __init__(self, model: TinyVQVAE, fingerprint: str):
        self.model = model.eval()
        cfg = model.cfg
        self.image_size, self.codebook_size, self.num_codes = cfg.image_size, cfg.codebook_size, cfg.num_codes
        self.fingerprint = fingerprint

    @torch.no_grad()
    def encode(self, images):
        self.check_images(images)
        return self.model.quantize(self.model.latents(images.float())).flatten(1)

    @torch.no_grad()
    def decode(self, codes):
        self.check_codes(codes)
        grid = self.image_size // DOWNSAMPLE
        q = self.model.codebook(codes.long()).view(codes.shape[0], grid, grid, -1)
        return self.model.draw(q).clamp(0, 1)

    @staticmethod
    def save(model: TinyVQVAE, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, CONFIG_FILE), "w") as f:
            json.dump({"image_tokenizer": TinyVQVAETokenizer.name, **dataclasses.asdict(model.cfg)}, f, indent=2)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(directory, WEIGHTS_FILE))

    @classmethod
    def load(cls, directory: str) -> "TinyVQVAETokenizer":
        config_path, weights_path = os.path.join(directory, CONFIG_FILE), os.path.join(directory, WEIGHTS_FILE)
        for path in (config_path, weights_path):
            if not os.path.isfile(path):
                raise ValueError(f"{path} not found; write a tiny VQ-VAE with `megatron-visualchat "
                                 f"train-image-tokenizer --out {directory}`")
        with open(config_path) as f:
            raw = json.load(f)
        if raw.pop("image_tokenizer", None) != cls.name:
            raise ValueError(f"{config_path} is not a {cls.name} config (no \"image_tokenizer\": \"{cls.name}\")")
        try:
            cfg = TinyVQVAEConfig(**raw)
        except TypeError as e:
            raise ValueError(f"{config_path}: {e}") from None
        model = TinyVQVAE(cfg)
        model.load_state_dict(load_file(weights_path))
        digest = hashlib.sha256()
        for path in (config_path, weights_path):
            with open(path, "rb") as f:
                digest.update(f.read())
        return cls(model, digest.hexdigest())
