"""The project's plain format: one JSON object per line, rounds with their images listed explicitly.

``{"id": "...", "rounds": [{"images": ["img/a.png", {"base64": "..."}], "question": "...", "answer": "..."}, ...]}``

* An image entry is a path (relative to ``images``, default the JSONL's directory; or an id in a base64 TSV/JSON
  store given as ``images``) or ``{"base64": "<data>"}`` inline.
* ``IMAGE#k`` in a question or answer refers to the sample's k-th image (1-based, in order of appearance) and is
  rendered with that image's final number, so it survives concatenation ("IMAGE#2" -> "image 5").
* ``<image>`` placeholders in a question are optional; when present their count must equal the round's images.
"""

from __future__ import annotations

import re

from ..conversation import image_ref
from ..images import InlineImage
from .base import RecordsSource, fail, make_round, remove_placeholders

_LOCAL_REF = re.compile(r"IMAGE#(\d+)")


class RoundsJsonlSource(RecordsSource):
    def _image(self, entry, label: str):
        if isinstance(entry, str) and entry:
            return self.store.ref(entry)
        if isinstance(entry, dict) and isinstance(entry.get("base64"), str):
            return InlineImage(entry["base64"], label)
        fail("malformed_conversation", f"{label}: expected a path string or {{'base64': ...}}, got {entry!r:.80}")

    def _rounds(self, index, rng):
        record = self.records.get(index)
        rounds_in = record.get("rounds")
        if not isinstance(rounds_in, list):
            fail("malformed_conversation", "'rounds' must be a JSON array")
        rounds = []
        for number, item in enumerate(rounds_in, start=1):
            if not isinstance(item, dict):
                fail("malformed_conversation", f"round {number} is {type(item).__name__}, expected an object")
            question, answer, listed = item.get("question"), item.get("answer"), item.get("images", [])
            if not isinstance(question, str) or not isinstance(answer, str) or not isinstance(listed, list):
                fail("malformed_conversation", f"round {number} needs string question/answer and a list 'images'")
            if item.get("output_images") and not self.WRITES_IMAGE_CODES:
                fail("malformed_conversation", f"round {number} lists 'output_images', which this format would "
                     f"train as the literal text OUTPUT#k: read the file as jsonl_images_out (with --image-tokenizer)")
            question, placeholders = remove_placeholders(question)
            if placeholders and placeholders != len(listed):
                fail("image_count_mismatch",
                     f"round {number}: {placeholders} <image> placeholder(s) but {len(listed)} image(s)")
            label = f"{record.get('id', index)}:round {number}"
            images = tuple(self._image(e, f"{label}:image {k}") for k, e in enumerate(listed, start=1))
            rounds.append(make_round(_to_refs(question, number), _to_refs(answer, number), images, number))
        return rounds  # the base class checks that every reference points to an image already shown


def _to_refs(text: str, number: int) -> str:
    def sub(match):
        if int(match.group(1)) < 1:
            fail("malformed_conversation", f"round {number}: IMAGE#{match.group(1)} (numbering starts at 1)")
        return image_ref(int(match.group(1)) - 1)

    return _LOCAL_REF.sub(sub, text)
