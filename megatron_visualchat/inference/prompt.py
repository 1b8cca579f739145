"""Chat prompts in exactly the training format, as the model sees them (every ``<image>`` expanded).

A round is rendered by the data package's template (``TEMPLATES["dsvc"]``: ``<s>``, system prompt in the first
round only, ``### Image k:`` headers numbered across rounds, ``### Question:`` / ``### Answer:``) and tokenised
piece by piece like ``ConversationEncoder``, so a chat history is token-for-token what training saw. Each
``<image>`` becomes ``num_image_tokens`` positions carrying ``MODALITY_IMAGE`` and the image's index, as the
collator does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from megatron_visualchat.data.conversation import Round
from megatron_visualchat.data.templates import Piece, Template
from megatron_visualchat.model.token_codes import MODALITY_IMAGE, MODALITY_PAD, MODALITY_TEXT, NO_IMAGE


@dataclass
class Segment:
    """New positions of one conversation (one batch row), at their final spliced length."""

    tokens: list[int] = field(default_factory=list)
    modality: list[int] = field(default_factory=list)
    image_id: list[int] = field(default_factory=list)
    pixel_values: list[torch.Tensor] = field(default_factory=list)  # this segment's images, in order

    @classmethod
    def text(cls, ids: Sequence[int]) -> "Segment":
        ids = [int(i) for i in ids]
        return cls(ids, [MODALITY_TEXT] * len(ids), [NO_IMAGE] * len(ids))

    def __len__(self) -> int:
        return len(self.tokens)

    def __add__(self, other: "Segment") -> "Segment":
        return Segment(self.tokens + other.tokens, self.modality + other.modality, self.image_id + other.image_id,
                       self.pixel_values + other.pixel_values)

    @property
    def num_images(self) -> int:
        return len(self.pixel_values)


def _piece_ids(piece: Piece, tokenizer) -> list[int]:
    if piece.kind == "text":
        return tokenizer.encode(piece.text)
    return [{"bos": tokenizer.bos_id, "eos": tokenizer.eos_id}[piece.kind]]


def round_segment(tokenizer, template: Template, round_index: int, question: str,
                  pixel_values: Sequence[torch.Tensor], *, images_before: int, num_image_tokens: int) -> Segment:
    """The generation prompt of round ``round_index`` (0-based) showing ``len(pixel_values)`` new images, the
    first of which is the conversation's image number ``images_before + 1``; ends with ``### Answer:\\n``."""
    rnd = Round(question=question, answer=None, images=tuple(range(len(pixel_values))))
    out = Segment(pixel_values=list(pixel_values))
    next_image = images_before
    for piece in template.round_pieces(round_index, rnd, images_before + 1):
        if piece.kind == "image":
            out.tokens += [tokenizer.image_id] * num_image_tokens
            out.modality += [MODALITY_IMAGE] * num_image_tokens
            out.image_id += [next_image] * num_image_tokens
            next_image += 1
        else:
            ids = _piece_ids(piece, tokenizer)
            out += Segment.text(ids)
    return out


def answer_segment(tokenizer, template: Template, round_index: int, answer: str) -> Segment:
    """A known answer of round ``round_index`` + its EOS (teacher forcing), tokenised as training does."""
    rnd = Round(question="", answer=answer)
    pieces = template.round_pieces(round_index, rnd, 1)
    supervised = [p for p in pieces if p.supervised]
    return Segment.text([i for p in supervised for i in _piece_ids(p, tokenizer)])


@dataclass
class Chunk:
    """New positions for every row of a batch: [B, n] tensors, rows left-padded with pad tokens (``MODALITY_PAD``,
    which MMCA and causal attention never attend to). ``pixel_values`` holds the rows' new images row-major."""

    tokens: torch.Tensor
    modality: torch.Tensor
    image_id: torch.Tensor
    pixel_values: Optional[torch.Tensor]
    num_images: torch.Tensor

    @property
    def length(self) -> int:
        return self.tokens.shape[1]

    @classmethod
    def from_segments(cls, segments: Sequence[Segment], pad_id: int, device: torch.device | str = "cpu") -> "Chunk":
        if not segments or not all(len(s) for s in segments):
            raise ValueError(f"every row needs at least one new position, got lengths {[len(s) for s in segments]}")
        n = max(len(s) for s in segments)

        def rows(attr: str, fill: int) -> torch.Tensor:
            return torch.tensor([[fill] * (n - len(s)) + getattr(s, attr) for s in segments], dtype=torch.long,
                                device=device)

        pixels = [p for s in segments for p in s.pixel_values]
        return cls(rows("tokens", pad_id), rows("modality", MODALITY_PAD), rows("image_id", NO_IMAGE),
                   torch.stack(pixels).to(device) if pixels else None,
                   torch.tensor([s.num_images for s in segments], device=device))
