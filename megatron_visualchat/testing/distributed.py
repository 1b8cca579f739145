"""Run a function on N local gloo processes with a given (TP, PP, CP, DP): the "2-GPU mock" of Megatron's tests.

Ranks are forked from a fork server that imported torch + megatron-core once (~7 s per session instead of per
process; a fork costs ~0.3 s). Not from the test process itself: once a process has run autograd, children forked
from it cannot (torch refuses "autograd's threading in combination with fork"), and tests do run backward in
process. The function and its arguments are pickled, so use module-level functions. Each child initialises
torch.distributed and megatron-core's groups through the same entry the trainer uses, runs the function, and sends
back its (picklable) result or its traceback. The parent enforces a deadline, kills every child on failure or
timeout and reports the first failing rank's traceback, so a test never hangs.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import signal
import socket
import time
import traceback
from typing import Any, Callable, Optional

import torch

from megatron_visualchat.config import ParallelConfig


class RankFailed(AssertionError):
    """A child rank raised; the message carries its traceback."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_PRELOAD = ["torch", "megatron.core", "megatron.core.models.gpt", "megatron.core.pipeline_parallel",
            "megatron.core.distributed", "megatron.core.optimizer", "megatron_visualchat.model.visualchat",
            "megatron_visualchat.training.pretrain"]


def _fork_server():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def _child(rank, world_size, parallel, port, seed, fn, args, kwargs, conn) -> None:
    status, payload = "ok", None
    try:
        torch.set_num_threads(1)
        # Imported in the child only: it brings megatron-core, which the test process itself never needs.
        from megatron_visualchat.parallel import destroy_parallel, initialize_parallel

        initialize_parallel(parallel, seed, rank=rank, world_size=world_size,
                            init_method=f"tcp://127.0.0.1:{port}", timeout_minutes=2)
        try:
            payload = fn(*args, **kwargs)
        finally:
            destroy_parallel()
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        status, payload = "error", traceback.format_exc()
    # Plain pickle copies tensor data; torch's multiprocessing reducers would share it through a helper thread
    # that dies with this process.
    try:
        message = pickle.dumps((status, payload))
    except Exception:  # noqa: BLE001 - an unpicklable result is a test bug; say so
        message = pickle.dumps(("error", f"rank {rank} returned an unpicklable result:\n{traceback.format_exc()}"))
    conn.send_bytes(message)
    conn.close()
    os._exit(0)  # skip atexit handlers inherited from the parent (pytest, megatron)


def run_parallel(
    fn: Callable[..., Any],
    *,
    tp: int = 1,
    pp: int = 1,
    dp: int = 1,
    cp: int = 1,
    vpp: Optional[int] = None,
    pp_layers: Optional[tuple[int, ...]] = None,
    args: tuple = (),
    kwargs: Optional[dict] = None,
    seed: int = 1234,
    timeout: float = 180.0,
) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``tp*pp*cp*dp`` forked gloo processes; return the per-rank results (index =
    global rank). Raises ``RankFailed`` with the child's traceback, or ``TimeoutError`` naming the silent ranks."""
    parallel = ParallelConfig(tp=tp, pp=pp, dp=dp, cp=cp, vpp=vpp, pp_layers=pp_layers)
    world_size = parallel.world_size
    ctx = _fork_server()
    port = free_port()
    procs, conns = [], []
    for rank in range(world_size):
        parent_conn, child_conn = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_child, args=(rank, world_size, parallel, port, seed, fn, args, kwargs or {},
                                              child_conn), daemon=True)
        p.start()
        child_conn.close()
        procs.append(p)
        conns.append(parent_conn)

    results: list[Any] = [None] * world_size
    pending = set(range(world_size))
    deadline = time.monotonic() + timeout
    try:
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"ranks {sorted(pending)} did not finish within {timeout:.0f}s "
                                   f"(tp={tp}, pp={pp}, cp={cp}, dp={dp})")
            ready = mp.connection.wait([conns[r] for r in pending], timeout=min(remaining, 1.0))
            for conn in ready:
                rank = conns.index(conn)
                try:
                    status, payload = pickle.loads(conn.recv_bytes())  # our own child's bytes
                except EOFError:
                    status, payload = "error", f"rank {rank} exited without a result (exit code " \
                                               f"{procs[rank].exitcode}); killed or crashed in native code"
                if status == "error":
                    raise RankFailed(f"rank {rank} of {world_size} (tp={tp}, pp={pp}, cp={cp}, dp={dp}) "
                                     f"failed:\n{payload}")
                results[rank] = payload
                pending.discard(rank)
    finally:
        for p in procs:
            if p.is_alive() and pending:
                os.kill(p.pid, signal.SIGKILL)
            p.join(timeout=5)
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
                p.join()
        for c in conns:
            c.close()
    return results
