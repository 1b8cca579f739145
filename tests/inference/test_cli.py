"""``megatron-visualchat chat`` / ``eval-replay``: registered subcommands, launch errors explained, bad input
refused with one line and exit status 2 (bugs keep their traceback), eval-replay writes CSV, JSONL and the summary
table."""

import errno
import io
import json
import types

import pytest

from megatron_visualchat.cli import COMMANDS, main as console
from megatron_visualchat.inference import cli
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


def _refusal(capsys, argv) -> str:
    """The one error line of a refused command (exit status 2, nothing else printed)."""
    assert console(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err and len(err.splitlines()) == 1
    return err


def test_bad_input_is_refused_with_one_line_and_status_2(chat_ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    (tmp_path / "e.json").write_text("{}")
    ckpt, missing, out_dir = ["--load", chat_ckpt], str(tmp_path / "missing"), str(tmp_path / "out")
    err = _refusal(capsys, ["chat", "--load", missing])
    assert err.startswith("megatron-visualchat chat: error: ") and "not found" in err
    # the evaluation file is checked before the checkpoint (a missing one here) is read
    err = _refusal(capsys, ["eval-replay", "--load", missing, "--data", str(tmp_path / "e.json"), "--out-dir", out_dir])
    assert err.startswith("megatron-visualchat eval-replay: error: ") and "non-empty object" in err
    assert "cannot read the evaluation file" in _refusal(capsys, ["eval-replay", "--load", missing, "--data", missing,
                                                                  "--out-dir", out_dir])
    assert "temperature=-1.0 must be >= 0" in _refusal(capsys, ["chat", *ckpt, "--temperature", "-1"])
    assert "--tp 2 needs 2 processes" in _refusal(capsys, ["chat", *ckpt, "--tp", "2"])


def test_max_length_is_bounded_by_the_model_positions(chat_ckpt, capsys):
    err = _refusal(capsys, ["chat", "--load", chat_ckpt, "--max-length", "100000"])
    assert "--max-length 100000 is outside the model's positions" in err and "max_position_embeddings 512" in err
    assert "between 1 and 512" in _refusal(capsys, ["chat", "--load", chat_ckpt, "--max-length", "0"])


def _build_fails_with(monkeypatch, error) -> None:
    def build(*args, **kwargs):
        raise error

    monkeypatch.setattr(cli, "init_inference_parallel", lambda tp, seed: types.SimpleNamespace(device="cpu"))
    monkeypatch.setattr(cli, "build_chat_model", build)


@pytest.mark.parametrize("error_class, code, name, status", [
    (FileNotFoundError, errno.ENOENT, "tokenizer.model", 2),  # the user named a directory without it: refused
    (OSError, errno.ENOSPC, "model.safetensors", 1),  # the machine failed, as the converter reports it
])
def test_os_errors_on_user_paths_are_one_line(chat_ckpt, capsys, monkeypatch, error_class, code, name, status):
    error = error_class(code, errno.errorcode[code], f"{chat_ckpt}/{name}")
    _build_fails_with(monkeypatch, error)
    assert console(["chat", "--load", chat_ckpt]) == status
    assert capsys.readouterr().err == f"megatron-visualchat chat: error: {error.strerror}: {error.filename}\n"


@pytest.mark.parametrize("error", [FileNotFoundError(errno.ENOENT, "ENOENT", "/nonexistent/internal/file"),
                                   ValueError("a bug deep inside")], ids=["internal-file", "ValueError"])
def test_bugs_keep_their_traceback(chat_ckpt, monkeypatch, error):
    _build_fails_with(monkeypatch, error)
    with pytest.raises(type(error)):
        console(["chat", "--load", chat_ckpt])
