"""``megatron-visualchat chat`` / ``eval-replay``: registered subcommands, launch errors explained, eval-replay
writes CSV, JSONL and the summary table."""

import io
import json

import pytest

from megatron_visualchat.cli import COMMANDS
from megatron_visualchat.testing.distributed import run_parallel


def test_subcommands_are_registered():
    assert COMMANDS["chat"] == "megatron_visualchat.inference.cli:main"
    assert COMMANDS["eval-replay"] == "megatron_visualchat.inference.cli:eval_main"


def test_tp_without_torchrun_is_explained(monkeypatch):
    from megatron_visualchat.inference.cli import init_inference_parallel

    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ValueError, match="--tp 2 needs 2 processes but WORLD_SIZE=1: launch with `torchrun"):
        init_inference_parallel(2, seed=1)


def _eval(ckpt, data, root, out_dir):
    from megatron_visualchat.inference.cli import eval_main

    out = io.StringIO()
    eval_main(["--load", ckpt, "--data", data, "--image-root", root, "--out-dir", out_dir, "--max-new-tokens", "4"],
              stdout=out)
    return out.getvalue()


def test_eval_replay_command(chat_ckpt, images, tmp_path):
    import os

    data = tmp_path / "eval.json"
    data.write_text(json.dumps({"pair": [["Describe both.", "red.png green.png"],
                                         {"question": "Colour of image 1?", "answer": "red"}]}))
    out = run_parallel(_eval, args=(chat_ckpt, str(data), os.path.dirname(images[0]), str(tmp_path / "out")))[0]
    assert "pair round 1: 4 tokens" in out and "| exact_match | 1 | 0 |" in out
    assert (tmp_path / "out" / "results.csv").read_text().startswith("conversation,round,images,")
    assert len((tmp_path / "out" / "results.jsonl").read_text().splitlines()) == 2
    assert "| all rounds | 2 | 0 |" in (tmp_path / "out" / "summary.md").read_text()


def test_bad_eval_file_fails_before_building_the_model(tmp_path):
    from megatron_visualchat.inference.cli import eval_main

    (tmp_path / "e.json").write_text("{}")
    with pytest.raises(ValueError, match="non-empty object"):
        eval_main(["--load", str(tmp_path), "--data", str(tmp_path / "e.json"), "--out-dir", str(tmp_path)])
