"""Every example launch (the 7B/13B/70B scripts, the SLURM batch script, README's "Training at scale" commands) runs
unmodified as a dry run, and its per-rank parameter counts match the closed forms of the published models."""

import shlex
from pathlib import Path

import pytest

from megatron_visualchat.checkpoint.convert import build_parser as converter_parser
from megatron_visualchat.cli import COMMANDS
from tests.examples.counts import (
    LLAMA2, LLAMA2_PUBLISHED, linear_projector, llama_stage, llama_total, padded_vocab, qwen_vl_vit_bigg,
)
from tests.examples.launch import REPO, converted_stand_in, parse_reports, run_launch, write_slurm_shims

QWEN_VL_OUT = 4096  # the Qwen-VL encoder's output width, the linear projector's input


def script_env(stand_ins, llm_ckpt: Path, tmp_path: Path, **extra) -> dict:
    return {"LLM_CKPT": str(llm_ckpt), "TOKENIZER": str(stand_ins["tok"]), "VISION_WEIGHTS": str(stand_ins["vision"]),
            "DATA": f"llava:{stand_ins['data']}", "SAVE": str(tmp_path / "save"), **extra}


def check_report(report: dict, preset: str, *, tp: int, pp_layers: list[int], dp: int) -> None:
    """Each rank's position (megatron's order: TP fastest, then DP, then PP), layers and parameter counts; the model
    total (TP-replicated parameters once) and what trains: the projector and the input embeddings."""
    pp = len(pp_layers)
    hidden, vocab = LLAMA2[preset][1], padded_vocab(tp)
    vision = qwen_vl_vit_bigg() + linear_projector(QWEN_VL_OUT, hidden)
    projector = linear_projector(QWEN_VL_OUT, hidden)
    assert report["ok"] and not report["notes"], report["notes"]
    assert report["sequence_parallel"]  # every recipe shards the sequence over its TP ranks
    assert sorted(report["ranks"]) == list(range(tp * pp * dp))
    for rank, (dp_rank, pp_rank, tp_rank, layers, params, trainable) in report["ranks"].items():
        assert rank == tp_rank + tp * (dp_rank + dp * pp_rank)
        first, last = pp_rank == 0, pp_rank == pp - 1
        start = sum(pp_layers[:pp_rank])
        assert layers == f"{start + 1}-{start + pp_layers[pp_rank]}"
        assert params == llama_stage(preset, tp, pp_layers[pp_rank], first, last, vocab) + (vision if first else 0)
        assert trainable == (projector + vocab // tp * hidden if first else 0)
    assert report["total"] == llama_total(preset, vocab) + vision
    assert report["trainable"] == projector + vocab * hidden


def test_closed_forms_match_the_published_llama2_sizes():
    assert {p: llama_total(p) for p in LLAMA2} == LLAMA2_PUBLISHED


@pytest.mark.parametrize("preset,tp", [("llama2-7b", 2), ("llama2-13b", 4)])
def test_single_node_scripts(stand_ins, tmp_path, preset, tp):
    llm = converted_stand_in(tmp_path / "llm", preset, tp=tp, pp=1)
    result = run_launch([REPO / "examples" / f"pretrain_vchat_{preset.split('-')[1]}.sh"],
                        script_env(stand_ins, llm, tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    (report,) = parse_reports(result.stdout)
    check_report(report, preset, tp=tp, pp_layers=[LLAMA2[preset][0]], dp=8 // tp)


def readme_training_steps() -> dict[str, str]:
    """The numbered steps of README's "Training at scale" block: {"1": text, "2": text (with the SLURM lines)}."""
    text = (REPO / "README.md").read_text()
    block = text.split("## Training at scale", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    steps, current = {}, None
    for line in block.splitlines():
        if line[:2] == "# " and line[2:3].isdigit():
            current = line[2]
            steps[current] = ""
        elif current is not None:
            steps[current] += line + "\n"
    return steps


def substitute(text: str, paths: dict) -> str:
    for placeholder, path in paths.items():
        assert placeholder in text, f"README no longer mentions {placeholder}"
        text = text.replace(placeholder, str(path))
    return text


def test_readme_commands_70b_script_and_slurm(stand_ins, tmp_path):
    """README's conversion command parses with the converter's own parser; a stand-in of its output at that layout
    feeds README's launch commands as written: examples/pretrain_vchat_70b.sh on node 0 of 4, and the sbatch
    script (through srun/scontrol/sbatch shims), which must report the same model."""
    steps = readme_training_steps()
    convert = shlex.split(steps["1"].replace("\\\n", " "))
    assert convert[0] == "megatron-visualchat" and COMMANDS[convert[1]].endswith(":hf_to_megatron_main")
    args = converter_parser().parse_args(convert[1:])
    llm = converted_stand_in(tmp_path / "llm", "llama2-70b", tp=args.tp, pp=args.pp, pp_layers=args.pp_layers)
    launch = substitute(steps["2"], {args.out: llm, "/ckpt/tok": stand_ins["tok"], "/data/llava_instruct_150k.json":
                                     stand_ins["data"], "/ckpt/qwen-vl-visual.safetensors": stand_ins["vision"]})
    result = run_launch(f"set -euo pipefail\nexport SAVE={tmp_path / 'save'}\n{launch}", {},
                        path_dirs=[write_slurm_shims(tmp_path / "bin")], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    direct, slurm = parse_reports(result.stdout)
    check_report(direct, "llama2-70b", tp=8, pp_layers=[17, 21, 21, 21], dp=1)
    assert slurm == direct
    launches = [line for line in result.stderr.splitlines() if line.startswith("torchrun_dry_run:")]
    assert len(launches) == 2 and all("4 node(s) x 8 process(es)" in line and "'node-rank': '0'" in line
                                      and "'master-addr': 'node0'" in line for line in launches), launches


def test_a_typo_in_any_path_variable_fails_naming_the_flag_and_path(stand_ins, tmp_path):
    llm = converted_stand_in(tmp_path / "llm", "llama2-7b", tp=2, pp=1)
    env = script_env(stand_ins, f"{llm}x", tmp_path, TOKENIZER=f"{stand_ins['tok']}x",
                     VISION_WEIGHTS=f"{stand_ins['vision']}x", DATA=f"llava:{stand_ins['data']}x")
    result = run_launch([REPO / "examples" / "pretrain_vchat_7b.sh"], env)
    assert result.returncode != 0
    for flag, path, kind in [("--llm-load", f"{llm}x", "directory"), ("--tokenizer-dir", f"{stand_ins['tok']}x",
                             "directory"), ("--vision-weights", f"{stand_ins['vision']}x", "file"),
                             ("--data", f"{stand_ins['data']}x", "file")]:
        assert f"{flag} {path}: no such {kind}" in result.stderr
    assert "dry run ok" not in result.stdout


def test_a_world_that_does_not_fit_the_layout_fails(stand_ins, tmp_path):
    llm = converted_stand_in(tmp_path / "llm", "llama2-70b", tp=8, pp=4, pp_layers=(17, 21, 21, 21))
    result = run_launch([REPO / "examples" / "pretrain_vchat_70b.sh"], script_env(stand_ins, llm, tmp_path, NNODES="3"))
    assert result.returncode != 0
    assert "pretrain_vchat: error: world size 24 is not divisible by tp(8) x pp(4)" in result.stderr
