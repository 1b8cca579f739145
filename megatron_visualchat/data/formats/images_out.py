"""``jsonl_images_out``: the ``jsonl`` format plus images the answer *writes* (as VQ codes, ``data/image_codes.py``).

A round may list ``"output_images": ["gen/a.png", ...]`` (files under ``images``); its answer names each exactly once
as ``OUTPUT#k`` (1-based within the round). The reader puts a marker for each in the answer text; only
``CodeWritingTokenizer`` can encode it (as ``<boi> codes <eoi>``), so datasets refuse this format without an image
tokenizer (``WRITES_IMAGE_CODES``) rather than tokenize the markers as text.
"""

from __future__ import annotations

import dataclasses
import re

from ..images import FileImage
from .base import fail
from .rounds_jsonl import RoundsJsonlSource

# private-use characters, never in real text (conversation.py's image references use U+E000/1, boxes.py U+E002/3)
_OUT_OPEN, _OUT_SEP, _OUT_CLOSE = "\ue004", "\ue005", "\ue006"
OUTPUT_PATTERN = re.compile(f"{_OUT_OPEN}([^{_OUT_SEP}]*){_OUT_SEP}([^{_OUT_CLOSE}]*){_OUT_CLOSE}")
_LOCAL_OUTPUT = re.compile(r"OUTPUT#(\d+)")


def output_image_marker(image: FileImage) -> str:
    """The marker for an image the answer writes as codes (an image file, confined to ``root`` when set)."""
    return f"{_OUT_OPEN}{image.path}{_OUT_SEP}{image.root or ''}{_OUT_CLOSE}"


def output_images(text: str) -> list[FileImage]:
    return [FileImage(m.group(1), m.group(2) or None) for m in OUTPUT_PATTERN.finditer(text)]


class ImageOutputJsonlSource(RoundsJsonlSource):
    """The ``jsonl`` format plus images in answers (``output_images`` per round, ``OUTPUT#k`` in the answer)."""

    WRITES_IMAGE_CODES = True

    def _rounds(self, index, rng):
        rounds = super()._rounds(index, rng)
        record = self.records.get(index)
        out = []
        for number, (r, item) in enumerate(zip(rounds, record["rounds"]), start=1):
            listed = item.get("output_images", [])
            if not isinstance(listed, list) or not all(isinstance(e, str) and e for e in listed):
                fail("malformed_conversation", f"round {number}: 'output_images' must be a list of file paths")
            refs = [int(m.group(1)) for m in _LOCAL_OUTPUT.finditer(r.answer)]
            if sorted(refs) != list(range(1, len(listed) + 1)):
                fail("malformed_conversation", f"round {number}: the answer must name each of its {len(listed)} "
                     f"output image(s) once as OUTPUT#1..OUTPUT#{len(listed)}, found {refs}")
            images = [self.store.ref(e) for e in listed]
            if not all(isinstance(i, FileImage) for i in images):
                fail("malformed_conversation", f"round {number}: output images must be files, not a base64 store")
            answer = _LOCAL_OUTPUT.sub(lambda m: output_image_marker(images[int(m.group(1)) - 1]), r.answer)
            out.append(dataclasses.replace(r, answer=answer))
        return out
