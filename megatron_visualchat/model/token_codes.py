"""Token codes: what each position of the spliced sequence is, the contract between data, model and inference.

Every position carries a modality code (pad, text or image), the index of the image it belongs to (``NO_IMAGE``
for text and pad; images numbered in order of appearance within a row) and, for packed sequences, the id of the
sample it belongs to. The collator, the chat prompt builder and the KV cache write them; splicing, MMCA and the
modality-split layers read them (docs/design/token_codes.md).

megatron-core hands ``attention_mask`` unchanged from GPTModel through every TransformerLayer to the core
attention, on every pipeline stage. Packing the three codes into that slot as one ``[B, 3, L]`` LongTensor lets
MMCA reach every layer without widening upstream signatures. Because all layers of a forward get the same
tensor, anything derived from the codes alone is computed once per forward (``PerCodesCache``).
"""

from __future__ import annotations

import collections
from typing import Callable, NamedTuple, Optional

import torch

MODALITY_PAD = 0  # never attended to; attention outputs 0 at pad queries
MODALITY_TEXT = 1
MODALITY_IMAGE = 2
NUM_MODALITIES = 3  # the codes are 0 .. NUM_MODALITIES - 1, so they can index rule tables
NO_IMAGE = -1  # image_id of text and pad positions

# Rows of the packed [B, 3, L] layout.
_MODALITY_ROW, _IMAGE_ID_ROW, _SAMPLE_ID_ROW = 0, 1, 2

_LAYOUT_MODALITY = {"t": MODALITY_TEXT, "p": MODALITY_PAD}


class TokenCodes(NamedTuple):
    modality: torch.Tensor  # [B, L] MODALITY_PAD / MODALITY_TEXT / MODALITY_IMAGE
    image_id: torch.Tensor  # [B, L] image index in order of appearance, NO_IMAGE elsewhere
    sample_id: torch.Tensor  # [B, L] packed-sample index (all 0 when not packed)


def pack_token_codes(modality: torch.Tensor, image_id: torch.Tensor,
                     sample_id: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[B, L] codes -> the [B, 3, L] int64 tensor carried in megatron's ``attention_mask`` slot."""
    if modality.shape != image_id.shape or (sample_id is not None and sample_id.shape != modality.shape):
        raise ValueError(f"token codes must share one [B, L] shape, got modality {tuple(modality.shape)}, "
                         f"image_id {tuple(image_id.shape)}"
                         + ("" if sample_id is None else f", sample_id {tuple(sample_id.shape)}"))
    if sample_id is None:
        sample_id = torch.zeros_like(modality)
    return torch.stack([modality, image_id, sample_id], dim=1).long()


def unpack_token_codes(packed: torch.Tensor) -> TokenCodes:
    if packed.dim() != 3 or packed.shape[1] != 3 or packed.dtype != torch.long:
        raise ValueError(f"expected packed token codes of shape [B, 3, L] (int64), got {tuple(packed.shape)} "
                         f"{packed.dtype}; build them with pack_token_codes")
    return TokenCodes(packed[:, _MODALITY_ROW], packed[:, _IMAGE_ID_ROW], packed[:, _SAMPLE_ID_ROW])


def check_code_values(modality: torch.Tensor, image_id: torch.Tensor) -> None:
    """Check code values (one device sync): known modalities; image_id >= 0 exactly on image tokens, else -1."""
    is_image = modality == MODALITY_IMAGE
    bad_modality = ~((modality == MODALITY_PAD) | (modality == MODALITY_TEXT) | is_image)
    bad_image_id = torch.where(is_image, image_id < 0, image_id != NO_IMAGE)
    bad = torch.stack([bad_modality.any(), bad_image_id.any()]).tolist()
    if bad[0]:
        b, j = bad_modality.nonzero()[0].tolist()
        raise ValueError(
            f"modality[{b}, {j}] = {int(modality[b, j])}; allowed codes: {MODALITY_PAD} pad, "
            f"{MODALITY_TEXT} text, {MODALITY_IMAGE} image"
        )
    if bad[1]:
        b, j = bad_image_id.nonzero()[0].tolist()
        raise ValueError(
            f"image_id[{b}, {j}] = {int(image_id[b, j])} with modality {int(modality[b, j])}: image tokens need "
            f"image_id >= 0, text and pad tokens need image_id = {NO_IMAGE}"
        )


def codes_from_layout(layout: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Build (modality, image_id, sample_id) 1-D long tensors from a readable layout string (tests, benchmarks).

    One character per position: ``t`` text, ``p`` pad, a digit ``0``-``9`` an image token of that image id;
    ``|`` starts the next packed sample (and is not a position); spaces are ignored. Example: ``"tt000t|t11pp"``.
    """
    modality, image_id, sample_id = [], [], []
    sample = 0
    for char in layout.replace(" ", ""):
        if char == "|":
            sample += 1
            continue
        if char.isdigit():
            modality.append(MODALITY_IMAGE)
            image_id.append(int(char))
        elif char in _LAYOUT_MODALITY:
            modality.append(_LAYOUT_MODALITY[char])
            image_id.append(NO_IMAGE)
        else:
            raise ValueError(f"layout {layout!r}: unknown character {char!r}; use t, p, 0-9, | or space")
        sample_id.append(sample)
    return (torch.tensor(modality), torch.tensor(image_id), torch.tensor(sample_id))


class PerCodesCache:
    """Results that depend only on the token codes (block masks, the validation of the codes, which tokens are
    images), shared by every layer of a forward pass: megatron-core hands all layers the same codes tensor, so one
    build serves 32-80 layers instead of one per layer. Entries hold references to the code tensors they were
    built from, so their memory cannot be reused while the entry lives; the key includes the tensors' version
    counters, so in-place edits miss."""

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


class ImageRouting(NamedTuple):
    """Which of the last ``sq`` positions are image tokens, in megatron's [s, b] layout, and their flat indices
    (row-major over [s, b]) for the modality-split projections and norms."""

    mask: torch.Tensor  # [s, b] bool
    image_idx: torch.Tensor  # flat indices of image tokens
    text_idx: torch.Tensor  # flat indices of the other tokens
    any_image: bool


_ROUTING_CACHE = PerCodesCache()


def image_routing(packed: torch.Tensor, sq: int, shard: Optional[tuple[int, int]] = None) -> ImageRouting:
    """The routing for hidden states that are the last ``sq`` positions of ``packed`` codes (all of them, except
    in KV-cache decode). ``shard = (rank, size)``: only the rank-th of ``size`` equal sequence chunks of those
    positions (a sequence-parallel rank's tokens). Computed once per codes tensor (one host sync) and shared by
    every layer."""

    def build() -> ImageRouting:
        mask = (unpack_token_codes(packed).modality[:, -sq:] == MODALITY_IMAGE).transpose(0, 1).contiguous()
        if shard is not None:
            mask = mask.chunk(shard[1], dim=0)[shard[0]].contiguous()
        flat = mask.reshape(-1)
        image_idx, text_idx = flat.nonzero().squeeze(1), (~flat).nonzero().squeeze(1)
        return ImageRouting(mask, image_idx, text_idx, bool(image_idx.numel()))

    return _ROUTING_CACHE.get(("routing", PerCodesCache.codes_key(packed), sq, shard), build, (packed,))
