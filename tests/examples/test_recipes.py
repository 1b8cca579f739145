"""The shipped recipes (examples/recipes/): DS-VisualChat's one stage at 7B / 13B / 70B is exactly the matching example
script's TrainingConfig (whose dry runs test_scripts.py checks at the real layouts); InfMLLM's three stages dry-run at
7B / 13B / 70B with what each stage trains (the pool-adapter, then the LLM too); the grounding quickstart script dry-runs the
tiny profile."""

import dataclasses
import json
import os
import shutil
import subprocess

import pytest

from megatron_visualchat.training import recipe_run
from megatron_visualchat.training.arguments import parse_args
from megatron_visualchat.training.recipe import load_recipe
from tests.examples.counts import LLAMA2
from tests.examples.launch import REPO, converted_stand_in, parse_reports, run_launch
from tests.examples.test_scripts import script_env

RECIPES = REPO / "examples" / "recipes"


def dry_run(capsys, path, profile, sets) -> list[dict]:
    recipe = load_recipe(path, profile=profile, assignments=tuple(f"{k}={v}" for k, v in sets.items()))
    assert recipe_run.dry_run(recipe) == 0
    return parse_reports(capsys.readouterr().out)


def script_config(script: str, env: dict, tmp_path):
    """The TrainingConfig an example script launches (a stand-in torchrun prints the trainer's flags)."""
    shim = tmp_path / "torchrun"
    shim.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
    shim.chmod(0o755)
    result = run_launch([REPO / "examples" / script], {**env, "TORCHRUN": str(shim)})
    assert result.returncode == 0, result.stderr
    argv = result.stdout.splitlines()
    return parse_args(argv[[a.endswith("pretrain_vchat.py") for a in argv].index(True) + 1:])


def stand_in_sets(stand_ins, llm, tmp_path) -> dict:
    return {"llm_ckpt": llm, "tokenizer": stand_ins["tok"], "vision_weights": stand_ins["vision"],
            "data": f"llava:{stand_ins['data']}", "run_dir": tmp_path / "run"}


@pytest.mark.parametrize("profile,preset,tp,pp", [("7b", "llama2-7b", 2, 1), ("13b", "llama2-13b", 4, 1),
                                                  ("70b", "llama2-70b", 8, 4)])
def test_dsvc_recipe_is_the_example_script(stand_ins, tmp_path, profile, preset, tp, pp):
    """Every setting of the 7B / 13B / 70B profiles equals examples/pretrain_vchat_<size>.sh's (but where it saves),
    and the world size is the script's."""
    llm = converted_stand_in(tmp_path / "llm", preset, tp=tp, pp=pp)
    recipe = load_recipe(RECIPES / "dsvc_1stage.yaml", profile=profile,
                         assignments=tuple(f"{k}={v}" for k, v in stand_in_sets(stand_ins, llm, tmp_path).items()))
    (stage,) = recipe.stages
    script = script_config(f"pretrain_vchat_{profile}.sh", {k: str(v) for k, v in script_env(
        stand_ins, llm, tmp_path).items()}, tmp_path)
    where = {"checkpoint": dataclasses.replace(script.checkpoint, save=str(stage.save)),
             "metrics": dataclasses.replace(script.metrics, tensorboard_dir=stage.run.metrics.tensorboard_dir)}
    assert stage.run == dataclasses.replace(script, **where)
    assert recipe.launch.world_size == tp * pp * {"7b": 4, "13b": 2, "70b": 1}[profile]


@pytest.mark.parametrize("profile,preset,tp,pp,pp_layers,world", [
    ("7b", "llama2-7b", 2, 1, None, 8), ("13b", "llama2-13b", 4, 1, None, 8),
    ("70b", "llama2-70b", 8, 4, (17, 21, 21, 21), 32)])
def test_infmllm_recipe_at_scale(capsys, stand_ins, tmp_path, profile, preset, tp, pp, pp_layers, world):
    refexp, llava = stand_ins["root"] / "refexp.json", stand_ins["root"] / "llava_one_image.json"
    refexp.write_text(json.dumps([{"image": "img0.png", "bbox": [2, 4, 10, 12], "expression": "the red one"}] * 300))
    llava.write_text(json.dumps([{"image": "img0.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "red"}]}] * 300))
    sets = {"llm_ckpt": converted_stand_in(tmp_path / "llm", preset, tp=tp, pp=pp, pp_layers=pp_layers),
            "tokenizer": stand_ins["tok"],
            "vision_weights": stand_ins["vision"], "run_dir": tmp_path / "run", "refexp": refexp,
            **{k: f"llava:{llava}" for k in ("captions", "vqa", "instruct")}}
    align, multitask, instruct = dry_run(capsys, RECIPES / "infmllm_3stage.yaml", profile, sets)
    for report in (align, multitask, instruct):
        assert report["ok"] and not report["notes"] and sorted(report["ranks"]) == list(range(world))
    assert align["total"] == multitask["total"] == instruct["total"]
    layers, hidden = LLAMA2[preset][:2]
    pool_adapter = 1408 * hidden + hidden + hidden * hidden + hidden  # Linear(1408 -> h), GELU, Linear(h -> h)
    assert align["trainable"] == pool_adapter
    assert multitask["trainable"] == instruct["trainable"] > pool_adapter + layers * hidden * hidden * 12


def test_grounding_quickstart_script_dry_run(tmp_path):
    """examples/grounding_quickstart.sh byte for byte (set-up step stubbed, small sets) as a recipe dry run."""
    root = tmp_path / "checkout"
    (root / "examples" / "recipes").mkdir(parents=True)
    (root / "tools").mkdir()
    for name in ("examples/grounding_quickstart.sh", "examples/recipes/infmllm_3stage.yaml"):
        shutil.copy2(REPO / name, root / name)
    (root / ".venv").symlink_to(REPO / ".venv")
    (root / "tools" / "setup_venv.sh").write_text("#!/usr/bin/env bash\n")
    (root / "tools" / "setup_venv.sh").chmod(0o755)
    env = {**os.environ, "OUT": str(tmp_path / "run"), "GROUNDING_SAMPLES": "40", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([root / "examples" / "grounding_quickstart.sh", "--dry-run", "--set", "qa_samples=40"],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    reports = parse_reports(result.stdout)
    assert len(reports) == 3 and all(r["ok"] for r in reports)
    assert "stage instruct: " in result.stdout and not (tmp_path / "run" / "chat").exists()
