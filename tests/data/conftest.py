"""Shared fixtures for the data tests: a tokenizer trained on the fly and tiny file writers."""

import base64
import io
import json

import pytest
from PIL import Image

from megatron_visualchat.data import VisualChatTokenizer, train_tiny_sentencepiece
from megatron_visualchat.data.synthetic import synthetic_corpus_lines


@pytest.fixture(scope="session")
def tok(tmp_path_factory) -> VisualChatTokenizer:
    """A tiny LLaMA-style sentencepiece tokenizer (no downloads)."""
    lines = synthetic_corpus_lines(num_samples=100) + ["Describe the picture. A cat sits on a red mat. Hello world!"]
    return train_tiny_sentencepiece(str(tmp_path_factory.mktemp("tok")), lines, vocab_size=400)


def _png_bytes(colour=(255, 0, 0), size=(8, 8), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, colour).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def png_bytes():
    """png_bytes(colour, size, mode) -> encoded PNG of a solid image."""
    return _png_bytes


@pytest.fixture
def b64_png():
    """b64_png(colour, size) -> base64 text of a solid PNG."""
    return lambda colour=(255, 0, 0), size=(8, 8): base64.b64encode(_png_bytes(colour, size)).decode()


@pytest.fixture
def write_png(tmp_path):
    """write_png(name, colour, size) -> path of a solid PNG under tmp_path."""

    def write(name, colour=(255, 0, 0), size=(8, 8)):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_png_bytes(colour, size))
        return str(path)

    return write


@pytest.fixture
def write_jsonl(tmp_path):
    """write_jsonl(name, records) -> path; a str record is written verbatim (for malformed lines)."""

    def write(name, records):
        path = tmp_path / name
        with open(path, "w") as f:
            for r in records:
                f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
        return str(path)

    return write
