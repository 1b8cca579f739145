"""Chat templates: a conversation -> per-round lists of pieces (BOS, text, image, EOS), each marked supervised or not.

``TEMPLATES["dsvc"]`` is DeepSpeed-VisualChat's format exactly (``utils/data/DST.py``): every round is its own
``<s>...</s>``, the system prompt opens the first round only, each image gets a plain-text ``### Image k:`` header
with numbering continued across rounds, then ``### Question:`` / ``### Answer:``. Only answer text and the round's
EOS are supervised. ``llama2_chat`` and ``llava_v1`` are the LLaMA-2-chat and LLaVA-v1 formats with the same
image/supervision conventions. Adjust a template's system prompt with ``dataclasses.replace``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from .conversation import Conversation, Round, resolve_refs
from .tokenizer import IMAGE_TOKEN

BOS_TEXT, EOS_TEXT = "<s>", "</s>"


@dataclass(frozen=True)
class Piece:
    kind: str  # "bos" | "eos" | "text" | "image"
    text: str = ""
    supervised: bool = False


BOS = Piece("bos")
IMAGE = Piece("image")
SUPERVISED_EOS = Piece("eos", supervised=True)


def _text(text: str, supervised: bool = False) -> list[Piece]:
    return [Piece("text", text, supervised)] if text else []


DSVC_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the user "
    "provides, and assist the user with a variety of tasks using natural language.\n\n"
)
LLAMA2_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the user "
    "provides, and assist the user with a variety of tasks using natural language."
)
LLAVA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


@dataclass(frozen=True)
class Template(ABC):
    system: str
    image_ref_format: str = "image {n}"  # how an in-text reference to image number n is written
    box_format: str = "norm3"  # how grounding boxes are written (data/boxes.py BOX_FORMATS)

    @abstractmethod
    def round_pieces(self, index: int, rnd: Round, first_image_number: int) -> list[Piece]:
        """Pieces of round ``index`` whose first new image has number ``first_image_number``."""

    def refs(self, text: str) -> str:
        return resolve_refs(text, self.image_ref_format)

    def render(self, conv: Conversation) -> list[list[Piece]]:
        rounds, number = [], 1
        for index, rnd in enumerate(conv.rounds):
            rounds.append(self.round_pieces(index, rnd, number))
            number += len(rnd.images)
        return rounds

    def render_text(self, conv: Conversation) -> str:
        """The conversation as one string (``<s>``, ``</s>``, ``<image>`` spelled out), for tests and debugging."""
        spelled = {"bos": BOS_TEXT, "eos": EOS_TEXT, "image": IMAGE_TOKEN}
        return "".join(p.text if p.kind == "text" else spelled[p.kind] for r in self.render(conv) for p in r)


def _answer(rnd: Round, text: str) -> list[Piece]:
    """Supervised answer text + EOS; nothing for a generation prompt (answer None)."""
    return [] if rnd.answer is None else _text(text, supervised=True) + [SUPERVISED_EOS]


@dataclass(frozen=True)
class DSVisualChatTemplate(Template):
    system: str = DSVC_SYSTEM

    def round_pieces(self, index, rnd, first_image_number):
        pieces, text = [BOS], self.system if index == 0 else ""
        for k in range(len(rnd.images)):
            pieces += _text(text + f"### Image {first_image_number + k}:\n") + [IMAGE]
            text = "\n"
        text += ("\n" if rnd.images else "") + f"### Question:\n{self.refs(rnd.question)}\n\n### Answer:\n"
        return pieces + _text(text) + _answer(rnd, self.refs(rnd.answer or ""))


@dataclass(frozen=True)
class Llama2ChatTemplate(Template):
    """``<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer} </s>`` per round (Meta's format)."""

    system: str = LLAMA2_SYSTEM

    def round_pieces(self, index, rnd, first_image_number):
        text = "[INST] " + (f"<<SYS>>\n{self.system}\n<</SYS>>\n\n" if index == 0 and self.system else "")
        pieces = [BOS]
        for k in range(len(rnd.images)):
            pieces += _text(text + f"Image {first_image_number + k}: ") + [IMAGE]
            text = "\n"
        pieces += _text(text + f"{self.refs(rnd.question)} [/INST]")
        return pieces + _answer(rnd, f" {self.refs(rnd.answer or '')} ")


@dataclass(frozen=True)
class LlavaV1Template(Template):
    """``<s>{system} USER: <image>\\n{q} ASSISTANT: {a}</s>USER: {q2} ASSISTANT: {a2}</s>`` (one BOS in total)."""

    system: str = LLAVA_V1_SYSTEM

    def round_pieces(self, index, rnd, first_image_number):
        pieces = [BOS] if index == 0 else []
        text = (f"{self.system} " if index == 0 and self.system else "") + "USER: "
        for _ in rnd.images:
            pieces += _text(text) + [IMAGE]
            text = "\n"
        pieces += _text(text + f"{self.refs(rnd.question)} ASSISTANT:")
        return pieces + _answer(rnd, f" {self.refs(rnd.answer or '')}")


TEMPLATES: dict[str, Template] = {
    "dsvc": DSVisualChatTemplate(),
    "llama2_chat": Llama2ChatTemplate(),
    "llava_v1": LlavaV1Template(),
}


def get_template(name_or_template: str | Template) -> Template:
    if isinstance(name_or_template, Template):
        return name_or_template
    if name_or_template not in TEMPLATES:
        raise ValueError(f"template={name_or_template!r} is not one of {sorted(TEMPLATES)}")
    return TEMPLATES[name_or_template]
