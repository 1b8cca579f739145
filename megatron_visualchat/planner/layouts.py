"""Every layout of a job on N GPUs, its pipeline split, predicted per-GPU memory and pipeline bubble, best first."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_visualchat.config import ConfigError, LLMConfig, ParallelConfig, TrainableConfig
from megatron_visualchat.planner.counts import VisionShape, stage_params
from megatron_visualchat.planner.memory import GIB, RECOMPUTE, StageMemory, Workload, stage_memory


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    vpp: int  # 1: no interleaving
    dp: int
    recompute: str
    pp_layers: tuple[int, ...]
    num_microbatches: int
    stages: tuple[StageMemory, ...]
    fits: bool
    sp: bool = False  # --sequence-parallel

    @property
    def bubble(self) -> float:
        """Idle fraction of a pipelined step: (PP-1) / (VPP * m)."""
        return (self.pp - 1) / (self.vpp * self.num_microbatches)

    @property
    def peak_gib(self) -> float:
        return max(s.total for s in self.stages) / GIB

    def sort_key(self):
        """Fits, then smallest bubble, then least recompute, then smallest TP (then least memory)."""
        return (not self.fits, round(self.bubble, 9), RECOMPUTE.index(self.recompute), self.tp, self.peak_gib)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _even_split(layers: int, stages: int, first: int) -> tuple[int, ...]:
    """``first`` layers on stage 0, the rest as even as possible over the others (extra layers on the last ones)."""
    if stages == 1:
        return (layers,)
    rest, others = layers - first, stages - 1
    base, extra = divmod(rest, others)
    return (first, *(base + (i >= others - extra) for i in range(others)))


def _evaluate(llm: LLMConfig, vision: VisionShape, trainable: TrainableConfig, work: Workload, *, tp: int, pp: int,
              vpp: int, dp: int, recompute: str, pp_layers: tuple[int, ...], m: int,
              sp: bool) -> tuple[StageMemory, ...]:
    stages = []
    for stage, layers in enumerate(pp_layers):
        params = stage_params(llm, vision, trainable, tp=tp, layers=layers, first=stage == 0, last=stage == pp - 1)
        stages.append(stage_memory(llm, vision, params, work, tp=tp, pp=pp, vpp=vpp, dp=dp, stage=stage,
                                   layers=layers, recompute=recompute, num_microbatches=m, sp=sp))
    return tuple(stages)


def _best_split(llm, vision, trainable, work, *, tp, pp, dp, recompute, m, sp) -> tuple[tuple[int, ...], tuple]:
    """The split with the smallest peak stage memory: stage 0 holds the vision tower and the most in-flight
    micro-batches, so it usually gets fewer layers. Ties go to the more even split."""
    even = llm.num_layers // pp
    best = None
    for first in range(even, 0, -1):
        split = _even_split(llm.num_layers, pp, first)
        stages = _evaluate(llm, vision, trainable, work, tp=tp, pp=pp, vpp=1, dp=dp, recompute=recompute,
                           pp_layers=split, m=m, sp=sp)
        peak = max(s.total for s in stages)
        if best is None or peak < best[0]:
            best = (peak, split, stages)
    return best[1], best[2]


def plan(llm: LLMConfig, vision: VisionShape, trainable: TrainableConfig, work: Workload, *, gpus: int,
         gpu_memory_gib: float, reserve_gib: float, global_batch_size: int, max_tp: int,
         max_vpp: int, sequence_parallel: bool = True) -> list[Layout]:
    """All valid layouts (ParallelConfig.validate's rules) up to ``max_tp`` and ``max_vpp``, best first
    (``Layout.sort_key``). ``sequence_parallel``: use it wherever TP > 1 and TP divides the sequence; it moves the
    same bytes as TP's all-reduces (reduce-scatter + all-gather) and only lowers activation memory, so a layout
    never gets worse with it."""
    budget = (gpu_memory_gib - reserve_gib) * GIB
    layouts = []
    for tp in _divisors(gpus):
        for pp in _divisors(gpus // tp):
            dp = gpus // (tp * pp)
            if tp > max_tp or pp > llm.num_layers or global_batch_size % (work.micro_batch_size * dp):
                continue
            m = global_batch_size // (work.micro_batch_size * dp)
            # megatron-core's interleaved schedule needs the micro-batches in whole groups of PP
            vpps = [1] + [v for v in range(2, max_vpp + 1) if pp > 1 and m % pp == 0]
            sp = sequence_parallel and tp > 1 and work.seq_length % tp == 0
            for vpp in vpps:
                even = None if vpp > 1 else _even_split(llm.num_layers, pp, llm.num_layers // pp)
                try:
                    ParallelConfig(tp=tp, pp=pp, dp=dp, vpp=None if vpp == 1 else vpp, pp_layers=even,
                                   sequence_parallel=sp).validate(llm)
                except ConfigError:
                    continue
                for recompute in RECOMPUTE:
                    if pp > 1 and vpp == 1:
                        split, stages = _best_split(llm, vision, trainable, work, tp=tp, pp=pp, dp=dp,
                                                    recompute=recompute, m=m, sp=sp)
                    else:
                        split = (llm.num_layers // pp,) * pp
                        stages = _evaluate(llm, vision, trainable, work, tp=tp, pp=pp, vpp=vpp, dp=dp,
                                           recompute=recompute, pp_layers=split, m=m, sp=sp)
                    layouts.append(Layout(tp, pp, vpp, dp, recompute, split, m, stages,
                                          fits=max(s.total for s in stages) <= budget, sp=sp))
    return sorted(layouts, key=Layout.sort_key)


def pipeline_flags(layout: Layout) -> Optional[str]:
    """The --pipeline-layers value for an uneven split (None when megatron's even split is the same)."""
    if layout.pp == 1 or layout.vpp > 1 or len(set(layout.pp_layers)) == 1:
        return None
    return ",".join(map(str, layout.pp_layers))
