"""The format-independent conversation every reader produces and every template renders.

Images belong to the round that first shows them (the template puts their ``### Image k:`` headers at the start
of that round). Text may *refer* to an image of the conversation ("What colour is the shape in image 2?"); such
references are stored as markers holding the image's 0-based index within the conversation and are rendered by
the template with the image's final number. This keeps references right when samples are concatenated and
numbering continues ("image 2" of the second sample becomes "image 4").
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from .images import ImageRef

_REF_OPEN, _REF_CLOSE = "\ue000", "\ue001"  # Unicode private-use characters: never in real text
_REF_PATTERN = re.compile(f"{_REF_OPEN}(\\d+){_REF_CLOSE}")


def image_ref(index: int) -> str:
    """The marker for the conversation's ``index``-th (0-based) image."""
    return f"{_REF_OPEN}{index}{_REF_CLOSE}"


def referenced_images(text: str) -> list[int]:
    return [int(m.group(1)) for m in _REF_PATTERN.finditer(text)]


def resolve_refs(text: str, fmt: str, first_number: int = 1) -> str:
    """Replace markers by ``fmt.format(n=number)`` where number = first_number + index."""
    return _REF_PATTERN.sub(lambda m: fmt.format(n=first_number + int(m.group(1))), text)


def _shift_refs(text: str, offset: int) -> str:
    return _REF_PATTERN.sub(lambda m: image_ref(int(m.group(1)) + offset), text) if offset else text


@dataclass(frozen=True)
class Round:
    """One question/answer exchange. ``answer=None`` only for the last round of a generation prompt."""

    question: str
    answer: str | None
    images: tuple[ImageRef, ...] = ()


@dataclass(frozen=True)
class Conversation:
    rounds: tuple[Round, ...]
    origin: str = ""
    # Which member of a concatenation each round came from (all 0 for a single record); lets the dataset drop just
    # the member whose image fails to load.
    members: tuple[int, ...] = field(default=())

    def __post_init__(self):
        if not self.members:
            object.__setattr__(self, "members", (0,) * len(self.rounds))

    @property
    def images(self) -> list[ImageRef]:
        return [image for r in self.rounds for image in r.images]

    @property
    def num_images(self) -> int:
        return sum(len(r.images) for r in self.rounds)

    def first_rounds(self, n: int) -> "Conversation":
        return replace(self, rounds=self.rounds[:n], members=self.members[:n])

    @staticmethod
    def concat(conversations: list["Conversation"]) -> "Conversation":
        """One multi-round conversation; image numbering (and references) continue across the parts."""
        rounds, members, offset = [], [], 0
        for member, conv in enumerate(conversations):
            for r in conv.rounds:
                rounds.append(
                    replace(
                        r,
                        question=_shift_refs(r.question, offset),
                        answer=None if r.answer is None else _shift_refs(r.answer, offset),
                    )
                )
                members.append(member)
            offset += conv.num_images
        return Conversation(tuple(rounds), " + ".join(c.origin for c in conversations), tuple(members))


def check_refs(rounds: list[Round] | tuple[Round, ...]) -> str | None:
    """None if every image reference points to an image shown in the same or an earlier round, else a message."""
    shown = 0
    for number, r in enumerate(rounds, start=1):
        shown += len(r.images)
        for text in (r.question, r.answer or ""):
            for index in referenced_images(text):
                if index >= shown:
                    return f"round {number} refers to image {index + 1} but only {shown} image(s) were shown so far"
    return None
