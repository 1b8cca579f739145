"""Merging two fusion parents' vocabularies (``megatron-visualchat fuse``): A's vocabulary, then what only B has.

A parent's tokenizer is its ``chat_tokenizer/`` (``VisualChatTokenizer.save``: sentencepiece model, added tokens,
image vocabulary) or else its ``tokenizer/tokenizer.model`` (the HF files ``hf-to-megatron`` carries). Tokens are
matched by spelling:

- sentencepiece pieces by piece string. A's pieces keep their ids. The pieces only B has are appended to A's model
  proto in B's order, with B's scores, as type UNUSED (B's CONTROL pieces stay CONTROL). sentencepiece decodes an
  UNUSED piece but never produces it when encoding, so the merged tokenizer encodes every text exactly as A does;
  appended as NORMAL or USER_DEFINED pieces they would change how A's text is split (BPE merges them in).
  B's pieces are reached by generation (the output layer) and decoded as B decodes them.
- the added tokens (``<image>``, ``<pad>``) and the image vocabulary (``<boi>``, ``<eoi>``, codes, sentinels) by
  name. As in every ``VisualChatTokenizer`` they follow the pieces, so their ids move by the number of pieces
  taken from B. The image vocabulary is A's, else B's (a text LLM fused with an image-code model gains B's).

Rows: each merged token takes the row of every parent whose checkpoint has one (its id below the parent's
vocabulary size). The fusion method combines the two rows of a shared token and lays out the row of a token one
parent has (``fuse.FuseMethod``). A token no checkpoint has a row for (e.g. ``<image>`` of two text LLMs) gets
zeros, like megatron's padding; rows past a parent's tokenizer (HF padding) are dropped.

Refused, naming the reason: different special tokens (unk/bos/eos/pad id or piece), different text normalisation,
a piece both have with different kinds (e.g. CONTROL in one), byte pieces only B has (byte fallback in B only),
image vocabularies of different codebook sizes, a checkpoint with fewer rows than its tokenizer's pieces.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from megatron_visualchat.checkpoint.convert import SIDE_FILES, TOKENIZER_DIR
from megatron_visualchat.checkpoint.errors import CheckpointError
from megatron_visualchat.checkpoint.hf_llava import TOKENIZER_OUT
from megatron_visualchat.data.tokenizer import ADDED_TOKENS_FILE, MODEL_FILE, VisualChatTokenizer

MERGED_TOKENIZER_DIR = TOKENIZER_OUT  # the merged VisualChatTokenizer, for --tokenizer-dir (as import-hf writes it)
HF_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")  # token ids in config.json / generation_config.json
STALE_HF_FILES = ("tokenizer.json",)  # A's fast tokenizer describes A's vocabulary only: not carried over
SPECIALS = ("unk", "bos", "eos", "pad")


def _pb():
    from sentencepiece import sentencepiece_model_pb2  # protobuf (tensorboard's dependency)

    return sentencepiece_model_pb2


def _proto(data: bytes):
    model = _pb().ModelProto()
    model.ParseFromString(data)
    return model


@dataclass(frozen=True)
class ParentVocab:
    """One parent's tokenizer (with its model proto) and its checkpoint's vocabulary rows."""

    source: Path  # the tokenizer's directory
    tokenizer: VisualChatTokenizer
    proto: bytes
    rows: int

    @classmethod
    def read(cls, load_dir: Path, rows: int) -> Optional["ParentVocab"]:
        """The tokenizer of a converted checkpoint, or None when it has no sentencepiece model."""
        chat, hf = load_dir / MERGED_TOKENIZER_DIR, load_dir / TOKENIZER_DIR
        try:
            if (chat / ADDED_TOKENS_FILE).is_file():
                source, tok = chat, VisualChatTokenizer.load(str(chat))
            elif (hf / MODEL_FILE).is_file():
                source, tok = hf, VisualChatTokenizer.from_model_file(str(hf / MODEL_FILE))
                _check_hf_added_tokens(hf, tok)
            else:
                return None
        except (OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{load_dir}: cannot read its tokenizer ({e})") from None
        if rows < tok.sp_vocab_size:
            raise CheckpointError(f"{load_dir} has {rows} vocabulary rows but its tokenizer ({source}) has "
                                  f"{tok.sp_vocab_size} sentencepiece pieces: the tokenizer is not this model's")
        return cls(source, tok, (source / MODEL_FILE).read_bytes(), rows)

    def fingerprint(self) -> dict:
        tok = self.tokenizer
        return {"sp_model_sha256": tok.sha256, "sp_pieces": tok.sp_vocab_size, "tokens": tok.vocab_size,
                "image_codebook_size": tok.image_codebook_size, "rows": self.rows, "dir": str(self.source)}


def _check_hf_added_tokens(hf_dir: Path, tok: VisualChatTokenizer) -> None:
    """A HF added_tokens.json ({token: id}) must agree with the ids VisualChatTokenizer gives those tokens."""
    path = hf_dir / ADDED_TOKENS_FILE
    if not path.is_file():
        return
    wrong = {t: i for t, i in json.loads(path.read_text()).items() if tok.added_tokens.get(t) != i}
    if wrong:
        raise ValueError(f"{path}: added tokens {wrong} are not VisualChatTokenizer's {tok.added_tokens}; save the "
                         f"tokenizer with VisualChatTokenizer.save into {MERGED_TOKENIZER_DIR}/ beside it")


def _specials(model) -> dict:
    """(id, piece) of the special tokens the sentencepiece model defines (id -1: none)."""
    ids = {k: getattr(model.trainer_spec, f"{k}_id") for k in SPECIALS}
    return {k: (i, model.pieces[i].piece if 0 <= i < len(model.pieces) else None) for k, i in ids.items()}


def _named_ids(tok: VisualChatTokenizer) -> dict[str, int]:
    """Ids of the tokens after the pieces, by name: added tokens, then the image vocabulary."""
    named = dict(tok.added_tokens)
    vocab = tok.image_vocab
    if vocab is not None:
        named.update({vocab.token_name(i): i for i in range(vocab.base_id, vocab.base_id + vocab.num_tokens)})
    return named


def _merged_proto(pa, pb_, a_dir: Path, b_dir: Path) -> tuple[bytes, int]:
    """A's model proto with B's own pieces appended (UNUSED, or CONTROL); returns it and how many were added."""
    Piece = _pb().ModelProto.SentencePiece
    if pa.normalizer_spec != pb_.normalizer_spec or pa.denormalizer_spec != pb_.denormalizer_spec:
        raise CheckpointError(f"{a_dir} and {b_dir}: the sentencepiece models normalise text differently "
                              f"({pa.normalizer_spec.name!r} vs {pb_.normalizer_spec.name!r}, or other normaliser "
                              "settings): the merged tokenizer could not decode B's pieces as B does")
    text = {Piece.NORMAL, Piece.USER_DEFINED, Piece.UNUSED}
    kinds = {p.piece: p.type for p in pa.pieces}
    clash, bytes_only_b, added = [], [], []
    for p in pb_.pieces:
        if p.piece in kinds:
            if kinds[p.piece] != p.type and not {kinds[p.piece], p.type} <= text:
                clash.append(f"{p.piece!r} ({Piece.Type.Name(kinds[p.piece])} in A, {Piece.Type.Name(p.type)} in B)")
        elif p.type in (Piece.BYTE, Piece.UNKNOWN):
            bytes_only_b.append(p.piece)
        else:
            added.append(p)
    if clash:
        raise CheckpointError(f"{a_dir} and {b_dir}: pieces of different kinds in the two tokenizers: "
                              f"{', '.join(clash[:8])}")
    if bytes_only_b:
        raise CheckpointError(f"{b_dir}'s tokenizer has byte/unknown pieces {bytes_only_b[:8]} that {a_dir}'s lacks "
                              "(byte fallback in B only): merge onto a parent A with byte fallback (swap A and B)")
    merged = _pb().ModelProto()
    merged.CopyFrom(pa)
    for p in added:
        piece = merged.pieces.add()
        piece.CopyFrom(p)
        if p.type != Piece.CONTROL:
            piece.type = Piece.UNUSED
    return merged.SerializeToString(), len(added)


@dataclass(frozen=True)
class VocabMerge:
    """The merged tokenizer and, for every merged id, the rows it takes from A and B (-1: none)."""

    tokenizer: VisualChatTokenizer
    a_rows: torch.Tensor  # long [vocab_size]
    b_rows: torch.Tensor
    a_to_merged: dict  # A's tokenizer id -> merged id
    b_to_merged: dict  # B's tokenizer id -> merged id
    spelled: dict  # merged id of every piece and named token, by spelling (named tokens first)
    pieces_from_b: int
    a: ParentVocab
    b: ParentVocab

    @property
    def vocab_size(self) -> int:
        """Rows of the merged checkpoint: up to the last token a parent has a row for (at least every piece)."""
        return len(self.a_rows)

    def only(self, side: str) -> torch.Tensor:
        """The merged ids (ascending) of the tokens only parent ``side`` ("a" | "b") has a row for."""
        own, other = (self.a_rows, self.b_rows) if side == "a" else (self.b_rows, self.a_rows)
        return torch.nonzero((own >= 0) & (other < 0)).flatten()

    def rows(self, a: torch.Tensor, b: torch.Tensor, both: Callable, one: Callable) -> torch.Tensor:
        """The merged rows from A's and B's (unpadded) rows: ``both(rows_a, rows_b)`` for shared tokens,
        ``one(rows, "a" | "b")`` for a token one parent has, zeros for none."""
        width = both(a[:1], b[:1]).shape[1]
        if a.is_meta:
            return torch.empty(self.vocab_size, width, dtype=a.dtype, device="meta")
        out = a.new_zeros(self.vocab_size, width)
        has_a, has_b = self.a_rows >= 0, self.b_rows >= 0
        for mask, value in ((has_a & has_b, lambda m: both(a[self.a_rows[m]], b[self.b_rows[m]])),
                            (has_a & ~has_b, lambda m: one(a[self.a_rows[m]], "a")),
                            (~has_a & has_b, lambda m: one(b[self.b_rows[m]], "b"))):
            if mask.any():
                out[mask] = value(mask)
        return out

    def record(self) -> dict:
        has_a, has_b = self.a_rows >= 0, self.b_rows >= 0
        return {"merged": True, "rule": "A's vocabulary, then the tokens only B has (docs/fusion.md)",
                "tokens": self.tokenizer.vocab_size, "rows": self.vocab_size,
                "sp_pieces": self.tokenizer.sp_vocab_size, "pieces_from_b": self.pieces_from_b,
                "rows_from_both": int((has_a & has_b).sum()), "rows_from_a_only": int((has_a & ~has_b).sum()),
                "rows_from_b_only": int((~has_a & has_b).sum()), "zero_rows": int((~has_a & ~has_b).sum()),
                "image_codebook_size": self.tokenizer.image_codebook_size, "tokenizer_dir": MERGED_TOKENIZER_DIR,
                "merged_sp_model_sha256": self.tokenizer.sha256,
                "model_a_tokenizer": self.a.fingerprint(), "model_b_tokenizer": self.b.fingerprint()}

    def remap_ids(self, config: dict, where: str, side: str = "a") -> None:
        """Parent ``side``'s token ids in a HF config (``HF_ID_KEYS``) -> the merged ids, in place."""
        to_merged, parent = (self.a_to_merged, self.a) if side == "a" else (self.b_to_merged, self.b)
        for key in HF_ID_KEYS:
            value = config.get(key)
            if isinstance(value, int) and value >= 0:
                if value not in to_merged:
                    raise CheckpointError(f"{where}: {key}={value} is not a token of {parent.source}'s tokenizer "
                                          f"({parent.tokenizer.vocab_size} tokens)")
                config[key] = to_merged[value]

    def save(self, out: Path, a_hf_dir: Path) -> None:
        """``out/chat_tokenizer`` (the merged VisualChatTokenizer) and ``out/tokenizer`` (the merged
        tokenizer.model with A's HF side files, their token ids renumbered, for ``megatron-to-hf``)."""
        self.tokenizer.save(str(out / MERGED_TOKENIZER_DIR))
        hf = out / TOKENIZER_DIR
        hf.mkdir(parents=True, exist_ok=True)
        (hf / MODEL_FILE).write_bytes((out / MERGED_TOKENIZER_DIR / MODEL_FILE).read_bytes())
        for name in SIDE_FILES:
            src = a_hf_dir / name
            if name in (MODEL_FILE, *STALE_HF_FILES) or not src.is_file():
                continue
            if name == ADDED_TOKENS_FILE:  # HF's {token: id}; VisualChatTokenizer's own file was checked on read
                tokens = json.loads(src.read_text())
                (hf / name).write_text(json.dumps({t: self._spelled_id(t, src) for t in tokens}, indent=2))
            elif name in ("tokenizer_config.json", "generation_config.json"):
                config = json.loads(src.read_text())
                self.remap_ids(config, str(src))
                if "added_tokens_decoder" in config:  # {id: {"content": token, ...}}
                    config["added_tokens_decoder"] = {str(self._spelled_id(entry["content"], src)): entry
                                                      for entry in config["added_tokens_decoder"].values()}
                (hf / name).write_text(json.dumps(config, indent=2))
            else:
                shutil.copy2(src, hf / name)

    def _spelled_id(self, content: str, where: Path) -> int:
        if content not in self.spelled:
            raise CheckpointError(f"{where}: added token {content!r} is not in the merged tokenizer")
        return self.spelled[content]


def merge_vocabularies(a: ParentVocab, b: ParentVocab) -> VocabMerge:
    """A's vocabulary, then the tokens only B has (module docstring); refuses what it cannot merge."""
    pa, pb_ = _proto(a.proto), _proto(b.proto)
    sa, sb = _specials(pa), _specials(pb_)
    wrong = [f"{k}: {sa[k]} vs {sb[k]}" for k in SPECIALS if sa[k] != sb[k]]
    if wrong:
        raise CheckpointError(f"{a.source} and {b.source} have conflicting special tokens ((id, piece) in A vs B: "
                              f"{'; '.join(wrong)}): the fused model cannot give one id both meanings")
    ka, kb = a.tokenizer.image_codebook_size, b.tokenizer.image_codebook_size
    if ka and kb and ka != kb:
        raise CheckpointError(f"{a.source} and {b.source} have image vocabularies of {ka} and {kb} codes: one "
                              "image tokenizer's codes cannot mean the other's")
    proto, from_b = _merged_proto(pa, pb_, a.source, b.source)
    merged = VisualChatTokenizer(proto, ka or kb)

    a_tok = torch.full((merged.vocab_size,), -1, dtype=torch.long)
    b_tok = a_tok.clone()
    a_piece = {p.piece: i for i, p in enumerate(pa.pieces)}
    b_piece = {p.piece: i for i, p in enumerate(pb_.pieces)}
    a_tok[:len(a_piece)] = torch.arange(len(a_piece))
    b_tok[:len(a_piece)] = torch.tensor([b_piece.get(p, -1) for p in a_piece], dtype=torch.long)
    b_tok[len(a_piece):merged.sp_vocab_size] = torch.tensor([i for p, i in b_piece.items() if p not in a_piece],
                                                             dtype=torch.long)
    named_a, named_b, named = _named_ids(a.tokenizer), _named_ids(b.tokenizer), _named_ids(merged)
    for name, i in named.items():
        a_tok[i], b_tok[i] = named_a.get(name, -1), named_b.get(name, -1)
    spelled = {p.piece: i for i, p in enumerate(_proto(proto).pieces)} | named

    a_rows = torch.where(a_tok < a.rows, a_tok, -1)
    b_rows = torch.where(b_tok < b.rows, b_tok, -1)
    with_row = torch.nonzero((a_rows >= 0) | (b_rows >= 0)).flatten()
    size = max(merged.sp_vocab_size, int(with_row[-1]) + 1)
    a_to_merged, b_to_merged = ({int(t): m for m, t in enumerate(ids.tolist()) if t >= 0} for ids in (a_tok, b_tok))
    return VocabMerge(merged, a_rows[:size], b_rows[:size], a_to_merged, b_to_merged, spelled, from_b, a, b)
