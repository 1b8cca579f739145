"""2-D sin-cos position tables shared by the QWen-VL resampler and the perceiver projector.

Both follow the MAE / QWen-VL convention so that a QWen-VL checkpoint's `attn_pool.pos_embed` and a freshly
initialised table are the same thing: tokens in raster order (row-major, row index slowest) and channels laid out
as [sin(col), cos(col), sin(row), cos(row)], each block D/4 wide with frequencies 1 / 10000^(k / (D/4)).
"""

from __future__ import annotations

import math

import torch
from timm.layers import build_sincos2d_pos_embed, resample_abs_pos_embed


def square_side(num_tokens: int, what: str) -> int:
    """Side of a square token grid, or a ValueError naming `what` when `num_tokens` is not a perfect square."""
    side = math.isqrt(num_tokens)
    if num_tokens <= 0 or side * side != num_tokens:
        raise ValueError(f"{what}: {num_tokens} tokens do not form a square grid")
    return side


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """[grid*grid, dim] float32 table in the MAE / QWen-VL layout (see module docstring)."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos positions need a width divisible by 4, got {dim}")
    # timm gives [sin(row), cos(row), sin(col), cos(col)] in raster order; MAE puts the column half first.
    table = build_sincos2d_pos_embed([grid, grid], dim, interleave_sin_cos=True)
    return torch.cat([table[:, dim // 2:], table[:, : dim // 2]], dim=1)


def resample_grid(table: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Bicubically resize a square [G*G, D] table to [num_tokens, D] (a square grid).

    Same arithmetic as QWen-VL's `get_abs_pos` (float32, align_corners=False, no antialias), so a table resized
    once at load time equals QWen's per-forward resize exactly.
    """
    old = square_side(table.shape[0], "position table")
    new = square_side(num_tokens, "token grid")
    if old == new:
        return table
    resized = resample_abs_pos_embed(
        table.unsqueeze(0), new_size=[new, new], old_size=[old, old], num_prefix_tokens=0,
        interpolation="bicubic", antialias=False,
    )
    return resized.squeeze(0)
