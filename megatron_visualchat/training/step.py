"""The forward step megatron-core's schedules call, and one call of the schedule for a list of microbatches."""

from __future__ import annotations

from functools import partial
from typing import Callable, Iterable, Iterator, Optional

import torch
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_model_config

from megatron_visualchat.data.cm3 import modality_loss_weights
from megatron_visualchat.model.token_codes import pack_token_codes
from megatron_visualchat.parallel.p2p import interleaved_schedule_kwargs
from megatron_visualchat.training.context_parallel import split_batch, sum_over_context_parallel


def masked_lm_loss(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Mean next-token loss over labelled positions. A microbatch without any label contributes a defined zero
    (the reference code's NaN), while keeping the graph so every trainable parameter gets a gradient.

    Under context parallelism a rank holds part of each sequence: it divides its loss sum by the labelled tokens
    of the whole sequence and reports the whole-sequence mean. megatron-core's schedule multiplies the loss by CP
    and DDP averages gradients over DP x CP, so the gradients equal CP=1's."""
    losses = output_tensor.float()
    mask = loss_mask.float()  # 0/1, or per-target weights (lm_objective's loss_weights): then a weighted mean
    num_tokens = sum_over_context_parallel(mask.sum())
    loss = (losses * mask).sum() / torch.where(num_tokens > 0, num_tokens, 1.0)
    return loss, {"lm loss": torch.stack([sum_over_context_parallel(loss.detach()), num_tokens.detach()])}


def gpt_forward_step(data_iterator: Iterator[dict], model):
    """Forward step for a text-only GPTModel: batch dict with tokens, position_ids, labels, loss_mask."""
    batch = split_batch(next(data_iterator))
    output = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"), labels=batch["labels"])
    return output, partial(masked_lm_loss, batch["loss_mask"])


def lm_objective(batch: dict, loss_weights: Optional[Callable] = None):
    """Training and eval loss: the model computes per-token losses from the labels; the mean is masked.
    ``loss_weights(labels) -> weights`` makes it a weighted mean, sum(w * loss) / sum(w) (0 on unlabelled
    targets)."""
    mask = batch["loss_mask"]
    if loss_weights is not None:
        mask = mask * loss_weights(batch["labels"])
    return batch["labels"], partial(masked_lm_loss, mask)


def modality_weighted_forward_step(vocab, text_weight: float, image_code_weight: float) -> Callable:
    """``visualchat_forward_step`` whose loss weighs image-code targets (of ``vocab``, an ``ImageCodeVocab``) by
    ``image_code_weight`` and all other targets by ``text_weight``: a weighted mean, normalised by the sum of the
    weights, so (1, 1) is the plain mean bit for bit and (2, 2) equals it too; (0, 1) is the mean over codes."""
    weights = partial(modality_loss_weights, vocab=vocab, text_weight=text_weight,
                      image_code_weight=image_code_weight)
    return partial(visualchat_forward_step, objective=partial(lm_objective, loss_weights=weights))


def visualchat_forward_step(data_iterator: Iterator[dict], model, objective: Callable = lm_objective):
    """Forward step for VisualChatModel: the collator's batch (tokens, labels, loss_mask, position_ids, token
    codes, pixel_values, num_images). Every stage reads the batch: the codes drive MMCA in all layers. Under
    context parallelism the model sees this rank's chunks of every per-position tensor (``split_batch``).
    ``objective(batch) -> (labels or None, loss_func)``: with labels the model returns per-token losses, without
    it returns logits (e.g. the held-out answer accuracy)."""
    batch = next(data_iterator)
    codes = batch.get("attention_mask")  # test batches carry the packed codes already
    if codes is None:
        codes = pack_token_codes(batch["modality"], batch["image_id"], batch.get("sample_id"))
    batch = split_batch({**batch, "attention_mask": codes})
    labels, loss_func = objective(batch)
    output = model(batch["tokens"], batch["position_ids"], batch["attention_mask"], labels=labels,
                   pixel_values=batch.get("pixel_values"), num_images=batch.get("num_images"))
    return output, loss_func


def run_schedule(
    model_chunks: list,
    microbatches: Iterable[dict],
    *,
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    forward_step: Callable = gpt_forward_step,
    forward_only: bool = False,
) -> list[dict]:
    """Run megatron-core's forward/backward schedule for this rank's pipeline stage(s). Returns the loss dicts
    (non-empty only on the last pipeline stage)."""
    microbatches = list(microbatches)
    # Every virtual-pipeline chunk walks the same microbatches with its own iterator.
    iterators = [iter(microbatches) for _ in model_chunks]
    iterator = iterators[0] if len(model_chunks) == 1 else iterators
    # Virtual stages: megatron-core's batched p2p would cross activations and gradients on a 2-rank pipeline, and
    # its shape exchange (mode cross) would deadlock; parallel/p2p.py.
    interleaved = interleaved_schedule_kwargs(get_model_config(model_chunks[0])) if len(model_chunks) > 1 else {}
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iterator,
        model=model_chunks if len(model_chunks) > 1 else model_chunks[0],
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
        **interleaved,
    )
