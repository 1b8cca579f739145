"""The map-style training dataset: blend plan item -> tokens, labels, ``<image>`` positions and RGB images.

Bad records never stop training: a record that fails (see ``errors.SKIP_REASONS``) is dropped from its
concatenation group, counted in ``dataset.skipped`` and warned about once per reason; if nothing of the item is
left, the next plan item is used instead (deterministically). Counts are of distinct records, keyed by (dataset,
record index), so a bad record met again in a later epoch is not counted again. In ``strict`` mode
(``--strict-data``) the first bad record raises SampleError naming its file and index. Counts in
``dataset.skipped`` are per process; with DataLoader workers read the aggregated ``VisualChatDataLoader.skipped``
(each sample carries the records skipped while building it, as ``skipped``: {(dataset, record): reason}).

Each dataset has an objective (``cm3.OBJECTIVES``, its spec's ``objective``), applied to the encoded sample. CM3
adds up to ``cm3.objective_extra_tokens`` positions, so such a dataset is encoded under ``max_seq_len`` minus that
many: trailing rounds are dropped as usual, and a first round that does not fit is skipped as ``too_long`` with the
reserve named. Datasets whose answers write images as codes (``jsonl_images_out``) need the encoder's tokenizer to
be a ``CodeWritingTokenizer`` (``build_train_dataset(image_codes=...)``).

Grounding records carry box markers (``boxes.py``); their images are decoded before the text is tokenized, since a
box is written in the frame the encoder sees, which depends on the image's size (``boxes``: a ``BoxRenderer``).
"""

from __future__ import annotations

import copy
import random
from collections import Counter

import torch
from torch.utils.data import Dataset

from .blend import BlendPlan, DatasetSpec, build_blend_plan
from .boxes import BoxRenderer, has_boxes
from .cm3 import apply_objective, objective_extra_tokens
from .conversation import Conversation
from .encode import ConversationEncoder
from .errors import SampleError, SkipLog
from .formats import ConversationSource, open_source
from .image_codes import CodeWritingTokenizer, ImageCodeCache
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
        objectives: list[str] | None = None,
    ):
        if len(plan) == 0:
            raise ValueError("empty blend plan")
        self.objectives = objectives or ["next_token"] * len(sources)
        if len(self.objectives) != len(sources):
            raise ValueError(f"need one objective per source, got {len(self.objectives)} for {len(sources)}")
        for source, objective in zip(sources, self.objectives):
            if source.WRITES_IMAGE_CODES and not isinstance(encoder.tokenizer, CodeWritingTokenizer):
                raise ValueError(f"{source.path}: its answers write images as codes: give an image tokenizer "
                                 f"(--image-tokenizer NAME:DIR; build_train_dataset(image_codes=ImageCodeCache(...)))")
            if objective != "next_token" and encoder.tokenizer.image_vocab is None:
                raise ValueError(f"{source.path}: objective {objective!r} needs the image vocabulary's sentinels: "
                                 f"give an image tokenizer (--image-tokenizer NAME:DIR)")
        self._encoders = {o: self._reserving(encoder, objective_extra_tokens(o)) for o in set(self.objectives)}
        self.sources, self.plan, self.encoder = sources, plan, encoder
        self.seed, self.strict = seed, strict
        self.max_image_pixels, self.max_image_bytes = max_image_pixels, max_image_bytes
        self.max_consecutive_skips = max_consecutive_skips
        self.boxes = boxes
        self.skip_log = SkipLog()

    @staticmethod
    def _reserving(encoder: ConversationEncoder, extra: int) -> ConversationEncoder:
        """``encoder`` with ``extra`` positions of ``max_seq_len`` kept free for what the objective adds."""
        if not extra:
            return encoder
        if encoder.max_seq_len <= extra:
            raise ValueError(f"max_seq_len={encoder.max_seq_len} leaves nothing after the {extra} positions the "
                             f"objective may add")
        reserving = copy.copy(encoder)
        reserving.max_seq_len = encoder.max_seq_len - extra
        return reserving

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
        source, objective = self.sources[source_id], self.objectives[source_id]
        encoder = self._encoders[objective]
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
                encoded = encoder.encode(conv)
            except SampleError as e:  # the first round, i.e. the first part's, does not fit
                detail = e.detail
                if e.reason == "too_long" and encoder is not self.encoder:
                    detail += (f" ({self.encoder.max_seq_len - encoder.max_seq_len} positions of "
                               f"{self.encoder.max_seq_len} kept free for objective {objective!r})")
                self._skip(SampleError(e.reason, detail, parts[0].origin), keys[0], skipped)
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
            ids, labels, positions = encoded.input_ids, encoded.labels, encoded.image_positions
            if objective != "next_token":  # moves tokens (never <image>), so the placeholders are found again
                ids, labels = apply_objective(objective, ids, labels, tokenizer=encoder.tokenizer,
                                              seed=rng.getrandbits(63))
                positions = [i for i, t in enumerate(ids) if t == encoder.tokenizer.image_id]
            return {
                "input_ids": torch.tensor(ids, dtype=torch.long),
                "labels": torch.tensor(labels, dtype=torch.long),
                "image_positions": torch.tensor(positions, dtype=torch.long),
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
    image_codes: ImageCodeCache | None = None,
) -> VisualChatDataset:
    """Open every dataset, build the seeded blend plan and return its ``split`` ("train", "eval" or "all").

    ``eval_fraction`` holds out that share of the blended items as "eval" (DS-VisualChat: 0.1 of the mix).
    ``image_preprocess`` (the encoder's ``ImagePreprocess``) is needed by grounding data: boxes are written in the
    template's ``box_format`` (a dataset's ``box_format`` option overrides it), ``box_outside`` per ``boxes.fit_box``.
    ``image_codes`` (the image tokenizer's code cache) lets answers write images as codes (``jsonl_images_out``).
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
    if image_codes is not None:
        tokenizer = CodeWritingTokenizer(tokenizer, image_codes)
    encoder = ConversationEncoder(
        tokenizer, template, max_seq_len=max_seq_len, num_image_tokens=num_image_tokens,
        max_images=max_images_per_sample,
    )
    boxes = None if image_preprocess is None else BoxRenderer(image_preprocess, encoder.template.box_format,
                                                              box_outside)
    return VisualChatDataset(sources, plan, encoder, seed=seed, strict=strict, max_image_pixels=max_image_pixels,
                             max_image_bytes=max_image_bytes, boxes=boxes, objectives=[s.objective for s in specs])
