"""Cross mode (the CrA baseline): images reach the LLM only through gated cross-attention layers.

The sequence holds text and one ``<image>`` marker position per image (modality ``IMAGE``, its ``image_id``); no
image embeddings are spliced in. Every ``cross_attention_interval``-th decoder layer gets megatron-core's cross
attention slots (``model/layer_specs.py``): an RMSNorm, ``GatedCrossAttention`` over the image embeddings, and the
stock bias-dropout-add. The image embeddings ride as one ``[M*T, b, h]`` context tensor (``image_context``: each
row's images in order, padded to the batch's most images per row M, T tokens each); ``cross_plan`` derives from the
token codes which of them each position may see and where each image was shown. In KV-cached decode
``ImageKeyValues`` keeps each cross layer's image K/V, projected once per image. docs/design/cross_attention.md
has the design and why.
"""

from __future__ import annotations

import copy
import math
from typing import NamedTuple, Optional

import torch
from megatron.core.transformer.attention import CrossAttention
from megatron.core.transformer.module import MegatronModule

from megatron_visualchat.model.token_codes import MODALITY_PAD, NO_IMAGE, PerCodesCache, unpack_token_codes


def positions_per_image(attention_mode: str, image_tokens: int) -> int:
    """Sequence positions one image takes: its ``image_tokens`` embeddings spliced in (mmca, causal), or a single
    ``<image>`` marker in mode ``cross``."""
    return 1 if attention_mode == "cross" else image_tokens


def has_cross_attention(layer_number: int, interval: int) -> bool:
    """Whether the decoder layer with megatron's 1-based global ``layer_number`` carries cross attention: layers
    K, 2K, ... (every layer for K = 1)."""
    return layer_number % interval == 0


class GatedCrossAttention(CrossAttention):
    """megatron-core's tensor-parallel CrossAttention (column-parallel ``linear_q`` / ``linear_kv``, row-parallel
    ``linear_proj``) whose output is scaled by ``tanh(gate)``, ``gate`` a trainable scalar initialised at 0
    (Flamingo): at step 0 the layer adds exactly nothing, so the model is the frozen LLM. The cross heads are new
    weights, so they are full multi-head even when the LLM's self-attention groups its keys (GQA)."""

    def __init__(self, config, submodules, layer_number: int, **kwargs):
        if config.num_query_groups != config.num_attention_heads:
            config = copy.copy(config)
            config.num_query_groups = config.num_attention_heads
        super().__init__(config, submodules, layer_number, **kwargs)
        self.gate = torch.nn.Parameter(torch.zeros(1, dtype=config.params_dtype))

    def forward(self, hidden_states, attention_mask, key_value_states=None, inference_context=None, **kwargs):
        if inference_context is None:
            output, bias = super().forward(hidden_states, attention_mask, key_value_states=key_value_states,
                                           **kwargs)
        else:  # KV-cached decode: megatron-core's own cache would take this layer number's self-attention slot
            output, bias = self._decode(hidden_states, attention_mask, key_value_states, inference_context)
        scale = torch.tanh(self.gate).to(output.dtype)
        return output * scale, None if bias is None else bias * scale

    def _decode(self, hidden_states, codes, new_context, inference_context):
        """``Attention.forward`` without megatron-core's KV bookkeeping: K/V of the images new in this forward
        (``new_context``) are projected once and added to ``ImageKeyValues``; the queries attend over all of a
        row's images shown so far."""
        query, key, value = self.get_query_key_value_tensors(hidden_states, new_context)
        key, value = image_key_values(inference_context).extend(self.layer_number, key, value)
        core = self.core_attention(query, key, value, codes, attn_mask_type=self.attn_mask_type)
        return self.linear_proj(core)


class CrossCoreAttention(MegatronModule):
    """Softmax attention of the queries ``[sq, b, np, hn]`` over the image keys/values ``[sk, b, np, hn]``. The
    ``attention_mask`` slot carries the packed token codes (as for MMCA, so activation recompute can save it);
    ``cross_plan`` turns them into the mask and the positions, once per forward. Rotary embeddings put each query
    at its sequence index and every key of image m at its marker's index (as mPLUG-Owl3's MI-Rope), so attention
    can tell the images of a sample apart by where they were shown. A query with no allowed key (no image shown
    yet, pads, a batch without images) outputs 0, not a uniform average."""

    def __init__(self, config, layer_number: int, attn_mask_type=None, attention_type: str = "cross",
                 cp_comm_type: Optional[str] = None, softmax_scale: Optional[float] = None, pg_collection=None,
                 *, rope_base: float = 10000.0):
        super().__init__(config=config)
        if config.context_parallel_size != 1 or config.attention_dropout:
            raise ValueError("cross-attention core supports neither context parallelism nor attention dropout")
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)
        self.rope_base = rope_base

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None) -> torch.Tensor:
        sq, b, heads, head_dim = query.shape
        plan = cross_plan(attention_mask, key.shape[0], sq)
        q = _rotate(query.float(), plan.query_pos[:, None], self.rope_base)  # [sq, b, np, hn]
        k = _rotate(key.float(), plan.key_pos.transpose(0, 1), self.rope_base)  # positions [sk, b]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, value))  # [b, heads, s, hn]
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.softmax_scale
        scores = scores.masked_fill(~plan.allowed, torch.finfo(torch.float32).min)
        probs = scores.softmax(dim=-1) * plan.allowed  # rows without any allowed key become exactly 0
        out = torch.matmul(probs.to(v.dtype), v)
        return out.permute(2, 0, 1, 3).reshape(sq, b, heads * head_dim)


def _rotate(t: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """LLaMA's (non-interleaved) rotary embedding of ``t [s, b, heads, hn]`` at ``positions`` ([s, b] or [s, 1])."""
    half = t.shape[-1] // 2
    inv_freq = 1.0 / base ** (torch.arange(0, half, device=t.device, dtype=torch.float32) / half)
    angles = positions.to(torch.float32)[..., None, None] * inv_freq  # [s, b, 1, half]
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    rotated = torch.cat([-t[..., half:], t[..., :half]], dim=-1)
    return t * cos + rotated * sin


def image_context(image_embeds: torch.Tensor, num_images: Optional[torch.Tensor], batch: int) -> torch.Tensor:
    """Image embeddings ``[N, T, h]`` (row-major: row 0's images in order, then row 1's ...) -> the cross-attention
    context ``[M*T, b, h]``, row ``r``'s image ``m`` at slots ``m*T .. m*T+T-1``, zeros past its last image."""
    n, t, h = image_embeds.shape
    if n == 0:  # still wired to the projector: DDP waits for a gradient of every parameter
        return image_embeds.reshape(0, 1, h).expand(0, batch, h)
    if num_images is None or int(num_images.sum()) != n:
        raise ValueError(f"num_images {None if num_images is None else num_images.tolist()} does not count the "
                         f"{n} images of the batch")
    most = int(num_images.max())
    rows = torch.repeat_interleave(torch.arange(batch, device=num_images.device), num_images)
    first = torch.cumsum(num_images, 0) - num_images
    cols = torch.arange(n, device=num_images.device) - first[rows]
    slots = image_embeds.new_zeros(batch, most, t, h).index_put((rows, cols), image_embeds)
    return slots.reshape(batch, most * t, h).transpose(0, 1).contiguous()


class CrossPlan(NamedTuple):
    allowed: torch.Tensor  # [b, 1, sq, M*T] bool
    query_pos: torch.Tensor  # [sq] sequence index of each query
    key_pos: torch.Tensor  # [b, M*T] sequence index of the marker of each key's image


_PLAN_CACHE = PerCodesCache()


def cross_plan(packed_codes: torch.Tensor, context_length: int, sq: int) -> CrossPlan:
    """What the cross layers of one forward share, from the codes alone (cached per codes tensor). Position ``j``
    (of the last ``sq``) may attend to the tokens of image ``m`` of its row iff image ``m`` was shown at or before
    ``j`` (the running maximum of ``image_id`` is the last image shown so far) and belongs to ``j``'s packed sample
    (the ``sample_id`` at its marker). Pads attend to nothing. The context holds M = (largest image_id + 1) images
    per row of ``context_length / M`` tokens each (``image_context``)."""

    def build() -> CrossPlan:
        codes = unpack_token_codes(packed_codes)
        b, length = codes.image_id.shape
        most = int(codes.image_id.max()) + 1 if codes.image_id.numel() else 0
        if (context_length == 0) != (most == 0) or (most and context_length % most):
            raise ValueError(f"a cross-attention context of {context_length} image tokens does not fit the "
                             f"{most} image(s) per row that the token codes show")
        t = context_length // most if most else 1
        is_marker = codes.image_id != NO_IMAGE
        last_shown = torch.cummax(codes.image_id, dim=1).values  # [b, L]; NO_IMAGE before the first image
        # Per image: the packed sample it belongs to and its marker's index (an extra column takes non-markers).
        column = torch.where(is_marker, codes.image_id, most)
        owner = torch.full((b, most + 1), -2, dtype=torch.long, device=packed_codes.device)
        owner = owner.scatter(1, column, codes.sample_id)[:, :most]
        index = torch.arange(length, device=packed_codes.device).expand(b, length)
        marker_pos = torch.zeros(b, most + 1, dtype=torch.long, device=packed_codes.device)
        marker_pos = marker_pos.scatter_reduce(1, column, index, reduce="amin", include_self=False)[:, :most]
        slot_image = torch.arange(most * t, device=packed_codes.device) // t
        shown = slot_image[None, None, :] <= last_shown[:, :, None]
        same_sample = owner[:, slot_image][:, None, :] == codes.sample_id[:, :, None]
        allowed = shown & same_sample & (codes.modality != MODALITY_PAD)[:, :, None]
        return CrossPlan(allowed[:, -sq:].unsqueeze(1), torch.arange(length - sq, length, device=packed_codes.device),
                         marker_pos[:, slot_image])

    return _PLAN_CACHE.get(("cross", PerCodesCache.codes_key(packed_codes), context_length, sq), build,
                           (packed_codes,))


def check_images_match_codes(packed_codes: torch.Tensor, num_images: Optional[torch.Tensor],
                              new_positions: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Every row's markers number its images 0 .. num_images - 1 (one host sync). In KV-cached decode the codes
    cover the cache too and ``num_images`` counts the images of the last ``new_positions`` only: their markers
    must number them after the row's earlier images. Returns per row (images before, images after)."""
    image_id = unpack_token_codes(packed_codes).image_id
    length = image_id.shape[1]
    after = _images_shown(image_id)
    before = _images_shown(image_id[:, :length - new_positions]) if new_positions else torch.zeros_like(after)
    expected = torch.zeros_like(after) if num_images is None else num_images.to(after.device)
    if not torch.equal(after - before, expected):
        where = "" if not new_positions else f" among the last {new_positions} positions"
        raise ValueError(f"the token codes show {(after - before).tolist()} image(s) per row{where} but "
                         f"num_images is {expected.tolist()}: every image needs exactly one marker in its row")
    return before, after


def _images_shown(image_id: torch.Tensor) -> torch.Tensor:
    """Per row, how many images ``image_id [b, L]`` shows (ids count up from 0 in order of appearance)."""
    if image_id.shape[1] == 0:
        return torch.zeros(image_id.shape[0], dtype=image_id.dtype, device=image_id.device)
    return image_id.max(dim=1).values + 1


def image_key_values(inference_context) -> "ImageKeyValues":
    """The cross layers' image K/V that ``inference.kv_cache.KVCache`` attaches to its inference context."""
    store = getattr(inference_context, "image_key_values", None)
    if not isinstance(store, ImageKeyValues):
        raise ValueError("cross-attention decode needs an inference context that carries the images' K/V "
                         "(image_key_values): use inference.kv_cache.KVCache's context")
    return store


class ImageKeyValues:
    """The cross layers' share of the KV cache: per cross layer, the K/V of every image shown so far, projected
    once per image (in the forward that holds its marker) and laid out as ``image_context`` lays out the context:
    buffers ``[capacity, T, b, np, hn]`` read as ``[M*T, b, np, hn]``, row r's image m at slots m*T .. m*T+T-1
    (capacity doubles when a row shows more images). Which images a row holds is read from the cache's token
    codes, so a rollback needs nothing here: a forgotten image's slots are overwritten by the next image that takes
    its number, and the mask never lets a position see an image its row has not shown (buffers start at zero, so
    unshown slots are finite and their weight is exactly 0)."""

    def __init__(self):
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._placement = None  # for the forward in flight: (rows, index in it, image number, most new, shown)

    def stage(self, packed_codes: torch.Tensor, new_positions: int, num_images: Optional[torch.Tensor]) -> None:
        """Before a forward over the last ``new_positions`` of ``packed_codes``: where its new images go."""
        before, after = check_images_match_codes(packed_codes, num_images, new_positions)
        new = after - before
        rows = torch.repeat_interleave(torch.arange(len(new), device=new.device), new)
        index = torch.arange(len(rows), device=new.device) - (torch.cumsum(new, 0) - new)[rows]
        self._placement = (rows, index, before[rows] + index, int(new.max()) if len(new) else 0,
                           int(after.max()) if len(after) else 0)

    def extend(self, layer_number: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new images' ``key`` / ``value`` ([M_new*T, b, np, hn], as ``image_context``) of one layer;
        return the K/V of every image shown so far, ``[M*T, b, np, hn]``."""
        if self._placement is None:
            raise RuntimeError("ImageKeyValues.stage must run before the cross layers of a forward")
        rows, index, number, most_new, shown = self._placement
        stored = self.layers.get(layer_number)
        if shown == 0:
            return key, value
        if most_new == 0 and stored is None:
            raise ValueError(f"cross layer {layer_number} has no K/V of the {shown} image(s) the cache shows: the "
                             "image K/V must travel with the cache (ImageKeyValues.copy when a cache is copied)")
        t = key.shape[0] // most_new if most_new else stored[0].shape[1]
        out = []
        for new, buffer in zip((key, value), stored or (None, None)):
            new = new.reshape(most_new, t, *new.shape[1:])  # [M_new, T, b, np, hn]
            if buffer is None or buffer.shape[0] < shown:
                grown = new.new_zeros(max(shown, 2 * (0 if buffer is None else buffer.shape[0])), *new.shape[1:])
                if buffer is not None:
                    grown[:buffer.shape[0]] = buffer
                buffer = grown
            buffer[number, :, rows] = new[index, :, rows]
            out.append(buffer)
        self.layers[layer_number] = (out[0], out[1])
        return tuple(buf[:shown].reshape(shown * t, *buf.shape[2:]) for buf in out)

    def copy(self) -> "ImageKeyValues":
        """An independent copy (a forked conversation keeps its images' K/V)."""
        clone = ImageKeyValues()
        clone.layers = {n: (k.clone(), v.clone()) for n, (k, v) in self.layers.items()}
        return clone

    def tensors(self) -> list[torch.Tensor]:
        return [t for kv in self.layers.values() for t in kv]
