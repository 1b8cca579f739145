"""The chat checkpoint's writer is atomic (an existing export is replaced only by a complete one, a directory of
something else is refused) and its files are checksummed: damaged bytes are named at load, an export written
before checksums still loads."""

import errno
import shutil

import pytest

from megatron_visualchat.checkpoint.chat import CONFIG_FILE, WEIGHTS_FILE, check_export_dir
from megatron_visualchat.checkpoint.checksums import CHECKSUM_FILE
from megatron_visualchat.checkpoint.errors import CheckpointError
from megatron_visualchat.testing.distributed import RankFailed, run_parallel
from tests.inference.tiny import build_model, tiny_cfg, train_tokenizer


class _FullDiskTokenizer:
    """Fails like a full disk after the weights and the config are written."""

    def save(self, directory):
        raise OSError(errno.ENOSPC, "No space left on device", directory)


def _export(tok_dir, out_dir, seed, fail=False):
    from megatron_visualchat.checkpoint.chat import save_chat_checkpoint
    from megatron_visualchat.data import VisualChatTokenizer

    tok = VisualChatTokenizer.load(tok_dir)
    model = build_model(tiny_cfg(tok.vocab_size), seed=seed)
    save_chat_checkpoint(model, _FullDiskTokenizer() if fail else tok, out_dir)


def _load(load_dir):
    from megatron_visualchat.inference.checkpoint import build_chat_model

    try:
        build_chat_model(load_dir)
    except CheckpointError as e:
        return str(e)
    return "loaded"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    train_tokenizer(str(root / "tok"))
    run_parallel(_export, args=(str(root / "tok"), str(root / "export"), 1))
    return root


def _files(directory):
    return {p.name: p.read_bytes() for p in directory.iterdir()}


def test_a_failed_export_leaves_the_previous_one_whole(exported, tmp_path):
    out = shutil.copytree(exported / "export", tmp_path / "export")
    before = _files(out)
    assert sorted(before) == sorted([WEIGHTS_FILE, CONFIG_FILE, CHECKSUM_FILE, "tokenizer.model",
                                     "added_tokens.json"])
    with pytest.raises(RankFailed, match="No space left on device"):
        run_parallel(_export, args=(str(exported / "tok"), str(out), 2, True))
    assert _files(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temp left
    run_parallel(_export, args=(str(exported / "tok"), str(out), 2))
    assert _files(out)[WEIGHTS_FILE] != before[WEIGHTS_FILE] and sorted(_files(out)) == sorted(before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_export_dir_holding_something_else_is_refused(tmp_path):
    check_export_dir(tmp_path / "new")
    check_export_dir(tmp_path)  # empty
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match=f"export directory {tmp_path} is not empty and holds no earlier "
                                              f"export \\({CONFIG_FILE} not found\\)"):
        check_export_dir(tmp_path)
    with pytest.raises(CheckpointError, match="exists and is not a directory"):
        check_export_dir(tmp_path / "notes.txt")


def test_damaged_export_is_named_and_old_exports_still_load(exported, tmp_path):
    out = shutil.copytree(exported / "export", tmp_path / "export")
    assert run_parallel(_load, args=(str(out),))[0] == "loaded"
    weights = out / WEIGHTS_FILE
    data = weights.read_bytes()
    weights.write_bytes(data[:-100] + bytes([data[-100] ^ 1]) + data[-99:])  # one flipped bit in a tensor
    assert run_parallel(_load, args=(str(out),))[0] == (
        f"{weights} is corrupt (checksum mismatch): export it again (pretrain_vchat.py --load SAVE_DIR "
        "--export-dir DIR) or restore it from a copy")
    weights.write_bytes(data)
    (out / CHECKSUM_FILE).unlink()  # written before checksums: loads, unverified
    assert run_parallel(_load, args=(str(out),))[0] == "loaded"
    weights.write_bytes(data[: len(data) // 2])
    assert run_parallel(_load, args=(str(out),))[0].startswith(f"{weights} is corrupt (cannot be read: ")
