"""QWen-VL's visual encoder (ViT-bigG/14 @448 + 256-query resampler), DS-VisualChat's best encoder.

timm has no QWen-VL model, but QWen's ViT blocks are exactly timm `VisionTransformer` blocks: pre-LN
(`ln_1`/`ln_2`, eps 1e-6), fused qkv with bias, exact-erf GELU MLP, bias-free patch conv, `ln_pre` before the
blocks, no class token and no final norm. So the trunk *is* a timm VisionTransformer; only the checkpoint layout
differs (QWen interleaves q/k/v per head in `in_proj`, see checkpoint_formats.convert_qwen_vl).

After the trunk comes QWen's `attn_pool` resampler and `ln_post`. QWen-VL's final 4096x4096 `proj` is not part of
this encoder: DS-VisualChat drops it and trains its own projection (the "linear" projector) on top.
"""

from __future__ import annotations

from functools import partial

import torch
from timm.layers import trunc_normal_
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .positions import resample_grid, sincos_2d, square_side

QWEN_NORM_EPS = 1e-6


class QwenResampler(nn.Module):
    """QWen-VL `attn_pool`: learned queries, one cross-attention over the patches, nothing else.

    Queries get the fixed 2-D sin-cos table of their own sqrt(Q) x sqrt(Q) grid; keys get the same table
    bicubically resized to the patch grid, so query (i, j) and the patches of image cell (i, j) share positions.
    As upstream: LayerNorm on queries and on the (projected) patches, no residual, no FFN, values without positions.
    Parameter names match QWen-VL's checkpoint, so weights load by name.
    """

    def __init__(self, num_queries: int, embed_dim: int, num_heads: int, kv_dim: int) -> None:
        super().__init__()
        grid = square_side(num_queries, "QWen resampler queries")
        self.num_queries = num_queries
        # Fixed, never trained (a frozen nn.Parameter upstream); persistent so the checkpoint's copy is loaded.
        self.register_buffer("pos_embed", sincos_2d(grid, embed_dim))
        self.query = nn.Parameter(trunc_normal_(torch.empty(num_queries, embed_dim), std=0.02))
        self.kv_proj = nn.Linear(kv_dim, embed_dim, bias=False) if kv_dim != embed_dim else nn.Identity()
        self.attn = nn.MultiheadAttention(embed_dim, num_heads, batch_first=True)
        self.ln_q = nn.LayerNorm(embed_dim, eps=QWEN_NORM_EPS)
        self.ln_kv = nn.LayerNorm(embed_dim, eps=QWEN_NORM_EPS)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """[N, T, kv_dim] patch tokens (T a square grid) -> [N, num_queries, embed_dim]."""
        key_pos = resample_grid(self.pos_embed, patches.shape[1])
        kv = self.ln_kv(self.kv_proj(patches))
        query = (self.ln_q(self.query) + self.pos_embed).unsqueeze(0).expand(kv.shape[0], -1, -1)
        return self.attn(query, kv + key_pos, kv, need_weights=False)[0]


class QwenVisualEncoder(nn.Module):
    """timm ViT trunk -> `attn_pool` resampler -> `ln_post`: pixels [N,3,S,S] -> [N, num_queries, output_dim]."""

    def __init__(
        self,
        image_size: int = 448,
        patch_size: int = 14,
        width: int = 1664,
        depth: int = 48,
        num_heads: int = 16,
        mlp_ratio: float = 4.9231,  # QWen-VL's config value: int(1664 * 4.9231) = 8192
        num_queries: int = 256,
        output_dim: int = 4096,
        resampler_heads: int | None = None,
    ) -> None:
        super().__init__()
        self.trunk = VisionTransformer(
            img_size=image_size, patch_size=patch_size, embed_dim=width, depth=depth, num_heads=num_heads,
            mlp_ratio=mlp_ratio, qkv_bias=True, class_token=False, global_pool="", num_classes=0,
            pre_norm=True, final_norm=False, norm_layer=partial(nn.LayerNorm, eps=QWEN_NORM_EPS), act_layer=nn.GELU,
        )
        self.attn_pool = QwenResampler(
            num_queries, output_dim, resampler_heads or output_dim // 128, kv_dim=width  # QWen: 4096 // 128 = 32
        )
        self.ln_post = nn.LayerNorm(output_dim, eps=QWEN_NORM_EPS)

    def forward_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.ln_post(self.attn_pool(self.trunk.forward_features(pixel_values)))

    forward = forward_features
