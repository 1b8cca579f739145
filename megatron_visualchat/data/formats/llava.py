"""LLaVA instruction JSON (``.json`` array or ``.jsonl``), single- and multi-image.

Record: ``{"image": "a.jpg" | ["a.jpg", "b.jpg"], "conversations": [{"from": "human", "value": "<image>\\n..."},
{"from": "gpt", "value": "..."}, ...]}``. The k-th ``<image>`` placeholder in the human turns is the k-th listed
image and is shown (with its ``### Image k:`` header) at the start of the round it appears in; the placeholders are
removed from the question text. A record without "image" and without placeholders is a text-only sample.
DS-VisualChat's ``llava`` loader (first round only of detail_23k / complex_reasoning_77k) is ``max_rounds=1``.
"""

from __future__ import annotations

from .base import RecordsSource, fail, make_round, remove_placeholders, turn_pairs


class LlavaSource(RecordsSource):
    """``images``: image directory / base64 store (default: the annotation file's directory)."""

    def image_names(self, index: int) -> list[str]:
        """The record's image names as listed (for cross-dataset matching); [] if malformed."""
        try:
            names = self.records.get(index).get("image", [])
        except ValueError:
            return []
        names = [names] if isinstance(names, str) else names
        return [n for n in names if isinstance(n, str)] if isinstance(names, list) else []

    def _rounds(self, index, rng):
        record = self.records.get(index)
        names = record.get("image", [])
        names = [names] if isinstance(names, str) else names
        if not isinstance(names, list) or not all(isinstance(n, (str, int)) for n in names):
            fail("malformed_conversation", f"'image' must be a string or a list of strings, got {names!r}")
        pairs = turn_pairs(record.get("conversations"), "from", "value")
        rounds, used = [], 0
        for number, (user, assistant) in enumerate(pairs, start=1):
            question, count = remove_placeholders(user["value"])
            if remove_placeholders(assistant["value"])[1]:
                fail("image_count_mismatch", f"round {number}: <image> placeholder in the answer")
            images = tuple(self.store.ref(n) for n in names[used : used + count])
            if len(images) != count:
                break
            used += count
            rounds.append(make_round(question, assistant["value"], images, number))
        total = sum(remove_placeholders(u["value"])[1] for u, _ in pairs)
        if total != len(names):
            fail("image_count_mismatch", f"{total} <image> placeholder(s) but {len(names)} image(s) listed")
        return rounds
