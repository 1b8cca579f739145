"""Deterministic random microbatches with token codes, for tests and benchmarks of the text-side model."""

from __future__ import annotations

import torch

from megatron_visualchat.model.token_codes import MODALITY_TEXT, codes_from_layout, pack_token_codes


def batch_from_layouts(layouts: list[str], vocab_size: int, seed: int = 0) -> dict:
    """One microbatch whose rows follow ``layouts`` (see ``codes_from_layout``: t text, digit image, p pad,
    | packed-sample boundary). Labels are random next tokens on text positions only."""
    g = torch.Generator().manual_seed(seed)
    codes = [codes_from_layout(lay) for lay in layouts]
    lengths = {len(c[0]) for c in codes}
    if len(lengths) != 1:
        raise ValueError(f"layouts must have one length, got {sorted(lengths)}")
    modality, image_id, sample_id = (torch.stack(parts) for parts in zip(*codes))
    b, s = modality.shape
    tokens = torch.randint(0, vocab_size, (b, s), generator=g)
    labels = torch.randint(0, vocab_size, (b, s), generator=g)
    loss_mask = (modality == MODALITY_TEXT).float()
    return dict(tokens=tokens, labels=labels, loss_mask=loss_mask,
                position_ids=torch.arange(s).expand(b, s).contiguous(),
                attention_mask=pack_token_codes(modality, image_id, sample_id))


def visualchat_batch(rows: list[list], image_tokens: int, vocab_size: int, *, seed: int = 0,
                     image_size: int = 32) -> dict:
    """A collated-like VisualChat microbatch. Each row is a list of parts: a string of t/p characters, or an int
    (an image of ``image_tokens`` positions). Rows are right-padded to one length; pixels are random."""
    layouts = ["".join(p if isinstance(p, str) else str(p) * image_tokens for p in row) for row in rows]
    positions = [len(lay.replace("|", "")) for lay in layouts]  # "|" marks a packed sample, not a position
    batch = batch_from_layouts([lay + "p" * (max(positions) - n) for lay, n in zip(layouts, positions)],
                               vocab_size, seed)
    num_images = torch.tensor([sum(isinstance(p, int) for p in row) for row in rows])
    g = torch.Generator().manual_seed(seed + 1)
    batch["pixel_values"] = torch.randn(int(num_images.sum()), 3, image_size, image_size, generator=g)
    batch["num_images"] = num_images
    return batch
