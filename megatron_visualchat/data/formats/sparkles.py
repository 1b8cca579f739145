"""SparklesDialogue (CC / VG) annotation files.

Record: ``{"dialogue": [{"role": "user", "content": "... IMAGE#804 ... IMAGE#14 ...", "images": [{"image_id": 804},
{"image_id": 14}]}, {"role": "assistant", "content": "..."}, ...]}`` with images at ``images/{image_id}.jpg``.
Each ``IMAGE#id`` becomes a reference to that image, rendered with the image's final number ("image 3"), so the
text keeps agreeing with the ``### Image k:`` headers even after concatenation. (DS-VisualChat substitutes a random
tag style, "image a" / "the first image", which no header matches.) Sparkles' ``<Img><ImageHere></Img>`` markers
are removed.
"""

from __future__ import annotations

import re

from ..conversation import image_ref
from .base import RecordsSource, fail, make_round, turn_pairs

SPARKLES_IMAGE_MARKER = "<Img><ImageHere></Img>"
_IMAGE_TAG = re.compile(r"IMAGE#(\w+)")  # \w+ is greedy, so IMAGE#1417 never matches as IMAGE#14


class SparklesSource(RecordsSource):
    default_image_filename = "{id}.jpg"

    def _rounds(self, index, rng):
        pairs = turn_pairs(self.records.get(index).get("dialogue"), "role", "content")
        positions: dict[str, int] = {}  # image id -> index within the conversation

        def tags_to_refs(text: str, number: int) -> str:
            def sub(match):
                if match.group(1) not in positions:
                    fail("malformed_conversation", f"round {number} mentions IMAGE#{match.group(1)} before it is shown")
                return image_ref(positions[match.group(1)])

            return _IMAGE_TAG.sub(sub, text.replace(SPARKLES_IMAGE_MARKER, ""))

        rounds = []
        for number, (user, assistant) in enumerate(pairs, start=1):
            if assistant.get("images"):
                fail("malformed_conversation", f"round {number}: the assistant turn lists images")
            listed = user.get("images", [])
            if not isinstance(listed, list) or not all(isinstance(i, dict) and "image_id" in i for i in listed):
                fail("malformed_conversation", f"round {number}: 'images' must be a list of {{'image_id': ...}}")
            images = []
            for item in listed:
                image_id = str(item["image_id"])
                if image_id in positions:
                    fail("malformed_conversation", f"round {number} shows IMAGE#{image_id} a second time")
                positions[image_id] = len(positions)
                images.append(self.store.ref(image_id))
            question = tags_to_refs(user["content"], number)
            rounds.append(make_round(question, tags_to_refs(assistant["content"], number), tuple(images), number))
        return rounds
