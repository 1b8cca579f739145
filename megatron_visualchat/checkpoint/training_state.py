"""Trainable-only training checkpoints: what training changes (trainable parameters, optimizer, scheduler, RNG,
data position), never the frozen 7B-70B weights, which stay in the converted base checkpoint.

Layout (one file per tensor/pipeline rank, written by its data-parallel rank 0; conventions in ``layout.py``):

    SAVE/iter_0000200/mp_rank_{tp:02d}_{pp:03d}/trainable.pt
    SAVE/iter_0000200/meta.json
    SAVE/latest_checkpointed_iteration.txt

Atomic: ranks write into ``SAVE/.tmp_iter_...``; global rank 0 renames it to ``iter_...`` only after every rank is
done, then rewrites the tracker through a temp file + rename. A crash mid-save leaves the previous checkpoint as
the latest. Optimizer state is saved DP-independent (the distributed optimizer's shards are gathered to DP rank 0),
so a run can resume at another data-parallel size.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.utils import unwrap_model

from megatron_visualchat.checkpoint.errors import CheckpointError
from megatron_visualchat.checkpoint.layout import iteration_dir, rank_dir, read_tracker, write_tracker

RANK_FILE = "trainable.pt"
META_FILE = "meta.json"
# What must match for a resume: the data-parallel size alone may change.
RESUME_KEYS = ("model", "tp", "pp", "vpp", "pp_layers")


def _rank_file(directory: Path) -> Path:
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
                    keep_last: int = 3) -> Path:
    """Collective: save ``iteration`` under ``root`` atomically, then keep only the ``keep_last`` newest (0: all)."""
    root = Path(root)
    final = iteration_dir(root, iteration)
    tmp = root / f".tmp_{final.name}"
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    has_trainable = any(_trainable_names(model) for model in unwrap_model(chunks))
    optimizer_state = _optimizer_state(optimizer, distributed_optimizer, has_trainable)
    if ps.get_data_parallel_rank() == 0:
        path = _rank_file(tmp)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({
            "iteration": iteration, "consumed_samples": consumed_samples,
            "model": trainable_state_dict(chunks), "optimizer": optimizer_state,
            "scheduler": scheduler.state_dict(), "rng": rng_state(),
        }, path)
    dist.barrier()
    if dist.get_rank() == 0:
        meta = {"iteration": iteration, "consumed_samples": consumed_samples, **config_record}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        write_tracker(root, iteration)
        _prune(root, keep_last)
    dist.barrier()
    return final


def _prune(root: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    iters = sorted(int(d.name[5:]) for d in root.iterdir() if d.name.startswith("iter_") and d.name[5:].isdigit())
    for it in iters[:-keep_last]:
        shutil.rmtree(iteration_dir(root, it), ignore_errors=True)


def check_compatible(meta: dict, config_record: dict, directory: Path) -> None:
    """Refuse a checkpoint from another model config or layout (only the data-parallel size may change)."""
    for key in RESUME_KEYS:
        if meta.get(key) != config_record.get(key):
            raise CheckpointError(f"checkpoint {directory} was saved with {key}={meta.get(key)!r}, this run has "
                                  f"{key}={config_record.get(key)!r}; only the data-parallel size may change on "
                                  "resume")


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


def load_checkpoint(root: Union[str, Path], chunks: list, optimizer, scheduler, *, distributed_optimizer: bool,
                    config_record: dict, iteration: Optional[int] = None) -> dict:
    """Restore trainable weights, optimizer, scheduler and RNG from ``iteration`` (default: the tracker's).
    Returns {"iteration", "consumed_samples"}."""
    iteration = read_tracker(root) if iteration is None else iteration
    directory = iteration_dir(root, iteration)
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise CheckpointError(f"{meta_path} not found: {root} is not a training checkpoint (a converted base LLM "
                              "is loaded with --llm-load)")
    check_compatible(json.loads(meta_path.read_text()), config_record, directory)
    path = _rank_file(directory)
    if not path.is_file():
        raise CheckpointError(f"{path} not found: {directory} was saved with another tensor/pipeline layout")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for model, saved in zip(unwrap_model(chunks), state["model"]):
        expected = _trainable_names(model)
        if set(saved) != expected:
            raise CheckpointError(f"checkpoint {path} holds trainable parameters that differ from this run's "
                                  f"trainable set (another --trainable policy?): {sorted(set(saved) ^ expected)[:5]}")
        model.load_state_dict(saved, strict=False)
    if state["optimizer"] is not None:
        _load_optimizer(optimizer, state["optimizer"], distributed_optimizer)
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return {"iteration": state["iteration"], "consumed_samples": state["consumed_samples"]}


def _load_optimizer(optimizer, opt: dict, distributed_optimizer: bool) -> None:
    # Rebuild fp32 main params from the restored weights, then the optimizer state on top.
    optimizer.reload_model_params()
    optimizer.load_state_dict(opt["common"])
    if distributed_optimizer:
        _unshare_adam_steps(optimizer)
        for part, param_state in zip(_parts(optimizer), opt["param_state"]):
            _load_dp_zero_state(part, param_state if ps.get_data_parallel_rank() == 0 else None)
