"""Let megatron-core's real distributed code run on CPU processes over gloo.

megatron-core 0.16.1 assumes CUDA in a handful of places (``device="cuda"`` literals in the schedules, clip-grad
and optimizer, ``pin_memory=True`` in RoPE's context-parallel slicing, ``torch.cuda.current_device()`` for
p2p/DDP buffers and RoPE, ``torch.cuda.synchronize()`` in p2p
and checkpoint saving, a CUDA RNG tracker, ``Tensor.type() == 'torch.cuda.FloatTensor'`` checks in the
optimizers, the CUDA generator state saved around activation recompute). This module maps exactly those to CPU
so that TP/PP/CP/DDP/distributed-optimizer/recompute code paths are exercised unchanged on laptops and CI; why each
shim exists and what it must not do is in docs/design/cpu_gloo.md. Collectives need none: gloo here runs the
``all_gather_into_tensor`` / ``reduce_scatter_tensor`` that sequence parallelism's gathers and reduce-scatters call.

It is installed only when no GPU is present (``install()`` refuses otherwise), once per process, and stays for
the life of the process.
"""

from __future__ import annotations

import contextlib

import torch
from megatron.core.tensor_parallel import random as mcore_random
from torch.overrides import TorchFunctionMode

_INSTALLED = False

_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
}


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device requests to CPU, and answers ``Tensor.type()`` with the CUDA type name the optimizers
    check for (they only compare names; the tensors stay on CPU)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return _CUDA_TYPE_NAMES.get(args[0].dtype) or func(*args)
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):  # page-locking needs a CUDA driver; the tensor is the same without it
            kwargs["pin_memory"] = False
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


class _CpuRNGStatesTracker(mcore_random.CudaRNGStatesTracker):
    """megatron-core's RNG tracker forks the CUDA generator; this one forks the CPU generator instead, so
    ``model_parallel_cuda_manual_seed`` and ``get_cuda_rng_tracker().fork()`` (dropout in TP regions) work."""

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.seeds_.add(seed)
        saved = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(saved)

    @contextlib.contextmanager
    def fork(self, name=mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        saved = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)


class _NoOpStream:
    """Stand-in for ``torch.cuda.current_stream()``: CPU ops are synchronous, so waiting is a no-op."""

    def wait_event(self, *_):
        pass

    def wait_stream(self, *_):
        pass

    def record_event(self, *_):
        pass

    def synchronize(self):
        pass


def install() -> None:
    """Map megatron-core's CUDA assumptions to CPU for this process. Refuses on a machine with a GPU."""
    global _INSTALLED
    if _INSTALLED:
        return
    if torch.cuda.is_available():
        raise RuntimeError("cpu_compat must not be installed on a machine with a GPU; use the NCCL path instead")
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.current_stream = lambda *a, **k: _NoOpStream()
    mcore_random.CudaRNGStatesTracker = _CpuRNGStatesTracker
    # Activation recompute saves/restores "the CUDA generator" around the recomputed forward: the CPU one here.
    mcore_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mcore_random._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    mcore_random.initialize_rng_tracker(force_reset=True)
    _CudaToCpuMode().__enter__()  # stays active for the life of the process
    _INSTALLED = True
