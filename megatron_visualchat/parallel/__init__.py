"""Process-group setup for megatron-core on GPUs (NCCL) and CPUs (gloo)."""

from megatron_visualchat.parallel.setup import destroy_parallel, initialize_parallel, parallel_info

__all__ = ["initialize_parallel", "destroy_parallel", "parallel_info"]
