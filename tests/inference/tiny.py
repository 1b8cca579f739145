"""Tiny chat model + tokenizer builders shared by the inference tests (called inside run_parallel children)."""

from __future__ import annotations

import dataclasses
import io

import torch
from PIL import Image

from megatron_visualchat.config import LLM_PRESETS, AttentionConfig, VisionConfig, VisualChatConfig
from megatron_visualchat.data import train_tiny_sentencepiece
from megatron_visualchat.data.synthetic import synthetic_corpus_lines
from megatron_visualchat.data.templates import DSVC_SYSTEM


def train_tokenizer(out_dir: str):
    lines = synthetic_corpus_lines(num_samples=50) + [DSVC_SYSTEM, "### Image 1:\n### Question:\n### Answer:\n"]
    return train_tiny_sentencepiece(out_dir, lines, vocab_size=400)


def tiny_cfg(vocab_size: int, mode: str = "mmca", split: str = "none", image_rows: str = "self",
             combine: str = "sum", *extras: str) -> VisualChatConfig:
    """``extras``: "modality-norms" adds mPLUG-Owl2's per-modality norms."""
    from megatron_visualchat.testing.equivalence import current_parallel

    llm = dataclasses.replace(LLM_PRESETS["tiny"], vocab_size=vocab_size)
    return VisualChatConfig(llm=llm, attention=AttentionConfig(mode=mode, modality_split=split,
                                                               image_rows=image_rows, combine=combine,
                                                               modality_norms="modality-norms" in extras),
                            vision=VisionConfig(encoder="tiny", projector="linear"), parallel=current_parallel())


def build_model(cfg: VisualChatConfig, full_state=None, seed: int = 7):
    """A tiny VisualChatModel in eval mode. Without ``full_state``: random weights made *decisive* (the output
    layer scaled up, so greedy choices have clear margins) and image-side split weights moved away from their
    text copies (so a wrong routing shows). With it: this rank's shard of that TP=1 state dict."""
    from megatron_visualchat.model.visualchat import VisualChatModel
    from megatron_visualchat.testing.equivalence import load_full_state_dict

    torch.manual_seed(seed)
    model = VisualChatModel(cfg)
    if full_state is not None:
        load_full_state_dict(model, full_state, cfg.llm)
    else:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "image_weight" in name:
                    p.add_(0.05 * torch.randn_like(p))
                if "output_layer" in name:
                    p.mul_(40.0)
    return model.eval()


def full_state(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items() if "_extra_state" not in k}


def png_bytes(colour=(200, 30, 30), size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def write_png(path, colour=(200, 30, 30), size=(40, 30)) -> str:
    with open(path, "wb") as f:
        f.write(png_bytes(colour, size))
    return str(path)


def full_logits(model, segment) -> torch.Tensor:
    """[L, V_padded] logits of one row by a plain forward over the whole sequence (no cache): the oracle."""
    from megatron_visualchat.model.token_codes import pack_token_codes

    n = len(segment)
    codes = pack_token_codes(torch.tensor([segment.modality]), torch.tensor([segment.image_id]))
    pixels = torch.stack(segment.pixel_values) if segment.pixel_values else None
    with torch.no_grad():
        out = model(torch.tensor([segment.tokens]), torch.arange(n)[None], codes, pixel_values=pixels,
                    num_images=torch.tensor([segment.num_images]))
    return out[0].float()


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(max |a - b|, max |b|) over the entries both have finite (banned tokens are -inf in both)."""
    finite = torch.isfinite(a) & torch.isfinite(b)
    if not torch.equal(finite, torch.isfinite(a)) or not torch.equal(finite, torch.isfinite(b)):
        return float("inf"), 1.0
    return float((a - b)[finite].abs().max()), float(b[finite].abs().max())
