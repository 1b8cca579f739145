"""Context parallelism (CP) for MMCA, all-gather flavour: queries stay local, keys, values and key codes travel.

Layout: megatron's load-balanced causal split. The sequence is cut into ``2*CP`` equal chunks and CP rank ``r``
holds chunks ``r`` and ``2*CP-1-r``, so every rank gets the same share of causal attention work. megatron-core's
RoPE slices its table the same way (``RotaryEmbedding`` with the CP group), so rotations use global positions.

What each rank holds: tokens, labels, loss mask, hidden states and Q/K/V of its two chunks, and the token codes of
its two chunks. The ``attention_mask`` slot stays "the codes of this rank's positions" (``[B, 3, L/CP]``), so every
reader that pairs codes with hidden states (modality-split linears, modality norms) works unchanged. MMCA needs
the codes of *all* keys: ``MMCACoreAttention`` all-gathers K and V (autograd; the backward reduce-scatters their
gradients) and the codes (``gather_codes``, small, no gradient), reorders them to global order and builds the mask
for this rank's query positions against every key. The first pipeline stage uses the same gathered codes to
splice the images into its chunks (every CP rank runs the vision tower on the batch's images).
"""

from __future__ import annotations

import functools

import torch
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

from megatron_visualchat.model.token_codes import PerCodesCache, unpack_token_codes


def check_seq_length(seq_length: int, cp: int) -> None:
    if seq_length % (2 * cp):
        raise ValueError(f"sequence length {seq_length} is not divisible by 2 x context_parallel_size = {2 * cp}: "
                         f"context parallelism cuts each sequence into 2 x CP equal chunks; set --seq-length to a "
                         f"multiple of {2 * cp}")


@functools.lru_cache(maxsize=64)
def rank_positions(seq_length: int, cp: int, rank: int, device: torch.device) -> torch.Tensor:
    """The global positions CP rank ``rank`` holds, in its local order: chunk ``rank``, then chunk
    ``2*cp-1-rank``. Cached, so every layer of a forward sees the same tensor (its block-mask cache key);
    never modify the result."""
    check_seq_length(seq_length, cp)
    chunk = seq_length // (2 * cp)
    return torch.cat([torch.arange(c * chunk, (c + 1) * chunk) for c in (rank, 2 * cp - 1 - rank)]).to(device)


@functools.lru_cache(maxsize=64)
def _global_order(seq_length: int, cp: int, device: torch.device) -> torch.Tensor:
    """For each global position, its index in the rank-major concatenation of all ranks' chunks."""
    gathered = torch.cat([rank_positions(seq_length, cp, r, torch.device("cpu")) for r in range(cp)])
    return torch.argsort(gathered).to(device)


def cp_world() -> tuple[int, int]:
    """(CP size, this rank's CP rank); (1, 0) before megatron's groups exist (single-process use)."""
    if not ps.model_parallel_is_initialized():
        return 1, 0
    return ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()


def local_positions(seq_length: int, device: torch.device) -> torch.Tensor:
    """This CP rank's global positions of a ``seq_length`` sequence."""
    cp, rank = cp_world()
    return rank_positions(seq_length, cp, rank, device)


def split_sequence(t: torch.Tensor, dim: int) -> torch.Tensor:
    """This CP rank's chunks of the whole-sequence tensor ``t`` along ``dim``."""
    return t.index_select(dim, local_positions(t.shape[dim], t.device))


def gather_sequence(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Every CP rank's chunks of ``t`` along ``dim``, in global order. Differentiable: megatron-core's
    sequence-parallel gather over the CP group, whose backward reduce-scatters (sums every rank's gradient of
    the whole sequence, then keeps this rank's chunks)."""
    group = ps.get_context_parallel_group()
    gathered = gather_from_sequence_parallel_region(t.movedim(dim, 0).contiguous(), True, group=group)
    order = _global_order(gathered.shape[0], group.size(), t.device)
    return gathered.index_select(0, order).movedim(0, dim)


_GATHERED_CODES = PerCodesCache()


def gather_codes(packed: torch.Tensor) -> torch.Tensor:
    """The whole sequence's packed codes ``[B, 3, L]`` from this rank's ``[B, 3, L/CP]``. Gathered once per codes
    tensor and shared by every layer (and the splice), like the block masks built from it. The gather is a
    collective inside a cache: the CP ranks of one stage run the same schedule on the same codes tensors, so
    they hit and miss together."""
    return _GATHERED_CODES.get(("cp codes", PerCodesCache.codes_key(packed)), lambda: gather_sequence(packed, 2),
                               (packed,))


def whole_sequence_codes(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(codes of the whole sequence, this rank's global positions in it, or None without CP) for readers that
    need every position's codes: MMCA's keys, the image splice."""
    unpack_token_codes(packed)  # shape and dtype, before any collective
    cp, _ = cp_world()
    if cp == 1:
        return packed, None
    whole = gather_codes(packed)
    return whole, local_positions(whole.shape[2], packed.device)
