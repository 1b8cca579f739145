"""The map-style training dataset: blend plan item -> tokens, labels, ``<image>`` positions and RGB images.

Bad records never stop training: a record that fails (see ``errors.SKIP_REASONS``) is dropped from its
concatenation group, counted in ``dataset.skipped`` and warned about once per reason; if nothing of the item is
left, the next plan item is used instead (deterministically). In ``strict`` mode (validation) the first bad record
raises SampleError naming its file and index. Counts in ``dataset.skipped`` are per process; with DataLoader
workers read the aggregated ``VisualChatDataLoader.skipped`` (each sample also carries its own ``skipped`` dict).
"""

from __future__ import annotations

import random
from collections import Counter

import torch
from torch.utils.data import Dataset

from .blend import BlendPlan, DatasetSpec, build_blend_plan
from .conversation import Conversation
from .encode import ConversationEncoder
from .errors import SampleError, SkipLog
from .formats import ConversationSource, open_source
from .images import DEFAULT_MAX_IMAGE_PIXELS, load_image
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
        max_consecutive_skips: int = 1000,
    ):
        if len(plan) == 0:
            raise ValueError("empty blend plan")
        self.sources, self.plan, self.encoder = sources, plan, encoder
        self.seed, self.strict = seed, strict
        self.max_image_pixels = max_image_pixels
        self.max_consecutive_skips = max_consecutive_skips
        self._log = SkipLog()

    @property
    def skipped(self) -> Counter:
        """reason -> number of records skipped in this process."""
        return self._log.counts

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, index: int) -> dict:
        """{"input_ids", "labels" (aligned with input_ids, not shifted), "image_positions", "images" (PIL RGB),
        "index" (plan item actually used), "skipped" (reason -> count met while building this sample)}."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range ({len(self)} samples)")
        skipped: Counter = Counter()
        for attempt in range(min(self.max_consecutive_skips, len(self))):
            item = (index + attempt) % len(self)
            sample = self._build(item, skipped)
            if sample is not None:
                sample.update(index=item, skipped=dict(skipped))
                return sample
        raise RuntimeError(
            f"{min(self.max_consecutive_skips, len(self))} consecutive samples from index {index} were unusable: "
            f"{dict(skipped)} (see the warnings for the first file/record of each reason)"
        )

    def _skip(self, error: SampleError, skipped: Counter) -> None:
        if self.strict:
            raise error
        self._log.record(error)
        skipped[error.reason] += 1

    def _build(self, item: int, skipped: Counter) -> dict | None:
        source_id, members = self.plan.item(item)
        source = self.sources[source_id]
        rng = random.Random(f"{self.seed}:{int(self.plan.item_ids[item])}")
        parts: list[Conversation] = []
        for record in members:
            try:
                parts.append(source.conversation(int(record), rng))
            except SampleError as e:
                self._skip(e, skipped)
        while parts:
            conv = Conversation.concat(parts) if len(parts) > 1 else parts[0]
            try:
                encoded = self.encoder.encode(conv)
            except SampleError as e:  # the first round, i.e. the first part's, does not fit
                self._skip(SampleError(e.reason, e.detail, parts[0].origin), skipped)
                parts.pop(0)
                continue
            kept = conv.first_rounds(encoded.num_rounds)
            images, failed = [], None
            for rnd, member in zip(kept.rounds, kept.members):
                for ref in rnd.images:
                    try:
                        images.append(load_image(ref, self.max_image_pixels))
                    except SampleError as e:
                        failed = member
                        self._skip(e.at(parts[member].origin), skipped)
                        break
                if failed is not None:
                    break
            if failed is not None:
                parts.pop(failed)
                continue
            return {
                "input_ids": torch.tensor(encoded.input_ids, dtype=torch.long),
                "labels": torch.tensor(encoded.labels, dtype=torch.long),
                "image_positions": torch.tensor(encoded.image_positions, dtype=torch.long),
                "images": images,
            }
        return None


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
) -> VisualChatDataset:
    """Open every dataset, build the seeded blend plan and return its ``split`` ("train", "eval" or "all").

    ``eval_fraction`` holds out that share of the blended items as "eval" (DS-VisualChat: 0.1 of the mix).
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
    return VisualChatDataset(sources, plan, encoder, seed=seed, strict=strict, max_image_pixels=max_image_pixels)
