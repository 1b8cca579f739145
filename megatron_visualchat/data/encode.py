"""Conversation -> token ids + labels + ``<image>`` positions, under a global length and image budget.

Length is counted as the model will see it: every ``<image>`` placeholder becomes ``num_image_tokens`` positions.
When a conversation does not fit, whole trailing rounds are dropped (an image is never cut, since its placeholder
belongs to exactly one round); when even the first round does not fit, the sample is refused (``too_long`` or
``too_many_images``) so the dataset can skip and count it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .conversation import Conversation
from .errors import SampleError
from .templates import Piece, Template, get_template

IGNORE_INDEX = -100


@dataclass
class EncodedConversation:
    input_ids: list[int]  # unexpanded: one <image> id per image
    labels: list[int]  # aligned with input_ids (NOT shifted): the token itself where supervised, else -100
    image_positions: list[int]  # indices into input_ids of the <image> placeholders, in order
    num_rounds: int  # rounds kept after truncation
    num_images: int

    def expanded_length(self, num_image_tokens: int) -> int:
        return len(self.input_ids) + self.num_images * (num_image_tokens - 1)


class ConversationEncoder:
    def __init__(
        self,
        tokenizer,
        template: str | Template = "dsvc",
        *,
        max_seq_len: int,
        num_image_tokens: int,
        max_images: int | None = None,
    ):
        if max_seq_len <= 0 or num_image_tokens <= 0:
            raise ValueError(f"max_seq_len={max_seq_len} and num_image_tokens={num_image_tokens} must be positive")
        if max_images is not None and max_images < 0:
            raise ValueError(f"max_images={max_images} must be >= 0 or None")
        self.tokenizer = tokenizer
        self.template = get_template(template)
        self.max_seq_len = max_seq_len
        self.num_image_tokens = num_image_tokens
        self.max_images = max_images

    def _piece_ids(self, piece: Piece) -> list[int]:
        tok = self.tokenizer
        if piece.kind == "text":
            return tok.encode(piece.text)
        return [{"bos": tok.bos_id, "eos": tok.eos_id, "image": tok.image_id}[piece.kind]]

    def encode(self, conv: Conversation) -> EncodedConversation:
        if not conv.rounds:
            raise SampleError("empty_conversation", "no rounds", conv.origin)
        out = EncodedConversation([], [], [], 0, 0)
        length = 0
        for index, pieces in enumerate(self.template.render(conv)):
            ids, labels, positions = [], [], []
            for piece in pieces:
                piece_ids = self._piece_ids(piece)
                if piece.kind == "image":
                    positions.append(len(out.input_ids) + len(ids))
                ids += piece_ids
                labels += piece_ids if piece.supervised else [IGNORE_INDEX] * len(piece_ids)
            round_length = len(ids) + len(positions) * (self.num_image_tokens - 1)
            too_long = length + round_length > self.max_seq_len
            too_many = self.max_images is not None and out.num_images + len(positions) > self.max_images
            if too_long or too_many:
                if index > 0:
                    break
                if too_long:
                    raise SampleError(
                        "too_long",
                        f"first round is {round_length} tokens ({len(positions)} image(s) x {self.num_image_tokens}) "
                        f"> max_seq_len={self.max_seq_len}",
                        conv.origin,
                    )
                raise SampleError(
                    "too_many_images",
                    f"first round shows {len(positions)} images > max_images_per_sample={self.max_images}",
                    conv.origin,
                )
            out.input_ids += ids
            out.labels += labels
            out.image_positions += positions
            out.num_rounds += 1
            out.num_images += len(positions)
            length += round_length
        return out
