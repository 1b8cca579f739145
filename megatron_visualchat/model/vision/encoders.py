"""Vision encoder registry: ENCODERS[name] -> EncoderSpec, and the VisionEncoder module built from it.

Every encoder returns *all* tokens of its last layer with no pooling ([N, num_image_tokens, hidden_size]), as
DS-VisualChat feeds them to its projection:
  * CLIP ViT-L/14 (224: 257 tokens, 336: 577 tokens, CLS first): HF `CLIPVisionModel.last_hidden_state`, i.e.
    *without* the post-LayerNorm (DS-VisualChat's choice; the post-norm only feeds CLIP's pooled output).
  * EVA-CLIP ViT-g/14 (InfMLLM / BLIP-2 variant: 39 blocks, 448 px -> 1025 tokens with CLS), followed by the
    separate `ln_vision` LayerNorm (held as timm's final `norm`, eps 1e-5 like BLIP-2's nn.LayerNorm).
  * SigLIP so400m/14 @384 (729 tokens, no CLS): HF `SiglipVisionModel.last_hidden_state`, which *includes* the
    post-LayerNorm; the attention-pooling head is not built.
  * QWen-VL ViT-bigG/14 @448 + its 256-query resampler + ln_post (256 tokens x 4096, no CLS): see qwen_vl.py.
  * tiny*: the same timm architectures with tiny dims (image 32, patch 8, width 32, depth 2, heads 2) for tests and
    the CPU quickstart; "tiny" is CLIP-shaped (CLS + 4x4 patches = 17 tokens).
All are built with random init (`pretrained=False`; timm never touches the network); real weights come from local
files via `load_encoder_weights`. The preprocessing each encoder expects is declared here once (`preprocess`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from functools import partial
from pathlib import Path

import timm
import torch
from torch import nn

from .checkpoint_formats import check_hf_vit_config, check_qwen_vl_config, convert_eva, convert_qwen_vl, convert_vit
from .preprocess import (
    OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, RESIZE_MODES, SIGLIP_MEAN, SIGLIP_STD, ImagePreprocess, ImageTransform,
)
from .qwen_vl import QwenVisualEncoder
from .weights import load_encoder_weights


@dataclass(frozen=True)
class EncoderSpec:
    """What the rest of the model needs to know about an encoder, without building it."""

    builder: Callable[[], nn.Module]  # module with .forward_features(pixels [N,3,S,S]) -> [N, T, hidden]
    hidden_size: int
    num_image_tokens: int  # tokens per image (T), CLS included when has_cls
    has_cls: bool  # token 0 is a class token
    preprocess: ImagePreprocess
    convert_checkpoint: Callable[[Mapping[str, torch.Tensor], nn.Module], dict[str, torch.Tensor]]
    check_hf_config: Callable[[Mapping, nn.Module, str], None] | None = None

    @property
    def image_size(self) -> int:
        return self.preprocess.image_size

    def output_tokens(self, options: EncoderOptions) -> tuple[int, bool]:
        """(tokens per image, whether token 0 is a class token) under ``options``, without building the encoder."""
        return self.num_image_tokens - int(options.drop_cls), self.has_cls and not options.drop_cls

    def image_preprocess(self, options: EncoderOptions) -> ImagePreprocess:
        """The encoder's preprocessing, with ``options.resize`` replacing its resize mode when set."""
        return self.preprocess if options.resize is None else replace(self.preprocess, resize=options.resize)


@dataclass(frozen=True)
class EncoderOptions:
    """Which features an encoder hands the projector (VisionConfig.encoder_options; LLaVA's two choices).

    feature_layer: None = the encoder's own output (above); an int k = HF's ``hidden_states[k]`` of the ViT trunk:
    0 is the embeddings after the pre-norm, k > 0 the output of block k, negative counts from the end (-1 = the
    last block, -2 = LLaVA-1.5's penultimate layer); no final norm is applied. Blocks past k are kept (their
    weights still load and export) but not run. Only timm ViT trunks (CLIP, SigLIP) support it.
    drop_cls: leave out the class token (LLaVA's vision_feature_select_strategy "default"; "full" keeps it).
    resize: None = the encoder's own preprocessing; else one of preprocess.RESIZE_MODES, e.g. "pad" (LLaVA-1.5's
    image_aspect_ratio=pad, which grounding needs: nothing is cropped away).
    """

    feature_layer: int | None = None
    drop_cls: bool = False
    resize: str | None = None

    @classmethod
    def parse(cls, encoder: str, options: Mapping | None) -> EncoderOptions:
        options = dict(options or {})
        allowed = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise ValueError(f"encoder {encoder!r}: unknown option(s) {unknown}; allowed: {sorted(allowed)}")
        layer = options.get("feature_layer")
        if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int)):
            raise ValueError(f"encoder {encoder!r}: feature_layer={layer!r} must be an integer (HF hidden_states "
                             "index) or null")
        if not isinstance(options.get("drop_cls", False), bool):
            raise ValueError(f"encoder {encoder!r}: drop_cls={options['drop_cls']!r} must be true or false")
        if options.get("resize") not in (None, *RESIZE_MODES):
            raise ValueError(f"encoder {encoder!r}: resize={options['resize']!r} is not one of {list(RESIZE_MODES)}")
        parsed = cls(**options)
        if parsed.drop_cls and not get_encoder_spec(encoder).has_cls:
            raise ValueError(f"encoder {encoder!r}: drop_cls=true, but this encoder has no class token")
        return parsed


# timm architectures we reuse. Feature-extractor overrides: no classifier, no pooling.
_FEATURES = dict(pretrained=False, num_classes=0, global_pool="")
_TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


def _timm(variant: str, **overrides) -> Callable[[], nn.Module]:
    return partial(timm.create_model, variant, **_FEATURES, **overrides)


def _clip(variant: str, **overrides) -> Callable[[], nn.Module]:
    # OpenAI CLIP uses QuickGELU; final_norm=False leaves out post_layernorm (HF last_hidden_state).
    return _timm(variant, final_norm=False, **overrides)


def _eva(**overrides) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        model = timm.create_model("eva_giant_patch14_clip_224", **_FEATURES, **overrides)
        # BLIP-2 / InfMLLM `ln_vision` is a plain nn.LayerNorm (eps 1e-5), unlike the blocks' 1e-6.
        model.norm = nn.LayerNorm(model.embed_dim, eps=1e-5)
        return model

    return build


def _siglip(**overrides) -> Callable[[], nn.Module]:
    # HF / big_vision SigLIP use the tanh GELU approximation (timm's default here is exact GELU).
    return _timm("vit_so400m_patch14_siglip_384", act_layer="gelu_tanh", **overrides)


_CLIP_PIXELS = partial(ImagePreprocess, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)
_SIGLIP_PIXELS = partial(ImagePreprocess, mean=SIGLIP_MEAN, std=SIGLIP_STD, resize="squash")
_CLIP_FAMILY = dict(
    convert_checkpoint=convert_vit, check_hf_config=partial(check_hf_vit_config, hidden_act="quick_gelu")
)
_SIGLIP_FAMILY = dict(
    convert_checkpoint=convert_vit, check_hf_config=partial(check_hf_vit_config, hidden_act="gelu_pytorch_tanh")
)
_QWEN_FAMILY = dict(convert_checkpoint=convert_qwen_vl, check_hf_config=check_qwen_vl_config)

ENCODERS: dict[str, EncoderSpec] = {
    "clip-vit-l-14-224": EncoderSpec(
        _clip("vit_large_patch14_clip_quickgelu_224"), 1024, 257, True, _CLIP_PIXELS(224), **_CLIP_FAMILY
    ),
    "clip-vit-l-14-336": EncoderSpec(
        _clip("vit_large_patch14_clip_quickgelu_336"), 1024, 577, True, _CLIP_PIXELS(336), **_CLIP_FAMILY
    ),
    # InfMLLM: 448 px, squashed like BLIP-2's processor, OpenAI CLIP statistics.
    "eva-clip-vit-g-14": EncoderSpec(
        _eva(depth=39, img_size=448), 1408, 1025, True, _CLIP_PIXELS(448, resize="squash"), convert_eva
    ),
    "siglip-so400m-14-384": EncoderSpec(_siglip(), 1152, 729, False, _SIGLIP_PIXELS(384), **_SIGLIP_FAMILY),
    # DS-VisualChat preprocesses QWen's 448 px like CLIP (short side + center crop), not QWen-VL's own squash.
    "qwen-vl-vit-bigg-14-448": EncoderSpec(QwenVisualEncoder, 4096, 256, False, _CLIP_PIXELS(448), **_QWEN_FAMILY),
    "tiny": EncoderSpec(
        _clip("vit_large_patch14_clip_quickgelu_224", **_TINY), 32, 17, True, _CLIP_PIXELS(32), **_CLIP_FAMILY
    ),
    "tiny-siglip": EncoderSpec(_siglip(**_TINY, mlp_ratio=4.0), 32, 16, False, _SIGLIP_PIXELS(32), **_SIGLIP_FAMILY),
    "tiny-eva": EncoderSpec(_eva(**_TINY), 32, 17, True, _CLIP_PIXELS(32, resize="squash"), convert_eva),
    "tiny-qwen": EncoderSpec(
        partial(QwenVisualEncoder, image_size=32, patch_size=8, width=32, depth=2, num_heads=2, mlp_ratio=2.0,
                num_queries=4, output_dim=48, resampler_heads=2),
        48, 4, False, _CLIP_PIXELS(32), **_QWEN_FAMILY,
    ),
}


def get_encoder_spec(name: str) -> EncoderSpec:
    if name not in ENCODERS:
        raise ValueError(f"unknown vision encoder {name!r}; registered: {sorted(ENCODERS)}")
    return ENCODERS[name]


class VisionEncoder(nn.Module):
    """pixels [N, 3, S, S] -> tokens [N, num_image_tokens, hidden_size]; wraps the architecture in `.model`.
    ``options`` (EncoderOptions fields) pick the feature layer and whether the class token is kept."""

    def __init__(self, name: str, options: Mapping | None = None) -> None:
        super().__init__()
        self.name = name
        self.spec = get_encoder_spec(name)
        self.options = EncoderOptions.parse(name, options)
        self.model = self.spec.builder()
        self.hidden_size = self.spec.hidden_size
        self.num_image_tokens, self.has_cls = self.spec.output_tokens(self.options)
        self.image_size = self.spec.image_size
        self.image_transform: ImageTransform = self.spec.image_preprocess(self.options).transform()
        self._blocks_run = None if self.options.feature_layer is None else self._feature_blocks()

    def _feature_blocks(self) -> int:
        """How many trunk blocks produce HF's hidden_states[feature_layer]."""
        layer = self.options.feature_layer
        if not isinstance(self.model, timm.models.VisionTransformer):
            raise ValueError(f"encoder {self.name!r}: feature_layer needs a ViT trunk (CLIP, SigLIP encoders); this "
                             f"one is a {type(self.model).__name__}: leave feature_layer unset")
        depth = len(self.model.blocks)
        if not -(depth + 1) <= layer <= depth:
            raise ValueError(f"encoder {self.name!r}: feature_layer={layer} is outside [-{depth + 1}, {depth}] (the "
                             f"{depth + 1} hidden states of a {depth}-block trunk)")
        return layer % (depth + 1)

    @property
    def unused_blocks(self) -> int:
        """Trunk blocks past the feature layer (kept for their weights, never run)."""
        return 0 if self._blocks_run is None else len(self.model.blocks) - self._blocks_run

    def check_pixels(self, pixel_values: torch.Tensor) -> None:
        size = self.image_size
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (3, size, size):
            raise ValueError(
                f"encoder {self.name!r} expects pixel_values [N, 3, {size}, {size}], got {tuple(pixel_values.shape)}"
            )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        self.check_pixels(pixel_values)
        param = next(self.model.parameters())
        pixels = pixel_values.to(device=param.device, dtype=param.dtype)
        if self._blocks_run is None:
            features = self.model.forward_features(pixels)
        else:  # timm's forward_features up to the chosen block, without the final norm
            m = self.model
            features = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(pixels))))
            for block in m.blocks[:self._blocks_run]:
                features = block(features)
        if self.options.drop_cls:
            features = features[:, 1:]
        return features


def build_encoder(name: str, weights: str | Path | None = None, options: Mapping | None = None) -> VisionEncoder:
    """Build encoder `name` (random init) with EncoderOptions `options`; with `weights`, load them from that local
    file/directory."""
    encoder = VisionEncoder(name, options)
    if weights is not None:
        load_encoder_weights(encoder, weights)
    return encoder
