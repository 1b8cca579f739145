"""Projector registry: vision tokens [N, T_in, vision_hidden] -> LM-space tokens [N, T_out, lm_hidden].

    build_projector(name, vision_hidden, lm_hidden, num_input_tokens, has_cls, **options)

Every projector exposes `num_output_tokens` (T_out, the number of <image> placeholder positions per image) and
`lm_hidden`. Unknown names or options, and options that do not fit the encoder's token grid, raise ValueError.

Tensor parallelism: projectors are plain torch modules, replicated (not sharded) on every TP rank. They are small
(<= ~100M params, vs billions in the LM), run once per image on the first pipeline stage only, and see identical
inputs on all TP ranks (the frozen encoder's output), so their gradients are identical across TP ranks: the usual
data-parallel grad reduction is all they need and no TP collective is spent on them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import partial

import torch
from timm.layers import Mlp, SwiGLU, trunc_normal_
from torch import nn
from torch.nn import functional as F

from .positions import resample_grid, sincos_2d, square_side

FFN_TYPES = ("none", "mlp", "swiglu")
POS_EMBED_TYPES = ("sincos2d", "none")


def _require_positive_int(option: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{option}={value!r} must be a positive integer")
    return value


def _require_choice(option: str, value: object, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{option}={value!r} not in {allowed}")
    return value


class LinearProjector(nn.Module):
    """DS-VisualChat's `baseline`: Linear(vision -> lm) + LayerNorm(eps 1e-12); one output per input token."""

    def __init__(self, vision_hidden: int, lm_hidden: int, num_input_tokens: int) -> None:
        super().__init__()
        self.num_output_tokens, self.lm_hidden = num_input_tokens, lm_hidden
        self.proj = nn.Linear(vision_hidden, lm_hidden)
        self.norm = nn.LayerNorm(lm_hidden, eps=1e-12)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(tokens))


class MLPProjector(nn.Module):
    """LLaVA-1.5 `mlp2x_gelu`: Linear(vision -> lm), GELU, Linear(lm -> lm); one output per input token."""

    def __init__(self, vision_hidden: int, lm_hidden: int, num_input_tokens: int) -> None:
        super().__init__()
        self.num_output_tokens, self.lm_hidden = num_input_tokens, lm_hidden
        self.mlp = Mlp(vision_hidden, hidden_features=lm_hidden, out_features=lm_hidden, act_layer=nn.GELU)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.mlp(tokens)


class PoolAdapter(nn.Module):
    """InfMLLM pool-adapter: drop CLS, average-pool the s x s patch grid to p x p (non-overlapping (s/p)^2 windows,
    no parameters), then Linear(vision -> lm), GELU, Linear(lm -> lm). Output tokens stay in raster order, each one a
    fixed image cell, so spatial layout survives without extra position embeddings."""

    def __init__(self, vision_hidden: int, lm_hidden: int, grid: int, pool_out: int, has_cls: bool) -> None:
        super().__init__()
        self.grid, self.pool_out, self.has_cls = grid, pool_out, has_cls
        self.num_output_tokens, self.lm_hidden = pool_out * pool_out, lm_hidden
        self.mlp = Mlp(vision_hidden, hidden_features=lm_hidden, out_features=lm_hidden, act_layer=nn.GELU)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        patches = tokens[:, 1:] if self.has_cls else tokens
        n, _, channels = patches.shape
        image = patches.transpose(1, 2).reshape(n, channels, self.grid, self.grid)  # row-major grid
        window = self.grid // self.pool_out
        pooled = F.avg_pool2d(image, kernel_size=window, stride=window)  # [n, C, p, p]
        return self.mlp(pooled.flatten(2).transpose(1, 2))


class PerceiverLayer(nn.Module):
    """Latents cross-attend to the patches (pre-LN, residual), then an optional pre-LN FFN (residual).

    latents_in_kv=True makes keys/values [patches ; latents] (Flamingo perceiver, mPLUG-Owl abstractor)."""

    def __init__(self, width: int, num_heads: int, ffn: str, ffn_hidden: int, latents_in_kv: bool) -> None:
        super().__init__()
        self.latents_in_kv = latents_in_kv
        self.ln_q = nn.LayerNorm(width, eps=1e-6)
        self.ln_kv = nn.LayerNorm(width, eps=1e-6)
        self.attn = nn.MultiheadAttention(width, num_heads, batch_first=True)
        if ffn == "none":
            self.ffn = None
        else:
            self.ln_ffn = nn.LayerNorm(width, eps=1e-6)
            self.ffn = (
                Mlp(width, hidden_features=ffn_hidden, act_layer=nn.GELU)
                if ffn == "mlp"  # swiglu: SiLU-gated with a LayerNorm on the hidden dim, as mPLUG-Owl's abstractor
                else SwiGLU(width, hidden_features=ffn_hidden, norm_layer=partial(nn.LayerNorm, eps=1e-6))
            )

    def forward(
        self, latents: torch.Tensor, patches: torch.Tensor, query_pos: torch.Tensor | None, key_pos: torch.Tensor | None
    ) -> torch.Tensor:
        q, kv = self.ln_q(latents), self.ln_kv(patches)
        if self.latents_in_kv:
            kv = torch.cat([kv, q], dim=1)
            key_pos = None if key_pos is None else torch.cat([key_pos, query_pos], dim=0)
        keys = kv if key_pos is None else kv + key_pos
        queries = q if query_pos is None else q + query_pos
        latents = latents + self.attn(queries, keys, kv, need_weights=False)[0]
        if self.ffn is not None:
            latents = latents + self.ffn(self.ln_ffn(latents))
        return latents


class PerceiverProjector(nn.Module):
    """Learned queries resampling the patches to a fixed token count, then LayerNorm + Linear(width -> lm).

    Patches are first projected to `width` (kv_proj). With pos_embed="sincos2d" (DS-VisualChat's `perceiver`,
    QWen-VL's resampler) the queries form a sqrt(Q) x sqrt(Q) grid with 2-D sin-cos positions and the patches get
    the same table resized to their grid (a kept CLS token gets a zero position, as mPLUG-Owl2 does)."""

    def __init__(
        self, vision_hidden: int, lm_hidden: int, num_patches: int, *, cls_in_input: bool, keep_cls: bool,
        num_queries: int, num_layers: int, width: int, num_heads: int, ffn: str, ffn_hidden: int, pos_embed: str,
        latents_in_kv: bool,
    ) -> None:
        super().__init__()
        self.drop_cls = cls_in_input and not keep_cls
        self.num_output_tokens, self.lm_hidden = num_queries, lm_hidden
        self.queries = nn.Parameter(trunc_normal_(torch.empty(num_queries, width), std=0.02))
        self.kv_proj = nn.Linear(vision_hidden, width)
        if pos_embed == "sincos2d":
            query_pos = sincos_2d(square_side(num_queries, "num_queries"), width)
            key_pos = resample_grid(query_pos, num_patches)
            if cls_in_input and keep_cls:
                key_pos = torch.cat([key_pos.new_zeros(1, width), key_pos])
            self.register_buffer("query_pos", query_pos, persistent=False)
            self.register_buffer("key_pos", key_pos, persistent=False)
        else:
            self.query_pos = self.key_pos = None
        self.layers = nn.ModuleList(
            PerceiverLayer(width, num_heads, ffn, ffn_hidden, latents_in_kv) for _ in range(num_layers)
        )
        self.out_norm = nn.LayerNorm(width, eps=1e-6)
        self.out_proj = nn.Linear(width, lm_hidden)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        patches = self.kv_proj(tokens[:, 1:] if self.drop_cls else tokens)
        latents = self.queries.unsqueeze(0).expand(patches.shape[0], -1, -1)
        for layer in self.layers:
            latents = layer(latents, patches, self.query_pos, self.key_pos)
        return self.out_proj(self.out_norm(latents))


# ---------------------------------------------------------------------------------------------------- builders
# Builders raise ValueError without the projector's name; build_projector adds it.
def build_linear(vision_hidden: int, lm_hidden: int, num_input_tokens: int, has_cls: bool) -> LinearProjector:
    return LinearProjector(vision_hidden, lm_hidden, num_input_tokens)


def build_mlp(vision_hidden: int, lm_hidden: int, num_input_tokens: int, has_cls: bool) -> MLPProjector:
    return MLPProjector(vision_hidden, lm_hidden, num_input_tokens)


def build_pool_adapter(
    vision_hidden: int, lm_hidden: int, num_input_tokens: int, has_cls: bool, *, pool_out: int = 16
) -> PoolAdapter:
    """pool_out: side p of the pooled grid (InfMLLM's released setting 16 -> 256 tokens); must divide the grid."""
    _require_positive_int("pool_out", pool_out)
    grid = square_side(num_input_tokens - int(has_cls), "patch grid (CLS excluded)")
    if grid % pool_out:
        divisors = [d for d in range(1, grid + 1) if grid % d == 0]
        raise ValueError(f"pool_out={pool_out} does not divide the {grid}x{grid} patch grid; allowed: {divisors}")
    return PoolAdapter(vision_hidden, lm_hidden, grid, pool_out, has_cls)


def build_perceiver(
    vision_hidden: int, lm_hidden: int, num_input_tokens: int, has_cls: bool, *,
    num_queries: int = 256, num_layers: int = 1, width: int | None = None, num_heads: int | None = None,
    ffn: str = "none", ffn_hidden: int | None = None, pos_embed: str = "sincos2d", latents_in_kv: bool = False,
    keep_cls: bool = False,
) -> PerceiverProjector:
    """Defaults = DS-VisualChat's `perceiver`: 256 queries, one cross-attention at the LM width with width/128 heads,
    2-D sin-cos positions, CLS dropped (unlike DS-VisualChat, with a residual: latents + attention). width /
    num_heads / ffn_hidden default to lm_hidden / max(1, width // 128) / 4 * width. keep_cls keeps the encoder's
    CLS token among the keys (mPLUG-Owl does)."""
    _require_positive_int("num_queries", num_queries)
    _require_positive_int("num_layers", num_layers)
    width = _require_positive_int("width", lm_hidden if width is None else width)
    num_heads = _require_positive_int("num_heads", max(1, width // 128) if num_heads is None else num_heads)
    ffn_hidden = _require_positive_int("ffn_hidden", 4 * width if ffn_hidden is None else ffn_hidden)
    _require_choice("ffn", ffn, FFN_TYPES)
    _require_choice("pos_embed", pos_embed, POS_EMBED_TYPES)
    if width % num_heads:
        raise ValueError(f"width={width} is not divisible by num_heads={num_heads}")
    num_patches = num_input_tokens - int(has_cls)
    if pos_embed == "sincos2d":
        if width % 4:
            raise ValueError(f"pos_embed='sincos2d' needs width divisible by 4, got width={width}")
        square_side(num_queries, "pos_embed='sincos2d' needs a square num_queries")
        square_side(num_patches, "pos_embed='sincos2d' needs a square patch grid (CLS excluded)")
    return PerceiverProjector(
        vision_hidden, lm_hidden, num_patches, cls_in_input=has_cls, keep_cls=keep_cls, num_queries=num_queries,
        num_layers=num_layers, width=width, num_heads=num_heads, ffn=ffn, ffn_hidden=ffn_hidden,
        pos_embed=pos_embed, latents_in_kv=latents_in_kv,
    )


# mPLUG-Owl's visual abstractor shape: 64 queries, 6 layers at width 1024 / 16 heads, keys = [patches ; queries]
# with the CLS token kept, SiLU-gated FFN (2816, LayerNorm inside) and no position embeddings (v1).
# Not weight-compatible with mPLUG-Owl (no normed-input residual, no trailing EOS token); every option overridable.
build_abstractor = partial(
    build_perceiver, num_queries=64, num_layers=6, width=1024, num_heads=16, ffn="swiglu", ffn_hidden=2816,
    pos_embed="none", latents_in_kv=True, keep_cls=True,
)

PROJECTORS: dict[str, Callable[..., nn.Module]] = {
    "linear": build_linear,
    "mlp": build_mlp,
    "pool_adapter": build_pool_adapter,
    "perceiver": build_perceiver,
    "abstractor": build_abstractor,
}


def projector_options(name: str) -> dict[str, object]:
    """Options projector `name` accepts, with their defaults."""
    if name not in PROJECTORS:
        raise ValueError(f"unknown projector {name!r}; registered: {sorted(PROJECTORS)}")
    return {
        p.name: p.default for p in inspect.signature(PROJECTORS[name]).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }


def build_projector(
    name: str, vision_hidden: int, lm_hidden: int, num_input_tokens: int, has_cls: bool, **options
) -> nn.Module:
    allowed = projector_options(name)
    unknown = sorted(set(options) - set(allowed))
    try:
        if unknown:
            raise ValueError(f"unknown option(s) {unknown}; allowed: {sorted(allowed) or 'none'}")
        for arg, value in (("vision_hidden", vision_hidden), ("lm_hidden", lm_hidden),
                           ("num_input_tokens", num_input_tokens)):
            _require_positive_int(arg, value)
        if has_cls and num_input_tokens < 2:
            raise ValueError(f"has_cls=True needs at least 2 input tokens, got num_input_tokens={num_input_tokens}")
        return PROJECTORS[name](vision_hidden, lm_hidden, num_input_tokens, has_cls, **options)
    except ValueError as error:
        raise ValueError(f"projector {name!r}: {error}") from None
