"""Session-wide fixtures: a tiny tokenizer, a few image files and a saved tiny chat checkpoint."""

import pytest

# Import megatron-core and the model once here: run_parallel forks its ranks from this process, so they inherit
# the modules instead of each importing them again (seconds per rank).
import megatron_visualchat.inference  # noqa: F401
import megatron_visualchat.model.visualchat  # noqa: F401
from megatron_visualchat.testing.distributed import run_parallel

from .tiny import build_model, tiny_cfg, train_tokenizer, write_png


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tok")
    train_tokenizer(str(path))
    return str(path)


@pytest.fixture(scope="session")
def tok(tok_dir):
    from megatron_visualchat.data import VisualChatTokenizer

    return VisualChatTokenizer.load(tok_dir)


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> list[str]:
    """Three small PNGs of different colours and sizes."""
    root = tmp_path_factory.mktemp("img")
    return [write_png(root / "red.png", (200, 30, 30), (40, 30)),
            write_png(root / "green.png", (20, 180, 40), (32, 32)),
            write_png(root / "blue.png", (30, 40, 210), (24, 48))]


def _save_checkpoint(tok_dir: str, out_dir: str) -> None:
    from megatron_visualchat.data import VisualChatTokenizer
    from megatron_visualchat.checkpoint.chat import save_chat_checkpoint

    tok = VisualChatTokenizer.load(tok_dir)
    save_chat_checkpoint(build_model(tiny_cfg(tok.vocab_size, split="qkvo")), tok, out_dir)


@pytest.fixture(scope="session")
def chat_ckpt(tok_dir, tmp_path_factory) -> str:
    """A tiny mmca + qkvo chat checkpoint (random, decisive weights) saved at TP=1."""
    out = str(tmp_path_factory.mktemp("ckpt"))
    run_parallel(_save_checkpoint, args=(tok_dir, out))
    return out
