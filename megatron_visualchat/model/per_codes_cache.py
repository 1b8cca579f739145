"""Results that depend only on the token codes, computed once per forward pass instead of once per layer."""

from __future__ import annotations

import collections
from typing import Callable

import torch


class PerCodesCache:
    """Results that depend only on the token codes (block masks, the validation of the codes, which tokens are
    images), shared by every layer of a forward pass: megatron-core hands all layers the same codes tensor, so one build serves 32-80
    layers instead of one per layer. Entries hold references to the code tensors they were built from, so their
    memory cannot be reused while the entry lives; the key includes the tensors' version counters, so in-place
    edits miss."""

    def __init__(self, size: int = 16):
        self.size, self.entries = size, collections.OrderedDict()

    @staticmethod
    def codes_key(*tensors: torch.Tensor) -> tuple:
        return tuple((t.data_ptr(), tuple(t.shape), tuple(t.stride()), t._version, t.device) for t in tensors)

    def get(self, key: tuple, build: Callable[[], object], pins: tuple):
        if key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key][0]
        value = build()
        self.entries[key] = (value, pins)
        if len(self.entries) > self.size:
            self.entries.popitem(last=False)
        return value
