"""What every format reader is: a map-style, lazily parsed view of one annotation file (index -> Conversation)."""

from __future__ import annotations

import os
import random
from abc import ABC, abstractmethod

from ..conversation import Conversation, Round, check_refs
from ..errors import SampleError
from ..images import open_image_store
from ..lazy import open_records

IMAGE_PLACEHOLDER = "<image>"
ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def fail(reason: str, detail: str):
    raise SampleError(reason, detail)


class ConversationSource(ABC):
    """Subclasses parse one record into rounds; this base locates errors and applies the shared checks."""

    WRITES_IMAGE_CODES = False  # answers that write images as VQ codes (formats/images_out.py) need an image tokenizer

    def __init__(self, path: str, *, max_rounds: int | None = None):
        if max_rounds is not None and max_rounds < 1:
            raise ValueError(f"max_rounds={max_rounds} must be >= 1 or None")
        if not os.path.exists(path):
            raise ValueError(f"annotation file not found: {path}")
        self.path = path
        self.max_rounds = max_rounds

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def where(self, index: int) -> str:
        """File and record of ``index`` for messages."""

    @abstractmethod
    def _rounds(self, index: int, rng: random.Random) -> list[Round]:
        """Parse record ``index``; raise SampleError (unlocated) on bad input."""

    def conversation(self, index: int, rng: random.Random | None = None) -> Conversation:
        """Record ``index`` as a Conversation. ``rng`` drives sources that sample (the LLaVA-Otter blend)."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {self.path} ({len(self)} records)")
        where = self.where(index)
        try:
            rounds = self._rounds(index, rng if rng is not None else random.Random(index))
            if not rounds:
                fail("empty_conversation", "no question/answer rounds")
            problem = check_refs(rounds)
            if problem:
                fail("malformed_conversation", problem)
        except SampleError as e:
            raise e.at(where) from None
        if self.max_rounds is not None:
            rounds = rounds[: self.max_rounds]
        return Conversation(tuple(rounds), where)


class RecordsSource(ConversationSource):
    """A source whose conversations are records of one annotation file (JSON / JSONL, read lazily), with images in
    a directory or base64 store (``images``, default: the annotation file's directory)."""

    default_image_filename = "{id}"

    def __init__(self, path: str, *, images: str | None = None, image_filename: str | None = None, max_rounds=None):
        super().__init__(path, max_rounds=max_rounds)
        self.records = open_records(path)
        self.store = image_store_for(path, images, image_filename or self.default_image_filename)

    def __len__(self):
        return len(self.records)

    def where(self, index):
        return self.records.where(index)


def image_store_for(path: str, images: str | None, image_filename: str):
    """The image store named by a reader's ``images`` option (default: the annotation file's directory)."""
    return open_image_store(images if images is not None else os.path.dirname(os.path.abspath(path)), image_filename)


def turn_pairs(turns, role_key: str, text_key: str) -> list[tuple[dict, dict]]:
    """Validate alternating user/assistant turns (user first) and return (user_turn, assistant_turn) pairs."""
    if not isinstance(turns, list):
        fail("malformed_conversation", f"turn list must be a JSON array, got {type(turns).__name__}")
    if not turns:
        fail("empty_conversation", "turn list is empty")
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            fail("malformed_conversation", f"turn {i} is {type(turn).__name__}, expected an object")
        role = ROLE_ALIASES.get(str(turn.get(role_key)).lower())
        if role is None:
            fail("unknown_role", f"turn {i} has {role_key}={turn.get(role_key)!r}; known: {sorted(ROLE_ALIASES)}")
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            fail("malformed_conversation", f"turn {i} is from {role!r}, expected {expected!r} (turns must alternate)")
        if not isinstance(turn.get(text_key), str):
            fail("malformed_conversation", f"turn {i} has no string {text_key!r}")
    if len(turns) % 2:
        fail("malformed_conversation", "the last user turn has no answer")
    return list(zip(turns[0::2], turns[1::2]))


def make_round(question: str, answer: str, images: tuple, number: int) -> Round:
    """A round with cleaned text; a round needs an answer and either a question or an image."""
    question, answer = question.strip(), answer.strip()
    if not answer:
        fail("malformed_conversation", f"round {number} has an empty answer")
    if not question and not images:
        fail("malformed_conversation", f"round {number} has an empty question and no image")
    return Round(question, answer, tuple(images))


def remove_placeholders(text: str, placeholder: str = IMAGE_PLACEHOLDER) -> tuple[str, int]:
    """Text without ``placeholder`` (and a newline right after it) and how many there were."""
    count = text.count(placeholder)
    return text.replace(placeholder + "\n", "").replace("\n" + placeholder, "").replace(placeholder, ""), count
