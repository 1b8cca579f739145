import json
import pickle

import pytest

from megatron_visualchat.data import VisualChatTokenizer, train_tiny_sentencepiece
from megatron_visualchat.data.tokenizer import ADDED_TOKENS_FILE, MODEL_FILE


def test_added_tokens_are_appended_after_the_sp_vocab(tok):
    assert tok.image_id == tok.sp_vocab_size
    assert tok.pad_id == tok.sp_vocab_size + 1
    assert tok.vocab_size == tok.sp_vocab_size + 2
    assert (tok.bos_id, tok.eos_id) == (1, 2)  # LLaMA's ids
    assert max(tok.encode("What colour is the shape in image 2?\n")) < tok.sp_vocab_size


def test_save_load_round_trip_keeps_ids_and_encoding(tok, tmp_path):
    tok.save(str(tmp_path))
    assert (tmp_path / MODEL_FILE).exists()
    meta = json.loads((tmp_path / ADDED_TOKENS_FILE).read_text())
    assert meta["added_tokens"] == {"<image>": tok.image_id, "<pad>": tok.pad_id}
    loaded = VisualChatTokenizer.load(str(tmp_path))
    text = "### Image 3:\nHow many shapes are in image 3?"
    assert loaded.encode(text) == tok.encode(text)
    assert (loaded.image_id, loaded.pad_id, loaded.sha256) == (tok.image_id, tok.pad_id, tok.sha256)


def test_load_refuses_mismatched_added_tokens(tok, tmp_path):
    tok.save(str(tmp_path))
    meta = json.loads((tmp_path / ADDED_TOKENS_FILE).read_text())
    meta["added_tokens"]["<image>"] = 5
    (tmp_path / ADDED_TOKENS_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="do not match"):
        VisualChatTokenizer.load(str(tmp_path))


def test_decode_spells_image_and_drops_specials(tok):
    ids = [tok.bos_id] + tok.encode("look") + [tok.image_id] + tok.encode("\nred") + [tok.eos_id, tok.pad_id]
    assert tok.decode(ids) == "look<image>\nred"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])


def test_leading_space_is_absorbed_by_the_dummy_prefix(tok):
    assert tok.encode(" red") == tok.encode("red")
    assert tok.encode("") == []


def test_pickles_for_dataloader_workers(tok):
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode("How many shapes?") == tok.encode("How many shapes?")


def test_training_is_deterministic_and_validates(tmp_path):
    lines = ["red green blue", "What colour is it?"] * 5
    a = train_tiny_sentencepiece(str(tmp_path / "a"), lines, vocab_size=300)
    b = train_tiny_sentencepiece(str(tmp_path / "b"), lines, vocab_size=300)
    assert a.sha256 == b.sha256
    with pytest.raises(ValueError, match="vocab_size=100"):
        train_tiny_sentencepiece(str(tmp_path / "c"), lines, vocab_size=100)
    with pytest.raises(ValueError, match="empty"):
        train_tiny_sentencepiece(str(tmp_path / "d"), [], vocab_size=300)
