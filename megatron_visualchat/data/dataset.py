"""The map-style training dataset: blend plan item -> tokens, labels, ``<image>`` positions and RGB images.

Bad records never stop training: a record that fails (see ``errors.SKIP_REASONS``) is dropped from its
concatenation group, counted in ``dataset.skipped`` and warned about once per reason; if nothing of the item is
left, the next plan item is used instead (deterministically). Counts are of distinct records, keyed by (dataset,
record index), so a bad record met again in a later epoch is not counted again. In ``strict`` mode
(``--strict-data``) the first bad record raises SampleError naming its file and index. Counts in
``dataset.skipped`` are per process; with DataLoader workers read the aggregated ``VisualChatDataLoader.skipped``
(each sample carries the records skipped while building it, as ``skipped``: {(dataset, record): reason}).

Grounding records carry box markers (``boxes.py``); their images are decoded before the text is tokenized, since a
box is written in the frame the encoder sees, which depends on the image's size (``boxes``: a ``BoxRenderer``).
"""

from __future__ import annotations

import random
from collections import Counter

import torch
from torch.utils.data import Dataset

from .blend import BlendPlan, DatasetSpec, build_blend_plan
from .boxes import BoxRenderer, has_boxes
from .conversation import Conversation
from .encode import ConversationEncoder
from .errors import SampleError, SkipLog
from .formats import ConversationSource, open_source
from .images import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGE_PIXELS, load_image
from .templates import Template


class VisualChatDataset(Dataset):
    def __init__(
        self,
        sources: list[ConversationSource],
        plan: BlendPlan,
        encoder: ConversationEncoder,
        *,
        seed: int = 0,
        strict: bool = False,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
        max_consecutive_skips: int = 1000,
        boxes: BoxRenderer | None = None,
    ):
        if len(plan) == 0:
            raise ValueError("empty blend plan")
        self.sources, self.plan, self.encoder = sources, plan, encoder
        self.seed, self.strict = seed, strict
        self.max_image_pixels, self.max_image_bytes = max_image_pixels, max_image_bytes
        self.max_consecutive_skips = max_consecutive_skips
        self.boxes = boxes
        self.skip_log = SkipLog()

    @property
    def skipped(self) -> Counter:
        """reason -> number of distinct records skipped in this process."""
        return self.skip_log.counts

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, index: int) -> dict:
        """{"input_ids", "labels" (aligned with input_ids, not shifted), "image_positions", "images" (PIL RGB),
        "index" (plan item actually used), "skipped" ({(dataset, record): reason} met while building this sample)}."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range ({len(self)} samples)")
        skipped: dict = {}
        for attempt in range(min(self.max_consecutive_skips, len(self))):
            item = (index + attempt) % len(self)
            sample = self.build_item(item, skipped)
            if sample is not None:
                sample.update(index=item, skipped=skipped)
                return sample
        raise RuntimeError(
            f"{min(self.max_consecutive_skips, len(self))} consecutive samples from index {index} were unusable: "
            f"{dict(Counter(skipped.values()))} (see the warnings for the first file/record of each reason)"
        )

    def _skip(self, error: SampleError, key: tuple, skipped: dict) -> None:
        if self.strict:
            raise error
        self.skip_log.record(error, key)
        skipped[key] = error.reason

    def build_item(self, item: int, skipped: dict | None = None) -> dict | None:
        """Plan item ``item`` as a sample without "index"/"skipped", or None when none of its records is usable.
        Skipped records are counted and added to ``skipped`` ({(dataset, record): reason})."""
        skipped = {} if skipped is None else skipped
        source_id, members = self.plan.item(item)
        source = self.sources[source_id]
        rng = random.Random(f"{self.seed}:{int(self.plan.item_ids[item])}")
        parts: list[Conversation] = []
        keys: list[tuple[int, int]] = []  # (dataset, record) of each part
        decoded: dict = {}  # image ref -> image decoded early (to write boxes)
        for record in members:
            key = (source_id, int(record))
            try:
                conv = source.conversation(key[1], rng)
                parts.append(self._render_boxes(conv, decoded) if has_boxes(conv) else conv)
                keys.append(key)
            except SampleError as e:
                self._skip(e.at(source.where(key[1])), key, skipped)
        while parts:
            conv = Conversation.concat(parts) if len(parts) > 1 else parts[0]
            try:
                encoded = self.encoder.encode(conv)
            except SampleError as e:  # the first round, i.e. the first part's, does not fit
                self._skip(SampleError(e.reason, e.detail, parts[0].origin), keys[0], skipped)
                del parts[0], keys[0]
                continue
            kept = conv.first_rounds(encoded.num_rounds)
            images, failed = [], None
            for rnd, member in zip(kept.rounds, kept.members):
                for ref in rnd.images:
                    try:
                        images.append(decoded[ref] if ref in decoded else self._load(ref))
                    except SampleError as e:
                        failed = member
                        self._skip(e.at(parts[member].origin), keys[member], skipped)
                        break
                if failed is not None:
                    break
            if failed is not None:
                del parts[failed], keys[failed]
                continue
            return {
                "input_ids": torch.tensor(encoded.input_ids, dtype=torch.long),
                "labels": torch.tensor(encoded.labels, dtype=torch.long),
                "image_positions": torch.tensor(encoded.image_positions, dtype=torch.long),
                "images": images,
            }
        return None

    def _load(self, ref):
        return load_image(ref, self.max_image_pixels, self.max_image_bytes)

    def _render_boxes(self, conv: Conversation, decoded: dict) -> Conversation:
        if self.boxes is None:
            raise ValueError(f"{conv.origin}: grounding boxes are written in the frame the vision encoder sees: "
                             f"build the dataset with image_preprocess= (the encoder's ImagePreprocess; validate-data: "
                             f"--vision-encoder)")
        for ref in conv.images:
            if ref not in decoded:
                decoded[ref] = self._load(ref)
        return self.boxes.render(conv, [decoded[ref].size for ref in conv.images])


def build_train_dataset(
    specs: list[DatasetSpec | dict],
    tokenizer,
    *,
    num_image_tokens: int,
    max_seq_len: int,
    template: str | Template = "dsvc",
    max_images_per_sample: int | None = 8,
    seed: int = 1234,
    total_samples: int | None = None,
    eval_fraction: float = 0.0,
    split: str = "train",
    strict: bool = False,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    image_preprocess=None,
    box_outside: str = "clip",
) -> VisualChatDataset:
    """Open every dataset, build the seeded blend plan and return its ``split`` ("train", "eval" or "all").

    ``eval_fraction`` holds out that share of the blended items as "eval" (DS-VisualChat: 0.1 of the mix).
    ``image_preprocess`` (the encoder's ``ImagePreprocess``) is needed by grounding data: boxes are written in the
    template's ``box_format`` (a dataset's ``box_format`` option overrides it), ``box_outside`` per ``boxes.fit_box``.
    """
    splits = ("train", "eval", "all")
    if split not in splits:
        raise ValueError(f"split={split!r} is not one of {list(splits)}")
    specs = [DatasetSpec.coerce(s) for s in specs]
    sources = [open_source(s.format, s.path, **s.options) for s in specs]
    plan = build_blend_plan(specs, [len(s) for s in sources], seed, total_samples)
    if split != "all":
        plan = plan.split(eval_fraction)[0 if split == "train" else 1]
        if len(plan) == 0:
            raise ValueError(f"split='eval' is empty: set eval_fraction > 0 (got {eval_fraction})")
    encoder = ConversationEncoder(
        tokenizer, template, max_seq_len=max_seq_len, num_image_tokens=num_image_tokens,
        max_images=max_images_per_sample,
    )
    boxes = None if image_preprocess is None else BoxRenderer(image_preprocess, encoder.template.box_format,
                                                              box_outside)
    return VisualChatDataset(sources, plan, encoder, seed=seed, strict=strict, max_image_pixels=max_image_pixels,
                             max_image_bytes=max_image_bytes, boxes=boxes)
