"""Images as vocabulary: the code <-> id mapping, the inline-code format and its cache, CM3, loss weights."""

import dataclasses
import json
import pickle
import random

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_visualchat.config import LLM_PRESETS
from megatron_visualchat.data import ConversationEncoder, VisualChatTokenizer
from megatron_visualchat.data.cm3 import apply_objective, cm3_transform, modality_loss_weights
from megatron_visualchat.data.encode import IGNORE_INDEX
from megatron_visualchat.data.errors import SampleError
from megatron_visualchat.data.images import FileImage
from megatron_visualchat.data.image_codes import CodeWritingTokenizer, ImageCodeCache, ImageOutputJsonlSource
from megatron_visualchat.data.synthetic import ShapeImage
from megatron_visualchat.model.image_tokenizer import ImageCodeVocab, load_image_tokenizer
from megatron_visualchat.model.image_tokenizer.tiny_vqvae import TinyVQVAE, TinyVQVAEConfig, TinyVQVAETokenizer

K = 16


@pytest.fixture(scope="module")
def image_tok(tok):
    """The text tokenizer with an image vocabulary of K codes."""
    return VisualChatTokenizer(tok._proto, image_codebook_size=K)


def test_vocab_mapping_and_tokenizer(tok, image_tok, tmp_path):
    vocab = image_tok.image_vocab
    assert (image_tok.image_id, image_tok.pad_id) == (tok.image_id, tok.pad_id)  # existing ids never move
    assert vocab.boi_id == tok.vocab_size and image_tok.vocab_size == tok.vocab_size + 2 + K + 4
    assert vocab.image_tokens([0, 3, K - 1]) == [vocab.boi_id, vocab.first_code_id, vocab.first_code_id + 3,
                                                 vocab.first_code_id + K - 1, vocab.eoi_id]
    assert vocab.token_to_code(vocab.code_to_token([5, 0, 7])) == [5, 0, 7]
    assert max(vocab.sentinel_ids) == image_tok.vocab_size - 1
    with pytest.raises(ValueError, match="outside the codebook"):
        vocab.code_to_token([K])
    with pytest.raises(ValueError, match="not an image code token"):
        vocab.token_to_code([vocab.boi_id])
    assert image_tok.decode(tok.encode("red") + vocab.image_tokens([2]) + [vocab.sentinel_ids[1]]) == \
        "red<boi><code:2><eoi><mask:1>"
    image_tok.save(str(tmp_path))
    loaded = VisualChatTokenizer.load(str(tmp_path))
    assert loaded.image_vocab == vocab and loaded.vocab_size == image_tok.vocab_size
    assert ImageCodeVocab(100, 8).num_tokens == 14
    # the model's vocabulary grows from the tokenizer (as for <image>/<pad>) and is padded for TP as usual
    llm = dataclasses.replace(LLM_PRESETS["tiny"], vocab_size=image_tok.vocab_size)
    assert image_tok.vocab_size <= llm.padded_vocab_size(2) < image_tok.vocab_size + 16
    assert llm.padded_vocab_size(2) % 16 == 0  # make_vocab_size_divisible_by 8 x TP 2


@pytest.fixture
def tiny_image_tokenizer(tmp_path):
    torch.manual_seed(0)
    TinyVQVAETokenizer.save(TinyVQVAE(TinyVQVAEConfig(image_size=16, codebook_size=K, embed_dim=4, channels=4)),
                            str(tmp_path / "vq"))
    return load_image_tokenizer("tiny_vqvae", str(tmp_path / "vq"))


def _write_record(tmp_path, answer="Here it is: OUTPUT#1", outputs=("out.png",)):
    for name, colour in (("in.png", "red"), ("out.png", "blue")):
        ShapeImage(colour, "square", 1, "left").render(16, random.Random(0)).save(tmp_path / name)
    record = {"id": "r0", "rounds": [{"images": ["in.png"], "question": "Draw IMAGE#1 in blue.", "answer": answer,
                                      "output_images": list(outputs)}]}
    (tmp_path / "gen.jsonl").write_text(json.dumps(record) + "\n")
    return str(tmp_path / "gen.jsonl")


def test_inline_code_format_and_cache(image_tok, tiny_image_tokenizer, tmp_path):
    source = ImageOutputJsonlSource(_write_record(tmp_path))
    conv = source.conversation(0)
    cache = ImageCodeCache(str(tmp_path / "cache"), tiny_image_tokenizer)
    writer = CodeWritingTokenizer(image_tok, cache)
    enc = ConversationEncoder(writer, "dsvc", max_seq_len=512, num_image_tokens=4).encode(conv)
    vocab = image_tok.image_vocab
    start = enc.input_ids.index(vocab.boi_id)
    written = enc.input_ids[start:start + 16 + 2]
    assert written[-1] == vocab.eoi_id and all(vocab.is_code(t) for t in written[1:-1])
    assert enc.labels[start:start + 18] == written  # the written image is supervised (it is in the answer)
    assert enc.num_images == 1 and enc.input_ids[enc.image_positions[0]] == image_tok.image_id  # input via encoder
    pixels = np.asarray(Image.open(tmp_path / "out.png"), dtype=np.float32) / 255
    expected = tiny_image_tokenizer.encode(torch.from_numpy(pixels).permute(2, 0, 1)[None])[0].tolist()
    assert vocab.token_to_code(written[1:-1]) == expected
    assert (cache.hits, cache.misses) == (0, 1)
    writer.encode(conv.rounds[0].answer)
    assert (cache.hits, cache.misses) == (1, 1)  # second time from disk
    other = ImageCodeCache(str(tmp_path / "cache"), load_image_tokenizer("tiny_vqvae", str(tmp_path / "vq")))
    other.image_tokenizer.fingerprint = "f" * 64  # another tokenizer: another key
    other.codes(FileImage(str(tmp_path / "out.png")))
    assert other.misses == 1
    assert pickle.loads(pickle.dumps(writer)).encode(conv.rounds[0].answer) == writer.encode(conv.rounds[0].answer)
    with pytest.raises(ValueError, match="no image vocabulary"):
        CodeWritingTokenizer(VisualChatTokenizer(image_tok._proto), cache)


def test_inline_code_format_errors(tmp_path):
    source = ImageOutputJsonlSource(_write_record(tmp_path, answer="no reference"))
    with pytest.raises(SampleError, match="OUTPUT#1"):
        source.conversation(0)


@pytest.mark.parametrize("seed", range(20))
def test_cm3_transform(seed):
    b0, b1, s = 90, 91, [95, 96, 97, 98]
    ids = [1, 10, 11, 12, b0, 50, 51, 52, 53, b1, 13, 14, 15, 2]
    labels = [IGNORE_INDEX, IGNORE_INDEX, 11, 12, b0, 50, 51, 52, 53, b1, 13, 14, 15, 2]
    out_ids, out_labels = cm3_transform(ids, labels, sentinel_ids=s, fixed_ids=(b0, b1, 1, 2), seed=seed,
                                        mean_spans=2.0)
    assert (out_ids, out_labels) == cm3_transform(ids, labels, sentinel_ids=s, fixed_ids=(b0, b1, 1, 2),
                                                  seed=seed, mean_spans=2.0)  # deterministic
    used = [t for t in s if t in out_ids]
    assert used == s[:len(used)] and used  # sentinels 0..n-1, at least one span
    first_tail = out_ids.index(used[0], out_ids.index(used[0]) + 1)
    body, tail = out_ids[:first_tail], out_ids[first_tail:]
    spans, current = {}, None
    for t in tail:  # tail = <mask:i> span_i <mask:j> span_j ...
        if t in s:
            current = spans.setdefault(t, [])
        else:
            current.append(t)
    assert all(spans.values())
    restored = [u for t in body for u in (spans[t] if t in s else [t])]
    assert restored == ids  # putting the spans back gives the original: every token kept, spans contiguous
    assert not {b0, b1, 1, 2, 10} & set(tail)  # fixed and unsupervised tokens never move
    for span in spans.values():  # a span lies on one side of each break
        assert len({ids.index(b0) < ids.index(t) < ids.index(b1) for t in span}) == 1
    assert out_labels[first_tail:] == tail  # moved tokens and sentinels are supervised
    assert [lab for t, lab in zip(body, out_labels) if t not in s] == \
        [lab for t, lab in zip(ids, labels) if t in body]  # the rest keep their labels


def test_cm3_nothing_movable_and_objectives(image_tok):
    ids, labels = [1, 10, 2], [IGNORE_INDEX] * 3
    assert cm3_transform(ids, labels, sentinel_ids=[9], fixed_ids=(), seed=0) == (ids, labels)
    assert apply_objective("next_token", ids, labels, tokenizer=image_tok, seed=0) == (ids, labels)
    with pytest.raises(ValueError, match="not one of"):
        apply_objective("mlm", ids, labels, tokenizer=image_tok, seed=0)
    with pytest.raises(ValueError, match="image vocabulary"):
        apply_objective("cm3", ids, labels, tokenizer=VisualChatTokenizer(image_tok._proto), seed=0)


def test_modality_loss_weights(image_tok):
    vocab = image_tok.image_vocab
    labels = torch.tensor([[IGNORE_INDEX, 7, vocab.boi_id, vocab.first_code_id, vocab.first_code_id + K - 1,
                            vocab.eoi_id, vocab.first_code_id + K]])
    w = modality_loss_weights(labels, vocab, text_weight=1.0, image_code_weight=0.25)
    assert w.tolist() == [[0.0, 1.0, 1.0, 0.25, 0.25, 1.0, 1.0]]
    with pytest.raises(ValueError, match=">= 0"):
        modality_loss_weights(labels, vocab, image_code_weight=-1)
