"""A multi-round, multi-image chat with one model: images can be added at any round, and earlier rounds' KV cache
(with their image features folded in) is reused instead of recomputed.

DS-VisualChat's demo re-encodes the whole history and every image at every round; ``reuse_cache=False`` does the
same here (the benchmark baseline), ``reuse_cache=True`` (default) only prefills the new round. Both give the same
tokens. Every input problem (missing or broken image file, too many images, a message over the context) raises
``ChatInputError`` *before* the cache changes, so the session stays usable; an unexpected failure inside the
forward rolls the cache back to the previous round.

On tensor-parallel ranks every rank runs the same session calls with the same inputs (the CLI broadcasts them).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
from PIL import Image

from megatron_visualchat.config import ConfigError
from megatron_visualchat.data.errors import SampleError
from megatron_visualchat.data.images import FileImage, decode_image, to_rgb
from megatron_visualchat.data.templates import Template, get_template
from megatron_visualchat.inference.generation import FINISH_EOS, Generation, check_inference_layout, generate, run_chunk
from megatron_visualchat.inference.image_generation import ImageAnswers, banned_image_tokens
from megatron_visualchat.inference.kv_cache import KVCache
from megatron_visualchat.inference.prompt import Chunk, Segment, answer_segment, round_segment
from megatron_visualchat.inference.sampling import SamplingParams
from megatron_visualchat.model.cross_attention import positions_per_image

DEFAULT_MAX_IMAGES = 8  # DS-VisualChat's limit per conversation

# A path, a PIL image, encoded bytes, or (name, encoded bytes) as the CLI broadcasts them.
ImageSource = Union[str, Path, Image.Image, bytes, tuple]


class ChatInputError(ValueError):
    """The user's input cannot be used; the message says what and how to fix it. The session is unchanged."""


@dataclass(frozen=True)
class ChatImage:
    name: str
    image: Image.Image


def load_chat_image(source: ImageSource) -> ChatImage:
    """Decode one image (RGB; EXIF orientation applied) or raise ChatInputError naming the file."""
    try:
        if isinstance(source, (str, Path)):
            return ChatImage(str(source), decode_image(FileImage(str(source)).read_bytes(), str(source)))
        if isinstance(source, Image.Image):
            return ChatImage(getattr(source, "filename", "") or "<PIL image>", to_rgb(source))
        if isinstance(source, bytes):
            return ChatImage("<image bytes>", decode_image(source, "<image bytes>"))
        if isinstance(source, tuple) and len(source) == 2 and isinstance(source[1], bytes):
            return ChatImage(str(source[0]), decode_image(source[1], str(source[0])))
    except SampleError as e:
        raise ChatInputError(f"cannot use image {e.detail}") from None
    raise ChatInputError(f"an image must be a path, a PIL image or encoded bytes, got {type(source).__name__}")


@dataclass
class ChatTurn:
    answer: str
    token_ids: list[int]
    finish_reason: str  # "eos" | "length" | "context_full"
    new_image_numbers: list[int]
    prompt_positions: int  # positions prefilled for this round (the whole history when reuse_cache=False)
    prompt_end: int  # cache position of the round's last prompt position (its logits pick the first token)
    seconds_to_first_token: float
    seconds: float
    step_logits: list[torch.Tensor] = field(default_factory=list)  # [1, V] per generated token, if asked
    images: list[Image.Image] = field(default_factory=list)  # drawn images, OUTPUT#k in the answer (k = 1, 2, ..)
    image_codes: list[list[int]] = field(default_factory=list)  # their codes


class TextStream:
    """Turns the growing answer's ids into text deltas, holding back an incomplete multi-byte character."""

    def __init__(self, tokenizer, on_text: Callable[[str], None], eos_id: int):
        self.tokenizer, self.on_text, self.eos_id = tokenizer, on_text, eos_id
        self.ids: list[int] = []
        self.sent = ""

    def __call__(self, step: int, tokens: list[Optional[int]]) -> None:
        if tokens[0] is None or tokens[0] == self.eos_id:
            return
        self.ids.append(tokens[0])
        self._emit(self.tokenizer.decode(self.ids), final=False)

    def _emit(self, text: str, final: bool) -> None:
        if (final or not text.endswith("\ufffd")) and len(text) > len(self.sent) and text.startswith(self.sent):
            self.on_text(text[len(self.sent):])
            self.sent = text

    def finish(self, answer: str) -> None:
        """Send whatever was held back (an answer may end inside a multi-byte character)."""
        self._emit(answer, final=True)


class ChatSession:
    def __init__(self, model, tokenizer, *, template: Union[str, Template] = "dsvc",
                 sampling: SamplingParams = SamplingParams(), max_images: int = DEFAULT_MAX_IMAGES,
                 max_length: Optional[int] = None, reuse_cache: bool = True, image_transform=None,
                 image_tokenizer=None):
        """``image_tokenizer``: decodes the image codes a model with an image vocabulary writes
        (``image_generation.py``); without it such a model answers in text only."""
        check_inference_layout()
        llm = model.cfg.llm
        if tokenizer.vocab_size > llm.vocab_size:
            raise ConfigError(f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary is "
                              f"{llm.vocab_size}: they do not belong together")
        if max_images < 0:
            raise ConfigError(f"max_images={max_images} (--max-images) must be >= 0")
        max_length = llm.max_position_embeddings if max_length is None else max_length
        if max_length < 1:
            raise ConfigError(f"max_length={max_length} (--max-length) must be >= 1")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.template = get_template(template)
        self.sampling, self.max_images, self.reuse_cache = sampling, max_images, reuse_cache
        self.device = next(model.parameters()).device
        self.cache = KVCache(1, max_length, self.device)
        # positions per image: its spliced embeddings, or one marker in cross mode; a model without a vision
        # tower (a jam-cross fusion) reads text only and refuses images
        vision = model.vision
        self.num_image_tokens = 0 if vision is None else positions_per_image(model.cfg.attention.mode,
                                                                             vision.num_output_tokens)
        self.image_transform = image_transform or (None if vision is None else vision.image_transform)
        # Never generated: an <image> placeholder, padding, or a BOS inside an answer.
        self._banned = (tokenizer.image_id, tokenizer.pad_id, tokenizer.bos_id,
                        *banned_image_tokens(tokenizer, image_tokenizer))
        self.drawing = None if image_tokenizer is None else ImageAnswers(tokenizer, image_tokenizer)
        if self.drawing is None and sampling.cfg_scale != 1.0:
            raise ConfigError(f"cfg_scale={sampling.cfg_scale} (--cfg-scale) guides image codes, but this model "
                              "draws no images (it needs an image vocabulary and an image tokenizer); use 1")
        self._text = tokenizer if self.drawing is None else self.drawing.decoder()
        self.generator = torch.Generator(device=self.device)
        self.clear()

    # ---- state -------------------------------------------------------------------------------------------------
    def clear(self) -> None:
        """Forget the conversation (cache, images, history); the sampling seed starts over."""
        self.cache.reset()
        self.history = Segment()  # every position written to the cache, in order (with the images' pixels)
        self.pending: list[int] = []  # decided tokens not yet in the cache (last answer token / closing EOS)
        self.image_names: list[str] = []
        self.image_sizes: list[tuple[int, int]] = []  # original (W, H), e.g. to read boxes in normalised units
        self.rounds = 0
        self.generator.manual_seed(self.sampling.seed)

    @property
    def image_numbers(self) -> list[int]:
        return list(range(1, len(self.image_names) + 1))

    @property
    def max_length(self) -> int:
        return self.cache.max_length

    @property
    def length(self) -> int:
        """Positions the conversation occupies (cached + pending)."""
        return len(self.history) + len(self.pending)

    # ---- rounds ------------------------------------------------------------------------------------------------
    def _new_round(self, question: str, images: Sequence[ImageSource]) -> tuple[Segment, list[ChatImage]]:
        if isinstance(images, (str, Path, bytes, Image.Image)):  # one image given without a list
            images = [images]
        if not isinstance(question, str) or not question.strip():
            raise ChatInputError("the message is empty: type a question (images alone are sent with your next "
                                 "message)")
        if images and self.model.vision is None:
            raise ChatInputError("this model reads text only (a jam-cross fusion has no vision tower): send the "
                                 "message without images")
        if len(self.image_names) + len(images) > self.max_images:
            raise ChatInputError(f"too many images: {len(self.image_names)} shown + {len(images)} new > "
                                 f"{self.max_images} allowed per conversation; use clear to start over")
        loaded = [load_chat_image(s) for s in images]
        pixels = [self.image_transform(im.image) for im in loaded]
        segment = Segment.text(self.pending) + round_segment(
            self.tokenizer, self.template, self.rounds, question.strip(), pixels,
            images_before=len(self.image_names), num_image_tokens=self.num_image_tokens)
        needed = len(self.history) + len(segment)
        if needed > self.max_length:
            raise ChatInputError(
                f"the message does not fit the context: it needs {len(segment)} positions ({len(images)} image(s) "
                f"x {self.num_image_tokens} + text) but {self.max_length - len(self.history)} of "
                f"{self.max_length} remain; use clear, or send less text or fewer images")
        return segment, loaded

    def _chunk(self, segment: Segment) -> tuple[Chunk, int]:
        """What to prefill (and where to roll back to if it fails): the new round, or everything again."""
        if self.reuse_cache:
            return Chunk.from_segments([segment], self.tokenizer.pad_id, self.device), self.cache.length
        self.cache.reset()
        return Chunk.from_segments([self.history + segment], self.tokenizer.pad_id, self.device), 0

    def ask(self, question: str, images: Sequence[ImageSource] = (), *, on_text: Optional[Callable[[str], None]] = None,
            keep_logits: bool = False) -> ChatTurn:
        """One round: show ``images`` (numbered after the ones already shown), ask ``question``, generate the
        answer (streamed through ``on_text`` as it comes)."""
        segment, loaded = self._new_round(question, images)
        chunk, rollback = self._chunk(segment)
        eos = self.tokenizer.eos_id
        stream = TextStream(self._text, on_text, eos) if on_text else None
        first_token_at: list[float] = []

        def on_tokens(step, tokens):
            if not first_token_at:
                first_token_at.append(time.perf_counter())
            if stream:
                stream(step, tokens)

        start = time.perf_counter()
        try:
            gen: Generation = generate(
                self.model, self.cache, chunk, self.sampling, eos_id=eos, vocab_size=self.tokenizer.vocab_size,
                pad_id=self.tokenizer.pad_id, banned_ids=self._banned, generator=self.generator,
                on_tokens=on_tokens, keep_logits=keep_logits,
                images=None if self.drawing is None else self.drawing.rule)
        except BaseException:
            self.cache.truncate(rollback)
            raise
        seconds = time.perf_counter() - start
        tokens, pending = gen.tokens[0], gen.pending[0]
        answer = self._text.decode([t for t in tokens if t != eos])
        codes = [] if self.drawing is None else self.drawing.codes(tokens)
        if stream:
            stream.finish(answer)
        prompt_end = len(self.history) + len(segment) - 1
        self.history = self.history + segment + Segment.text(tokens[: len(tokens) - len(pending)])
        # The next round starts with what was not fed; a cut-off answer is closed with EOS as in training.
        self.pending = pending + ([] if gen.finish[0] == FINISH_EOS else [eos])
        first = len(self.image_names) + 1
        self.image_names += [im.name for im in loaded]
        self.image_sizes += [im.image.size for im in loaded]
        self.rounds += 1
        return ChatTurn(
            answer=answer, token_ids=tokens,
            finish_reason=gen.finish[0], new_image_numbers=list(range(first, first + len(loaded))),
            prompt_positions=chunk.length, prompt_end=prompt_end,
            seconds_to_first_token=(first_token_at[0] if first_token_at else time.perf_counter()) - start,
            seconds=seconds, step_logits=gen.step_logits,
            images=self.drawing.draw(codes) if codes else [], image_codes=codes)

    def add_exchange(self, question: str, answer: str, images: Sequence[ImageSource] = ()) -> None:
        """Put a known round (question, images, answer) into the history without generating: few-shot examples,
        or replaying a transcript."""
        segment, loaded = self._new_round(question, images)
        segment = segment + answer_segment(self.tokenizer, self.template, self.rounds, answer)
        if len(self.history) + len(segment) > self.max_length:
            raise ChatInputError(f"the exchange needs {len(segment)} positions but only "
                                 f"{self.max_length - len(self.history)} of {self.max_length} remain; use clear")
        if self.reuse_cache:
            rollback = self.cache.length
            try:
                with torch.no_grad():
                    run_chunk(self.model, self.cache, Chunk.from_segments([segment], self.tokenizer.pad_id,
                                                                          self.device))
            except BaseException:
                self.cache.truncate(rollback)
                raise
        self.history = self.history + segment
        self.pending = []
        self.image_names += [im.name for im in loaded]
        self.image_sizes += [im.image.size for im in loaded]
        self.rounds += 1
