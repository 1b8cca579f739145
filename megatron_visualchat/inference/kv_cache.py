"""The KV cache of a conversation: megatron-core's static inference context plus the token codes of every cached
position.

megatron-core 0.16.1 does the K/V bookkeeping: given ``inference_context=StaticInferenceContext``, each
``SelfAttention`` writes the new tokens' (un-rotated) K/V at ``sequence_len_offset`` into per-layer buffers, hands
our core attention the keys of *all* cached positions, and rotates queries with the position offset. MMCA still
needs to know what every cached key *is* (text, image, pad; which image), so this cache keeps those codes next to
the K/V: a new text token then attends with both MMCA branches over the whole history, and a new image in a later
round follows ``image_rows`` (docs/design/mmca.md, "Decode with a KV cache").

Positions are only committed after a forward succeeded (``commit``); rolling back a failed round is just moving
the offset back (``truncate``): K/V beyond the offset are dead and get overwritten.

Cross mode (docs/design/cross_attention.md) keeps a third part next to them: the cross layers' image K/V
(``model.cross_attention.ImageKeyValues``, carried on the inference context where those layers find it), each
image projected once, in the forward that holds its marker. Which images a row holds is read from the codes, so
rollback and reset need nothing more there.
"""

from __future__ import annotations

import torch

from megatron_visualchat.model.cross_attention import ImageKeyValues
from megatron_visualchat.model.token_codes import MODALITY_PAD, NO_IMAGE, pack_token_codes


class ContextFullError(ValueError):
    """The conversation does not fit in the cache's context window."""


class KVCache:
    def __init__(self, batch_size: int, max_length: int, device: torch.device | str = "cpu"):
        from megatron.core.inference.contexts import StaticInferenceContext  # lazy: megatron-core takes seconds

        if batch_size < 1 or max_length < 1:
            raise ValueError(f"batch_size={batch_size} and max_length={max_length} must be >= 1")
        self.batch_size, self.max_length = batch_size, max_length
        self.context = StaticInferenceContext(batch_size, max_length)
        self.context.image_key_values = ImageKeyValues()  # cross mode's layers read and extend it
        self.modality = torch.full((batch_size, max_length), MODALITY_PAD, dtype=torch.long, device=device)
        self.image_id = torch.full((batch_size, max_length), NO_IMAGE, dtype=torch.long, device=device)

    @property
    def length(self) -> int:
        """Positions committed so far (the same for every row; rows pad with ``MODALITY_PAD``)."""
        return int(self.context.sequence_len_offset)

    @property
    def room(self) -> int:
        return self.max_length - self.length

    def next_image_ids(self) -> list[int]:
        """Per row, the image_id the next image gets (images are numbered in order of appearance)."""
        if self.length == 0:
            return [0] * self.batch_size
        return (self.image_id[:, : self.length].max(dim=1).values + 1).tolist()

    def stage(self, modality: torch.Tensor, image_id: torch.Tensor) -> torch.Tensor:
        """Record the codes of ``n`` new positions ([B, n]) and return packed codes for all ``length + n``
        positions, as the core attention expects (queries = the last n)."""
        b, n = modality.shape
        if b != self.batch_size or image_id.shape != modality.shape:
            raise ValueError(f"codes of shape {tuple(modality.shape)} / {tuple(image_id.shape)} do not fit a cache "
                             f"of batch size {self.batch_size}")
        if n > self.room:
            raise ContextFullError(f"{n} new positions do not fit: {self.length} of {self.max_length} are used "
                                   f"({self.room} left)")
        end = self.length + n
        self.modality[:, self.length:end] = modality
        self.image_id[:, self.length:end] = image_id
        return pack_token_codes(self.modality[:, :end], self.image_id[:, :end])

    def commit(self, n: int) -> None:
        """The forward over the ``n`` staged positions wrote their K/V: make them part of the history."""
        self.context.increment_sequence_len_offset(n)

    def truncate(self, length: int) -> None:
        """Forget every position from ``length`` on (rollback of a failed round, or ``reset`` with 0)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of length {self.length} to {length}")
        self.context.sequence_len_offset = length

    def reset(self) -> None:
        self.truncate(0)
