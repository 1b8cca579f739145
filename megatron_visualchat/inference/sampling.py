"""Choosing the next token from full-vocabulary logits: greedy, temperature and nucleus (top-p) sampling.

Sampling draws from an explicit ``torch.Generator`` so a seed reproduces a conversation, and every tensor-parallel
rank (same gathered logits, same seed) would draw the same token; the generation loop still broadcasts the choice
from TP rank 0, so ranks can never drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch


@dataclass(frozen=True)
class SamplingParams:
    """``temperature=0`` is greedy decoding (DS-VisualChat's chat default); ``top_p<1`` keeps the smallest set of
    tokens whose probability mass reaches ``top_p``. ``stop_on_eos=False`` always generates ``max_new_tokens``
    (for latency benchmarks). ``cfg_scale`` is classifier-free guidance on image-code steps (1 = off; a model that
    draws images only, ``image_generation.py``)."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 1234
    stop_on_eos: bool = True
    cfg_scale: float = 1.0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if not self.cfg_scale >= 0.0:
            raise ValueError(f"cfg_scale={self.cfg_scale} must be >= 0 (1 = no classifier-free guidance)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def restrict_vocabulary(logits: torch.Tensor, vocab_size: int, banned_ids: Sequence[int] = ()) -> torch.Tensor:
    """Drop Megatron's vocabulary padding (rows past ``vocab_size``) and forbid ``banned_ids`` (e.g. ``<image>``)."""
    if logits.shape[-1] < vocab_size:
        raise ValueError(f"logits have {logits.shape[-1]} columns, fewer than the vocabulary ({vocab_size})")
    logits = logits[..., :vocab_size].float()
    if banned_ids:
        logits = logits.index_fill(-1, torch.tensor(list(banned_ids), device=logits.device), float("-inf"))
    return logits


def sample_tokens(logits: torch.Tensor, params: SamplingParams,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``logits`` [B, V] -> token ids [B]."""
    if params.greedy:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= params.top_p, 0.0)  # the top token always stays
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
