"""``megatron-visualchat plan``: list the layouts that fit a job in GPU memory, best first, with the memory model's
per-GPU breakdown (docs/planner.md)."""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

from megatron_visualchat.config import LLM_PRESETS
from megatron_visualchat.model.vision import ENCODERS, PROJECTORS
from megatron_visualchat.planner.counts import vision_shape
from megatron_visualchat.planner.layouts import Layout, pipeline_flags, plan
from megatron_visualchat.planner.memory import GIB, Workload
from megatron_visualchat.argtypes import trainable_parts


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megatron-visualchat plan", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model-preset", choices=sorted(LLM_PRESETS), required=True)
    p.add_argument("--vision-encoder", choices=sorted(ENCODERS), required=True)
    p.add_argument("--projector", choices=sorted(PROJECTORS), default="linear")
    p.add_argument("--gpus", type=int, required=True)
    p.add_argument("--gpu-memory-gib", type=float, required=True)
    p.add_argument("--reserve-gib", type=float, default=4.0,
                   help="per GPU, kept out of the budget: CUDA context, NCCL buffers, allocator fragmentation")
    p.add_argument("--max-tp", type=int, default=8, help="largest tensor-parallel size (GPUs in one NVLink node)")
    p.add_argument("--max-vpp", type=int, default=8,
                   help="largest virtual pipeline size: each chunk adds p2p transfers the bubble formula ignores")
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--global-batch-size", type=int, default=128)
    p.add_argument("--images-per-sample", type=int, default=1, help="images a sequence carries on average")
    p.add_argument("--trainable", type=trainable_parts, default=trainable_parts("projector,image_projections"),
                   help="as for training (pretrain_vchat --trainable)")
    p.add_argument("--no-distributed-optimizer", action="store_true",
                   help="plan for plain DDP: every rank keeps the whole optimizer state")
    p.add_argument("--no-sequence-parallel", action="store_true",
                   help="plan without --sequence-parallel (by default every layout with TP > 1 uses it when TP "
                        "divides --seq-length)")
    p.add_argument("--top", type=int, default=10, help="layouts to print")
    return p


def _row(layout: Layout) -> str:
    first, peak = layout.stages[0], max(layout.stages, key=lambda s: s.total)
    split = pipeline_flags(layout) or "even"
    return (f"{layout.tp:>3} {'yes' if layout.sp else 'no':>3} {layout.pp:>3} {layout.vpp:>4} {layout.dp:>4} "
            f"{layout.recompute:>9} {split:>14} "
            f"{layout.bubble:>7.3f} {first.weights / GIB:>8.1f} {(first.gradients + first.optimizer) / GIB:>9.2f} "
            f"{first.activations / GIB:>8.1f} {first.vision_activations / GIB:>7.2f} {first.total / GIB:>8.1f} "
            f"{peak.total / GIB:>8.1f} {'yes' if layout.fits else 'no':>4}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    llm = LLM_PRESETS[args.model_preset]
    vision = vision_shape(args.vision_encoder, args.projector, llm.hidden_size)
    work = Workload(seq_length=args.seq_length, micro_batch_size=args.micro_batch_size,
                    images_per_sample=args.images_per_sample, distributed_optimizer=not args.no_distributed_optimizer,
                    train_vision_encoder=args.trainable.vision_encoder)
    layouts = plan(llm, vision, args.trainable, work, gpus=args.gpus, gpu_memory_gib=args.gpu_memory_gib,
                   reserve_gib=args.reserve_gib, global_batch_size=args.global_batch_size, max_tp=args.max_tp,
                   max_vpp=args.max_vpp, sequence_parallel=not args.no_sequence_parallel)
    fitting = sum(layout.fits for layout in layouts)
    print(f"{args.model_preset} + {args.vision_encoder} on {args.gpus} x {args.gpu_memory_gib:g} GiB "
          f"({args.reserve_gib:g} GiB reserved), seq {args.seq_length}, micro-batch {args.micro_batch_size}, "
          f"global batch {args.global_batch_size}: {fitting} of {len(layouts)} layouts fit (predicted, not "
          f"measured on a GPU; docs/planner.md)")
    print(f"{'tp':>3} {'sp':>3} {'pp':>3} {'vpp':>4} {'dp':>4} {'recompute':>9} {'pipeline':>14} {'bubble':>7} "
          f"{'weights':>8} {'grad+opt':>9} {'act':>8} {'vision':>7} {'stage0':>8} {'peak':>8} {'fits':>4}")
    print(" " * 55 + "(GiB per GPU; weights..stage0 on stage 0, peak over stages)")
    for layout in layouts[:args.top]:
        print(_row(layout))
    return 0 if fitting else 1
