"""Put each image's embeddings at its positions in the token sequence, in order (the reference code reverses
them: image 3 ended up after "### Image 1:")."""

from __future__ import annotations

from typing import Optional

import torch

from megatron_visualchat.model.token_codes import MODALITY_IMAGE


def splice_image_embeddings(text_embeds: torch.Tensor, image_embeds: torch.Tensor, modality: torch.Tensor,
                            num_images: Optional[torch.Tensor] = None,
                            positions: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``text_embeds`` [s, b, h] (megatron layout), ``image_embeds`` [N, T, h] for the batch's images in
    row-major order of appearance, ``modality`` [b, s] token codes. The ``MODALITY_IMAGE`` positions, read row
    by row, receive the N*T image vectors in order; one vectorised index_put, no per-token loop.
    ``num_images`` [b] (optional) lets a mismatch name the offending sample. ``positions`` [s]: the rows of
    ``text_embeds`` are these positions of a longer ``modality`` [b, L] (context parallelism: this rank's
    chunks); each receives the image vector of its place in the whole sequence."""
    s, b, h = text_embeds.shape
    image_pos = modality == MODALITY_IMAGE
    per_row = image_pos.sum(dim=1)
    n, t = image_embeds.shape[0], image_embeds.shape[1] if image_embeds.dim() == 3 else 0
    expected = num_images * t if num_images is not None else None
    if (expected is not None and not torch.equal(per_row, expected)) or int(per_row.sum()) != n * t:
        rows = [i for i in range(b) if expected is None or int(per_row[i]) != int(expected[i])] or list(range(b))
        details = "; ".join(
            f"sample {i}: {int(per_row[i])} image positions"
            + ("" if num_images is None else f" but {int(num_images[i])} image(s) x {t} tokens = "
               f"{int(num_images[i]) * t}") for i in rows)
        raise ValueError(f"image placeholders do not match the images given ({n} images x {t} tokens): {details}")
    if n == 0:
        # An empty sum is 0 but keeps the projector in the graph: its parameters get defined zero gradients.
        return text_embeds + image_embeds.sum() if image_embeds.requires_grad else text_embeds
    values = image_embeds.reshape(n * t, h).to(text_embeds.dtype)
    if positions is None:
        rows, cols = image_pos.nonzero(as_tuple=True)  # row-major = images in order of appearance
    else:
        order = (image_pos.flatten().cumsum(0) - 1).view_as(image_pos)  # row-major image-token index
        rows, cols = image_pos[:, positions].nonzero(as_tuple=True)
        values = values[order[:, positions][rows, cols]]
    return text_embeds.index_put((cols, rows), values)
