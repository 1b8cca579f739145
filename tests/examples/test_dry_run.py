"""``pretrain_vchat.py --dry-run`` in process on the tiny preset: counts that do not depend on the layout, notes, and
refusals of inputs that training would only trip over later."""

import shutil

import pytest

from megatron_visualchat.config import ConfigError
from megatron_visualchat.training.pretrain import main
from tests.examples.launch import converted_stand_in, parse_reports


def dry_run(monkeypatch, capsys, stand_ins, world: int, *flags) -> dict:
    monkeypatch.setenv("WORLD_SIZE", str(world))
    argv = ["--dry-run", "--tokenizer-dir", str(stand_ins["tok"]), "--data", f"llava:{stand_ins['data']}",
            "--seq-length", "512", "--micro-batch-size", "1", "--global-batch-size", "8", "--train-iters", "2",
            *flags]
    assert main(argv) == 0
    (report,) = parse_reports(capsys.readouterr().out)
    return report


def test_every_layout_reports_the_same_model(monkeypatch, capsys, stand_ins):
    """TP=2 x PP=2 x VPP=2 (x DP=2) against one rank: same total and trainable count, TP-split image-side
    projections and TP-replicated norms each counted once; nothing left unselected."""
    flags = ["--modality-split", "qkvo", "--trainable", "projector,image_projections,embeddings"]
    single = dry_run(monkeypatch, capsys, stand_ins, 1, *flags)
    parallel = dry_run(monkeypatch, capsys, stand_ins, 8, *flags, "--tensor-model-parallel-size", "2",
                       "--pipeline-model-parallel-size", "2", "--virtual-pipeline-model-parallel-size", "2")
    assert (parallel["total"], parallel["trainable"]) == (single["total"], single["trainable"])
    assert single["notes"] == parallel["notes"] == []
    assert {r: v[3] for r, v in parallel["ranks"].items() if v[0] == 0} == {0: "1-1,3-3", 1: "1-1,3-3",
                                                                             4: "2-2,4-4", 5: "2-2,4-4"}
    assert single["ranks"][0][4] == single["total"]


def test_a_trainable_part_that_selects_nothing_is_noted(monkeypatch, capsys, stand_ins):
    report = dry_run(monkeypatch, capsys, stand_ins, 1, "--modality-split", "none", "--trainable",
                     "projector,image_projections")
    assert report["ok"] and report["notes"] == ["note: --trainable image_projections selects no parameter of this "
                                                "model"]


def test_llm_load_at_another_layout_is_noted(monkeypatch, capsys, stand_ins, tmp_path):
    llm = converted_stand_in(tmp_path / "llm", "tiny", tp=1, pp=1)
    report = dry_run(monkeypatch, capsys, stand_ins, 2, "--llm-load", str(llm), "--tensor-model-parallel-size", "2",
                     "--trainable", "projector")
    assert report["ok"] and len(report["notes"]) == 1 and "reshards on load" in report["notes"][0]
    assert "reconvert with hf-to-megatron --tp 2 --pp 1" in report["notes"][0]


@pytest.mark.parametrize("damage,message", [
    ("other-model", r"holds LLMConfig\(num_layers=32, .* but --model-preset gives LLMConfig\(num_layers=4"),
    ("rank-file", r"1 rank file\(s\) missing, e\.g\. .*mp_rank_01"),
    ("record", r"was not written by hf-to-megatron"),
])
def test_llm_load_must_be_a_complete_conversion_of_the_preset(monkeypatch, capsys, stand_ins, tmp_path, damage,
                                                               message):
    llm = converted_stand_in(tmp_path / "llm", "llama2-7b" if damage == "other-model" else "tiny", tp=2, pp=1)
    if damage == "rank-file":
        shutil.rmtree(llm / "iter_0000000" / "mp_rank_01")
    if damage == "record":
        (llm / "megatron_visualchat_config.json").unlink()
    with pytest.raises(ConfigError, match=f"--llm-load {llm}.*" + message):
        dry_run(monkeypatch, capsys, stand_ins, 2, "--llm-load", str(llm), "--tensor-model-parallel-size", "2")


def test_an_unknown_flag_is_a_usage_error(monkeypatch, capsys, stand_ins):
    with pytest.raises(SystemExit) as exit_info:
        dry_run(monkeypatch, capsys, stand_ins, 2, "--tensor-model-paralel-size", "2")
    assert exit_info.value.code == 2 and "--tensor-model-paralel-size" in capsys.readouterr().err
