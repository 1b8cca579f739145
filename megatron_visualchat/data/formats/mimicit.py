"""MIMIC-IT (Otter) instruction files: ``{"meta": ..., "data": {INS_ID: {"instruction", "answer", "image_ids",
"rel_ins_ids"}}}`` with images referenced by id.

As in DS-VisualChat, related instructions are merged into one multi-round sample in a single pass (an instruction
starts a group with its not-yet-used ``rel_ins_ids``) and all of the first instruction's images are shown in round
1. Rounds keep file order (DS-VisualChat shuffles them on every access; we keep samples deterministic).
Images come from ``images``: a directory (``image_filename``, e.g. ``"{id_suffix}.jpg"`` for CGD's COCO files),
a base64 TSV, or MIMIC-IT's base64 JSON map (``SD.json``...), indexed by byte offset and read lazily.
"""

from __future__ import annotations

from ..lazy import PackedRecords, load_json
from .base import ConversationSource, fail, image_store_for, make_round, remove_placeholders


def merge_related(data: dict) -> list[tuple[str, list]]:
    """[(first id, [instruction entries])]: one group per instruction not already merged into an earlier group."""
    used, groups = set(), []
    for key, entry in data.items():
        if key in used:
            continue
        used.add(key)
        members = [entry]
        related = entry.get("rel_ins_ids", []) if isinstance(entry, dict) else []
        for rel in related if isinstance(related, list) else []:
            if isinstance(rel, str) and rel in data and rel not in used:
                used.add(rel)
                members.append(data[rel])
        groups.append((key, members))
    return groups


class MimicItSource(ConversationSource):
    def __init__(self, path: str, *, images: str | None = None, image_filename: str = "{id}", max_rounds=None):
        super().__init__(path, max_rounds=max_rounds)
        document = load_json(path)
        data = document.get("data") if isinstance(document, dict) else None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a MIMIC-IT instruction file with a 'data' object")
        groups = merge_related(data)
        self.records = PackedRecords(({"turns": m} for _, m in groups), path, [f"data[{k}]" for k, _ in groups])
        self.store = image_store_for(path, images, image_filename)

    def __len__(self):
        return len(self.records)

    def where(self, index):
        return self.records.where(index)

    def image_ids(self, index: int) -> list[str]:
        """The group's image ids ([] when malformed)."""
        first = self.records.get(index)["turns"][0]
        ids = first.get("image_ids", []) if isinstance(first, dict) else []
        return [str(i) for i in ids] if isinstance(ids, list) else []

    def _rounds(self, index, rng):
        rounds = []
        for number, entry in enumerate(self.records.get(index)["turns"], start=1):
            if not isinstance(entry, dict):
                fail("malformed_conversation", f"instruction {number} is {type(entry).__name__}, expected an object")
            question, answer = entry.get("instruction"), entry.get("answer")
            if not isinstance(question, str) or not isinstance(answer, str):
                fail("malformed_conversation", f"instruction {number} lacks string 'instruction'/'answer'")
            ids = entry.get("image_ids", [])
            if not isinstance(ids, list):
                fail("malformed_conversation", f"instruction {number}: 'image_ids' must be a list, got {ids!r}")
            images = tuple(self.store.ref(str(i)) for i in ids) if number == 1 else ()
            rounds.append(make_round(remove_placeholders(question)[0], answer, images, number))
        return rounds
