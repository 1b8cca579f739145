"""Shared tiny HF reference models for the vision tests (random init, saved to tmp dirs; no network)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

from .tiny_configs import TINY_VIT



def _randomise_norms(model: torch.nn.Module) -> None:
    """HF inits LayerNorms to identity; perturb them so a wrong norm mapping cannot go unnoticed."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)


@pytest.fixture
def hf_clip() -> CLIPVisionModel:
    torch.manual_seed(0)
    model = CLIPVisionModel(CLIPVisionConfig(**TINY_VIT, hidden_act="quick_gelu")).eval()
    _randomise_norms(model)
    return model


@pytest.fixture
def hf_siglip() -> SiglipVisionModel:
    torch.manual_seed(1)
    model = SiglipVisionModel(SiglipVisionConfig(**TINY_VIT)).eval()
    _randomise_norms(model)
    return model


@pytest.fixture
def hf_clip_dir(hf_clip: CLIPVisionModel, tmp_path: Path) -> Path:
    hf_clip.save_pretrained(tmp_path / "clip")
    return tmp_path / "clip"


@pytest.fixture
def pixels() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
