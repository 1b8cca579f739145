"""Generation with a KV cache on megatron-core's inference path, for batches of conversations.

One forward (``run_chunk``) takes only the *new* positions: their images go through the vision tower (encoded
once, when first shown), are spliced into the word embeddings, and the decoder runs with
``inference_context=cache.context`` so every layer appends its K/V and attends over the whole cached history
(RoPE offset included). The token codes of all cached positions travel in the attention-mask slot, so MMCA and the
modality-split projections see the right layout at every step. Logits are gathered across tensor-parallel ranks
(``runtime_gather_output``) and the chosen tokens are broadcast from TP rank 0, so all ranks feed the same tokens.

Rows of a batch are left-padded; pads are never attended to. RoPE is relative, so a left-padded row scores the
same as alone (up to float rounding).

A model with an image vocabulary draws through ``images`` (an ``ImageRule``): ``image_generation.py`` holds the
rule (which tokens each step may choose, ``<boi>`` -> exactly ``num_codes`` codes -> ``<eoi>``) and classifier-free
guidance; this loop only asks it to guide, mask and advance.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from megatron_visualchat.inference.image_generation import ImageRule, ImageSteps
from megatron_visualchat.inference.kv_cache import KVCache
from megatron_visualchat.inference.prompt import Chunk
from megatron_visualchat.inference.sampling import SamplingParams, restrict_vocabulary, sample_tokens
from megatron_visualchat.model.token_codes import MODALITY_PAD, MODALITY_TEXT, NO_IMAGE

FINISH_EOS, FINISH_LENGTH, FINISH_CONTEXT = "eos", "length", "context_full"


def check_inference_layout() -> None:
    """Generation runs tensor-parallel only; one pipeline stage must hold the whole model."""
    from megatron.core import parallel_state as ps

    pp = ps.get_pipeline_model_parallel_world_size()
    if pp != 1:
        raise ValueError(f"inference supports tensor parallelism only: pipeline parallel size {pp} must be 1 "
                         "(launch with --tp N and as many processes)")


def run_chunk(model, cache: KVCache, chunk: Chunk) -> torch.Tensor:
    """Forward the chunk's new positions through the cache; returns the last position's logits [B, V_padded],
    gathered over the TP group. ``model`` is a VisualChatModel in eval mode holding all layers."""
    codes = cache.stage(chunk.modality, chunk.image_id)
    b, n = chunk.tokens.shape
    position_ids = torch.arange(cache.length, cache.length + n, device=chunk.tokens.device).expand(b, n)
    logits = model(chunk.tokens, position_ids, codes, pixel_values=chunk.pixel_values, num_images=chunk.num_images,
                   inference_context=cache.context, runtime_gather_output=True)
    cache.commit(n)
    return logits[:, -1]


def _broadcast_from_tp_rank0(tokens: torch.Tensor) -> torch.Tensor:
    from megatron.core import parallel_state as ps

    if ps.get_tensor_model_parallel_world_size() > 1:
        torch.distributed.broadcast(tokens, src=ps.get_tensor_model_parallel_src_rank(),
                                    group=ps.get_tensor_model_parallel_group())
    return tokens


@dataclass
class Generation:
    tokens: list[list[int]]  # per row, the sampled tokens (incl. a final EOS)
    finish: list[str]  # per row: "eos" | "length" | "context_full"
    pending: list[list[int]]  # per row, sampled tokens not yet written to the cache (the last one(s))
    step_logits: list[torch.Tensor] = field(default_factory=list)  # [B, V] per step, when asked for


# (step, per-row new token or None for a finished row) -> None; used to stream text as it comes
TokenCallback = Callable[[int, list[Optional[int]]], None]


def generate(model, cache: KVCache, prompt: Chunk, params: SamplingParams, *, eos_id: int, vocab_size: int,
             pad_id: int, banned_ids: Sequence[int] = (), generator: Optional[torch.Generator] = None,
             on_tokens: Optional[TokenCallback] = None, keep_logits: bool = False,
             images: Optional[ImageRule] = None) -> Generation:
    """Prefill ``prompt`` into ``cache`` and decode up to ``params.max_new_tokens`` tokens per row.

    A row stops at EOS (when ``params.stop_on_eos``); finished rows are fed their EOS once and then pads. The last
    sampled token of each row is not fed (nothing would read its K/V yet): it is returned in ``pending`` so the
    next round starts with it. Stops early with "context_full" when the cache has no room for the next token.
    ``images``: the model draws images as codes (``image_generation.py``); ``step_logits`` are then the guided,
    masked scores each token was chosen from."""
    check_inference_layout()
    if model.training:
        raise ValueError("generate() needs the model in eval mode (model.eval()): megatron-core only uses the KV "
                         "cache's inference path outside training")
    if images is None and params.cfg_scale != 1.0:
        raise ValueError(f"cfg_scale={params.cfg_scale}: classifier-free guidance applies to image codes, and this "
                         "generation draws no images (a model with an image vocabulary and its image tokenizer "
                         "does); use cfg_scale 1")
    b = prompt.tokens.shape[0]
    out = Generation([[] for _ in range(b)], [FINISH_LENGTH] * b, [[] for _ in range(b)])
    done = [False] * b
    drawing = None if images is None else ImageSteps(
        images, lambda c, chunk: run_chunk(model, c, chunk), b, params.cfg_scale, vocab_size, pad_id,
        prompt.tokens.device)
    with torch.no_grad():
        logits = run_chunk(model, cache, prompt)
        for step in range(params.max_new_tokens):
            if drawing is not None:
                logits = drawing.guide(logits)
            scores = restrict_vocabulary(logits, vocab_size, banned_ids)
            if drawing is not None:
                scores = drawing.restrict(scores, min(params.max_new_tokens - 1 - step, cache.room))
            if keep_logits:
                out.step_logits.append(scores.cpu())
            chosen = _broadcast_from_tp_rank0(sample_tokens(scores, params, generator)).tolist()
            fresh = [None if done[r] else chosen[r] for r in range(b)]
            if drawing is not None:
                drawing.advance(fresh)
            for r, token in enumerate(fresh):
                if token is None:
                    continue
                out.tokens[r].append(token)
                if token == eos_id and params.stop_on_eos:
                    done[r], out.finish[r] = True, FINISH_EOS
            if on_tokens is not None:
                on_tokens(step, fresh)
            if all(done) or step == params.max_new_tokens - 1:
                break
            if cache.room < 1:
                for r in range(b):
                    if not done[r]:
                        out.finish[r] = FINISH_CONTEXT
                break
            device = prompt.tokens.device
            feed = torch.tensor([[t if t is not None else pad_id] for t in fresh], device=device)
            modality = torch.tensor([[MODALITY_TEXT if t is not None else MODALITY_PAD] for t in fresh], device=device)
            no_image = torch.full((b, 1), NO_IMAGE, dtype=torch.long, device=device)
            logits = run_chunk(model, cache, Chunk(feed, modality, no_image, None,
                                                   torch.zeros(b, dtype=torch.long, device=device)))
    # Tokens sampled in the last iteration were never fed; rows that finished earlier had their EOS fed.
    out.pending = [[t] if t is not None else [] for t in fresh]
    return out
