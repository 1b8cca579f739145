"""The training side of context parallelism: each CP rank's share of a batch, and the sums the loss needs.

Our equivalent of Megatron-LM's ``get_batch_on_this_cp_rank``: every CP rank of a data-parallel rank loads the same
whole batch; the forward step keeps this rank's two chunks (``model/mmca/context_parallel.py``) of every
per-position tensor, the packed token codes included. Images (``pixel_values``, ``num_images``) stay whole: each
CP rank runs the vision tower and splices the vectors that land in its chunks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_visualchat.model.mmca.context_parallel import cp_world, gather_sequence, split_sequence

# Per-position batch entries ([B, L]) and the packed codes ([B, 3, L]), by the dimension that is the sequence.
SEQUENCE_DIMS = {"tokens": 1, "labels": 1, "loss_mask": 1, "position_ids": 1, "modality": 1, "image_id": 1,
                 "sample_id": 1, "attention_mask": 2}


def split_batch(batch: dict) -> dict:
    """This CP rank's chunks of ``batch`` (the batch itself without CP). Refuses a length not divisible by 2*CP."""
    if cp_world()[0] == 1:
        return batch
    return {k: split_sequence(v, SEQUENCE_DIMS[k]) if k in SEQUENCE_DIMS and v is not None else v
            for k, v in batch.items()}


def sum_over_context_parallel(t: torch.Tensor) -> torch.Tensor:
    """The sum of ``t`` over the CP group, outside autograd (a new tensor; ``t`` itself without CP)."""
    if cp_world()[0] == 1:
        return t
    total = t.detach().clone()
    dist.all_reduce(total, group=ps.get_context_parallel_group())
    return total


def whole_sequence(t: torch.Tensor) -> torch.Tensor:
    """``[B, L/CP]`` per-position values of this rank's chunks -> ``[B, L]`` of the whole sequence (no gradient)."""
    if cp_world()[0] == 1:
        return t
    return gather_sequence(t.detach(), 1)
