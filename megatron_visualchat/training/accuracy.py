"""Held-out answer accuracy through megatron-core's forward-only schedule: an answer (one run of supervised
positions: the answer tokens and their EOS) counts as correct when the argmax prediction matches all of it. With
teacher forcing this equals greedy decoding of the answer, and it runs at any TP/PP layout (logits stay
vocab-parallel; the argmax is combined across the tensor-parallel group)."""

from __future__ import annotations

import itertools
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_visualchat.training.context_parallel import whole_sequence
from megatron_visualchat.training.step import run_schedule, visualchat_forward_step


def vocab_parallel_argmax(logits: torch.Tensor) -> torch.Tensor:
    """Argmax over a vocabulary split across the TP group: logits [b, s, V/TP] -> global ids [b, s]."""
    group = ps.get_tensor_model_parallel_group()
    values, local_ids = logits.float().max(dim=-1)
    ids = local_ids + ps.get_tensor_model_parallel_rank() * logits.shape[-1]
    world = ps.get_tensor_model_parallel_world_size()
    if world == 1:
        return ids
    all_values = [torch.empty_like(values) for _ in range(world)]
    all_ids = [torch.empty_like(ids) for _ in range(world)]
    dist.all_gather(all_values, values.contiguous(), group=group)
    dist.all_gather(all_ids, ids.contiguous(), group=group)
    best = torch.stack(all_values).argmax(dim=0)
    return torch.stack(all_ids).gather(0, best.unsqueeze(0)).squeeze(0)


def _correct_answers(batch: dict, logits: torch.Tensor):
    mask = batch["loss_mask"].bool()
    miss = (vocab_parallel_argmax(logits) != batch["labels"]) & mask
    # Context parallelism: an answer may span this rank's chunks and others'; judge it on the whole sequence.
    mask, miss = whole_sequence(torch.cat([mask, miss]).long()).bool().chunk(2)
    starts = mask & ~torch.nn.functional.pad(mask[:, :-1], (1, 0))
    span = torch.cumsum(starts.flatten().long(), 0).view_as(mask) - 1  # answer index, batch-wide
    num_answers = int(starts.sum())
    wrong = torch.zeros(num_answers, dtype=torch.long).index_add_(0, span[mask], miss[mask].long())
    stats = torch.tensor([float((wrong == 0).sum()), float(num_answers)])
    return logits.new_zeros(()), {"answers": stats}


def answer_objective(batch: dict):
    """No labels (the model returns vocab-parallel logits); the loss slot counts exactly-predicted answers."""
    return None, partial(_correct_answers, batch)


def answer_accuracy(chunks: list, loader, *, num_microbatches: int, seq_length: int, micro_batch_size: int,
                    max_batches: int | None = None) -> float:
    """Fraction of held-out answers predicted exactly; same value on every rank."""
    for c in chunks:
        c.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=torch.cuda.current_device())  # NCCL reduces device tensors
    forward_step = partial(visualchat_forward_step, objective=answer_objective)
    batches = iter(loader)
    with torch.no_grad():
        for i in itertools.count():
            if max_batches is not None and i >= max_batches:
                break
            mbs = [b for b in (next(batches, None) for _ in range(num_microbatches)) if b is not None]
            if len(mbs) < num_microbatches:
                break
            out = run_schedule(chunks, mbs, num_microbatches=num_microbatches, seq_length=seq_length,
                               micro_batch_size=micro_batch_size, forward_step=forward_step, forward_only=True)
            if out and ps.get_tensor_model_parallel_rank() == 0 and ps.get_context_parallel_rank() == 0:
                totals += sum(d["answers"].double() for d in out).to(totals.device)
    for c in chunks:
        c.train()
    dist.all_reduce(totals)
    return float(totals[0] / totals[1].clamp(min=1))
