"""SentencePiece LLaMA-2 tokenizer plus the tokens DS-VisualChat adds (``<image>``, pad), with stable ids.

The added tokens are *appended* after the sentencepiece vocabulary (image = sp_vocab, pad = sp_vocab + 1), so the
ids of the frozen LLM's 32000 pieces never move and the trainable embedding copy only grows at the end. ``save``
writes the exact sp model next to a small JSON of the added tokens so a checkpoint is self-describing.

``image_codebook_size=K > 0`` appends an image vocabulary after those (``<boi>``, ``<eoi>``, K code tokens, the CM3
sentinels; ids from ``ImageCodeVocab``, the one home of that mapping) so images can be written as tokens.

Text pieces are encoded one sentencepiece "sentence" at a time (as HF's legacy LLaMA tokenizer does between special
tokens): sentencepiece adds its dummy-prefix space, so one leading space of a piece is absorbed into it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os

import sentencepiece as spm

from ..model.image_tokenizer.vocab import ImageCodeVocab

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
ADDED_TOKENS = (IMAGE_TOKEN, PAD_TOKEN)  # order fixes the ids: sp_vocab + position
MODEL_FILE = "tokenizer.model"
ADDED_TOKENS_FILE = "added_tokens.json"


class VisualChatTokenizer:
    def __init__(self, model_proto: bytes, image_codebook_size: int = 0):
        self._proto = model_proto
        self.image_codebook_size = image_codebook_size
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.sp_vocab_size = self._sp.get_piece_size()
        self.added_tokens = {token: self.sp_vocab_size + i for i, token in enumerate(ADDED_TOKENS)}
        self.image_id = self.added_tokens[IMAGE_TOKEN]
        self.pad_id = self.added_tokens[PAD_TOKEN]
        self.image_vocab = (ImageCodeVocab(self.sp_vocab_size + len(ADDED_TOKENS), image_codebook_size)
                            if image_codebook_size else None)
        self.bos_id = self._sp.bos_id()
        self.eos_id = self._sp.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(f"sentencepiece model has no BOS/EOS (bos_id={self.bos_id}, eos_id={self.eos_id})")
        pieces = self._sp.encode("a", out_type=str)
        self._dummy_prefix = bool(pieces) and pieces[0].startswith("\u2581")

    @classmethod
    def from_model_file(cls, path: str, image_codebook_size: int = 0) -> "VisualChatTokenizer":
        """From a LLaMA-2 ``tokenizer.model`` (or any sentencepiece model with BOS/EOS)."""
        with open(path, "rb") as f:
            return cls(f.read(), image_codebook_size)

    @classmethod
    def load(cls, directory: str) -> "VisualChatTokenizer":
        """Load what ``save`` wrote, checking that the added-token ids are the ones the checkpoint was trained with."""
        meta_path = os.path.join(directory, ADDED_TOKENS_FILE)
        with open(meta_path) as f:
            meta = json.load(f)
        tok = cls.from_model_file(os.path.join(directory, MODEL_FILE), int(meta.get("image_codebook_size", 0)))
        if meta.get("added_tokens") != tok.added_tokens or meta.get("sp_vocab_size") != tok.sp_vocab_size:
            raise ValueError(
                f"{meta_path}: added tokens {meta.get('added_tokens')} (sp vocab {meta.get('sp_vocab_size')}) do not "
                f"match the model file's {tok.added_tokens} (sp vocab {tok.sp_vocab_size})"
            )
        if meta.get("sp_model_sha256") != tok.sha256:
            raise ValueError(f"{meta_path}: sp_model_sha256 does not match {os.path.join(directory, MODEL_FILE)}")
        return tok

    def with_image_vocab(self, image_codebook_size: int) -> "VisualChatTokenizer":
        """This tokenizer with an image vocabulary of ``image_codebook_size`` codes (the same text ids)."""
        return VisualChatTokenizer(self._proto, image_codebook_size)

    @property
    def new_token_ids(self) -> tuple[int, ...]:
        """Ids the base LLM does not know: the added tokens, then the image vocabulary (breaks, codes, sentinels)."""
        first = self.sp_vocab_size
        return tuple(range(first, self.vocab_size))

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, MODEL_FILE), "wb") as f:
            f.write(self._proto)
        meta = {"sp_vocab_size": self.sp_vocab_size, "added_tokens": self.added_tokens, "sp_model_sha256": self.sha256}
        if self.image_vocab is not None:
            meta["image_codebook_size"] = self.image_codebook_size
        with open(os.path.join(directory, ADDED_TOKENS_FILE), "w") as f:
            json.dump(meta, f, indent=2)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self._proto).hexdigest()

    @property
    def vocab_size(self) -> int:
        """Rows the embedding / output layer need (sp pieces + added tokens + image vocabulary), before Megatron's
        padding."""
        return self.sp_vocab_size + len(ADDED_TOKENS) + (self.image_vocab.num_tokens if self.image_vocab else 0)

    def encode(self, text: str) -> list[int]:
        """Piece ids of ``text`` (no BOS/EOS)."""
        if not text:
            return []
        if self._dummy_prefix and text.startswith(" "):
            text = text[1:]
        return self._sp.encode(text)

    def decode(self, ids) -> str:
        """Text of ``ids``; ``<image>`` is spelled out, pad/BOS/EOS are dropped."""
        out, run = [], []
        for i in (int(x) for x in ids):
            if i < self.sp_vocab_size and i not in (self.bos_id, self.eos_id):
                run.append(i)
                continue
            if run:  # BOS/EOS/added tokens end a sentencepiece sentence (each decodes without its dummy space)
                out.append(self._sp.decode(run))
                run = []
            if i == self.image_id:
                out.append(IMAGE_TOKEN)
            elif self.image_vocab is not None and self.image_vocab.base_id <= i < self.vocab_size:
                out.append(self.image_vocab.token_name(i))
            elif i >= self.sp_vocab_size and i != self.pad_id:
                raise ValueError(f"token id {i} is outside the vocabulary (size {self.vocab_size})")
        if run:
            out.append(self._sp.decode(run))
        return "".join(out)

    def __getstate__(self):
        return {"model_proto": self._proto, "image_codebook_size": self.image_codebook_size}

    def __setstate__(self, state):
        self.__init__(state["model_proto"], state.get("image_codebook_size", 0))


def train_tiny_sentencepiece(out_dir: str, corpus_lines, vocab_size: int = 512) -> VisualChatTokenizer:
    """Train a small LLaMA-style BPE sentencepiece model on ``corpus_lines`` (no downloads), save it to ``out_dir``.

    Same normalisation as LLaMA-2 (identity, keep whitespace, split digits, byte fallback, ids unk=0 bos=1 eos=2), so
    code paths match the real tokenizer. ``vocab_size`` must exceed the 256 byte pieces + 3 specials; it is an upper
    bound (a tiny corpus may yield fewer pieces). Returns the saved tokenizer.
    """
    if vocab_size < 260:
        raise ValueError(f"vocab_size={vocab_size} must be >= 260 (256 byte-fallback pieces + unk/bos/eos + 1)")
    lines = [part for line in corpus_lines for part in str(line).split("\n") if part.strip()]
    if not lines:
        raise ValueError("corpus_lines is empty")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        character_coverage=1.0,
        hard_vocab_limit=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    tok = VisualChatTokenizer(model.getvalue())
    tok.save(out_dir)
    return tok
