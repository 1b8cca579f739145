"""Boxes in text (visual grounding, InfMLLM / Shikra style): the model reads and writes boxes as plain text.

Three things live here:

* ``BOX_FORMATS``: how a box is spelled. ``norm3`` ``[0.125,0.250,0.500,0.750]`` (normalised, 3 decimals; Shikra,
  InfMLLM), ``qwen`` ``<box>(125,250),(500,750)</box>`` (Qwen-VL's 0..1000 integer grid), ``pixel``
  ``[16,32,64,96]`` (integer pixels). Every format writes and parses boxes in the *frame* the model sees: the
  encoder's S x S input after pad / resize / crop. ``parse`` finds every box of its format in free text.
* Box markers: readers do not know the image size or the transform, so they put ``box_marker(image, box)`` into
  question / answer text: the box in the *source* image (pixels, or normalised by the source size) and the image it
  belongs to. Markers contain the image's reference marker, so concatenation renumbers them like any reference.
* ``BoxRenderer``: once the images are decoded, maps every marker's box through ``ImagePreprocess.geometry`` of its
  image (the same parameters the pixels go through) and writes it in the chosen format. A box the crop cuts is
  clipped to the frame, or refused (``box_outside``, skipped and counted like any bad record) per ``--box-outside``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Callable, Optional, Sequence

from .conversation import Conversation, image_ref, referenced_images
from .errors import SampleError

Box = tuple[float, float, float, float]  # (x1, y1, x2, y2), continuous coordinates (pixel edges)

BOX_OUTSIDE = ("clip", "skip")
_NUM = r"-?\d+(?:\.\d+)?"


def _numbers(match: re.Match, first: int = 1) -> Box:
    return tuple(float(match.group(k)) for k in range(first, first + 4))  # type: ignore[return-value]


@dataclass(frozen=True)
class BoxFormat:
    """One spelling of a box: ``write`` and ``pattern`` (4 groups) both in ``unit``s of the frame's side (1 =
    normalised, 1000 = Qwen's grid, None = the frame's pixels)."""

    name: str
    write: Callable[[Sequence[float]], str]
    pattern: re.Pattern
    unit: Optional[float]

    def _scale(self, size: tuple[int, int]) -> tuple[float, float]:
        return (float(size[0]), float(size[1])) if self.unit is None else (self.unit, self.unit)

    def format(self, box: Sequence[float], size: tuple[int, int]) -> str:
        """``box`` in pixels of a ``size`` = (W, H) frame, as text."""
        sx, sy = self._scale(size)
        return self.write((box[0] / size[0] * sx, box[1] / size[1] * sy, box[2] / size[0] * sx, box[3] / size[1] * sy))

    def parse(self, text: str, size: tuple[int, int]) -> list[Box]:
        """Every box of this format in ``text`` (free text around them is ignored), in pixels of the frame."""
        sx, sy = self._scale(size)
        return [(b[0] * size[0] / sx, b[1] * size[1] / sy, b[2] * size[0] / sx, b[3] * size[1] / sy)
                for b in map(_numbers, self.pattern.finditer(text))]


def _grid(v: float, top: int) -> int:
    return min(top, max(0, int(round(v))))


BOX_FORMATS: dict[str, BoxFormat] = {
    "norm3": BoxFormat(
        "norm3", lambda b: "[" + ",".join(f"{min(1.0, max(0.0, v)):.3f}" for v in b) + "]",
        re.compile(rf"\[\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*\]"), 1.0),
    "qwen": BoxFormat(
        "qwen", lambda b: "<box>({},{}),({},{})</box>".format(*(_grid(v, 1000) for v in b)),
        re.compile(rf"<box>\s*\(\s*({_NUM})\s*,\s*({_NUM})\s*\)\s*,\s*\(\s*({_NUM})\s*,\s*({_NUM})\s*\)\s*</box>"),
        1000.0),
    "pixel": BoxFormat(
        "pixel", lambda b: "[" + ",".join(str(int(round(v))) for v in b) + "]",
        re.compile(rf"\[\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*\]"), None),
}


def get_box_format(name: str) -> BoxFormat:
    if name not in BOX_FORMATS:
        raise ValueError(f"box format {name!r} is not one of {sorted(BOX_FORMATS)}")
    return BOX_FORMATS[name]


def parse_boxes(text: str, fmt: str, size: tuple[int, int]) -> list[Box]:
    """Every ``fmt`` box in free ``text``, in pixels of the ``size`` = (W, H) frame."""
    return get_box_format(fmt).parse(text, size)


# ---- mapping through the image transform -------------------------------------------------------------------------

def map_box(box: Sequence[float], geometry) -> Box:
    """A source-pixel box in the encoder frame of ``geometry`` (``ImagePreprocess.geometry``), unclipped."""
    x1, y1 = geometry.to_output(box[0], box[1])
    x2, y2 = geometry.to_output(box[2], box[3])
    return (x1, y1, x2, y2)


def unmap_box(box: Sequence[float], geometry) -> Box:
    """A frame box back in source pixels (for scoring against references given in the source image)."""
    x1, y1 = geometry.to_source(box[0], box[1])
    x2, y2 = geometry.to_source(box[2], box[3])
    return (x1, y1, x2, y2)


def fit_box(box: Sequence[float], size: int, outside: str) -> Box:
    """``box`` (frame pixels) inside the ``size`` x ``size`` frame: clipped (``clip``), or refused with
    ``box_outside`` when the crop cuts any of it (``skip``) or all of it (``clip``)."""
    if outside not in BOX_OUTSIDE:
        raise ValueError(f"box_outside={outside!r} is not one of {list(BOX_OUTSIDE)}")
    eps = 1e-6 * size
    inside = box[0] >= -eps and box[1] >= -eps and box[2] <= size + eps and box[3] <= size + eps
    clipped = tuple(min(float(size), max(0.0, v)) for v in box)
    if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
        raise SampleError("box_outside", f"box {[round(v, 1) for v in box]} lies outside the {size}x{size} image "
                                         f"the encoder sees (cropped away); use a pad/squash resize for grounding")
    if not inside and outside == "skip":
        raise SampleError("box_outside", f"box {[round(v, 1) for v in box]} is cut by the {size}x{size} crop "
                                         f"(--box-outside skip; 'clip' keeps the visible part)")
    return clipped  # type: ignore[return-value]


# ---- markers in conversation text --------------------------------------------------------------------------------

_OPEN, _CLOSE = "\ue002", "\ue003"  # private use, like conversation.py's image reference markers
_MARKER = re.compile(f"{_OPEN}(\ue000\\d+\ue001)(px|n)\\|([a-z0-9]*)\\|({_NUM}),({_NUM}),({_NUM}),({_NUM}){_CLOSE}")


def check_box(box, label: str) -> Box:
    """``box`` as 4 floats with x1 < x2 and y1 < y2, else SampleError (malformed_conversation) naming ``label``."""
    if not (isinstance(box, (list, tuple)) and len(box) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)):
        raise SampleError("malformed_conversation", f"{label}: a box is 4 numbers, got {box!r:.80}")
    if not (box[0] < box[2] and box[1] < box[3]) or min(box) < 0:
        raise SampleError("malformed_conversation", f"{label}: box {list(box)} needs 0 <= x1 < x2 and 0 <= y1 < y2")
    return tuple(float(v) for v in box)  # type: ignore[return-value]


def box_marker(image_index: int, box: Sequence[float], *, normalized: bool = False,
               box_format: Optional[str] = None) -> str:
    """A box of the conversation's ``image_index``-th (0-based) image, in source pixels (or normalised by the
    source size). ``box_format`` overrides the template's format for this box."""
    if box_format is not None:
        get_box_format(box_format)
    coords = ",".join(f"{float(v):.6f}" for v in box)
    return f"{_OPEN}{image_ref(image_index)}{'n' if normalized else 'px'}|{box_format or ''}|{coords}{_CLOSE}"


def has_boxes(conv: Conversation) -> bool:
    return any(_OPEN in r.question or _OPEN in (r.answer or "") for r in conv.rounds)


@dataclass(frozen=True)
class BoxRenderer:
    """Writes a conversation's box markers as text in the encoder frame. ``preprocess``: the encoder's
    ``ImagePreprocess`` (the same one the collator's transform uses); ``box_format``: the default format (a
    marker may name its own, from its dataset); ``outside``: ``clip`` or ``skip`` (see ``fit_box``)."""

    preprocess: object
    box_format: str = "norm3"
    outside: str = "clip"

    def __post_init__(self):
        get_box_format(self.box_format)
        if self.outside not in BOX_OUTSIDE:
            raise ValueError(f"box_outside={self.outside!r} is not one of {list(BOX_OUTSIDE)}")

    def frame_box(self, box: Sequence[float], image_size: tuple[int, int], normalized: bool = False) -> Box:
        """A source box (pixels, or normalised by ``image_size``) in the frame, fitted per ``outside``."""
        w, h = image_size
        if normalized:
            box = (box[0] * w, box[1] * h, box[2] * w, box[3] * h)
        g = self.preprocess.geometry(w, h)
        return fit_box(map_box(box, g), g.size, self.outside)

    def text(self, text: str, image_sizes: Sequence[tuple[int, int]]) -> str:
        size = self.preprocess.image_size

        def sub(m: re.Match) -> str:
            (index,) = referenced_images(m.group(1))
            if index >= len(image_sizes):
                raise SampleError("malformed_conversation", f"a box refers to image {index + 1} but the "
                                                            f"conversation has {len(image_sizes)} image(s)")
            box = self.frame_box(_numbers(m, first=4), image_sizes[index], m.group(2) == "n")
            return get_box_format(m.group(3) or self.box_format).format(box, (size, size))

        return _MARKER.sub(sub, text)

    def render(self, conv: Conversation, image_sizes: Sequence[tuple[int, int]]) -> Conversation:
        """``conv`` with every box marker written out; ``image_sizes`` are the (W, H) of ``conv.images``."""
        rounds = tuple(replace(r, question=self.text(r.question, image_sizes),
                               answer=None if r.answer is None else self.text(r.answer, image_sizes))
                       for r in conv.rounds)
        return replace(conv, rounds=rounds)


__all__ = ["BOX_FORMATS", "BOX_OUTSIDE", "Box", "BoxFormat", "BoxRenderer", "box_marker", "check_box", "fit_box",
           "get_box_format", "has_boxes", "map_box", "parse_boxes", "unmap_box"]
