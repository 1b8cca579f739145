"""Staged training recipes: one YAML file lists a run's stages (InfMLLM's align -> multitask -> instruct, or
DS-VisualChat's single stage), each written as ``TrainingConfig`` keys, so stages are data, not copies of a script.

    variables: {run_dir: runs/x, data: null}       ${name} in any string; null: must come from --set name=VALUE
    launch: {nproc_per_node: 8, nnodes: 1}         torchrun sizes (--nproc / --nnodes override them)
    defaults: {model: {...}, optimizer: {...}}     TrainingConfig sections and fields, shared by every stage
    profile: 7b                                    the profile used unless --profile names another
    profiles: {7b: {variables, launch, defaults, stages: {STAGE: {...}}}}   overlays, e.g. one per model size
    stages:
      - {name: align, model: {trainable: projector}, data: {data: ["${captions}"]}, batch: {train_iters: 2000}}

A stage's settings are defaults <- the stage <- profile defaults <- the profile's entry for the stage (a profile
adapts the whole recipe, e.g. to a model size; mappings merge key by key, lists and values replace, null restores
the trainer's default). A ``data.data`` entry is
``FORMAT:PATH[:WEIGHT...]`` or a mapping (one dataset spec: ``format``, ``path``, ``weight``, ``options``...). Keys
are checked against ``TrainingConfig`` (a wrong one is named with its file and place) and every stage's flags are
parsed and its layout checked before anything runs. What chains the stages is fixed, not written: stage k saves to
``RUN_DIR/<name>/checkpoints``, starts from the weights every earlier stage saved (``--init-from``, in order: each
stage's checkpoints hold only what it trained) and, unless it names a tokenizer, uses the one stage k-1 trained
with (the vocabulary must not change under the embeddings). ``recipe_run.py`` runs them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

from megatron_visualchat.config import ConfigError
from megatron_visualchat.training.arguments import build_parser, model_config, parse_args
from megatron_visualchat.training.run_config import TrainingConfig

SECTIONS = {f.name: {sf.name for sf in dataclasses.fields(f.default)}
            for f in dataclasses.fields(TrainingConfig) if dataclasses.is_dataclass(f.default)}
# Flags the runner sets itself: what chains the stages, and the dry run.
RUNNER_KEYS = {"checkpoint.save": "RUN_DIR/<stage>/checkpoints", "checkpoint.load": "the stage's own checkpoints",
               "checkpoint.load_iteration": "the latest checkpoint", "checkpoint.init_from": "the earlier stages",
               "dry_run": "recipe --dry-run"}
TOP_KEYS = ("description", "variables", "launch", "defaults", "profile", "profiles", "stages")
PROFILE_KEYS = ("variables", "launch", "defaults", "stages")
LAUNCH_KEYS = ("nproc_per_node", "nnodes")
STAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
CHECKPOINTS = "checkpoints"


class RecipeError(ConfigError):
    """A recipe file, a --set or a stage's flags are wrong; the message names the file and the place."""


@dataclass(frozen=True)
class Launch:
    nproc_per_node: int = 1
    nnodes: int = 1

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes


@dataclass(frozen=True)
class Stage:
    """One stage, resolved: the trainer flags its settings give (``flags``), the chaining the runner adds (--save,
    --init-from, an inherited --tokenizer-dir) and the ``TrainingConfig`` they parse into."""

    name: str
    directory: Path
    flags: tuple[str, ...]
    run: TrainingConfig
    init_from: tuple[str, ...]  # earlier stages' checkpoint directories, in order
    inherited_tokenizer: Optional[str]  # the previous stage's saved tokenizer, when this stage names none

    @property
    def save(self) -> Path:
        return self.directory / CHECKPOINTS

    @property
    def argv(self) -> tuple[str, ...]:
        return self.chained(self.init_from, self.inherited_tokenizer)

    def chained(self, init_from: tuple[str, ...], tokenizer: Optional[str]) -> tuple[str, ...]:
        return (*self.flags, "--save", str(self.save), *[a for root in init_from for a in ("--init-from", root)],
                *(["--tokenizer-dir", tokenizer] if tokenizer else []))


@dataclass(frozen=True)
class Recipe:
    path: Path
    profile: Optional[str]
    run_dir: Path
    launch: Launch
    stages: tuple[Stage, ...]

    def stage(self, name: str) -> Stage:
        names = [s.name for s in self.stages]
        if name not in names:
            raise RecipeError(f"{self.path}: no stage {name!r} (stages: {', '.join(names)})")
        return self.stages[names.index(name)]


def load_recipe(path, *, profile: Optional[str] = None, assignments: tuple[str, ...] = (),
                nproc_per_node: Optional[int] = None, nnodes: Optional[int] = None) -> Recipe:
    """Read, resolve and check ``path`` (``assignments``: ``name=value`` from --set, values read as YAML)."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as e:
        raise RecipeError(f"recipe {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise RecipeError(f"recipe {path} is not valid YAML: {e}") from None
    where = _Where(path)
    doc = where.mapping(doc, "the recipe", TOP_KEYS)
    stages_doc = doc.get("stages")
    if not isinstance(stages_doc, list) or not stages_doc:
        raise where.error("stages", "give a list of stages, each a mapping with a name")
    names = [where.stage_name(s, i) for i, s in enumerate(stages_doc)]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise where.error("stages", f"stage name {twice[0]!r} is used twice (each stage has its own directory)")
    profile, overlay = _profile(doc, profile, names, where)
    variables = _variables(doc, overlay, profile, path, assignments, where)
    run_dir = Path(str(variables.lookup("run_dir", "run_dir")))
    launch = _launch(doc, overlay, variables, where, nproc_per_node, nnodes)
    defaults = where.settings(doc.get("defaults"), "defaults")
    profile_defaults = where.settings(overlay.get("defaults"), f"profiles.{profile}.defaults")
    stages: list[Stage] = []
    for i, (name, stage_doc) in enumerate(zip(names, stages_doc)):
        own = where.settings({k: v for k, v in stage_doc.items() if k != "name"}, f"stages[{i}] ({name})")
        extra = where.settings((overlay.get("stages") or {}).get(name), f"profiles.{profile}.stages.{name}")
        merged = _merge(_merge(_merge(defaults, own), profile_defaults), extra)
        settings = variables.substitute(merged, f"stage {name}")
        stages.append(_stage(name, run_dir / name, settings, stages, launch, where))
    return Recipe(path, profile, run_dir, launch, tuple(stages))


class _Where:
    """Error messages that name the recipe file and the place in it."""

    def __init__(self, path: Path):
        self.path = path

    def error(self, place: str, problem: str) -> RecipeError:
        return RecipeError(f"{self.path}: {place}: {problem}")

    def mapping(self, value, place: str, allowed=None) -> dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.error(place, f"expected a mapping, found {type(value).__name__} {value!r}")
        unknown = sorted(set(value) - set(allowed)) if allowed is not None else []
        if unknown:
            raise self.error(place, f"unknown key {unknown[0]!r} (allowed: {', '.join(allowed)})")
        return value

    def stage_name(self, stage, index: int) -> str:
        stage = self.mapping(stage, f"stages[{index}]")
        name = stage.get("name")
        if not isinstance(name, str) or not STAGE_NAME.match(name):
            raise self.error(f"stages[{index}]", f"needs a name of letters, digits, '_', '-' or '.', found {name!r}")
        return name

    def settings(self, value, place: str) -> dict:
        """``{section: {field: value}}`` with every key a ``TrainingConfig`` field the recipe may set."""
        value = self.mapping(value, place)
        for section, fields in value.items():
            if section not in SECTIONS:
                hint = f" (set by {RUNNER_KEYS[section]})" if section in RUNNER_KEYS else ""
                raise self.error(place, f"unknown section {section!r}{hint} (TrainingConfig sections: "
                                        f"{', '.join(SECTIONS)})")
            for name in self.mapping(fields, f"{place}.{section}"):
                key = f"{section}.{name}"
                if key in RUNNER_KEYS:
                    raise self.error(place, f"{key} is set by the recipe runner ({RUNNER_KEYS[key]})")
                if name not in SECTIONS[section]:
                    raise self.error(place, f"unknown key {key} ({section} keys: "
                                            f"{', '.join(sorted(SECTIONS[section]))})")
        return value


def _profile(doc: dict, chosen: Optional[str], stage_names: list[str], where: _Where) -> tuple[Optional[str], dict]:
    profiles = where.mapping(doc.get("profiles"), "profiles")
    chosen = chosen if chosen is not None else doc.get("profile")
    if chosen is None:
        if profiles:
            raise where.error("profiles", f"pick one with --profile ({', '.join(profiles)}) or a 'profile:' key")
        return None, {}
    if chosen not in profiles:
        raise where.error("profile", f"no profile {chosen!r} (profiles: {', '.join(profiles) or 'none'})")
    overlay = where.mapping(profiles[chosen], f"profiles.{chosen}", PROFILE_KEYS)
    for name in where.mapping(overlay.get("stages"), f"profiles.{chosen}.stages"):
        if name not in stage_names:
            raise where.error(f"profiles.{chosen}.stages", f"no stage {name!r} (stages: {', '.join(stage_names)})")
    return chosen, overlay


def _variables(doc: dict, overlay: dict, profile: Optional[str], path: Path, assignments: tuple[str, ...],
               where: _Where) -> "_Variables":
    """Declared variables (recipe <- profile <- --set), with the built-ins ``profile`` and ``run_dir`` (default
    ``runs/<recipe name>[-<profile>]``)."""
    declared = {"run_dir": f"runs/{path.stem}" + (f"-{profile}" if profile else "")}
    declared.update(where.mapping(doc.get("variables"), "variables"))
    declared.update(where.mapping(overlay.get("variables"), f"profiles.{profile}.variables"))
    for text in assignments:
        name, eq, value = text.partition("=")
        if not eq or name not in declared:
            raise RecipeError(f"--set {text}: expected NAME=VALUE with NAME one of {', '.join(sorted(declared))} "
                              f"(the variables of {path})")
        declared[name] = yaml.safe_load(value) if value else ""
    declared["profile"] = profile or ""
    return _Variables(declared, where)


class _Variables:
    """Values of ``${name}`` references, resolved on first use (one variable may refer to others)."""

    def __init__(self, declared: dict, where: _Where):
        self.declared, self.where, self.resolved = declared, where, {}

    def lookup(self, name: str, place: str, chain: tuple[str, ...] = ()):
        if name not in self.declared:
            raise self.where.error(place, f"${{{name}}} is not a variable (variables: "
                                          f"{', '.join(sorted(self.declared))})")
        if name in chain:
            raise self.where.error("variables", f"{' -> '.join((*chain, name))}: variables refer to each other")
        if name not in self.resolved:
            self.resolved[name] = self.substitute(self.declared[name], f"variable {name}", (*chain, name))
        if self.resolved[name] is None:
            raise self.where.error(place, f"variable {name!r} has no value: pass --set {name}=VALUE")
        return self.resolved[name]

    def substitute(self, value, place: str, chain: tuple[str, ...] = ()):
        """``${name}`` in strings (a string that is one reference takes the variable's value and type)."""
        if isinstance(value, dict):
            return {k: self.substitute(v, place, chain) for k, v in value.items()}
        if isinstance(value, list):
            return [self.substitute(v, place, chain) for v in value]
        if not isinstance(value, str):
            return value
        whole = VARIABLE.fullmatch(value)
        if whole:
            return self.lookup(whole.group(1), place, chain)
        return VARIABLE.sub(lambda m: str(self.lookup(m.group(1), place, chain)), value)


def _launch(doc: dict, overlay: dict, variables: _Variables, where: _Where, nproc_per_node: Optional[int],
            nnodes: Optional[int]) -> Launch:
    values = {**where.mapping(doc.get("launch"), "launch", LAUNCH_KEYS),
              **where.mapping(overlay.get("launch"), "profiles.<profile>.launch", LAUNCH_KEYS)}
    values = variables.substitute(values, "launch")
    if nproc_per_node is not None:
        values["nproc_per_node"] = nproc_per_node
    if nnodes is not None:
        values["nnodes"] = nnodes
    for key, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise where.error(f"launch.{key}", f"expected a positive integer, found {value!r}")
    return Launch(**values)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _stage(name: str, directory: Path, settings: dict, earlier: list[Stage], launch: Launch,
           where: _Where) -> Stage:
    names_tokenizer = settings.get("data", {}).get("tokenizer_dir") is not None
    tokenizer = None if names_tokenizer or not earlier else str(earlier[-1].save / "tokenizer")
    stage = Stage(name, directory, tuple(_flags(settings, where, f"stage {name}")), TrainingConfig(),
                  tuple(str(s.save) for s in earlier), tokenizer)
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            run = parse_args(list(stage.argv))
        model_config(run, launch.world_size)
    except SystemExit:  # argparse printed "usage ... error: argument --lr: invalid float value: 'x'"
        message = stderr.getvalue().strip().splitlines()[-1].split("error: ", 1)[-1]
        raise where.error(f"stage {name}", f"{message} (a recipe key is its flag's name in snake case)") from None
    except ConfigError as e:
        raise where.error(f"stage {name}", f"{e} (on {launch.world_size} process(es))") from None
    return dataclasses.replace(stage, run=run)


def _flags(settings: dict, where: _Where, place: str) -> list[str]:
    """``{section: {field: value}}`` as the trainer's flags, by each field's argparse action."""
    actions = {a.dest: a for a in build_parser()._actions}
    argv: list[str] = []
    for section, fields in settings.items():
        for name, value in fields.items():
            action = actions[name]
            flag = action.option_strings[0]
            if value is None:
                continue
            if action.nargs == 0:  # store_true
                if not isinstance(value, bool):
                    raise where.error(place, f"{section}.{name} is a switch: true or false, found {value!r}")
                argv += [flag] if value else []
            elif isinstance(action, argparse._AppendAction):  # --data, --eval-data, --init-from: one flag per item
                argv += [part for item in (value if isinstance(value, list) else [value])
                         for part in (flag, json.dumps([item]) if isinstance(item, dict) else _text(item))]
            else:
                argv += [flag, _text(value)]
    return argv


def _text(value) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(_text(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)
