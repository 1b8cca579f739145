"""The server's cached conversations: one ``KVCache`` each, kept in least-recently-used order under a byte budget.

A request's prompt is a list of position *keys* (the token id, or the image's content hash for an image position).
The longest cached prefix of those keys is reused and only the rest is prefilled:

* a cached conversation whose whole last prompt is part of the request (the client sends back the answer and asks
  the next question, or retries) is extended in place; positions after the common prefix (an answer the client
  cut with ``stop``, or tokens that do not re-tokenise the same) are dropped;
* a shorter common prefix (a branch of another conversation, or only the system prompt) is copied into a new
  cache, so the other conversation stays intact;
* without any, a new cache starts empty.

Budget: ``KVCache`` buffers are allocated for the whole context on first use, so every cache costs the same. Idle
caches are evicted, oldest first, so that their bytes (measured from the K/V and token-code tensors) stay within
the budget; the cache serving a request always exists, so with a budget smaller than one cache nothing is kept.

Every tensor-parallel rank holds the same entries (its shard of each cache): rank 0 decides with ``plan`` and
every rank applies the decision with ``place`` / ``record``, which are deterministic.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Hashable, Optional, Sequence

import torch

from megatron_visualchat.inference.kv_cache import KVCache


def cache_bytes(cache: KVCache) -> int:
    """Bytes held by a cache: megatron-core's per-layer K/V buffers, cross layers' image K/V, the token codes."""
    tensors = [t for kv in cache.context.key_value_memory_dict.values() for t in kv]
    tensors += cache.context.image_key_values.tensors() + [cache.modality, cache.image_id]
    return sum(t.numel() * t.element_size() for t in tensors)


def fork_cache(source: KVCache, keep: int) -> KVCache:
    """A new cache holding the first ``keep`` positions of ``source`` (copied; ``source`` is unchanged)."""
    cache = KVCache(source.batch_size, source.max_length, source.modality.device)
    for layer, kv in source.context.key_value_memory_dict.items():
        copies = tuple(torch.empty_like(t) for t in kv)
        for copy, t in zip(copies, kv):
            copy[:keep].copy_(t[:keep])  # megatron-core's layout: [positions, batch, heads, head dim]
        cache.context.key_value_memory_dict[layer] = copies
    cache.context.image_key_values = source.context.image_key_values.copy()  # cross mode: the images' K/V
    cache.modality[:, :keep] = source.modality[:, :keep]
    cache.image_id[:, :keep] = source.image_id[:, :keep]
    cache.commit(keep)
    return cache


def common_prefix(a: Sequence[Hashable], b: Sequence[Hashable]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@dataclass
class Entry:
    cache: KVCache
    keys: list = field(default_factory=list)  # one per cached position
    prompt_length: int = 0  # positions of the last prompt written into it (the rest is its generated answer)


@dataclass(frozen=True)
class Placement:
    """Where a request runs: ``slot`` (``source`` is copied into a new slot when set; an unknown slot without a
    source starts empty), keeping its first ``keep`` positions."""

    slot: int
    keep: int
    source: Optional[int] = None


class ConversationPool:
    def __init__(self, max_length: int, device: torch.device, budget_bytes: int):
        if budget_bytes < 0:
            raise ValueError(f"the KV-cache budget must be >= 0 bytes, got {budget_bytes}")
        self.max_length, self.device, self.budget_bytes = max_length, device, budget_bytes
        self.entries: OrderedDict[int, Entry] = OrderedDict()  # least recently used first
        self.next_slot = 0
        self.peak_bytes = 0  # most ever held at once, the request in flight included
        self.stats = self._stats()  # a snapshot other threads may read while the worker changes the entries

    @property
    def bytes(self) -> int:
        return sum(cache_bytes(e.cache) for e in self.entries.values())

    def _stats(self) -> dict:
        held = self.bytes
        self.peak_bytes = max(self.peak_bytes, held)
        return {"conversations": len(self.entries), "bytes": held, "budget_bytes": self.budget_bytes,
                "peak_bytes": self.peak_bytes}

    # ---- rank 0 -----------------------------------------------------------------------------------------------
    def plan(self, keys: Sequence[Hashable], usable: Callable[[int], int]) -> Placement:
        """Where a prompt with these ``keys`` runs. ``usable(n)`` is the longest prefix of at most ``n`` positions
        that may be kept (it must not cut an image in two, and leaves at least one position to run)."""
        best, common = None, 0
        for slot, entry in self.entries.items():
            n = common_prefix(entry.keys, keys)
            if n > common:
                best, common = slot, n
        keep = usable(common)
        if best is None or keep == 0:
            return Placement(self.next_slot, 0)
        if common >= self.entries[best].prompt_length:
            return Placement(best, keep)
        return Placement(self.next_slot, keep, source=best)

    # ---- every rank ---------------------------------------------------------------------------------------------
    def place(self, placement: Placement) -> KVCache:
        """Apply ``placement``: make room within the budget (oldest idle caches first), then create, copy or reuse
        the cache and cut it to ``keep`` positions."""
        slot = placement.slot
        if slot not in self.entries:
            self.next_slot = max(self.next_slot, slot + 1)
            size = max((cache_bytes(e.cache) for e in self.entries.values()), default=0)
            self._evict(lambda held: held + size <= self.budget_bytes, spare=placement.source)
            if placement.source is None:
                self.entries[slot] = Entry(KVCache(1, self.max_length, self.device))
            else:
                source = self.entries[placement.source]
                self.entries[slot] = Entry(fork_cache(source.cache, placement.keep), source.keys[:placement.keep])
        entry = self.entries[slot]
        self.entries.move_to_end(slot)
        entry.cache.truncate(placement.keep)
        del entry.keys[placement.keep:]
        return entry.cache

    def record(self, slot: int, keys: Sequence[Hashable], prompt_length: int) -> None:
        """After a request ran in ``slot``: what its cache now holds; then evict down to the budget."""
        entry = self.entries[slot]
        if len(keys) != entry.cache.length:
            raise ValueError(f"{len(keys)} keys for a cache of {entry.cache.length} positions")
        entry.keys, entry.prompt_length = list(keys), prompt_length
        self.stats = self._stats()  # the peak includes the request just served
        self._evict(lambda held: held <= self.budget_bytes)

    def _evict(self, fits: Callable[[int], bool], spare: Optional[int] = None) -> None:
        for slot in [s for s in self.entries if s != spare]:
            if fits(self.bytes):
                break
            del self.entries[slot]
        self.stats = self._stats()
