"""Grounding annotations: referring expressions / region captions, and conversations with boxes in the text.

``refexp`` (RefCOCO/+/g, Visual Genome regions, converted to JSON): one object per region,
``{"image": "COCO_train2014_000000000009.jpg", "bbox": [x, y, w, h], "expression": "the man on the left"}``
(COCO pixels of the source image; ``"expressions": [...]`` or RefCOCO's ``"sentences": [{"sent": ...}, ...]`` for
several). ``tasks`` picks the rounds: ``rec`` (expression -> box, one round per expression) and/or ``reg`` (box ->
the first expression), e.g. ``"rec,reg"``.

``grounded_chat`` (Shikra / MiniGPT-v2 style, grounded captions): LLaVA-like ``{"image": "a.jpg", "conversations":
[...], "boxes": [[x1, y1, x2, y2], ...]}`` with source-pixel boxes; each ``<boxes>`` placeholder in a turn takes the
boxes listed by the next entry of ``"boxes_seq"`` (``[[0], [1, 2]]``), or the next box when there is no
``boxes_seq``. Boxes written inline as ``[x1,y1,x2,y2]`` are read too (``inline_boxes``: ``normalized`` by the
source size, the default, ``pixel``, or ``none`` to leave such text alone).

Boxes become markers (``data/boxes.py``) that the dataset writes in the encoder frame, in the dataset's
``box_format`` option or else the template's. Pickled annotations (RefCOCO's ``refs(unc).p``) are refused:
unpickling runs code; docs/grounding.md has the few lines that convert them, to run once on files you trust.
"""

from __future__ import annotations

import os

from ..boxes import BOX_FORMATS, box_marker, check_box, get_box_format
from .base import RecordsSource, fail, make_round, remove_placeholders, turn_pairs

REC_PROMPT = "Where is {expression}? Answer with its box."
REG_PROMPT = "What is in the box {box}? Answer in a few words."
TASKS = ("rec", "reg")
INLINE_BOXES = ("normalized", "pixel", "none")
BOXES_PLACEHOLDER = "<boxes>"
_INLINE = BOX_FORMATS["norm3"].pattern  # "[x1, y1, x2, y2]": the same spelling whatever the unit
_PICKLE_SUFFIXES = (".p", ".pkl", ".pickle")


def refuse_pickle(path: str) -> None:
    """A pickle (by name or by its protocol-2+ header) is refused before anything reads it as data."""
    with open(path, "rb") as f:
        head = f.read(1)
    if path.lower().endswith(_PICKLE_SUFFIXES) or head == b"\x80":
        raise ValueError(f"{path}: a Python pickle; it is not read (unpickling runs code). Convert it once, on a "
                         f"file you trust, to the JSON this reader takes: see 'Converting RefCOCO' in "
                         f"docs/grounding.md")


class _GroundingSource(RecordsSource):
    def __init__(self, path: str, *, box_format: str | None = None, **kwargs):
        if os.path.isfile(path):
            refuse_pickle(path)
        super().__init__(path, **kwargs)
        self.box_format = box_format
        if box_format is not None:
            get_box_format(box_format)

    def _image(self, record: dict):
        name = record.get("image", record.get("file_name"))
        if not isinstance(name, (str, int)) or name == "":
            fail("malformed_conversation", f"'image' must name one image file, got {name!r:.80}")
        return self.store.ref(str(name))

    def _marker(self, box, normalized: bool = False) -> str:
        return box_marker(0, box, normalized=normalized, box_format=self.box_format)


class RefExpSource(_GroundingSource):
    def __init__(self, path: str, *, tasks: str | list = "rec", rec_prompt: str = REC_PROMPT,
                 reg_prompt: str = REG_PROMPT, **kwargs):
        super().__init__(path, **kwargs)
        self.tasks = tuple(t.strip() for t in tasks.split(",")) if isinstance(tasks, str) else tuple(tasks)
        if not self.tasks or any(t not in TASKS for t in self.tasks):
            raise ValueError(f"tasks={tasks!r}: a comma list of {list(TASKS)}")
        if "{expression}" not in rec_prompt or "{box}" not in reg_prompt:
            raise ValueError("rec_prompt needs '{expression}' and reg_prompt needs '{box}'")
        self.rec_prompt, self.reg_prompt = rec_prompt, reg_prompt

    def _rounds(self, index, rng):
        record = self.records.get(index)
        bbox = record.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4):
            fail("malformed_conversation", f"'bbox' must be [x, y, w, h] in pixels, got {bbox!r:.80}")
        x, y, w, h = check_box([bbox[0], bbox[1], bbox[0] + bbox[2], bbox[1] + bbox[3]], "'bbox' [x, y, w, h]")
        box = self._marker((x, y, w, h))
        expressions = _expressions(record)
        rounds = []
        for task in self.tasks:
            pairs = ([(self.rec_prompt.format(expression=e), box) for e in expressions] if task == "rec"
                     else [(self.reg_prompt.format(box=box), expressions[0])])
            for question, answer in pairs:
                rounds.append(make_round(question, answer, () if rounds else (self._image(record),), len(rounds) + 1))
        return rounds


def _expressions(record: dict) -> list[str]:
    if "expression" in record:
        found = [record["expression"]]
    else:
        found = record.get("expressions", record.get("sentences"))
        found = [s.get("sent") if isinstance(s, dict) else s for s in found] if isinstance(found, list) else None
    if not found or not all(isinstance(e, str) and e.strip() for e in found):
        fail("malformed_conversation", "needs 'expression' (a string), or 'expressions' / 'sentences' (a list of "
                                       "strings or {'sent': ...})")
    return [e.strip() for e in found]


class GroundedChatSource(_GroundingSource):
    def __init__(self, path: str, *, inline_boxes: str = "normalized", **kwargs):
        super().__init__(path, **kwargs)
        if inline_boxes not in INLINE_BOXES:
            raise ValueError(f"inline_boxes={inline_boxes!r} is not one of {list(INLINE_BOXES)}")
        self.inline_boxes = inline_boxes

    def _rounds(self, index, rng):
        record = self.records.get(index)
        boxes = record.get("boxes", [])
        if not isinstance(boxes, list):
            fail("malformed_conversation", f"'boxes' must be a list of [x1, y1, x2, y2], got {boxes!r:.80}")
        boxes = [check_box(b, f"boxes[{k}]") for k, b in enumerate(boxes)]
        seq = record.get("boxes_seq", [[k] for k in range(len(boxes))])
        if not (isinstance(seq, list) and all(isinstance(s, list) and all(isinstance(i, int) and 0 <= i < len(boxes)
                                                                            for i in s) for s in seq)):
            fail("malformed_conversation", f"'boxes_seq' must list indices into 'boxes' ({len(boxes)} boxes)")
        placeholders = iter(seq)
        rounds = []
        for number, (user, assistant) in enumerate(turn_pairs(record.get("conversations"), "from", "value"), 1):
            question = self._boxes_in(remove_placeholders(user["value"])[0], placeholders, boxes)
            answer = self._boxes_in(assistant["value"], placeholders, boxes)
            rounds.append(make_round(question, answer, (self._image(record),) if number == 1 else (), number))
        if next(placeholders, None) is not None:
            fail("malformed_conversation", f"more 'boxes_seq' entries than {BOXES_PLACEHOLDER} placeholders")
        return rounds

    def _boxes_in(self, text: str, placeholders, boxes) -> str:
        if self.inline_boxes != "none":
            normalized = self.inline_boxes == "normalized"

            def inline(m):
                box = check_box([float(g) for g in m.groups()], f"inline box {m.group(0)}")
                if normalized and max(box) > 1:
                    fail("malformed_conversation", f"inline box {m.group(0)} is not normalised (0..1); set the "
                                                   f"dataset option inline_boxes='pixel' for pixel boxes")
                return self._marker(box, normalized)

            text = _INLINE.sub(inline, text)
        parts = text.split(BOXES_PLACEHOLDER)
        out = [parts[0]]
        for part in parts[1:]:
            indices = next(placeholders, None)
            if indices is None:
                fail("malformed_conversation", f"more {BOXES_PLACEHOLDER} placeholders than 'boxes_seq' entries")
            out.append(" ".join(self._marker(boxes[i]) for i in indices) + part)
        return "".join(out)


__all__ = ["GroundedChatSource", "RefExpSource", "refuse_pickle"]
