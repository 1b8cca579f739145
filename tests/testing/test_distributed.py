"""The harness itself: results per rank, a child's traceback as the failure, no hangs."""

import time

import pytest

from megatron_visualchat.testing.distributed import RankFailed, run_parallel


def _ranks():
    import torch
    from megatron.core import parallel_state as ps

    t = torch.ones(1) * (ps.get_tensor_model_parallel_rank() + 1)
    torch.distributed.all_reduce(t, group=ps.get_tensor_model_parallel_group())
    return (torch.distributed.get_rank(), ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(),
            float(t))


def _fail_on_rank_one():
    import torch

    if torch.distributed.get_rank() == 1:
        raise ValueError("boom from rank one")
    torch.distributed.barrier()  # rank 0 would wait forever: the harness must kill it


def _sleep():
    time.sleep(60)


def test_returns_per_rank_results_with_megatron_groups():
    results = run_parallel(_ranks, tp=2, pp=2)
    assert [r[0] for r in results] == [0, 1, 2, 3]
    assert sorted((r[1], r[2]) for r in results) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(r[3] == 3.0 for r in results)  # 1 + 2 summed over the TP group


def test_child_traceback_becomes_the_failure():
    with pytest.raises(RankFailed, match="boom from rank one"):
        run_parallel(_fail_on_rank_one, tp=2, timeout=60)


def test_timeout_kills_children():
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"ranks \[0, 1\] did not finish"):
        run_parallel(_sleep, tp=2, timeout=3)
    assert time.monotonic() - start < 20
