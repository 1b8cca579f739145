"""Samples -> the batch the model consumes, with every ``<image>`` already expanded to its final positions.

Output (all [B, L] tensors are at the final, spliced length L = longest row, or ``pad_to``):

* ``tokens``       text ids; ``<image>`` id at every image position; pad id at pads.
* ``labels``       next-token targets for megatron's GPTModel: labels[i] = token at i+1 when that token is a
                   supervised answer/EOS token, else -100 (image positions, the position before an image, the last
                   position of every sample and pads never carry a label).
* ``loss_mask``    float, labels != -100.
* ``position_ids`` 0..n-1 per sample, restarting at 0 for each packed sample; pads **continue** counting from the
                   row's last sample (never beyond L-1, so within any RoPE table sized for L).
* ``modality``     ``MODALITY_PAD`` / ``MODALITY_TEXT`` / ``MODALITY_IMAGE`` (``model/token_codes.py``).
* ``image_id``     index of the image within its row in order of appearance (continuing across packed samples);
                   ``NO_IMAGE`` (-1) at text and pads.
* ``sample_id``    0.. per packed sample within the row (all 0 without packing); **-1 at pads**.
* ``pixel_values`` [N_images_total, 3, H, W] float32, row-major (row 0's images in order, then row 1's ...);
                   [0, 3, H, W] for a batch without images.
* ``num_images``   [B].

Invariant the model relies on: the image positions taken in row-major order, in chunks of ``num_image_tokens``,
are the images of ``pixel_values`` in order (``image_id`` of each chunk = running index within its row).

``__call__(samples)`` puts one sample per row; ``collate_bins(bins)`` puts each bin (a list of whole samples, in
order, chosen by ``data/pack.py``) in one row of exactly ``pad_to`` positions, pads only at its end; ``sample_id``
keeps MMCA from attending across samples.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from megatron_visualchat.model.token_codes import MODALITY_IMAGE, MODALITY_PAD, MODALITY_TEXT, NO_IMAGE

from .encode import IGNORE_INDEX


def _special_ids(tokenizer_or_ids) -> tuple[int, int]:
    if isinstance(tokenizer_or_ids, Mapping):
        return int(tokenizer_or_ids["image_id"]), int(tokenizer_or_ids["pad_id"])
    return int(tokenizer_or_ids.image_id), int(tokenizer_or_ids.pad_id)


def _image_size(image_size, image_transform) -> tuple[int, int]:
    size = image_size if image_size is not None else getattr(image_transform, "image_size", None)
    if size is None:
        raise ValueError("image_size is needed (the transform declares no .image_size): pass image_size=(H, W)")
    size = (size, size) if isinstance(size, int) else tuple(int(s) for s in size)
    if len(size) != 2 or min(size) <= 0:
        raise ValueError(f"image_size={image_size!r} must be an int or (H, W) of positive ints")
    return size


class VisualChatCollator:
    def __init__(
        self,
        tokenizer_or_ids,
        num_image_tokens: int,
        image_transform: Callable,
        max_seq_len: int,
        pad_to: int | None = None,
        image_size: int | tuple[int, int] | None = None,
    ):
        """``tokenizer_or_ids``: anything with ``image_id``/``pad_id`` attributes, or a mapping with those keys."""
        if num_image_tokens <= 0 or max_seq_len <= 0:
            raise ValueError(f"num_image_tokens={num_image_tokens} and max_seq_len={max_seq_len} must be positive")
        if pad_to is not None and pad_to < max_seq_len:
            raise ValueError(f"pad_to={pad_to} must be >= max_seq_len={max_seq_len} (the dataset's length cap)")
        self.image_id, self.pad_id = _special_ids(tokenizer_or_ids)
        self.num_image_tokens = num_image_tokens
        self.image_transform = image_transform
        self.max_seq_len = max_seq_len
        self.pad_to = pad_to
        self.image_size = _image_size(image_size, image_transform)

    def _expand(self, sample: dict) -> dict:
        """One sample at its final length: tokens, next-token labels, modality, per-sample image index."""
        ids = torch.as_tensor(sample["input_ids"], dtype=torch.long)
        labels = torch.as_tensor(sample["labels"], dtype=torch.long)
        positions = torch.as_tensor(sample["image_positions"], dtype=torch.long)
        where = f"sample {sample.get('index', '?')}"
        if labels.shape != ids.shape:
            raise ValueError(f"{where}: labels {tuple(labels.shape)} and input_ids {tuple(ids.shape)} differ")
        is_image = ids == self.image_id
        if not torch.equal(is_image.nonzero().flatten(), positions):
            raise ValueError(f"{where}: image_positions {positions.tolist()} do not match the <image> ids in input_ids")
        if len(positions) != len(sample["images"]):
            raise ValueError(f"{where}: {len(positions)} <image> placeholders but {len(sample['images'])} images")
        repeats = torch.where(is_image, self.num_image_tokens, 1)
        expanded_image = is_image.repeat_interleave(repeats)
        length = len(expanded_image)
        if length > self.max_seq_len:
            raise ValueError(f"{where}: {length} tokens after image expansion > max_seq_len={self.max_seq_len}")
        targets = labels.repeat_interleave(repeats).masked_fill(expanded_image, IGNORE_INDEX)
        image_index = (torch.cumsum(is_image.long(), 0) - 1).repeat_interleave(repeats)
        return {
            "tokens": ids.repeat_interleave(repeats),
            # an image position never predicts anything, even if a template put a supervised token right after it
            "labels": torch.cat([targets[1:], torch.tensor([IGNORE_INDEX])]).masked_fill(expanded_image, IGNORE_INDEX),
            "modality": torch.where(expanded_image, MODALITY_IMAGE, MODALITY_TEXT),
            "image_id": torch.where(expanded_image, image_index, NO_IMAGE),
            "num_images": len(positions),
            "length": length,
        }

    def length(self, sample: dict) -> int:
        """Positions ``sample`` takes once every ``<image>`` is expanded (what a bin's capacity is measured in)."""
        return len(sample["input_ids"]) + len(sample["image_positions"]) * (self.num_image_tokens - 1)

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        """One sample per row; rows padded to ``pad_to``, else to the longest."""
        return self._assemble([[s] for s in samples])

    def collate_bins(self, bins: list[list[dict]]) -> dict[str, torch.Tensor]:
        """One bin per row, each row exactly ``pad_to`` positions."""
        if self.pad_to is None:
            raise ValueError("collate_bins needs pad_to (the bin capacity, --seq-length)")
        return self._assemble(bins)

    def _assemble(self, rows: list[list[dict]]) -> dict[str, torch.Tensor]:
        if not rows or not all(rows):
            raise ValueError("cannot collate an empty list of samples (or an empty bin)")
        expanded = [[self._expand(s) for s in row] for row in rows]
        lengths = [sum(e["length"] for e in row) for row in expanded]
        L = self.pad_to or max(lengths)
        if max(lengths) > L:
            b = lengths.index(max(lengths))
            raise ValueError(f"bin {b} (samples {[s.get('index', '?') for s in rows[b]]}) holds {lengths[b]} "
                             f"positions > pad_to={L}")
        B = len(rows)
        out = {
            "tokens": torch.full((B, L), self.pad_id, dtype=torch.long),
            "labels": torch.full((B, L), IGNORE_INDEX, dtype=torch.long),
            "position_ids": torch.zeros((B, L), dtype=torch.long),
            "modality": torch.full((B, L), MODALITY_PAD, dtype=torch.long),
            "image_id": torch.full((B, L), NO_IMAGE, dtype=torch.long),
            "sample_id": torch.full((B, L), -1, dtype=torch.long),
            "num_images": torch.zeros(B, dtype=torch.long),
        }
        pixels = []
        for b, (row, samples) in enumerate(zip(expanded, rows)):
            start, images_before = 0, 0
            for k, (e, sample) in enumerate(zip(row, samples)):
                n = e["length"]
                span = slice(start, start + n)
                for key in ("tokens", "labels", "modality"):
                    out[key][b, span] = e[key]
                out["image_id"][b, span] = torch.where(e["image_id"] >= 0, e["image_id"] + images_before, NO_IMAGE)
                out["position_ids"][b, span] = torch.arange(n)
                out["sample_id"][b, span] = k
                pixels += [self._pixels(im, sample) for im in sample["images"]]
                images_before += e["num_images"]
                start += n
            last_length = row[-1]["length"]
            out["position_ids"][b, start:] = torch.arange(last_length, last_length + L - start)
            out["num_images"][b] = images_before
        out["loss_mask"] = (out["labels"] != IGNORE_INDEX).float()
        out["pixel_values"] = torch.stack(pixels) if pixels else torch.zeros((0, 3, *self.image_size))
        return out

    def _pixels(self, image, sample: dict) -> torch.Tensor:
        pixels = self.image_transform(image)
        if tuple(pixels.shape) != (3, *self.image_size):
            raise ValueError(
                f"sample {sample.get('index', '?')}: image transform gave shape {tuple(pixels.shape)}, "
                f"expected (3, {self.image_size[0]}, {self.image_size[1]})"
            )
        return pixels.float()
