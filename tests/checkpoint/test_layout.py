"""Megatron's directory conventions shared by converted and training checkpoints: iteration and rank directory
names, the tracker file, the iteration a training run resumes from, and putting a finished directory in place."""

import pytest

from megatron_visualchat.checkpoint.errors import CheckpointError
from megatron_visualchat.checkpoint.layout import (
    TRACKER_FILE,
    iteration_dir,
    latest_iteration,
    rank_dir,
    read_tracker,
    replace_dir,
    saved_iterations,
    write_tracker,
)


def test_directory_names(tmp_path):
    assert iteration_dir(tmp_path, 200) == tmp_path / "iter_0000200"
    assert iteration_dir(tmp_path, "release") == tmp_path / "release"
    assert rank_dir(tmp_path, 1, 0, pp_suffix=False) == tmp_path / "mp_rank_01"
    assert rank_dir(tmp_path, 3, 2, pp_suffix=True) == tmp_path / "mp_rank_03_002"


def test_tracker(tmp_path):
    with pytest.raises(CheckpointError, match="latest_checkpointed_iteration.txt not found"):
        read_tracker(tmp_path)
    write_tracker(tmp_path, 0)
    assert read_tracker(tmp_path) == 0 and sorted(p.name for p in tmp_path.iterdir()) == [TRACKER_FILE]
    (tmp_path / TRACKER_FILE).write_text("release\n")
    assert read_tracker(tmp_path) == "release"
    (tmp_path / TRACKER_FILE).write_text("last")
    with pytest.raises(CheckpointError, match="found 'last'"):
        read_tracker(tmp_path)


def test_latest_iteration(tmp_path):
    assert latest_iteration(None) is None and latest_iteration(tmp_path / "absent") is None
    assert latest_iteration(tmp_path) is None
    write_tracker(tmp_path, 4)
    with pytest.raises(CheckpointError, match="names iteration 4, but .* has no such checkpoint directory"):
        latest_iteration(tmp_path)
    iteration_dir(tmp_path, 4).mkdir()
    assert latest_iteration(str(tmp_path)) == 4


def test_saved_iterations_and_replace_dir(tmp_path):
    for name in ("iter_0000010", "iter_0000002", ".tmp_iter_0000012", "tokenizer"):
        (tmp_path / name).mkdir()
    assert saved_iterations(tmp_path) == [2, 10] and saved_iterations(tmp_path / "absent") == []
    (tmp_path / "iter_0000002" / "old.pt").write_text("old")
    (tmp_path / ".tmp_iter_0000012" / "new.pt").write_text("new")
    replace_dir(tmp_path / ".tmp_iter_0000012", tmp_path / "iter_0000002")  # an existing one is replaced whole
    assert [p.name for p in (tmp_path / "iter_0000002").iterdir()] == ["new.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000002", "iter_0000010", "tokenizer"]
