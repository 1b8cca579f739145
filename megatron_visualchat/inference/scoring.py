"""Scorers for replayed answers: short answers (exact match, VQA accuracy) and boxes written as text (IoU >= 0.5).

Short answers are compared after VQA-style normalisation: lower case, punctuation dropped (decimal points and
digit-grouping commas kept as numbers), number words zero..ten as digits, articles a/an/the removed, whitespace
collapsed ("Two." == "2"; "the red one" == "red one"). The VQA contraction table is not applied.

Boxes follow InfMLLM's grounding convention: the answer carries ``[x1, y1, x2, y2]`` (also ``(x1, y1), (x2,
y2)``); when all four numbers are <= 1 they are normalised by the image's original width and height, otherwise
pixels. Unlike InfMLLM's regex (which cannot read a coordinate of exactly 1.0 or an integer pixel value) any
number format parses. A hit is IoU >= 0.5 with the reference box (Precision@1).

Grounding-trained models (``docs/grounding.md``) write boxes in the frame their encoder sees, in one of
``data/boxes.py``'s formats: given ``answer_box_format`` and the image's ``geometry`` (``ImagePreprocess.geometry``),
the first box of that format in the answer is read and mapped back through the pad / resize / crop into source
pixels. Every box score carries its IoU, so a summary reports accuracy@IoU>=0.5 and mean IoU (REC).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from megatron_visualchat.data.boxes import parse_boxes, unmap_box

_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_NUMBER = r"-?\d+(?:\.\d+)?"
_BOX = re.compile(rf"({_NUMBER})\s*,\s*({_NUMBER})\s*[\]\)]?\s*,\s*[\[\(]?\s*({_NUMBER})\s*,\s*({_NUMBER})")
BOX_FORMATS = ("pixel", "normalized")
IOU_THRESHOLD = 0.5


@dataclass(frozen=True)
class Score:
    value: float  # in [0, 1]
    detail: str = ""
    iou: Optional[float] = None  # box scores: IoU with the reference (0 when no box was found)


@dataclass(frozen=True)
class ScoreContext:
    """What a scorer may need beyond the texts: the original size (W, H) of the image a box refers to, how the
    reference box is written, and for grounding-trained models the format of the answer's box
    (``data/boxes.BOX_FORMATS``) with the image's ``geometry`` in the encoder."""

    image_size: Optional[tuple[int, int]] = None
    reference_box_format: str = "pixel"
    answer_box_format: Optional[str] = None
    geometry: Optional[object] = None


def normalize_answer(text: str) -> str:
    text = text.lower().replace("\n", " ")
    text = re.sub(r"(?<=\d),(?=\d)", "", text)  # 1,000 -> 1000
    text = re.sub(r"[^\w\s.]", " ", text)
    text = re.sub(r"\.(?!\d)|(?<!\d)\.", " ", text)  # keep only decimal points
    return " ".join(_NUMBER_WORDS.get(w, w) for w in text.split() if w not in _ARTICLES)


def _references(reference) -> list[str]:
    refs = [reference] if isinstance(reference, str) else list(reference or [])
    if not refs or not all(isinstance(r, str) for r in refs):
        raise ValueError(f"a short-answer reference must be a string or a list of strings, got {reference!r}")
    return refs


def exact_match(prediction: str, reference, context: ScoreContext = ScoreContext()) -> Score:
    """1 if the normalised prediction equals any normalised reference."""
    got = normalize_answer(prediction)
    hit = any(got == normalize_answer(r) for r in _references(reference))
    return Score(float(hit), f"normalised answer {got!r}")


def vqa_accuracy(prediction: str, reference, context: ScoreContext = ScoreContext()) -> Score:
    """VQA's min(1, matching human answers / 3). The denominator is min(3, number of references), so one reference
    reduces to exact match; with VQA's 10 answers it is the standard metric."""
    refs = _references(reference)
    got = normalize_answer(prediction)
    matches = sum(got == normalize_answer(r) for r in refs)
    return Score(min(1.0, matches / min(3, len(refs))), f"{matches}/{len(refs)} reference answers match {got!r}")


def parse_box(text: str) -> Optional[tuple[float, float, float, float]]:
    """The first four comma-separated numbers written as a box, or None."""
    m = _BOX.search(text)
    return None if m is None else tuple(float(g) for g in m.groups())


def _to_pixels(box: Sequence[float], normalized: bool, image_size) -> tuple[float, float, float, float]:
    if not normalized:
        return tuple(float(v) for v in box)
    if image_size is None:
        raise ValueError("a normalised box needs the image size to be compared in pixels")
    w, h = image_size
    return (box[0] * w, box[1] * h, box[2] * w, box[3] * h)


def _area(box: Sequence[float]) -> float:
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two (x1, y1, x2, y2) boxes; a box with x2 < x1 or y2 < y1 has no area."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = _area(a) + _area(b) - inter
    return inter / union if union > 0 else 0.0


def box_hit(prediction: str, reference, context: ScoreContext = ScoreContext()) -> Score:
    if context.reference_box_format not in BOX_FORMATS:
        raise ValueError(f"reference box_format={context.reference_box_format!r} is not one of {list(BOX_FORMATS)}")
    if not (isinstance(reference, (list, tuple)) and len(reference) == 4
            and all(isinstance(v, (int, float)) for v in reference)):
        raise ValueError(f"a box reference must be [x1, y1, x2, y2], got {reference!r}")
    target = _to_pixels(reference, context.reference_box_format == "normalized", context.image_size)
    if context.answer_box_format is not None:
        if context.geometry is None:
            raise ValueError(f"a {context.answer_box_format!r} box is read in the encoder's frame: the image's "
                             f"preprocessing geometry is needed")
        size = context.geometry.size
        boxes = parse_boxes(prediction, context.answer_box_format, (size, size))
        predicted = unmap_box(boxes[0], context.geometry) if boxes else None
    else:
        box = parse_box(prediction)
        predicted = None if box is None else _to_pixels(box, all(0.0 <= v <= 1.0 for v in box), context.image_size)
    if predicted is None:
        fmt = context.answer_box_format
        return Score(0.0, f"no {fmt} box in the answer" if fmt else "no box [x1, y1, x2, y2] in the answer", 0.0)
    iou = box_iou(predicted, target)
    return Score(float(iou >= IOU_THRESHOLD), f"IoU {iou:.3f} (predicted {[round(v, 1) for v in predicted]} px)", iou)


SCORERS: dict[str, Callable[[str, object, ScoreContext], Score]] = {
    "exact_match": exact_match,
    "vqa_accuracy": vqa_accuracy,
    "box_iou": box_hit,
}


def get_scorer(name: str) -> Callable[[str, object, ScoreContext], Score]:
    if name not in SCORERS:
        raise ValueError(f"scorer={name!r} is not one of {sorted(SCORERS)}")
    return SCORERS[name]
