"""Trainable-only checkpoints: what training changes (trainable parameters, optimizer, scheduler, RNG, data
position), never the frozen 7B-70B weights, which stay in the converted base checkpoint.

Layout (one file per tensor/pipeline rank, written by its data-parallel rank 0):

    SAVE/iter_0000200/mp_rank_{tp:02d}_{pp:03d}/trainable.pt
    SAVE/iter_0000200/meta.json
    SAVE/latest_checkpointed_iteration.txt

Atomic: ranks write into ``SAVE/.tmp_iter_...``; global rank 0 renames it to ``iter_...`` only after every rank is
done, then rewrites the ``latest`` file through a temp file + rename. A crash mid-save leaves the previous
checkpoint as ``latest``. Optimizer state is saved DP-independent (the distributed optimizer's shards are gathered
to DP rank 0), so a run can resume at another data-parallel size.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

LATEST = "latest_checkpointed_iteration.txt"


def _iter_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def _rank_file(directory: str) -> str:
    from megatron.core import parallel_state as ps

    return os.path.join(directory, f"mp_rank_{ps.get_tensor_model_parallel_rank():02d}_"
                                   f"{ps.get_pipeline_model_parallel_rank():03d}", "trainable.pt")


def unwrap(chunk):
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def _has_trainable(chunks: list) -> bool:
    return any(p.requires_grad for chunk in chunks for p in unwrap(chunk).parameters())


def trainable_state_dict(chunks: list) -> list[dict]:
    out = []
    for chunk in chunks:
        model = unwrap(chunk)
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        out.append({k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k in names})
    return out


def rng_state() -> dict:
    from megatron.core import tensor_parallel

    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

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


def save_checkpoint(root: str, iteration: int, chunks: list, optimizer, scheduler, *, consumed_samples: int,
                    distributed_optimizer: bool, config_record: dict, keep_last: int = 3) -> str:
    from megatron.core import parallel_state as ps

    tmp = os.path.join(root, f".tmp_iter_{iteration:07d}")
    final = _iter_dir(root, iteration)
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    optimizer_state = _optimizer_state(optimizer, distributed_optimizer, _has_trainable(chunks))
    if ps.get_data_parallel_rank() == 0:
        path = _rank_file(tmp)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save({
            "iteration": iteration, "consumed_samples": consumed_samples,
            "model": trainable_state_dict(chunks), "optimizer": optimizer_state,
            "scheduler": scheduler.state_dict(), "rng": rng_state(),
        }, path)
    dist.barrier()
    if dist.get_rank() == 0:
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump({"iteration": iteration, "consumed_samples": consumed_samples, **config_record}, f, indent=1)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        latest_tmp = os.path.join(root, LATEST + ".tmp")
        with open(latest_tmp, "w") as f:
            f.write(str(iteration))
        os.replace(latest_tmp, os.path.join(root, LATEST))
        _prune(root, keep_last)
    dist.barrier()
    return final


def _prune(root: str, keep_last: int) -> None:
    if keep_last <= 0:
        return
    iters = sorted(int(d[5:]) for d in os.listdir(root) if d.startswith("iter_") and d[5:].isdigit())
    for it in iters[:-keep_last]:
        shutil.rmtree(_iter_dir(root, it), ignore_errors=True)


def latest_iteration(root: Optional[str]) -> Optional[int]:
    if not root:
        return None
    path = os.path.join(root, LATEST)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        text = f.read().strip()
    if not text.isdigit() or not os.path.isdir(_iter_dir(root, int(text))):
        raise ValueError(f"{path} names iteration {text!r}, but {root} has no such checkpoint directory")
    return int(text)


def check_compatible(meta: dict, config_record: dict, root: str) -> None:
    """Refuse a checkpoint from another model config (a different parallel layout is fine for DP only)."""
    for key in ("model", "tp", "pp", "vpp", "pp_layers"):
        if meta.get(key) != config_record.get(key):
            raise ValueError(f"checkpoint {root} was saved with {key}={meta.get(key)!r}, this run has "
                             f"{key}={config_record.get(key)!r}; only the data-parallel size may change on resume")


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


def load_checkpoint(root: str, chunks: list, optimizer, scheduler, *, distributed_optimizer: bool,
                    config_record: dict, iteration: Optional[int] = None) -> dict:
    """Restore trainable weights, optimizer, scheduler and RNG. Returns {"iteration", "consumed_samples"}."""
    iteration = latest_iteration(root) if iteration is None else iteration
    directory = _iter_dir(root, iteration)
    with open(os.path.join(directory, "meta.json")) as f:
        meta = json.load(f)
    check_compatible(meta, config_record, root)
    state = torch.load(_rank_file(directory), map_location="cpu", weights_only=True)
    for chunk, saved in zip(chunks, state["model"]):
        model = unwrap(chunk)
        expected = {n for n, p in model.named_parameters() if p.requires_grad}
        if set(saved) != expected:
            raise ValueError(f"checkpoint {directory} holds trainable parameters {sorted(set(saved) ^ expected)[:5]} "
                             "that differ from this run's trainable set (another --trainable policy?)")
        model.load_state_dict(saved, strict=False)
    opt = state["optimizer"]
    if opt is not None:
        _load_optimizer(optimizer, opt, distributed_optimizer)
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return {"iteration": state["iteration"], "consumed_samples": state["consumed_samples"]}


def _load_optimizer(optimizer, opt: dict, distributed_optimizer: bool) -> None:
    from megatron.core import parallel_state as ps

    # Rebuild fp32 main params from the restored weights, then the optimizer state on top.
    optimizer.reload_model_params()
    optimizer.load_state_dict(opt["common"])
    if distributed_optimizer:
        _unshare_adam_steps(optimizer)
        for part, param_state in zip(_parts(optimizer), opt["param_state"]):
            _load_dp_zero_state(part, param_state if ps.get_data_parallel_rank() == 0 else None)
