"""``megatron-visualchat recipe RECIPE.yaml``: run a recipe's stages in order, each under torchrun, resumable at
stage granularity.

A stage is finished when its marker ``RUN_DIR/<stage>/finished.json`` exists: the runner writes it (with the
stage's flags) once the stage's torchrun exits cleanly with its last checkpoint at the final iteration, and skips
that stage on the next call. A stage without one runs; the trainer resumes it from its last checkpoint (``--save``
holds one after a crash, a kill or an ``--exit-interval`` stop). Refused
before anything runs: a finished stage whose flags have changed since, or one after a stage that still has to run
(its output would not follow from the new one) -- ``--from-stage NAME`` reruns NAME and everything after it, moving
their old directories aside. ``--dry-run`` runs each stage's ``pretrain_vchat --dry-run`` in this process at the
recipe's world size (the later stages' inputs, not written yet, are named instead of checked).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from megatron_visualchat.checkpoint.layout import TRACKER_FILE, iteration_dir, latest_iteration
from megatron_visualchat.config import ConfigError
from megatron_visualchat.training.recipe import Launch, Recipe, RecipeError, Stage, load_recipe

MARKER = "finished.json"
TRAINER_MODULE = "megatron_visualchat.training.pretrain"


def marker(stage: Stage) -> Path:
    return stage.directory / MARKER


def finished_flags(stage: Stage) -> Optional[list[str]]:
    """The flags a finished stage ran with (None: not finished)."""
    path = marker(stage)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())["argv"]
    except (ValueError, KeyError, TypeError):
        raise RecipeError(f"{path} is damaged: delete it to run stage {stage.name} again") from None


def plan(recipe: Recipe, from_stage: Optional[str] = None) -> list[Stage]:
    """The stages to run, in order (``from_stage`` and every later one, or those not finished); refuses a finished
    stage whose settings changed, one that follows a stage still to run, and an unfinished one before
    ``from_stage``."""
    start = recipe.stages.index(recipe.stage(from_stage)) if from_stage else len(recipe.stages)
    todo: list[Stage] = []
    for stage in recipe.stages:
        if recipe.stages.index(stage) >= start:
            todo.append(stage)
            continue
        flags = finished_flags(stage)
        if flags is None and from_stage:
            raise RecipeError(f"--from-stage {from_stage}: the earlier stage {stage.name} has not finished "
                              f"({marker(stage)} not found): run from {stage.name}")
        if flags is None:
            todo.append(stage)
        elif todo:
            raise RecipeError(f"stage {stage.name} is finished, but the earlier stage {todo[0].name} is not, so its "
                              f"output would not follow from {todo[0].name}'s: rerun with --from-stage "
                              f"{todo[0].name}")
        elif flags != list(stage.argv):
            raise RecipeError(f"stage {stage.name} finished with other settings ({_changes(flags, stage.argv)}): "
                              f"rerun it and the stages after it with --from-stage {stage.name}, or restore the "
                              "recipe")
    return todo


def _changes(old: list[str], new: tuple[str, ...]) -> str:
    before, after = _options(old), _options(new)
    show = lambda values: "unset" if values is None else " ".join(values) or "set"  # noqa: E731
    return "; ".join(f"{flag}: then {show(before.get(flag))}, now {show(after.get(flag))}"
                     for flag in sorted(set(before) | set(after)) if before.get(flag) != after.get(flag))


def _options(argv) -> dict[str, list[str]]:
    """``--flag value...`` as {flag: [values]} (a switch: [])."""
    out: dict[str, list[str]] = {}
    flag = None
    for arg in argv:
        if arg.startswith("--"):
            flag = arg
            out.setdefault(flag, [])
        else:
            out[flag].append(arg)
    return out


def torchrun_command(stage: Stage, launch: Launch, *, node_rank: int = 0, master_addr: str = "127.0.0.1",
                     master_port: int = 29500) -> list[str]:
    """The stage's launch: torchrun (standalone on one node, which picks a free port) running the trainer."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(launch.nproc_per_node)]
    if launch.nnodes == 1:
        command.append("--standalone")
    else:
        command += ["--nnodes", str(launch.nnodes), "--node-rank", str(node_rank), "--master-addr", master_addr,
                    "--master-port", str(master_port)]
    return [*command, "-m", TRAINER_MODULE, *stage.argv]


def _move_aside(stage: Stage) -> None:
    if stage.directory.exists():
        aside = stage.directory.with_name(f"{stage.directory.name}.before-{time.strftime('%Y%m%dT%H%M%S')}")
        stage.directory.rename(aside)
        print(f"stage {stage.name}: earlier output moved to {aside}", flush=True)


def _status(stage: Stage) -> str:
    iteration = latest_iteration(stage.save)
    return f"resuming from its checkpoint of iteration {iteration}" if iteration else "starting"


def run(recipe: Recipe, *, from_stage: Optional[str] = None, launcher: Optional[Callable[[Stage], int]] = None,
        node_rank: int = 0, master_addr: str = "127.0.0.1", master_port: int = 29500) -> int:
    """Run the stages ``plan`` picks; ``launcher(stage) -> exit code`` starts one (default: torchrun)."""
    todo = plan(recipe, from_stage)
    if from_stage and recipe.launch.nnodes > 1:
        raise RecipeError("--from-stage moves stage directories aside, which several nodes cannot do together: "
                          "move them yourself (on the shared run directory), then run without --from-stage")
    if from_stage:
        for stage in todo:
            _move_aside(stage)
    for stage in recipe.stages:
        if stage not in todo:
            print(f"stage {stage.name}: finished ({marker(stage)}), skipped", flush=True)
    for stage in todo:
        print(f"stage {stage.name}: {_status(stage)}", flush=True)
        if launcher is None:
            code = subprocess.call(torchrun_command(stage, recipe.launch, node_rank=node_rank,
                                                    master_addr=master_addr, master_port=master_port))
        else:
            code = launcher(stage)
        if code != 0:
            print(f"stage {stage.name} failed (exit code {code}); the same command resumes it from its last "
                  "checkpoint", file=sys.stderr, flush=True)
            return code or 1
        iteration, total = saved_progress(stage)
        if iteration is None or iteration != total:
            print(f"stage {stage.name} stopped at iteration {iteration} of {total} (--exit-interval?); the same "
                  "command continues it", flush=True)
            return 0
        if node_rank == 0:
            marker(stage).write_text(json.dumps({"stage": stage.name, "argv": list(stage.argv)}, indent=1))
        print(f"stage {stage.name}: finished", flush=True)
    return 0


def saved_progress(stage: Stage) -> tuple[Optional[int], Optional[int]]:
    """(latest saved iteration, the iterations the run trains) from the stage's checkpoints."""
    from megatron_visualchat.checkpoint.training_state import META_FILE

    iteration = latest_iteration(stage.save)
    if iteration is None:
        return None, None
    return iteration, json.loads((iteration_dir(stage.save, iteration) / META_FILE).read_text()).get("train_iters")


def dry_run(recipe: Recipe, *, from_stage: Optional[str] = None) -> int:
    """Each stage to run: its command, then the trainer's dry run at the recipe's world size."""
    from megatron_visualchat.training.arguments import parse_args
    from megatron_visualchat.training.dry_run import dry_run as trainer_dry_run

    todo = plan(recipe, from_stage)
    for stage in recipe.stages:
        if stage not in todo:
            print(f"stage {stage.name}: finished, would be skipped", flush=True)
            continue
        print(f"stage {stage.name}: {shlex.join(torchrun_command(stage, recipe.launch))}", flush=True)
        trainer_dry_run(parse_args(_checkable(stage, recipe)), recipe.launch.world_size)
    return 0


def _checkable(stage: Stage, recipe: Recipe) -> list[str]:
    """The stage's flags, less the inputs earlier stages have not written yet (named instead); an inherited
    tokenizer not saved yet is checked where the previous stage reads its own."""
    init_from = []
    for root in stage.init_from:
        if (Path(root) / TRACKER_FILE).is_file():
            init_from.append(root)
        else:
            print(f"--init-from {root}: written by an earlier stage (not yet)")
    tokenizer = stage.inherited_tokenizer
    if tokenizer and not Path(tokenizer).is_dir():
        previous = recipe.stages[recipe.stages.index(stage) - 1]
        tokenizer = _tokenizer_source(previous, recipe)
        print(f"--tokenizer-dir {stage.inherited_tokenizer}: saved by stage {previous.name} (not yet); checked as "
              f"{tokenizer}")
    return list(stage.chained(tuple(init_from), tokenizer))


def _tokenizer_source(stage: Stage, recipe: Recipe) -> str:
    """Where ``stage`` reads its tokenizer from: --tokenizer-dir, its own predecessor's, or the synthetic set's."""
    if stage.run.data.tokenizer_dir and stage.run.data.tokenizer_dir != stage.inherited_tokenizer:
        return stage.run.data.tokenizer_dir
    if stage.inherited_tokenizer:
        return _tokenizer_source(recipe.stages[recipe.stages.index(stage) - 1], recipe)
    from megatron_visualchat.training.data_setup import synthetic_paths

    return synthetic_paths(stage.run)["tokenizer"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megatron-visualchat recipe", description=__doc__.split("\n\n")[0])
    p.add_argument("recipe", help="recipe YAML file (examples/recipes/, docs/recipes.md)")
    p.add_argument("--profile", default=None, help="one of the recipe's profiles (default: its 'profile:' key)")
    p.add_argument("--set", dest="assignments", action="append", default=[], metavar="NAME=VALUE",
                   help="give a recipe variable a value (repeatable; VALUE is read as YAML)")
    p.add_argument("--nproc", type=int, default=None, help="processes per node (default: the recipe's launch)")
    p.add_argument("--nnodes", type=int, default=None, help="nodes (default: the recipe's launch)")
    p.add_argument("--node-rank", type=int, default=0)
    p.add_argument("--master-addr", default="127.0.0.1", help="node 0's address (several nodes)")
    p.add_argument("--master-port", type=int, default=29500)
    p.add_argument("--dry-run", action="store_true",
                   help="print each stage's command and run the trainer's --dry-run on it (one CPU process)")
    p.add_argument("--from-stage", default=None, metavar="NAME",
                   help="rerun stage NAME and every later one (their earlier output is moved aside, not deleted)")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        recipe = load_recipe(args.recipe, profile=args.profile, assignments=tuple(args.assignments),
                             nproc_per_node=args.nproc, nnodes=args.nnodes)
        print(f"recipe {recipe.path}" + (f" (profile {recipe.profile})" if recipe.profile else "") +
              f": {len(recipe.stages)} stage(s) in {recipe.run_dir}, {recipe.launch.nnodes} node(s) x "
              f"{recipe.launch.nproc_per_node} process(es)", flush=True)
        if args.dry_run:
            return dry_run(recipe, from_stage=args.from_stage)
        return run(recipe, from_stage=args.from_stage, node_rank=args.node_rank, master_addr=args.master_addr,
                   master_port=args.master_port)
    except ConfigError as e:
        print(f"megatron-visualchat recipe: error: {e}", file=sys.stderr)
        return 2
