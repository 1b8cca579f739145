"""Chat-completion requests on the model: the conversation is rendered exactly as ``ChatSession`` renders it
(``round_segment`` per user turn, ``answer_segment`` for each answer the client sends back), the longest cached
prefix is reused (``serve_cache.py``), only the rest is prefilled, and the answer is generated with the request's
sampling options, streamed as text and cut at the first stop string. A model that draws (an image vocabulary and
an image tokenizer, ``image_generation.py``) returns its images as PNG bytes with their place in the text; each
is handed to ``on_image`` when its ``<eoi>`` is generated.

A request's cache therefore holds exactly what a cold request for the same conversation computes: an answer whose
tokens do not re-tokenise the same, or that the client shortened, simply ends the reusable prefix there. The
sampler is seeded per request, so sampled answers do not depend on what ran before either.

Three steps, so tensor-parallel ranks stay in lockstep: ``prepare`` (rank 0, any thread: render and check),
``plan`` (rank 0, model worker: choose the cache) and ``run`` (every rank, same ``Job``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Hashable, Optional

import torch

from megatron_visualchat.data.templates import Template, get_template
from megatron_visualchat.inference.generation import FINISH_EOS, generate
from megatron_visualchat.inference.image_generation import ImageAnswers, banned_image_tokens, png_bytes
from megatron_visualchat.inference.prompt import Chunk, Segment, answer_segment, round_segment
from megatron_visualchat.inference.sampling import SamplingParams
from megatron_visualchat.inference.serve_cache import ConversationPool, Placement
from megatron_visualchat.inference.serve_request import ChatRequest, RequestError
from megatron_visualchat.inference.session import TextStream
from megatron_visualchat.model.cross_attention import positions_per_image
from megatron_visualchat.model.token_codes import MODALITY_IMAGE


class StopSequence(Exception):
    """A stop string appeared: generation ends here."""


class StopText:
    """The answer's text as it streams, cut before the first stop string (OpenAI's ``stop``). Text that may be the
    start of a stop string is held back until the next tokens show whether it is."""

    def __init__(self, stops: tuple[str, ...], emit: Optional[Callable[[str], None]]):
        self.stops, self.emit = stops, emit
        self.text, self.sent = "", 0

    def feed(self, delta: str) -> None:
        self.text += delta
        found = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        if found:
            self.text = self.text[:min(found)]
            self.finish()
            raise StopSequence
        held = max((k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        self._send(len(self.text) - held)

    def finish(self) -> None:
        self._send(len(self.text))

    def _send(self, end: int) -> None:
        if end > self.sent:
            if self.emit is not None:
                self.emit(self.text[self.sent:end])
            self.sent = end


@dataclass(frozen=True)
class Prompt:
    segment: Segment  # the whole conversation up to "### Answer:", every image's pixels included
    keys: list[Hashable]  # per position: the token id, or the image's content hash


@dataclass(frozen=True)
class Job:
    """What every rank runs: the cache to use and the positions to prefill into it."""

    placement: Placement
    keys: list[Hashable]
    suffix: Segment  # positions from placement.keep on, with the pixels of their images
    sampling: SamplingParams
    stop: tuple[str, ...]


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str  # OpenAI's: "stop" (EOS or a stop string) | "length" (max_tokens or the context)
    prompt_tokens: int  # positions of the prompt, images included
    cached_tokens: int  # of which reused from a cached conversation
    completion_tokens: int
    images: tuple[tuple[int, bytes], ...] = ()  # drawn images: (their place in ``text``, PNG bytes), in order


def _system_prompt(text: str, default: str) -> str:
    """A client's system message in the template's place: the default's trailing separator is kept."""
    text = text.strip()
    return text + default[len(default.rstrip()):] if text else ""


class ServeEngine:
    def __init__(self, model, tokenizer, pool: ConversationPool, *, template: str | Template = "dsvc",
                 defaults: SamplingParams = SamplingParams(), image_tokenizer=None):
        self.model, self.tokenizer, self.pool, self.defaults = model.eval(), tokenizer, pool, defaults
        self.drawing = None if image_tokenizer is None else ImageAnswers(tokenizer, image_tokenizer)
        self.template = get_template(template)
        self.device = next(model.parameters()).device
        # positions per image: its spliced embeddings, or one marker in cross mode; a model without a vision
        # tower (a jam-cross fusion) reads text only and refuses images, as ChatSession
        vision = model.vision
        self.num_image_tokens = 0 if vision is None else positions_per_image(model.cfg.attention.mode,
                                                                             vision.num_output_tokens)
        self.image_transform = None if vision is None else vision.image_transform
        self.banned = (tokenizer.image_id, tokenizer.pad_id, tokenizer.bos_id,
                       *banned_image_tokens(tokenizer, image_tokenizer))  # as ChatSession
        self.generator = torch.Generator(device=self.device)

    @property
    def max_length(self) -> int:
        return self.pool.max_length

    def prepare(self, request: ChatRequest) -> Prompt:
        """Render the request's conversation; a prompt longer than the context is a RequestError."""
        if request.cfg_scale not in (None, 1.0) and self.drawing is None:
            raise RequestError(f"cfg_scale={request.cfg_scale}: classifier-free guidance applies to image codes and "
                               "this model draws no images; leave it out", param="cfg_scale",
                               code="unsupported_parameter")
        template = self.template
        if request.system is not None:
            template = dataclasses.replace(template, system=_system_prompt(request.system, template.system))
        if self.image_transform is None and any(rnd.images for rnd in request.rounds):
            raise RequestError("this model reads text only (a jam-cross fusion has no vision tower): send the "
                               "messages without images", param="messages", code="unsupported_content")
        segment, hashes = Segment(), []
        for index, rnd in enumerate(request.rounds):
            pixels = [self.image_transform(im.image) for im in rnd.images]
            segment += round_segment(self.tokenizer, template, index, rnd.question, pixels,
                                     images_before=len(hashes), num_image_tokens=self.num_image_tokens)
            if rnd.answer is not None:
                segment += answer_segment(self.tokenizer, template, index, rnd.answer)
            hashes += [im.sha256 for im in rnd.images]
        if len(segment) > self.max_length:
            raise RequestError(f"the conversation does not fit the context: it needs {len(segment)} positions "
                               f"({len(hashes)} image(s) x {self.num_image_tokens} + text) but the context holds "
                               f"{self.max_length}; start a new conversation or send less", param="messages",
                               code="context_length_exceeded")
        keys = [hashes[i] if m == MODALITY_IMAGE else t
                for t, m, i in zip(segment.tokens, segment.modality, segment.image_id)]
        return Prompt(segment, keys)

    def plan(self, prompt: Prompt, request: ChatRequest) -> Job:
        seg = prompt.segment

        def usable(n: int) -> int:
            """At most ``n`` positions, one left to run, never ending inside an image."""
            k = min(n, len(seg) - 1)
            while k > 0 and seg.modality[k] == MODALITY_IMAGE and seg.image_id[k - 1] == seg.image_id[k]:
                k -= 1
            return k

        placement = self.pool.plan(prompt.keys, usable)
        keep = placement.keep
        shown = len({i for i, m in zip(seg.image_id[:keep], seg.modality[:keep]) if m == MODALITY_IMAGE})
        suffix = Segment(seg.tokens[keep:], seg.modality[keep:], seg.image_id[keep:], seg.pixel_values[shown:])
        d = self.defaults
        sampling = SamplingParams(
            max_new_tokens=request.max_tokens or d.max_new_tokens,
            temperature=d.temperature if request.temperature is None else request.temperature,
            top_p=d.top_p if request.top_p is None else request.top_p,
            seed=d.seed if request.seed is None else request.seed,
            cfg_scale=d.cfg_scale if request.cfg_scale is None else request.cfg_scale)
        return Job(placement, prompt.keys, suffix, sampling, request.stop)

    def run(self, job: Job, on_text: Optional[Callable[[str], None]] = None,
            on_image: Optional[Callable[[bytes], None]] = None) -> Completion:
        """Prefill ``job.suffix`` into its cache and generate; the text streams through ``on_text``, each drawn
        image (PNG bytes) through ``on_image``."""
        eos, keep = self.tokenizer.eos_id, job.placement.keep
        cache = self.pool.place(job.placement)
        tokens: list[int] = []
        images: list[tuple[int, bytes]] = []
        text = StopText(job.stop, on_text)
        # images take no room in the text: they come back as image parts
        stream = TextStream(self.tokenizer if self.drawing is None else self.drawing.decoder(""), text.feed, eos)

        def on_tokens(step, new):
            if new[0] is not None:
                tokens.append(new[0])
            stream(step, new)
            if self.drawing is not None and new[0] == self.drawing.rule.vocab.eoi_id:
                images.append((len(text.text), png_bytes(self.drawing.draw(self.drawing.codes(tokens)[-1:])[0])))
                if on_image is not None:
                    on_image(images[-1][1])

        self.generator.manual_seed(job.sampling.seed)
        try:
            gen = generate(self.model, cache, Chunk.from_segments([job.suffix], self.tokenizer.pad_id, self.device),
                           job.sampling, eos_id=eos, vocab_size=self.tokenizer.vocab_size,
                           pad_id=self.tokenizer.pad_id, banned_ids=self.banned, generator=self.generator,
                           on_tokens=on_tokens, images=None if self.drawing is None else self.drawing.rule)
            finish = "stop" if gen.finish[0] == FINISH_EOS else "length"
            stream.finish(stream.tokenizer.decode([t for t in tokens if t != eos]))
        except StopSequence:
            finish = "stop"
        except BaseException:
            cache.truncate(keep)
            self.pool.record(job.placement.slot, job.keys[:keep], keep)
            raise
        text.finish()
        self.pool.record(job.placement.slot, (job.keys + tokens)[:cache.length], len(job.keys))
        # an image drawn after a stop string began is cut off with it
        return Completion(text.text, finish, len(job.keys), keep, sum(t != eos for t in tokens),
                          tuple((at, png) for at, png in images if at <= len(text.text)))
