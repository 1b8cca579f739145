"""``megatron-visualchat train-image-tokenizer``: fit the tiny VQ-VAE on freshly drawn synthetic shape images.

Images come from ``data/synthetic.py``'s renderer (no files needed); the held-out set uses another seed stream. At
the end it reports reconstruction MSE / PSNR on held-out images, how many codebook entries are used, and the share
of images whose reconstruction keeps the original's dominant shape colour (the fact a chat about the image needs).
Training: Adam on reconstruction MSE + VQ loss; the codebook starts from encoder outputs of the first batch, and
entries unused for ``RESTART_EVERY`` steps restart at random current encoder outputs (else most codes die).
"""

from __future__ import annotations

import argparse
import math
import random
import time

import numpy as np
import torch
import torch.nn.functional as F

from ...data.synthetic import BACKGROUND, COLOURS, SHAPES, SIDES, ShapeImage
from .tiny_vqvae import TinyVQVAE, TinyVQVAEConfig, TinyVQVAETokenizer

RESTART_EVERY = 50
COLOUR_TOLERANCE = 0.25  # RGB distance from the background beyond which a pixel belongs to a shape
POOL_SIZE = 4096  # training images drawn once, batches sampled from them
_PALETTE = torch.tensor([BACKGROUND, *COLOURS.values()], dtype=torch.float32) / 255  # index 0 = background


def synthetic_images(count: int, size: int, seed: str) -> torch.Tensor:
    """``count`` synthetic shape images ``[count, 3, size, size]`` in [0, 1], deterministic in ``seed``."""
    out = np.empty((count, size, size, 3), dtype=np.uint8)
    for i in range(count):
        rng = random.Random(f"{seed}:{i}")
        image = ShapeImage(rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.randint(1, 3), rng.choice(SIDES))
        out[i] = np.asarray(image.render(size, rng))
    return torch.from_numpy(out).permute(0, 3, 1, 2).float() / 255


def dominant_colour(images: torch.Tensor) -> torch.Tensor:
    """Index into COLOURS of the most frequent shape colour per image (-1: no shape pixel): pixels farther than
    COLOUR_TOLERANCE from the background vote for their nearest palette colour."""
    pixels = images.permute(0, 2, 3, 1).reshape(images.shape[0], -1, 3)
    foreground = (pixels - _PALETTE[0]).norm(dim=-1) > COLOUR_TOLERANCE
    nearest = torch.cdist(pixels, _PALETTE[1:].expand(images.shape[0], -1, -1)).argmin(-1)
    counts = (F.one_hot(nearest, len(_PALETTE) - 1) * foreground[..., None]).sum(1)
    return torch.where(counts.max(1).values > 0, counts.argmax(1), -1)


@torch.no_grad()
def evaluate(tokenizer: TinyVQVAETokenizer, images: torch.Tensor) -> dict[str, float]:
    codes = tokenizer.encode(images)
    recon = tokenizer.decode(codes)
    mse = float(F.mse_loss(recon, images))
    return {"mse": mse, "psnr": 10 * math.log10(1 / max(mse, 1e-12)),
            "colour_match": float((dominant_colour(recon) == dominant_colour(images)).float().mean()),
            "codes_used": int(codes.unique().numel())}


def train_tiny_vqvae(cfg: TinyVQVAEConfig, steps: int, batch_size: int = 32, lr: float = 2e-3, seed: int = 0,
                     pool_size: int = POOL_SIZE, log=None) -> tuple[TinyVQVAE, list[float]]:
    """Train and return the model and its per-step total loss."""
    if steps < 1 or batch_size < 1:
        raise ValueError(f"need steps >= 1 and batch_size >= 1, got {steps=} {batch_size=}")
    torch.manual_seed(seed)
    model = TinyVQVAE(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    used = torch.zeros(cfg.codebook_size, dtype=torch.bool)
    pool = synthetic_images(pool_size, cfg.image_size, f"{seed}:train")
    losses = []
    for step in range(steps):
        images = pool[torch.randint(pool_size, (batch_size,))]
        if step == 0:
            with torch.no_grad():
                z = model.latents(images).reshape(-1, cfg.embed_dim)
                model.codebook.weight.copy_(z[torch.randint(len(z), (cfg.codebook_size,))])
        recon, vq_loss, codes = model(images)
        loss = F.mse_loss(recon, images) + vq_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        used[codes.unique()] = True
        if (step + 1) % RESTART_EVERY == 0:
            with torch.no_grad():
                dead = (~used).nonzero().squeeze(1)
                if len(dead):
                    z = model.latents(images).reshape(-1, cfg.embed_dim)
                    model.codebook.weight[dead] = z[torch.randint(len(z), (len(dead),))]
            used.zero_()
        if log and ((step + 1) % 100 == 0 or step + 1 == steps):
            log(f"step {step + 1}/{steps}: loss {loss:.4f}")
    return model.eval(), losses


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megatron-visualchat train-image-tokenizer",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory for config.json + model.safetensors")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--codebook-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=32, help="multiple of 4; codes per image = (S/4)^2")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-eval", type=int, default=256, help="held-out synthetic images for the report")
    args = parser.parse_args(argv)
    try:
        cfg = TinyVQVAEConfig(image_size=args.image_size, codebook_size=args.codebook_size)
    except ValueError as e:
        parser.error(str(e))
    start = time.time()
    model, _ = train_tiny_vqvae(cfg, args.steps, args.batch_size, args.lr, args.seed, log=print)
    TinyVQVAETokenizer.save(model, args.out)
    tokenizer = TinyVQVAETokenizer.load(args.out)
    m = evaluate(tokenizer, synthetic_images(args.num_eval, cfg.image_size, f"{args.seed}:heldout"))
    print(f"saved {args.out} ({cfg.num_codes} codes/image, codebook {cfg.codebook_size}) in {time.time() - start:.0f}s")
    print(f"held-out ({args.num_eval} images): mse {m['mse']:.5f}  psnr {m['psnr']:.2f} dB  dominant colour kept "
          f"{m['colour_match']:.1%}  codes used {m['codes_used']}/{cfg.codebook_size}")
    return 0
