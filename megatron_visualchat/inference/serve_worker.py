"""The one thread that runs the model for the HTTP server, and the loop other tensor-parallel ranks follow.

Requests queue up and run one at a time, in arrival order, so two requests never write into the same cache
concurrently. The worker never waits for a client: text goes into the request's own ``asyncio`` queue without
bound, so a slow reader delays nobody, and a request whose client left before its turn is skipped. A request that
has started runs to its end (at most ``max_tokens``): with tensor parallelism every rank must run the same steps,
and its cache stays for the next round.

As in the chat REPL (``repl.py``), rank 0 drives: it broadcasts each ``Job`` and every other rank runs it too;
``None`` tells the followers to stop.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from typing import Callable, Optional

import torch

from megatron_visualchat.inference.repl import broadcast_from_rank0
from megatron_visualchat.inference.serve_engine import Completion, Prompt, ServeEngine
from megatron_visualchat.inference.serve_request import ChatRequest

log = logging.getLogger(__name__)


class Ticket:
    """One queued request as the HTTP side sees it: events ``("text", str)`` and ``("image", PNG bytes)``, then
    ``("done", Completion)`` or ``("error", Exception)``, arrive on ``events`` in the server's event loop."""

    def __init__(self, prompt: Prompt, request: ChatRequest, loop: asyncio.AbstractEventLoop, stream: bool):
        self.prompt, self.request, self.loop, self.stream = prompt, request, loop, stream
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()

    def put(self, kind: str, value) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is closed: the server is shutting down
            pass

    async def result(self) -> Completion:
        """The completion (text events skipped); raises what the worker raised."""
        while True:
            kind, value = await self.events.get()
            if kind == "done":
                return value
            if kind == "error":
                raise value


class ModelWorker:
    def __init__(self, engine: ServeEngine, broadcast: Callable = broadcast_from_rank0):
        self.engine, self.broadcast = engine, broadcast
        self.jobs: queue.Queue[Optional[Ticket]] = queue.Queue()
        self.thread = threading.Thread(target=self._loop, name="model-worker", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Finish the queued requests, then stop the worker (and the follower ranks)."""
        if self.thread.is_alive():
            self.jobs.put(None)
            self.thread.join()

    @property
    def queued(self) -> int:
        return self.jobs.qsize()

    def submit(self, prompt: Prompt, request: ChatRequest, stream: bool) -> Ticket:
        ticket = Ticket(prompt, request, asyncio.get_running_loop(), stream)
        self.jobs.put(ticket)
        return ticket

    def _loop(self) -> None:
        if self.engine.device.type == "cuda":  # the current device is per thread
            torch.cuda.set_device(self.engine.device)
        while (ticket := self.jobs.get()) is not None:
            if ticket.cancelled.is_set():
                continue
            try:
                job = self.engine.plan(ticket.prompt, ticket.request)
                self.broadcast(job)
                completion = self.engine.run(job, (lambda t: ticket.put("text", t)) if ticket.stream else None,
                                             (lambda png: ticket.put("image", png)) if ticket.stream else None)
            except Exception as e:  # noqa: BLE001 - reported to this request's client; the server goes on
                log.exception("request failed")
                ticket.put("error", e)
            else:
                ticket.put("done", completion)
        self.broadcast(None)


def follow(engine: ServeEngine, broadcast: Callable = broadcast_from_rank0) -> None:
    """Ranks other than 0: run every job rank 0 broadcasts, until it sends ``None``."""
    while (job := broadcast(None)) is not None:
        try:
            engine.run(job)
        except Exception:  # noqa: BLE001 - rank 0 reports it to the client; keep following
            log.exception("request failed")
