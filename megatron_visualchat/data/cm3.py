"""Training objectives on encoded token sequences: plain next-token, CM3's causal-masked infilling, and a loss
weight per modality (text tokens vs image-code tokens).

CM3 (Aghajanyan et al. 2022; CM3leon, JAM): pick a few spans, replace each by a sentinel ``<mask:i>`` in place and
append ``<mask:i> span`` at the end, so a left-to-right model learns to infill with both sides as context. Spans
are taken only from supervised tokens and never contain a fixed token (the image-code breaks ``<boi>``/``<eoi>``,
``<image>`` placeholders, BOS/EOS, pad), so a span never crosses a modality break and the vision placeholders keep
their order. Every token is kept (only moved); the result depends only on the inputs and the seed.
"""

from __future__ import annotations

import math
import random

import torch

from ..model.image_tokenizer.vocab import NUM_CM3_SENTINELS
from .encode import IGNORE_INDEX

OBJECTIVES = ("next_token", "cm3")


def _poisson(rng: random.Random, lam: float) -> int:
    limit, k, p = math.exp(-lam), 0, rng.random()
    while p > limit:
        k, p = k + 1, p * rng.random()
    return k


def cm3_transform(ids: list[int], labels: list[int], *, sentinel_ids, fixed_ids, seed: int,
                  mean_spans: float = 1.0) -> tuple[list[int], list[int]]:
    """``(ids, labels)`` (aligned, unshifted, as ``ConversationEncoder`` writes them) with 1..len(sentinel_ids)
    spans (Poisson(mean_spans), at least one) moved to the end. Sentinels are supervised."""
    if len(ids) != len(labels):
        raise ValueError(f"ids ({len(ids)}) and labels ({len(labels)}) must align")
    if not sentinel_ids:
        raise ValueError("cm3 needs at least one sentinel id (the tokenizer's image vocabulary provides them)")
    fixed = set(fixed_ids) | set(sentinel_ids)
    segments, start = [], None  # maximal runs of movable positions [start, end)
    for i, (t, lab) in enumerate([*zip(ids, labels), (None, IGNORE_INDEX)]):
        movable = lab != IGNORE_INDEX and t not in fixed
        if movable and start is None:
            start = i
        elif not movable and start is not None:
            segments.append((start, i))
            start = None
    rng = random.Random(seed)
    spans = []
    for _ in range(min(len(sentinel_ids), max(1, _poisson(rng, mean_spans)))):
        if not segments:
            break
        s, e = rng.choices(segments, weights=[e - s for s, e in segments])[0]
        length = rng.randint(1, e - s)
        a = rng.randint(s, e - length)
        spans.append((a, a + length))
        segments.remove((s, e))
        segments += [seg for seg in ((s, a), (a + length, e)) if seg[1] > seg[0]]
    spans.sort()
    out_ids, out_labels, tail_ids, tail_labels, pos = [], [], [], [], 0
    for sentinel, (a, b) in zip(sentinel_ids, spans):
        out_ids += ids[pos:a] + [sentinel]
        out_labels += labels[pos:a] + [sentinel]
        tail_ids += [sentinel] + ids[a:b]
        tail_labels += [sentinel] + labels[a:b]
        pos = b
    return out_ids + ids[pos:] + tail_ids, out_labels + labels[pos:] + tail_labels


def objective_extra_tokens(objective: str) -> int:
    """At most how many positions ``objective`` adds to a sample (CM3: a sentinel in place + one before the moved
    span, for each of at most ``NUM_CM3_SENTINELS`` spans)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective={objective!r} is not one of {OBJECTIVES}")
    return 2 * NUM_CM3_SENTINELS if objective == "cm3" else 0


def apply_objective(objective: str, ids: list[int], labels: list[int], *, tokenizer, seed: int):
    """One sample's ``(ids, labels)`` under ``objective`` (``OBJECTIVES``); ``cm3`` needs the tokenizer's image
    vocabulary (sentinels, breaks)."""
    if objective == "next_token":
        return ids, labels
    if objective != "cm3":
        raise ValueError(f"objective={objective!r} is not one of {OBJECTIVES}")
    vocab = tokenizer.image_vocab
    if vocab is None:
        raise ValueError("objective 'cm3' needs a tokenizer with an image vocabulary (image_codebook_size > 0) for "
                         "its <mask:i> sentinels")
    fixed = (*vocab.break_ids, tokenizer.image_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)
    return cm3_transform(ids, labels, sentinel_ids=vocab.sentinel_ids, fixed_ids=fixed, seed=seed)


def modality_loss_weights(labels: torch.Tensor, vocab, text_weight: float = 1.0,
                          image_code_weight: float = 1.0) -> torch.Tensor:
    """Per-target loss weights: 0 where ``labels == IGNORE_INDEX``, ``image_code_weight`` on image-code targets,
    ``text_weight`` on every other target (text, breaks, sentinels). Multiply the per-token loss by these and divide
    by their sum for a weighted mean."""
    if text_weight < 0 or image_code_weight < 0:
        raise ValueError(f"loss weights must be >= 0, got text {text_weight}, image codes {image_code_weight}")
    first = vocab.first_code_id
    is_code = (labels >= first) & (labels < first + vocab.codebook_size)
    weights = torch.where(is_code, image_code_weight, text_weight).float()
    return weights.masked_fill(labels == IGNORE_INDEX, 0.0)
