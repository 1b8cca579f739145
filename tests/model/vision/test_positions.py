import numpy as np
import pytest
import torch
from torch.nn import functional as F

from megatron_visualchat.model.vision.positions import resample_grid, sincos_2d, square_side


def _mae_sincos(dim: int, grid: int) -> np.ndarray:
    """MAE / QWen-VL get_2d_sincos_pos_embed, written out from its definition."""
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
    rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")  # raster order, row slowest

    def one_d(pos: np.ndarray) -> np.ndarray:
        angles = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    return np.concatenate([one_d(cols), one_d(rows)], axis=1)  # MAE's "emb_h" half is built from the columns


@pytest.mark.parametrize("dim,grid", [(8, 3), (48, 4), (64, 16)])
def test_sincos_2d_matches_mae_layout(dim, grid):
    table = sincos_2d(grid, dim)
    assert table.shape == (grid * grid, dim) and table.dtype == torch.float32
    np.testing.assert_allclose(table.numpy(), _mae_sincos(dim, grid), atol=1e-5)


def test_sincos_2d_rejects_width_not_divisible_by_4():
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d(4, 6)


def test_resample_grid_matches_qwen_get_abs_pos():
    table = torch.randn(16, 12)
    expected = F.interpolate(
        table.reshape(1, 4, 4, 12).permute(0, 3, 1, 2), size=(7, 7), mode="bicubic", align_corners=False
    ).permute(0, 2, 3, 1).flatten(0, 2)
    torch.testing.assert_close(resample_grid(table, 49), expected, rtol=0, atol=0)
    assert resample_grid(table, 16) is table


def test_square_side_errors_name_the_grid():
    assert square_side(49, "x") == 7
    with pytest.raises(ValueError, match="patch grid: 50 tokens do not form a square grid"):
        square_side(50, "patch grid")
