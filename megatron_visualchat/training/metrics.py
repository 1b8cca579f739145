"""Per-step metrics: console line, TensorBoard events and a progress bar, written by one rank."""

from __future__ import annotations

import time
from collections import Counter
from typing import Optional

import psutil
import torch


def memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return psutil.Process().memory_info().rss / 2**30


class MetricsLogger:
    def __init__(self, *, enabled: bool, total_iters: int, tensorboard_dir: Optional[str] = None,
                 progress_bar: bool = True, start_iter: int = 0, packing: bool = False):
        """``packing``: the log line adds the samples per step and the packing efficiency of the interval."""
        self.enabled, self.packing = enabled, packing
        self.interval = Counter()  # tokens, positions, samples and steps since the last logged line
        self.writer = None
        self.bar = None
        if not enabled:
            return
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(tensorboard_dir)
        if progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_iters, initial=start_iter, desc="train", unit="it", dynamic_ncols=True)
        self._last = time.perf_counter()

    def step(self, iteration: int, *, loss: float, lr: float, grad_norm: Optional[float], tokens: int,
             image_tokens: int, positions: int, samples: int, skipped: Counter, log: bool) -> dict:
        """Record one optimizer step; print a line when ``log``. Returns the metrics. ``tokens``: non-pad positions,
        ``positions``: all positions of the step's rows, ``samples``: samples in them (all data-parallel ranks).
        ``packing_efficiency`` (non-pad fraction of the positions) and ``samples_per_step`` cover the log interval
        (every step since the last logged one)."""
        if not self.enabled:
            return {}
        now = time.perf_counter()
        dt, self._last = now - self._last, now
        self.interval.update(tokens=tokens, positions=positions, samples=samples, steps=1)
        interval = self.interval
        metrics = {"loss": loss, "lr": lr, "grad_norm": grad_norm if grad_norm is not None else float("nan"),
                   "tokens_per_s": tokens / dt, "image_tokens_per_s": image_tokens / dt,
                   "skipped_samples": sum(skipped.values()), "memory_gb": memory_gb(), "step_s": dt,
                   "packing_efficiency": interval["tokens"] / max(interval["positions"], 1),
                   "samples_per_step": interval["samples"] / interval["steps"]}
        if self.writer:
            for key, value in metrics.items():
                self.writer.add_scalar(f"train/{key}", value, iteration)
            for reason, n in skipped.items():
                self.writer.add_scalar(f"skipped/{reason}", n, iteration)
        if self.bar:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        if log:
            skipped_text = ", ".join(f"{k}={v}" for k, v in sorted(skipped.items())) or "0"
            packing = (f"samples {metrics['samples_per_step']:.1f}/step | "
                       f"pack eff {metrics['packing_efficiency']:.1%} | " if self.packing else "")
            line = (f"iter {iteration:6d} | loss {loss:.4f} | lr {lr:.3e} | grad norm {metrics['grad_norm']:.3f} | "
                    f"tok/s {metrics['tokens_per_s']:.0f} | img tok/s {metrics['image_tokens_per_s']:.0f} | {packing}"
                    f"skipped {skipped_text} | mem {metrics['memory_gb']:.2f} GB")
            self.interval = Counter()
            (self.bar.write if self.bar else print)(line)
        return metrics

    def eval(self, iteration: int, loss: float, accuracy: float) -> None:
        if not self.enabled:
            return
        if self.writer:
            self.writer.add_scalar("eval/loss", loss, iteration)
            self.writer.add_scalar("eval/answer_accuracy", accuracy, iteration)
        (self.bar.write if self.bar else print)(
            f"iter {iteration:6d} | eval loss {loss:.4f} | held-out answer accuracy {accuracy:.1%}")

    def close(self) -> None:
        if self.bar:
            self.bar.close()
        if self.writer:
            self.writer.close()
