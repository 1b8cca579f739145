"""One entry that brings up torch.distributed + megatron-core parallel_state + the model-parallel RNG, and one
that tears them down. Works under torchrun (env:// rendezvous) and under the test harness (explicit rank/world)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from megatron_visualchat.config import ParallelConfig
from megatron_visualchat.parallel import cpu_compat


@dataclass(frozen=True)
class ParallelInfo:
    """What a caller needs from the set-up groups: its global rank (rank 0 talks to the user, writes the files)
    and the device its model goes on. Positions within the groups come from megatron-core's ``parallel_state``."""

    rank: int
    device: torch.device


def initialize_parallel(
    parallel: ParallelConfig,
    seed: int = 1234,
    *,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    init_method: Optional[str] = None,
    timeout_minutes: float = 10.0,
) -> ParallelInfo:
    """Initialise the default process group (NCCL with a GPU, gloo without) and megatron-core's TP/PP/DP groups,
    then seed the CPU/CUDA generators and megatron's RNG tracker (different TP ranks get different dropout
    streams, DP ranks identical model init). A world size other than tp x pp x cp x dp is a ``ConfigError``; build
    ``parallel`` with ``ParallelConfig.for_world`` to derive dp from the world size."""
    use_cuda = torch.cuda.is_available()
    if not use_cuda:
        cpu_compat.install()
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    parallel.check_world_size(world_size)
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", rank % max(torch.cuda.device_count(), 1)))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        if init_method is None and "MASTER_ADDR" not in os.environ:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", "29500")
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            init_method=init_method or "env://",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(minutes=timeout_minutes),
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.vpp,
        context_parallel_size=parallel.cp,
        distributed_timeout_minutes=int(max(timeout_minutes, 1)),
    )
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return parallel_info(device)


def parallel_info(device: Optional[torch.device] = None) -> ParallelInfo:
    """This process's ``ParallelInfo`` once ``initialize_parallel`` has run."""
    return ParallelInfo(
        rank=dist.get_rank(),
        device=device or (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
                          else torch.device("cpu")),
    )


def destroy_parallel() -> None:
    """Tear down megatron's groups and the default group so a process (or test) can initialise again."""
    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
