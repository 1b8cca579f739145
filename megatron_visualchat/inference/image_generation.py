"""Drawing images as code tokens while generating (JAM / CM3leon): modality switching, classifier-free guidance,
and turning a finished answer's codes into pictures.

The decoding rule, per row. In text, every image-vocabulary token but ``<boi>`` is forbidden (no code, ``<eoi>`` or
CM3 sentinel outside an image), and ``<boi>`` only while the whole image still fits (``num_codes + 1`` more steps
within ``max_new_tokens`` and the context): an image is never cut off. After ``<boi>`` exactly ``num_codes`` tokens
are sampled among the code tokens only (every other logit masked), then ``<eoi>`` is forced and text resumes.

Classifier-free guidance (``SamplingParams.cfg_scale``, 1 = off): on code steps the logits are
``uncond + scale * (cond - uncond)``. ``uncond`` comes from a second stream with its own KV cache that reads
``<s> <mask:0> <boi>`` and the image's codes so far: CM3leon's unconditional prompt, the whole conversation replaced
by one mask token (the CM3 sentinel a model trained with the CM3 objective has seen stand for removed content).
Each image restarts that stream, so its logits depend on nothing but the image's own codes. Text steps and the
forced ``<eoi>`` use the conditional logits alone. Under tensor parallelism every rank runs the same streams on
the same (broadcast) tokens, with logits gathered as in ``generation.py``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from PIL import Image

from megatron_visualchat.config import ConfigError
from megatron_visualchat.inference.kv_cache import KVCache
from megatron_visualchat.inference.prompt import Chunk, Segment
from megatron_visualchat.model.image_tokenizer import ImageCodeVocab, ImageTokenizer

OUTPUT_MARKER = "OUTPUT#{k}"  # where the k-th drawn image sits in a chat answer's text (the training data's marker)


@dataclass(frozen=True)
class ImageRule:
    """What ``generate`` needs to let a model draw: the vocabulary, codes per image and CFG's unconditional prompt
    (the tokens before ``<boi>``)."""

    vocab: ImageCodeVocab
    num_codes: int
    unconditional: tuple[int, ...]


def _image_vocab_ids(vocab: ImageCodeVocab) -> tuple[int, ...]:
    return tuple(range(vocab.base_id, vocab.base_id + vocab.num_tokens))


def banned_image_tokens(tokenizer, image_tokenizer: Optional[ImageTokenizer]) -> tuple[int, ...]:
    """Image-vocabulary tokens a model must never produce: all of them when no image tokenizer says how many codes
    an image has (the answer is then text only); none otherwise (``ImageSteps`` restricts them)."""
    if tokenizer.image_vocab is None or image_tokenizer is not None:
        return ()
    return _image_vocab_ids(tokenizer.image_vocab)


class ImageAnswers:
    """A model that draws: its ``ImageRule`` and the finished answers' images, decoded by the image tokenizer."""

    def __init__(self, tokenizer, image_tokenizer: ImageTokenizer):
        if tokenizer.image_vocab is None:
            raise ConfigError(f"an image tokenizer ({image_tokenizer.name}) was given, but the model's tokenizer has "
                              "no image vocabulary: this model cannot write images")
        if tokenizer.image_codebook_size != image_tokenizer.codebook_size:
            raise ConfigError(f"the image tokenizer ({image_tokenizer.name}) has {image_tokenizer.codebook_size} "
                              f"codes but the model's tokenizer has {tokenizer.image_codebook_size} code tokens: use "
                              "the image tokenizer the model was trained with")
        self.tokenizer, self.image_tokenizer = tokenizer, image_tokenizer
        vocab = tokenizer.image_vocab
        self.rule = ImageRule(vocab, image_tokenizer.num_codes, (tokenizer.bos_id, vocab.sentinel_ids[0]))

    def runs(self, ids: Sequence[int]) -> list[tuple[str, list[int]]]:
        """``ids`` as ("text", token ids) and ("image", code token ids after ``<boi>``) runs, in order."""
        vocab, out = self.rule.vocab, []
        for t in (int(i) for i in ids):
            if t == vocab.boi_id:
                out.append(("image", []))
            elif t == vocab.eoi_id:
                continue
            elif out and out[-1][0] == "image" and len(out[-1][1]) < self.rule.num_codes:
                out[-1][1].append(t)
            elif out and out[-1][0] == "text":
                out[-1][1].append(t)
            else:
                out.append(("text", [t]))
        return out

    def text(self, ids: Sequence[int], marker: str = OUTPUT_MARKER) -> str:
        """The answer's text, each image written as ``marker`` (``{k}``: its 1-based number) from its ``<boi>`` on,
        so a growing answer's text only ever grows (``TextStream``)."""
        parts, k = [], 0
        for kind, run in self.runs(ids):
            if kind == "text":
                parts.append(self.tokenizer.decode(run))
            else:
                k += 1
                parts.append(marker.format(k=k))
        return "".join(parts)

    def codes(self, ids: Sequence[int]) -> list[list[int]]:
        """The codes of every complete image in ``ids``."""
        vocab = self.rule.vocab
        return [vocab.token_to_code(run) for kind, run in self.runs(ids)
                if kind == "image" and len(run) == self.rule.num_codes]

    def draw(self, codes: Sequence[Sequence[int]]) -> list[Image.Image]:
        """The image tokenizer's ``decode`` of each image's codes, as RGB pictures (8 bits, rounded)."""
        if not codes:
            return []
        pixels = self.image_tokenizer.decode(torch.tensor([list(c) for c in codes], dtype=torch.long))
        return [to_picture(p) for p in pixels]

    def decoder(self, marker: str = OUTPUT_MARKER) -> "AnswerDecoder":
        return AnswerDecoder(self, marker)


@dataclass(frozen=True)
class AnswerDecoder:
    """A ``decode(ids)`` for ``TextStream``: the answer's text with images as ``marker``."""

    answers: ImageAnswers
    marker: str

    def decode(self, ids: Sequence[int]) -> str:
        return self.answers.text(ids, self.marker)


def to_picture(pixels: torch.Tensor) -> Image.Image:
    """``[3, S, S]`` in [0, 1] -> an RGB image (values rounded to 8 bits)."""
    array = (pixels.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array, "RGB")


def png_bytes(picture: Image.Image) -> bytes:
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    return buf.getvalue()


# logits of one cache's new positions: run_chunk bound to the model
Forward = Callable[[KVCache, Chunk], torch.Tensor]


class ImageSteps:
    """The per-row modality state of one ``generate`` call, its masks and (CFG) the unconditional streams."""

    def __init__(self, rule: ImageRule, forward: Forward, batch: int, cfg_scale: float, vocab_size: int,
                 pad_id: int, device):
        self.rule, self.forward, self.cfg_scale, self.pad_id, self.device = rule, forward, cfg_scale, pad_id, device
        vocab = rule.vocab
        code = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        code[vocab.first_code_id: vocab.first_code_id + vocab.codebook_size] = True
        image_tokens = torch.zeros_like(code)
        image_tokens[list(_image_vocab_ids(vocab))] = True
        only_eoi = torch.ones_like(code)
        only_eoi[vocab.eoi_id] = False
        no_boi = image_tokens.clone()
        text_forbid = image_tokens.clone()
        text_forbid[vocab.boi_id] = False
        # forbidden tokens by state: text (an image fits), text (it does not), a code step, the forced <eoi>
        self.forbid = {"text": text_forbid, "text_no_room": no_boi, "code": ~code, "close": only_eoi}
        self.remaining: list[Optional[int]] = [None] * batch  # codes still to sample in the row's image; None: text
        self.uncond: list[Optional[KVCache]] = [None] * batch
        self.uncond_feed: list[list[int]] = [[] for _ in range(batch)]  # tokens its stream has not read yet

    @property
    def guided(self) -> bool:
        return self.cfg_scale != 1.0

    def guide(self, logits: torch.Tensor) -> torch.Tensor:
        """Rows at a code step get ``uncond + scale * (cond - uncond)`` (float32); others keep their logits."""
        rows = [r for r, left in enumerate(self.remaining) if left]
        if not self.guided or not rows:
            return logits
        logits = logits.float().clone()
        for r in rows:
            feed, self.uncond_feed[r] = self.uncond_feed[r], []
            uncond = self.forward(self.uncond[r], Chunk.from_segments([Segment.text(feed)], self.pad_id,
                                                                      self.device))[0].float()
            logits[r] = uncond + self.cfg_scale * (logits[r] - uncond)
        return logits

    def restrict(self, scores: torch.Tensor, steps_left: int) -> torch.Tensor:
        """Mask ``scores`` [B, V] by each row's state; ``steps_left``: tokens a row may still feed after this one
        (the smaller of the remaining new tokens and the cache's room)."""
        fits = steps_left >= self.rule.num_codes + 1
        states = ["text" if left is None and fits else "text_no_room" if left is None else "code" if left else "close"
                  for left in self.remaining]
        forbid = torch.stack([self.forbid[s] for s in states])
        return scores.masked_fill(forbid, float("-inf"))

    def advance(self, tokens: Sequence[Optional[int]]) -> None:
        """Move every row's state past its new token (None: a finished row)."""
        vocab = self.rule.vocab
        for r, t in enumerate(tokens):
            if t is None:
                continue
            left = self.remaining[r]
            if left is None and t == vocab.boi_id:
                self.remaining[r] = self.rule.num_codes
                if self.guided:
                    self._restart_unconditional(r)
            elif left:
                self.remaining[r] = left - 1
                self.uncond_feed[r].append(t)
            elif left == 0:  # the forced <eoi>
                self.remaining[r] = None

    def _restart_unconditional(self, r: int) -> None:
        prefix = [*self.rule.unconditional, self.rule.vocab.boi_id]
        if self.uncond[r] is None:
            self.uncond[r] = KVCache(1, len(prefix) + self.rule.num_codes, self.device)
        self.uncond[r].reset()
        self.uncond_feed[r] = prefix
