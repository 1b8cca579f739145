"""Token codes (modality / image_id / sample_id) and the input checks shared by every MMCA implementation.

Each key position carries a modality code (pad, text or image), the index of the image it belongs to (-1 for
text and pad) and, for packed sequences, the id of the sample it belongs to (design note mmca.md, "Token codes").
"""

from __future__ import annotations

import torch

MODALITY_PAD = 0
MODALITY_TEXT = 1
MODALITY_IMAGE = 2

# Allowed option values. Each implementation keeps its own registry keyed by these names.
IMAGE_ROWS = ("self", "self+text", "image")
COMBINE = ("sum", "mean")
MODES = ("mmca", "causal")

_LAYOUT_MODALITY = {"t": MODALITY_TEXT, "p": MODALITY_PAD}


def check_option(name: str, value: object, allowed: tuple[str, ...]) -> None:
    """Raise a ValueError naming the option, the bad value and the allowed set."""
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; allowed values: {', '.join(map(repr, allowed))}")


def check_attention_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    modality: torch.Tensor,
    image_id: torch.Tensor,
    sample_id: torch.Tensor | None,
    *,
    image_rows: str,
    combine: str,
    mode: str,
) -> None:
    """Validate options and shapes (no device sync): q [B,Hq,Lq,D], k/v [B,Hkv,Lk,D], codes [B,Lk], Lq <= Lk."""
    check_option("mode", mode, MODES)
    check_option("image_rows", image_rows, IMAGE_ROWS)
    check_option("combine", combine, COMBINE)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [batch, heads, length, head_dim], got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    batch, heads_q, len_q, dim = q.shape
    _, heads_kv, len_k, dim_k = k.shape
    if k.shape[0] != batch:
        raise ValueError(f"batch size differs: q has {batch}, k/v have {k.shape[0]}")
    if dim_k != dim:
        raise ValueError(f"head_dim differs: q has {dim}, k/v have {dim_k}")
    if heads_q % heads_kv != 0:
        raise ValueError(f"query heads ({heads_q}) must be a multiple of key/value heads ({heads_kv})")
    if len_q > len_k:
        raise ValueError(f"query length {len_q} exceeds key length {len_k}: queries are the last Lq key positions")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    codes = {"modality": modality, "image_id": image_id}
    if sample_id is not None:
        codes["sample_id"] = sample_id
    for name, t in codes.items():
        if tuple(t.shape) != (batch, len_k):
            raise ValueError(f"{name} must have shape [batch, key_length] = {(batch, len_k)}, got {tuple(t.shape)}")
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")


def check_code_values(modality: torch.Tensor, image_id: torch.Tensor) -> None:
    """Check code values (one device sync): modality in {0,1,2}; image_id >= 0 exactly on image tokens, else -1."""
    is_image = modality == MODALITY_IMAGE
    bad_modality = ~((modality == MODALITY_PAD) | (modality == MODALITY_TEXT) | is_image)
    bad_image_id = torch.where(is_image, image_id < 0, image_id != -1)
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
            "image_id >= 0, text and pad tokens need image_id = -1"
        )


def codes_from_layout(layout: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Build (modality, image_id, sample_id) 1-D long tensors from a readable layout string.

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
            image_id.append(-1)
        else:
            raise ValueError(f"layout {layout!r}: unknown character {char!r}; use t, p, 0-9, | or space")
        sample_id.append(sample)
    return (torch.tensor(modality), torch.tensor(image_id), torch.tensor(sample_id))
