"""Trainable-only training checkpoints: what training changes (trainable parameters, optimizer, scheduler, RNG,
data position), never the frozen 7B-70B weights, which stay in the converted base checkpoint.

Layout (one file per tensor/pipeline rank, written by its data-parallel rank 0; conventions in ``layout.py``):

    SAVE/iter_0000200/mp_rank_{tp:02d}_{pp:03d}/trainable.pt
    SAVE/iter_0000200/meta.json
    SAVE/iter_0000200/SHA256SUMS                 every file above (``checksums.py``), written last
    SAVE/latest_checkpointed_iteration.txt

Atomic: ranks write into ``SAVE/.tmp_iter_...``; global rank 0 renames it to ``iter_...`` only after every rank is
done, then rewrites the tracker through a temp file + rename. A crash mid-save leaves the previous checkpoint as
the latest. Optimizer state is saved DP-independent (the distributed optimizer's shards are gathered to DP rank 0),
so a run can resume at another data-parallel size; each rank file also holds its optimizer state by parameter name,
so a run can resume at another TP / PP / VPP layout or optimizer kind (``reshard.py``). ``--keep-last`` prunes only
this run's own checkpoints (``KeepLast``). A resume refuses, naming the differing fields, another model config or
another LR schedule (unless ``--override-opt-param-scheduler``), and names the file and the earlier iterations when
a file is corrupt.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.utils import unwrap_model

from megatron_visualchat.checkpoint import reshard
from megatron_visualchat.checkpoint.checksums import read_checksums, sha256, verify, write_checksums
from megatron_visualchat.checkpoint.errors import CheckpointError
from megatron_visualchat.checkpoint.layout import (
    TRACKER_FILE,
    available,
    iteration_dir,
    latest_iteration,
    rank_dir,
    read_tracker,
    replace_dir,
    saved_iterations,
    write_tracker,
)

RANK_FILE = "trainable.pt"
META_FILE = "meta.json"
# meta.json "format" of checkpoints that resume at another layout (rank files with "layers" and "optimizer_named");
# older ones have none and resume at their own layout (any data-parallel size).
FORMAT = "megatron_visualchat.training/2"
# What must match for a resume; the layout (these keys of the config record, the optimizer kind and the
# data-parallel size) may change.
RESUME_KEYS = ("model",)
PARALLEL_KEYS = ("tp", "pp", "vpp", "pp_layers")
LAYOUT_FLAGS = {"tp": "--tensor-model-parallel-size", "pp": "--pipeline-model-parallel-size",
                "vpp": "--virtual-pipeline-model-parallel-size", "pp_layers": "--pipeline-layers",
                "distributed_optimizer": "--use-distributed-optimizer"}
# The scheduler values a resume must keep unless --override-opt-param-scheduler, and the flags that set them
# (steps count samples: iterations x --global-batch-size).
SCHEDULE_FLAGS = {
    "max_lr": "--lr",
    "min_lr": "--min-lr",
    "lr_warmup_steps": "--lr-warmup-fraction, --train-iters/--train-epochs, --global-batch-size",
    "lr_decay_steps": "--train-iters/--train-epochs, --global-batch-size",
    "lr_decay_style": "--lr-decay-style",
    "start_wd": "--weight-decay",
    "end_wd": "--weight-decay",
}
# What the scheduler reads from megatron's param groups rather than from itself (this run's values win).
GROUP_SCHEDULE_KEYS = ("max_lr", "min_lr")


@dataclass(frozen=True)
class ResumePoint:
    """The checkpoint a run continues from: its root directory (``--load`` or ``--save``) and iteration."""

    root: Path
    iteration: int


def find_resume_point(load: Optional[str], save: Optional[str],
                      load_iteration: Optional[int] = None) -> Optional[ResumePoint]:
    """Where a run resumes: ``--load``, which must hold a checkpoint; else ``--save`` when it holds one; else
    nowhere (None: a fresh start). ``load_iteration`` picks another saved iteration than the tracker's."""
    if load:
        root = Path(load)
        if not (root / TRACKER_FILE).is_file():
            raise CheckpointError(f"--load {load} holds no checkpoint ({root / TRACKER_FILE} not found): pass the "
                                  "--save directory of the run to resume, or drop --load to start from scratch")
    elif save and (Path(save) / TRACKER_FILE).is_file():
        root = Path(save)
    elif load_iteration is not None:
        raise CheckpointError(f"--load-iteration {load_iteration}: there is no checkpoint to load (no --load, and "
                              f"--save {save} holds none)")
    else:
        return None
    if load_iteration is None:
        return ResumePoint(root, latest_iteration(root))
    if not iteration_dir(root, load_iteration).is_dir():
        raise CheckpointError(f"--load-iteration {load_iteration}: {root} has no "
                              f"{iteration_dir(root, load_iteration).name} ({available(root)})")
    return ResumePoint(root, load_iteration)


def resume_message(resume: Optional[ResumePoint], layout_change: Optional[str] = None) -> str:
    """What rank 0 says on start: the checkpoint a run continues from (and the layout change, ``load_checkpoint``'s
    ``layout_change``), or that it starts from scratch."""
    if resume is None:
        return "no checkpoint to resume from (no --load, and --save holds none): training starts from scratch"
    change = f", {layout_change}" if layout_change else ""
    return f"resuming from {iteration_dir(resume.root, resume.iteration)} (iteration {resume.iteration}){change}"


@dataclass
class KeepLast:
    """``--keep-last`` over this run's own checkpoints: those it saved and, when it resumed from the directory it
    saves to, those up to the iteration it resumed from (its own history). Anything else in ``--save`` (another
    run's checkpoints, or iterations above a ``--load-iteration`` resume point) is never deleted, and neither is
    the newest save, which the tracker names. ``count`` 0 keeps everything."""

    count: int
    resumed_from: Optional[int] = None
    written: list[int] = field(default_factory=list)

    @classmethod
    def for_run(cls, count: int, save: Optional[str], resume: Optional[ResumePoint]) -> "KeepLast":
        same_dir = resume is not None and save is not None and Path(save).resolve() == resume.root.resolve()
        return cls(count, resume.iteration if same_dir else None)

    def to_delete(self, existing: list[int], newest: int) -> list[int]:
        """``existing``: the saved iterations, ascending."""
        if self.count <= 0:
            return []
        own = [i for i in existing if i in self.written or (self.resumed_from is not None and i <= self.resumed_from)]
        keep = set(own[-self.count:]) | {newest}
        return [i for i in own if i not in keep]


def trainable_rank_file(directory: Path) -> Path:
    return rank_dir(directory, ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(),
                    pp_suffix=True) / RANK_FILE


def _trainable_names(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def trainable_state_dict(chunks: list) -> list[dict]:
    out = []
    for model in unwrap_model(chunks):
        names = _trainable_names(model)
        out.append({k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k in names})
    return out


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _parts(optimizer) -> list:
    """megatron-core chains one optimizer per parameter group kind (e.g. decay / no decay)."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _optimizer_state(optimizer, distributed: bool, has_trainable: bool) -> Optional[dict]:
    """DP-independent optimizer state on DP rank 0 (collective for the distributed optimizer). A pipeline stage
    without trainable parameters (a frozen LLM's middle stages) has none."""
    if not has_trainable:
        return None
    if not distributed:
        return {"common": optimizer.state_dict()}
    param_state = [part.get_parameter_state_dp_zero() for part in _parts(optimizer)]
    return {"common": optimizer.state_dict(), "param_state": param_state}


def save_checkpoint(root: Union[str, Path], iteration: int, chunks: list, optimizer, scheduler, *,
                    consumed_samples: int, distributed_optimizer: bool, config_record: dict,
                    keep_last: KeepLast) -> Path:
    """Collective: save ``iteration`` under ``root`` atomically (checksums last), then prune per ``keep_last``."""
    root = Path(root)
    final = iteration_dir(root, iteration)
    tmp = root / f".tmp_{final.name}"
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    has_trainable = any(_trainable_names(model) for model in unwrap_model(chunks))
    optimizer_state = _optimizer_state(optimizer, distributed_optimizer, has_trainable)
    named = reshard.named_optimizer_state(chunks, optimizer) if has_trainable else None  # collective (DP)
    digest = None
    if ps.get_data_parallel_rank(with_context_parallel=True) == 0:  # one writer per TP/PP position
        path = trainable_rank_file(tmp)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({
            "iteration": iteration, "consumed_samples": consumed_samples,
            "model": trainable_state_dict(chunks), "optimizer": optimizer_state,
            "scheduler": scheduler.state_dict(), "rng": rng_state(),
            "layers": [[r.start, r.stop] for r in reshard.layer_ranges(chunks)], "optimizer_named": named,
        }, path)
        digest = (path.relative_to(tmp).as_posix(), sha256(path))
    digests = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(digest, digests, dst=0)  # rank 0 also learns that every rank file is written
    keep_last.written.append(iteration)
    if dist.get_rank() == 0:
        meta = {"format": FORMAT, "iteration": iteration, "consumed_samples": consumed_samples, **config_record}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
        write_checksums(tmp, {**dict(d for d in digests if d is not None), META_FILE: sha256(tmp / META_FILE)})
        replace_dir(tmp, final)
        write_tracker(root, iteration)
        for old in keep_last.to_delete(saved_iterations(root), iteration):
            shutil.rmtree(iteration_dir(root, old), ignore_errors=True)
    dist.barrier()
    return final


_ABSENT = object()


def _show(value: Any) -> str:
    return "(absent)" if value is _ABSENT else json.dumps(value)


def differences(saved: Any, current: Any, path: str = "") -> list[str]:
    """``dotted.path: saved X, this run Y`` for every leaf that differs between two JSON-like records."""
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(saved) | set(current), key=str):
            out += differences(saved.get(key, _ABSENT), current.get(key, _ABSENT), f"{path}.{key}" if path else key)
        return out
    return [] if saved == current else [f"{path}: saved {_show(saved)}, this run {_show(current)}"]


def check_compatible(meta: dict, config_record: dict, directory: Path) -> None:
    """Refuse a checkpoint from another model config (the parallel layout may change)."""
    current = json.loads(json.dumps({key: config_record.get(key) for key in RESUME_KEYS}))  # tuples as in JSON
    diffs = differences({key: meta.get(key) for key in RESUME_KEYS}, current)
    if diffs:
        raise CheckpointError(f"checkpoint {directory} was saved with another model or layout (the parallel layout "
                              f"may change on resume, the model may not): {'; '.join(diffs)}. Resume with the saved "
                              "settings, or pass another --save to start a new run")


def _layout(record: dict, distributed_optimizer: Optional[bool]) -> dict:
    """TP, PP, VPP, pp_layers and the optimizer kind of a config record (JSON values)."""
    layout = json.loads(json.dumps({key: record.get(key) for key in PARALLEL_KEYS}))
    return {**layout, "distributed_optimizer": distributed_optimizer}


def _saved_layout(meta: dict, distributed_optimizer: bool) -> dict:
    saved = meta.get("run", {}).get("parallelism", {}).get("use_distributed_optimizer", distributed_optimizer)
    return _layout(meta, saved)


def describe_layout(layout: dict, dp: Optional[int]) -> str:
    """``TP2 x PP2 (VPP 2) x DP1 with the distributed optimizer``."""
    text = f"TP{layout['tp']} x PP{layout['pp']}"
    text += f" (VPP {layout['vpp']})" if layout.get("vpp") else ""
    text += f" (layers {layout['pp_layers']})" if layout.get("pp_layers") else ""
    text += f" x DP{dp}" if dp is not None else ""
    return text + (" with the distributed optimizer" if layout.get("distributed_optimizer") else "")


def check_layout_change(meta: dict, saved: dict, current: dict, directory: Path) -> None:
    """A checkpoint written before resharding (no ``format``) resumes at its own layout only."""
    diffs = differences(saved, current)
    if diffs and meta.get("format") != FORMAT:
        flags = ", ".join(LAYOUT_FLAGS[d.split(":")[0]] for d in diffs)
        raise CheckpointError(f"checkpoint {directory} was written before checkpoints could change layout, so it "
                              f"resumes at its own layout only (any data-parallel size): {'; '.join(diffs)}. Resume "
                              f"with the saved {flags}, or pass another --save to start a new run")


def check_schedule(saved: dict, fresh: dict, path: Path) -> None:
    """Refuse a resume whose LR / weight-decay schedule differs from the saved one (megatron would silently keep
    the saved one: a longer --train-iters would then train its extra steps at the final lr)."""
    diffs = [f"{key}: saved {saved.get(key)!r}, this run {fresh[key]!r} ({flag})"
             for key, flag in SCHEDULE_FLAGS.items() if saved.get(key) != fresh[key]]
    if diffs:
        raise CheckpointError(f"{path} was saved with another learning-rate schedule: {'; '.join(diffs)}. Pass "
                              "--override-opt-param-scheduler to train on with this run's schedule (the step count "
                              "carries on from the checkpoint), or resume with the saved flags")


def _unshare_adam_steps(optimizer) -> None:
    """megatron-core 0.16.1's DistributedOptimizer.load_state_dict (torch AdamW fallback, no Apex/TE) gives every
    parameter the *same* ``step`` tensor; AdamW then increments it once per parameter per step and the bias
    correction drifts. Give each parameter its own copy."""
    for part in _parts(optimizer):
        for st in part.optimizer.state.values():
            if "step" in st:
                st["step"] = st["step"].clone()


def _load_dp_zero_state(part, param_state) -> None:
    """megatron-core 0.16.1 with torch's AdamW (no Apex/TE) keeps a per-parameter ``step`` the DP-zero state does
    not carry (``step`` comes back through ``load_state_dict``): set it aside while the shards are copied in.
    In fp32 the main params are views of the model parameters, so the copy runs under no_grad."""
    inner = part.optimizer.state
    steps = {p: st.pop("step") for p, st in inner.items() if "step" in st}
    try:
        with torch.no_grad():
            part.load_parameter_state_from_dp_zero(param_state)
    finally:
        for p, step in steps.items():
            inner[p]["step"] = step


def repair_hint(root: Path, iteration: int) -> str:
    """What to do when a file of ``iteration`` is damaged."""
    others = [i for i in saved_iterations(root) if i != iteration]
    if not others:
        return f"no other iteration is saved in {root}: start from scratch with another --save"
    return f"resume from an earlier iteration with --load-iteration N (available: {', '.join(map(str, others))})"


def load_checkpoint(root: Union[str, Path], chunks: list, optimizer, scheduler, *, distributed_optimizer: bool,
                    config_record: dict, iteration: Optional[int] = None) -> dict:
    """Restore trainable weights, optimizer, scheduler and RNG from ``iteration`` (default: the tracker's), after
    checking every file it reads against ``SHA256SUMS``, the config and the LR schedule. At another TP / PP / VPP
    layout or optimizer kind every rank file is read and resharded (``reshard.py``). Returns {"iteration",
    "consumed_samples", "layout_change": None or "saved at ..., resumed at ..."}."""
    root = Path(root)
    iteration = read_tracker(root) if iteration is None else iteration
    directory = iteration_dir(root, iteration)
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise CheckpointError(f"{meta_path} not found: {root} is not a training checkpoint (a converted base LLM "
                              "is loaded with --llm-load)")
    fix = repair_hint(root, iteration)
    digests = read_checksums(directory, fix, warn=dist.get_rank() == 0)
    verify(directory, META_FILE, digests, fix)
    try:
        meta = json.loads(meta_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{meta_path} is corrupt (cannot be read: {e}): {fix}") from None
    check_compatible(meta, config_record, directory)
    saved, current = _saved_layout(meta, distributed_optimizer), _layout(config_record, distributed_optimizer)
    check_layout_change(meta, saved, current, directory)
    if saved == current:
        path = trainable_rank_file(directory)
        if not path.is_file():
            raise CheckpointError(f"{path} not found: {directory} is incomplete: {fix}")
        state = read_trainable_rank_file(directory, path, digests, fix)
        if not scheduler.override_opt_param_scheduler:
            check_schedule(state["scheduler"], scheduler.state_dict(), path)
        for model, saved_model in zip(unwrap_model(chunks), state["model"]):
            expected = _trainable_names(model)
            if set(saved_model) != expected:
                _refuse_trainable_set(path, set(saved_model), expected)
            model.load_state_dict(saved_model, strict=False)
        if state["optimizer"] is not None:
            _load_optimizer(optimizer, state["optimizer"], distributed_optimizer)
        set_rng_state(state["rng"])
    else:
        state = _load_resharded(directory, meta, digests, fix, chunks, optimizer, scheduler)
    scheduler.load_state_dict(state["scheduler"])
    change = None
    if saved != current or meta.get("dp") != config_record.get("dp"):
        change = (f"saved at {describe_layout(saved, meta.get('dp'))}, resumed at "
                  f"{describe_layout(current, config_record.get('dp'))}")
    return {"iteration": state["iteration"], "consumed_samples": state["consumed_samples"], "layout_change": change}


def read_trainable_rank_file(directory: Path, path: Path, digests, fix: str) -> dict:
    verify(directory, path.relative_to(directory).as_posix(), digests, fix)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, EOFError, IndexError ... for a damaged file
        raise CheckpointError(f"{path} is corrupt (cannot be read: {type(e).__name__}: {e}): {fix}") from e


def _refuse_trainable_set(path: Path, saved: set, expected: set) -> None:
    raise CheckpointError(f"checkpoint {path} holds trainable parameters that differ from this run's trainable set "
                          f"(another --trainable policy?): {sorted(saved ^ expected)[:5]}")


def _load_resharded(directory: Path, meta: dict, digests, fix: str, chunks: list, optimizer, scheduler) -> dict:
    """Every saved rank file, merged to the full naming and sliced for this rank: trainable weights, fp32 main
    params, Adam moments and steps (and fp16's loss scale). Returns rank (0, 0)'s state for the scheduler and the
    data position. RNG states are per rank and stay this run's freshly seeded ones."""
    states = []
    for tp_rank in range(meta["tp"]):
        for pp_rank in range(meta["pp"]):
            path = rank_dir(directory, tp_rank, pp_rank, pp_suffix=True) / RANK_FILE
            if not path.is_file():
                raise CheckpointError(f"{path} not found: {directory} is incomplete ({meta['tp']} x {meta['pp']} "
                                      f"rank files expected): {fix}")
            states.append((tp_rank, pp_rank, read_trainable_rank_file(directory, path, digests, fix)))
    first = states[0][2]
    if not scheduler.override_opt_param_scheduler:
        check_schedule(first["scheduler"], scheduler.state_dict(), directory / META_FILE)
    weights, optim = reshard.merge_rank_states(states, meta["tp"])
    model = unwrap_model(chunks)[0]
    expected = reshard.global_trainable_names(chunks)  # collective
    saved = {n for n in weights if not reshard.is_tied_copy(n, model)}
    if saved != expected:
        _refuse_trainable_set(directory, saved, expected)
    local_weights, local_optim = reshard.local_state(weights, optim, chunks, meta["model"]["llm"]["vocab_size"])
    for chunk, local in zip(unwrap_model(chunks), local_weights):
        chunk.load_state_dict(local, strict=False)
    if any(local_weights):
        optimizer.reload_model_params()
        common = _saved_common(states)
        groups = [g for c in common for g in c.get("optimizer", c)["param_groups"]]  # megatron nests torch's
        steps = [g["step"] for g in groups if g.get("step") is not None]
        reshard.set_named_optimizer_state(chunks, optimizer, local_optim, max(steps) if steps else None)
        scaler = next((c["grad_scaler"] for c in common if c.get("grad_scaler") is not None), None)
        for part in _parts(optimizer):
            if scaler is not None and getattr(part, "grad_scaler", None) is not None:
                part.grad_scaler.load_state_dict(scaler)
    return first


def _saved_common(states: list) -> list[dict]:
    """megatron's optimizer state dicts (one per chained optimizer) of the saved stages that train something."""
    out = []
    for _tp, _pp, state in states:
        if state["optimizer"] is not None:
            common = state["optimizer"]["common"]
            out += common if isinstance(common, list) else [common]
    return out


def _load_optimizer(optimizer, opt: dict, distributed_optimizer: bool) -> None:
    # Rebuild fp32 main params from the restored weights, then the optimizer state on top; the schedule values
    # megatron keeps in the param groups stay this run's (equal to the saved ones unless overriding).
    optimizer.reload_model_params()
    schedule = [{k: g[k] for k in GROUP_SCHEDULE_KEYS if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(opt["common"])
    for group, values in zip(optimizer.param_groups, schedule):
        group.update(values)
    if distributed_optimizer:
        _unshare_adam_steps(optimizer)
        for part, param_state in zip(_parts(optimizer), opt["param_state"]):
            root = ps.get_data_parallel_rank(with_context_parallel=True) == 0
            _load_dp_zero_state(part, param_state if root else None)
