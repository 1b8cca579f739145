"""Staged recipes: a YAML file of stages resolves to each stage's trainer flags (defaults <- stage <- profile,
variables, the chaining the runner adds), every mistake is refused naming the file and the key, and the runner's
stage-level resume (finished markers, changed stages, --from-stage, a stage stopped early) picks the right stages.
The last test trains a real two-stage chain: stage 2 starts from stage 1's weights (--init-from) with another
trainable set."""

import json
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from megatron_visualchat.checkpoint.chat import WEIGHTS_FILE
from megatron_visualchat.checkpoint.errors import CheckpointError
from megatron_visualchat.checkpoint.init_from import init_iteration
from megatron_visualchat.checkpoint.layout import iteration_dir, write_tracker
from megatron_visualchat.checkpoint.training_state import META_FILE
from megatron_visualchat.training import recipe_run
from megatron_visualchat.training.recipe import RecipeError, load_recipe
from megatron_visualchat.testing.distributed import run_parallel

BASE = """
variables: {iters: 4, lr_scale: null}
defaults:
  data: {synthetic: 64, data_cache_dir: "${run_dir}/data"}
  batch: {micro_batch_size: 2, global_batch_size: 4, seq_length: 160, train_iters: "${iters}"}
  optimizer: {lr: 1.0e-3, lr_warmup_fraction: 0.0}  # no warmup: the first step moves the weights
  model: {trainable: [projector, llm]}
profile: small
profiles:
  small: {variables: {iters: 2}, stages: {second: {optimizer: {lr: 5.0e-4}}}}
  other: {launch: {nproc_per_node: 2}, defaults: {parallelism: {tensor_model_parallel_size: 2}}}
stages:
  - name: first
    model: {trainable: [projector]}
  - name: second
    optimizer: {min_lr: 1.0e-5}
    metrics: {no_progress_bar: true}
"""


def write(tmp_path, text: str, name: str = "recipe.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def flags(stage) -> dict:
    """The stage's flags as {flag: [values]} (a switch maps to [])."""
    out, argv = {}, list(stage.argv)
    while argv:
        flag = argv.pop(0)
        values = out.setdefault(flag, [])
        if argv and not argv[0].startswith("--"):
            values.append(argv.pop(0))
    return out


def test_stage_settings_merge_and_chain(tmp_path):
    recipe = load_recipe(write(tmp_path, BASE), assignments=("run_dir=" + str(tmp_path / "run"),))
    first, second = recipe.stages
    assert recipe.profile == "small" and recipe.launch.world_size == 1
    f1, f2 = flags(first), flags(second)
    assert f1["--trainable"] == ["projector"] and f2["--trainable"] == ["projector,llm"]
    assert f1["--train-iters"] == f2["--train-iters"] == ["2"]  # the profile's variable, typed through ${iters}
    assert f1["--lr"] == ["0.001"] and f2["--lr"] == ["0.0005"] and f2["--min-lr"] == ["1e-05"]
    assert f2["--no-progress-bar"] == [] and "--no-progress-bar" not in f1
    run = tmp_path / "run"
    assert f1["--save"] == [str(run / "first" / "checkpoints")] and "--init-from" not in f1
    assert f2["--init-from"] == [str(run / "first" / "checkpoints")]
    assert f2["--tokenizer-dir"] == [str(run / "first" / "checkpoints" / "tokenizer")]  # the vocabulary carries on
    assert second.run.optimizer.lr == 5e-4 and second.run.checkpoint.init_from == (str(run / "first/checkpoints"),)


def test_profile_layout_and_null_restores_the_default(tmp_path):
    text = BASE.replace("  - name: first\n", "  - name: first\n    optimizer: {lr: null}\n")
    recipe = load_recipe(write(tmp_path, text), profile="other", assignments=("iters=3",))
    first = recipe.stages[0]
    assert recipe.launch.world_size == 2 and first.run.parallelism.tensor_model_parallel_size == 2
    assert first.run.optimizer.lr == 1e-3 and "--lr" not in flags(first)  # the trainer's default, not the recipe's
    assert recipe.run_dir.as_posix() == "runs/recipe-other" and first.run.batch.train_iters == 3


@pytest.mark.parametrize("change,message", [
    (("\nstages:\n", "\nstagez: []\nstages:\n"), r"recipe\.yaml: the recipe: unknown key 'stagez'"),
    (("optimizer: {min_lr", "optimiser: {min_lr"), r"stages\[1\] \(second\): unknown section 'optimiser'"),
    (("min_lr: 1.0e-5", "lrr: 1.0e-5"), r"stages\[1\] \(second\): unknown key optimizer\.lrr \(optimizer keys: "),
    (("{no_progress_bar: true}", "{no_progress_bar: yes please}"), r"metrics\.no_progress_bar is a switch"),
    (("min_lr: 1.0e-5", "min_lr: fast"), r"stage second: argument --min-lr: invalid float value: 'fast'"),
    (("optimizer: {min_lr: 1.0e-5}", "checkpoint: {save: /x}"), r"checkpoint\.save is set by the recipe runner"),
    (("  - name: second", "  - name: first"), r"stage name 'first' is used twice"),
    (("{iters: 2}", "{iters: 2}, launch: {nproc_per_node: 3}"),
     r"stage first: --global-batch-size 4 is not divisible .* \(on 3 process\(es\)\)"),
    (("stages: {second:", "stages: {third:"), r"profiles\.small\.stages: no stage 'third'"),
    (("trainable: [projector]}", "trainable: [projector]}\n    data: {template: \"${nope}\"}"),
     r"stage first: \$\{nope\} is not a variable"),
    (("lr: 1.0e-3,", "lr: \"${lr_scale}\","), r"variable 'lr_scale' has no value: pass --set lr_scale=VALUE"),
])
def test_mistakes_name_the_file_and_key(tmp_path, change, message):
    path = write(tmp_path, BASE.replace(*change))
    assert BASE.replace(*change) != BASE
    with pytest.raises(RecipeError, match=message) as e:
        load_recipe(path)
    assert str(path) in str(e.value)


def test_unknown_profile_and_set(tmp_path):
    path = write(tmp_path, BASE)
    with pytest.raises(RecipeError, match=r"no profile 'huge' \(profiles: small, other\)"):
        load_recipe(path, profile="huge")
    with pytest.raises(RecipeError, match=r"--set itres=2: expected NAME=VALUE with NAME one of iters, lr_scale"):
        load_recipe(path, assignments=("itres=2",))


def fake_stage_run(stage, iteration=None):
    """What a stage's training leaves: checkpoints up to ``iteration`` of its train_iters (default: all)."""
    total = stage.run.batch.train_iters
    iteration = total if iteration is None else iteration
    directory = iteration_dir(stage.save, iteration)
    directory.mkdir(parents=True)
    (directory / META_FILE).write_text(json.dumps({"iteration": iteration, "train_iters": total}))
    write_tracker(stage.save, iteration)
    return 0


def test_finished_stages_are_skipped_and_changes_refused(tmp_path, capsys):
    path = write(tmp_path, BASE)
    run_dir = ("run_dir=" + str(tmp_path / "run"),)
    launched = []

    def launcher(stage):
        launched.append(stage.name)
        return fake_stage_run(stage, 1 if stage.name == "second" and launched.count("second") == 1 else None)

    recipe = load_recipe(path, assignments=run_dir)
    assert recipe_run.run(recipe, launcher=launcher) == 0
    assert "stage second stopped at iteration 1 of 2" in capsys.readouterr().out  # an --exit-interval stop
    assert recipe_run.finished_flags(recipe.stages[0]) == list(recipe.stages[0].argv)
    assert recipe_run.finished_flags(recipe.stages[1]) is None
    assert recipe_run.run(recipe, launcher=launcher) == 0  # continues with the unfinished stage only
    assert launched == ["first", "second", "second"]
    assert recipe_run.plan(recipe) == []
    assert "stage first: finished" in capsys.readouterr().out

    changed = load_recipe(path, assignments=(*run_dir, "iters=3"))
    with pytest.raises(RecipeError, match=r"stage first finished with other settings \(--train-iters: then 2, now 3\): "
                                          r"rerun it .* with --from-stage first"):
        recipe_run.plan(changed)
    assert [s.name for s in recipe_run.plan(changed, from_stage="first")] == ["first", "second"]

    (recipe.stages[0].directory / recipe_run.MARKER).unlink()
    with pytest.raises(RecipeError, match="stage second is finished, but the earlier stage first is not"):
        recipe_run.plan(recipe)
    with pytest.raises(RecipeError, match="--from-stage second: the earlier stage first has not finished"):
        recipe_run.plan(recipe, from_stage="second")


def test_from_stage_moves_old_output_aside_and_a_failure_stops(tmp_path):
    recipe = load_recipe(write(tmp_path, BASE), assignments=("run_dir=" + str(tmp_path / "run"),))
    assert recipe_run.run(recipe, launcher=fake_stage_run) == 0
    assert recipe_run.run(recipe, from_stage="second", launcher=lambda stage: 3) == 3
    aside = [p.name for p in (tmp_path / "run").iterdir() if p.name.startswith("second.before-")]
    assert len(aside) == 1 and (tmp_path / "run" / aside[0] / recipe_run.MARKER).is_file()
    assert recipe_run.plan(recipe) == [recipe.stages[1]]  # failed: not marked, runs (resumes) next time


def test_init_from_needs_a_saved_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match=rf"--init-from {tmp_path} holds no training checkpoint \(latest_"):
        init_iteration(tmp_path)


def _train(argv):
    from megatron_visualchat.training.arguments import parse_args
    from megatron_visualchat.training.pretrain import train

    return train(parse_args(argv))


def test_a_stage_starts_from_the_earlier_stages_weights(tmp_path):
    """Stage 1 trains the projector; stage 2 trains only the LLM, starting from stage 1's weights (--init-from):
    its export holds stage 1's projector exactly."""
    text = BASE.replace("  - name: second\n", "  - name: second\n    model: {trainable: [llm]}\n"
                        f"    checkpoint: {{export_dir: {tmp_path / 'chat'}}}\n")
    recipe = load_recipe(write(tmp_path, text), assignments=("run_dir=" + str(tmp_path / "run"),
                                                             "iters=1"), profile="small")

    def launcher(stage):
        run_parallel(_train, args=(list(stage.argv),), timeout=300)
        return 0

    assert recipe_run.run(recipe, launcher=launcher) == 0
    first = torch.load(iteration_dir(recipe.stages[0].save, 1) / "mp_rank_00_000" / "trainable.pt",
                       weights_only=True)["model"][0]
    exported = load_file(tmp_path / "chat" / WEIGHTS_FILE)
    projector = {k: v for k, v in first.items() if "projector" in k}
    assert projector and all(torch.equal(exported[k], v) for k, v in projector.items())
