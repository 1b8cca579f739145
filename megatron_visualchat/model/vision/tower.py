"""VisionTower = vision encoder + projector: pixels [N, 3, S, S] -> image embeddings [N, num_output_tokens, lm_hidden].

With freeze_encoder=True (DS-VisualChat's recipe) the encoder's parameters have requires_grad=False, it runs under
torch.no_grad (no activation memory kept for a backward it will never get) and always in eval mode, even when
the tower is put in train mode: a frozen feature extractor should produce the same features for the same image
(no dropout / drop-path noise it cannot learn from, features cacheable), exactly as at inference time. LoRA
adapters in a frozen encoder (``model/lora.py``) train: then it runs with autograd, still in eval mode.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .encoders import VisionEncoder, build_encoder
from .projectors import build_projector
from .weights import load_projector_weights


class VisionTower(nn.Module):
    def __init__(self, encoder: VisionEncoder, projector: nn.Module, freeze_encoder: bool = True) -> None:
        super().__init__()
        self.encoder = encoder
        self.projector = projector
        self.freeze_encoder = freeze_encoder
        self.num_output_tokens: int = projector.num_output_tokens
        self.lm_hidden: int = projector.lm_hidden
        self.image_transform = encoder.image_transform
        if freeze_encoder:
            encoder.requires_grad_(False)
            encoder.eval()

    def train(self, mode: bool = True) -> VisionTower:
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()
        return self

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        self.encoder.check_pixels(pixel_values)
        if pixel_values.shape[0] == 0:
            return self._no_images(pixel_values.device)
        if self.freeze_encoder and not any(p.requires_grad for p in self.encoder.parameters()):
            with torch.no_grad():
                features = self.encoder(pixel_values)
        else:
            features = self.encoder(pixel_values)
        return self.projector(features.to(next(self.projector.parameters()).dtype))

    def _no_images(self, device: torch.device) -> torch.Tensor:
        """[0, T, lm_hidden] still wired to every trainable parameter, so each gets a defined all-zero gradient.

        Text-only micro-batches must not leave trainable parameters without .grad: megatron-core DDP's bucketed
        grad reduction (and ZeRO-style optimizers) expect every trainable parameter to take part in backward.
        """
        dtype = next(self.projector.parameters()).dtype
        empty = torch.zeros(0, self.num_output_tokens, self.lm_hidden, device=device, dtype=dtype)
        trainable = [p for p in self.parameters() if p.requires_grad]
        if not trainable:
            return empty
        return empty + 0.0 * sum(p.sum() for p in trainable).to(dtype)


def build_vision_tower(
    encoder: str,
    projector: str,
    lm_hidden: int,
    freeze_encoder: bool = True,
    projector_options: dict | None = None,
    encoder_weights: str | Path | None = None,
    encoder_options: dict | None = None,
    projector_weights: str | Path | None = None,
) -> VisionTower:
    """Encoder `encoder` (ENCODERS, with EncoderOptions `encoder_options`; weights from a local file/dir if given) +
    projector `projector` (PROJECTORS; weights from a safetensors file of its own state dict if given)."""
    vision = build_encoder(encoder, weights=encoder_weights, options=encoder_options)
    proj = build_projector(
        projector, vision.hidden_size, lm_hidden, vision.num_image_tokens, vision.has_cls, **(projector_options or {})
    )
    if projector_weights is not None:
        load_projector_weights(proj, projector_weights)
    return VisionTower(vision, proj, freeze_encoder=freeze_encoder)
