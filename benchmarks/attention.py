"""Forward+backward time and peak memory: MMCA fast path vs torch SDPA causal vs the dense MMCA reference.

    python benchmarks/attention.py                      # CUDA, bf16, L in 1024..8192, 32 heads x 128
    python benchmarks/attention.py --cpu-smoke          # tiny float32 run on CPU (checks the script works)

Each sequence holds up to --images images of --image-tokens tokens, evenly spaced in text; fewer when they
would fill more than half the sequence (the table shows the count). On CPU mmca_attention is the dense
reference (its documented fallback) and memory is not measured. Prints one markdown table.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch
import torch.nn.functional as F

from megatron_visualchat.config import COMBINES, IMAGE_ROWS
from megatron_visualchat.model.mmca import mmca_attention, mmca_attention_reference
from megatron_visualchat.model.token_codes import MODALITY_IMAGE, MODALITY_TEXT, NO_IMAGE

# Live float32 [B, H, Lq, Lk] maps the reference needs at its peak (scores, masked copies and softmax per
# branch, saved activations, their gradients): an over-estimate used to skip sizes that cannot fit.
REFERENCE_SCORE_MAPS = 12


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=None, help="default: --heads (no GQA)")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--image-tokens", type=int, default=256)
    parser.add_argument("--image-rows", choices=IMAGE_ROWS, default="self")
    parser.add_argument("--combine", choices=COMBINES, default="sum")
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations (include torch.compile)")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny float32 sizes on CPU")
    args = parser.parse_args()
    if not args.cpu_smoke and not torch.cuda.is_available():
        parser.error("no CUDA device: the full benchmark needs one; use --cpu-smoke for a CPU check")
    if args.cpu_smoke:
        args.lengths, args.heads, args.kv_heads, args.head_dim = [64, 128], 4, 2, 16
        args.images, args.image_tokens, args.warmup, args.iters = 2, 8, 1, 2
    args.kv_heads = args.kv_heads or args.heads
    return args


def make_layout(length: int, images: int, image_tokens: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Evenly spaced images in text -> (modality [L], image_id [L], number of images placed)."""
    images = min(images, (length // 2) // image_tokens)
    modality = torch.full((length,), MODALITY_TEXT)
    image_id = torch.full((length,), NO_IMAGE)
    gap = (length - images * image_tokens) // (images + 1)
    for n in range(images):
        start = gap * (n + 1) + n * image_tokens
        modality[start : start + image_tokens] = MODALITY_IMAGE
        image_id[start : start + image_tokens] = n
    return modality, image_id, images


def measure(step: Callable[[], None], device: torch.device, warmup: int, iters: int) -> tuple[float, float | None]:
    """Mean milliseconds per call and peak extra memory in MiB (None on CPU)."""
    for _ in range(warmup):
        step()
    if device.type != "cuda":
        start = time.perf_counter()
        for _ in range(iters):
            step()
        return (time.perf_counter() - start) * 1e3 / iters, None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(iters):
        step()
    end.record()
    torch.cuda.synchronize()
    return begin.elapsed_time(end) / iters, (torch.cuda.max_memory_allocated() - baseline) / 2**20


def reference_fits(args: argparse.Namespace, length: int, device: torch.device) -> bool:
    if device.type != "cuda":
        return True
    need = REFERENCE_SCORE_MAPS * args.batch * args.heads * length * length * 4
    return need < torch.cuda.mem_get_info(device)[0]


def run_length(args: argparse.Namespace, length: int, device: torch.device, dtype: torch.dtype) -> list[str]:
    modality, image_id, images = make_layout(length, args.images, args.image_tokens)
    modality = modality.expand(args.batch, -1).to(device)
    image_id = image_id.expand(args.batch, -1).to(device)
    gen = torch.Generator(device=device).manual_seed(length)

    def tensor(heads: int) -> torch.Tensor:
        shape = (args.batch, heads, length, args.head_dim)
        return torch.randn(shape, generator=gen, device=device, dtype=dtype).requires_grad_()

    q, k, v = tensor(args.heads), tensor(args.kv_heads), tensor(args.kv_heads)
    grad_out = torch.randn_like(q)
    options = dict(image_rows=args.image_rows, combine=args.combine)
    methods: dict[str, Callable[[], torch.Tensor]] = {
        "mmca": lambda: mmca_attention(q, k, v, modality, image_id, **options),
        "sdpa_causal": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
        "reference": lambda: mmca_attention_reference(q, k, v, modality, image_id, **options),
    }
    cells = [str(length), str(images)]
    for name, forward in methods.items():
        if name == "reference" and not reference_fits(args, length, device):
            cells += ["skip (would not fit)", "-"]
            continue

        def step() -> None:
            forward().backward(grad_out)
            q.grad = k.grad = v.grad = None

        try:
            ms, mib = measure(step, device, args.warmup, args.iters)
        except torch.OutOfMemoryError:
            q.grad = k.grad = v.grad = None
            torch.cuda.empty_cache()
            cells += ["OOM", "-"]
            continue
        cells += [f"{ms:.2f}", "n/a" if mib is None else f"{mib:.0f}"]
    return cells


def main() -> None:
    args = parse_args()
    cuda = not args.cpu_smoke
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    print(
        f"{name}, {dtype}, batch {args.batch}, {args.heads} q heads / {args.kv_heads} kv heads x {args.head_dim}, "
        f"images of {args.image_tokens} tokens, image_rows={args.image_rows}, combine={args.combine}; "
        f"forward+backward, mean of {args.iters} after {args.warmup} warmup; memory = peak above inputs\n"
    )
    header = ["L", "images", "mmca ms", "mmca MiB", "SDPA causal ms", "SDPA causal MiB", "reference ms",
              "reference MiB"]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for length in args.lengths:
        print("| " + " | ".join(run_length(args, length, device, dtype)) + " |", flush=True)


if __name__ == "__main__":
    main()
