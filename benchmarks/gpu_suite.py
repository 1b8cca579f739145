"""The GPU suite: one command, one markdown table, each measurement next to its peer from the same process.

    python benchmarks/gpu_suite.py --json results.json   # CUDA, bf16, headline shapes (tools/device_check.sh)
    python benchmarks/gpu_suite.py --cpu-smoke           # every code path at toy sizes, CPU, float32

Rows (docs/benchmarks.md, "GPU suite"):
  a  MMCA forward+backward: mmca_attention (FlexAttention) vs torch SDPA causal (flash) on the same sequence vs
     DeepSpeed-VisualChat's eager two-softmax MMCA (peers/dsvc_mmca.py); ms, TFLOP/s, peak memory, ratios.
  b  one training step of VisualChat (megatron-core LLaMA-2 shape, frozen LLM, CLIP-L/14-336, linear projector,
     random weights) vs HF LlamaForCausalLM (SDPA) in the same frozen setting (peers/hf_llama.py); tokens/s, MFU.
  c  chat first-token latency per round, KV-cache reuse vs re-encoding the whole conversation (benchmarks/chat.py).
Where an optional piece is missing (Transformer-Engine, torch.compile/Triton, flash SDPA, transformers) the
`path` column says what ran instead. Run it as a script: it imports its siblings (attention.py, chat.py, peers/)
from benchmarks/.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import platform
import sys
import time
import traceback
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import chat
from attention import make_layout, measure
from peers.dsvc_mmca import dsvc_masks, dsvc_mmca_attention

from megatron_visualchat.config import (
    BACKENDS, DTYPES, IMAGE_ROWS, LLM_PRESETS, AttentionConfig, LLMConfig, ParallelConfig, VisionConfig,
    VisualChatConfig,
)
from megatron_visualchat.model.mmca import mmca_attention
from megatron_visualchat.model.mmca.fast import _mmca_attention_fast
from megatron_visualchat.model.token_codes import MODALITY_IMAGE, MODALITY_PAD, MODALITY_TEXT
from megatron_visualchat.model.visualchat import VisualChatModel, apply_trainable_policy
from megatron_visualchat.model.vision import ENCODERS
from megatron_visualchat.parallel import destroy_parallel, initialize_parallel
from megatron_visualchat.testing.batches import visualchat_batch
from megatron_visualchat.testing.distributed import free_port
from megatron_visualchat.training.step import visualchat_forward_step

# Dense bf16 tensor-core peak (vendor datasheets), for MFU; other devices need --peak-tflops.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}
# Bytes per [B, H, L, L] score element live at the DS-VC peer's peak (bf16 scores and masked copies, two float32
# softmaxes and their casts, gradients): an over-estimate used to skip lengths that cannot fit.
DSVC_BYTES_PER_SCORE = 32
COLUMNS = ["row", "case", "method", "path", "ms", "rate", "peak GiB", "vs"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="toy sizes, CPU, float32: every code path")
    parser.add_argument("--rows", nargs="+", choices="abc", default=list("abc"))
    parser.add_argument("--json", default=None, help="also write every number here (rewritten after each row)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak for MFU (default: by name)")
    a = parser.add_argument_group("row a: MMCA attention")
    a.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    a.add_argument("--heads", type=int, default=32)
    a.add_argument("--kv-heads", type=int, default=None, help="default: --heads (LLaMA-2-7B has no GQA)")
    a.add_argument("--head-dim", type=int, default=128)
    a.add_argument("--images", type=int, default=16, help="at most this many images, filling at most half of L")
    a.add_argument("--image-tokens", type=int, nargs="+", default=[256, 577], help="one case per value")
    a.add_argument("--image-rows", choices=IMAGE_ROWS, default="self+text",
                   help="default: what DS-VC's code computes, so all three methods compute the same output")
    a.add_argument("--warmup", type=int, default=3, help="untimed calls (torch.compile happens here)")
    a.add_argument("--iters", type=int, default=10)
    b = parser.add_argument_group("row b: training step")
    b.add_argument("--preset", choices=sorted(LLM_PRESETS), default="llama2-7b")
    b.add_argument("--encoder", choices=sorted(ENCODERS), default="clip-vit-l-14-336")
    b.add_argument("--step-images", type=int, default=4)
    b.add_argument("--seq-length", type=int, default=4096)
    b.add_argument("--backend", choices=("auto", *BACKENDS), default="auto",
                   help="auto: Transformer-Engine linears when installed, else megatron-core's local ones")
    b.add_argument("--step-warmup", type=int, default=2)
    b.add_argument("--step-iters", type=int, default=5)
    c = parser.add_argument_group("row c: chat")
    c.add_argument("--chat-encoder", choices=sorted(ENCODERS), default="clip-vit-l-14-224",
                   help="257 tokens per image: 8 rounds fit LLaMA-2's 4096 positions")
    c.add_argument("--rounds", type=int, default=8)
    c.add_argument("--new-tokens", type=int, default=4, help="tokens generated per round (first-token time is "
                                                               "what is compared)")
    c.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.cpu_smoke:  # one case per row; GQA so the peers' head grouping runs too
        args.lengths, args.heads, args.kv_heads, args.head_dim = [64], 4, 2, 16
        args.images, args.image_tokens, args.warmup, args.iters = 4, [8], 0, 1
        args.preset, args.encoder, args.chat_encoder, args.seq_length = "tiny", "tiny", "tiny", 128
        args.step_warmup, args.step_iters, args.rounds, args.new_tokens, args.repeats = 0, 1, 3, 2, 1
    elif not torch.cuda.is_available():
        parser.error("no CUDA device: the suite measures a GPU; use --cpu-smoke for a CPU check of every path")
    args.kv_heads = args.kv_heads or args.heads
    args.dtype = "fp32" if args.cpu_smoke else "bf16"
    return args


def line(row: str, case: str, method: str, path: str, ms: float | None = None, rate: str = "-",
         peak_mib: float | None = None, vs: str = "-", status: str | None = None, **numbers) -> dict:
    """One table line; ``numbers`` are extra raw values kept for the JSON."""
    return dict(row=row, case=case, method=method, path=path, ms=ms, rate=rate, peak_mib=peak_mib, vs=vs,
                status=status, **numbers)


def cells(entry: dict) -> list[str]:
    ms = entry["status"] or f"{entry['ms']:.2f}"
    peak = "-" if entry["peak_mib"] is None else f"{entry['peak_mib'] / 1024:.2f}"
    return [entry["row"], entry["case"], entry["method"], entry["path"], ms, entry["rate"], peak, entry["vs"]]


def timed(step: Callable[[], None], device: torch.device, warmup: int, iters: int):
    """(ms, peak MiB or None, status): ``attention.measure``, an out-of-memory reported as status "OOM"."""
    try:
        ms, mib = measure(step, device, warmup, iters)
        return ms, mib, None
    except torch.OutOfMemoryError:
        free_memory(device)
        return None, None, "OOM"


def free_memory(device: torch.device) -> None:
    gc.collect()  # megatron-core modules hold reference cycles
    if device.type == "cuda":
        torch.cuda.empty_cache()


def first_that_runs(candidates: list[tuple[str, Callable]], run: Callable[[Callable], tuple]):
    """Try ``run(fn)`` for each (path, fn) in order, dropping from ``candidates`` the ones that raise so later
    cases do not retry them (``timed`` reports out-of-memory itself). Returns (path, result); the path also names
    what failed before it."""
    failed = []
    while candidates:
        path, fn = candidates[0]
        try:
            return "; ".join([path, *failed]), run(fn)
        except Exception as error:  # a missing optional piece (Triton for torch.compile, a flash kernel)
            failed.append(f"{path} failed: {type(error).__name__}")
            candidates.pop(0)
    raise RuntimeError("; ".join(failed))


# ---------------------------------------------------------------------------------------------------- row a
def attended_pairs(modality: torch.Tensor, image_id: torch.Tensor, image_rows: str) -> int:
    """(query, key) pairs MMCA attends over for one row of codes [L] (an image row's own value under "self" /
    "self+text" is a gather, not attention): text rows see every earlier non-pad token; image rows see earlier
    text ("self+text") or their own image ("image")."""
    text, image = modality == MODALITY_TEXT, modality == MODALITY_IMAGE
    pairs = torch.where(text, (modality != MODALITY_PAD).cumsum(0), 0).sum()
    if image_rows == "self+text":
        pairs = pairs + torch.where(image, text.cumsum(0), 0).sum()
    elif image_rows == "image":
        pairs = pairs + (torch.bincount(image_id[image]) ** 2).sum()
    return int(pairs)


def tflops(pairs: int, args, ms: float | None) -> str:
    """Forward+backward FLOPs = 3.5 x forward (FlashAttention's count, backward recomputing QK^T), forward =
    4 * head_dim per attended pair and query head."""
    if ms is None:
        return "-"
    return f"{14 * args.head_dim * args.heads * pairs / (ms * 1e-3) / 1e12:.3g} TFLOP/s"


def attention_methods(device: torch.device) -> tuple[list, list]:
    """Candidate lists (path, fn), best first: ours as fn(q, k, v, modality, image_id, image_rows=...), SDPA causal
    as fn(q, k, v)."""
    if device.type == "cuda":
        ours = [("FlexAttention, torch.compile", mmca_attention)] if importlib.util.find_spec("triton") else []
        ours.append(("FlexAttention eager (no torch.compile)", partial(_mmca_attention_fast, compile=False)))
        backends = [("flash", SDPBackend.FLASH_ATTENTION), ("default backend", None)]
    else:
        ours = [("FlexAttention eager (CPU)", partial(_mmca_attention_fast, compile=False))]
        backends = [("math (CPU)", SDPBackend.MATH)]

    def sdpa(backend, q, k, v):
        if backend is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    return ours, [(f"SDPA {name}", partial(sdpa, backend)) for name, backend in backends]


def attention_rows(args, device: torch.device, dtype: torch.dtype) -> list[dict]:
    ours, sdpa = attention_methods(device)
    lines = []
    for length in args.lengths:
        for image_tokens in args.image_tokens:
            modality, image_id, images = make_layout(length, args.images, image_tokens)
            if images == 0:
                continue
            pairs = attended_pairs(modality, image_id, args.image_rows)
            case = f"L={length}, {images} img x {image_tokens}"
            lines += attention_case(args, device, dtype, case, modality, image_id, pairs, ours, sdpa)
    return lines


def attention_case(args, device, dtype, case, modality, image_id, pairs, ours, sdpa) -> list[dict]:
    length = modality.shape[0]
    modality = modality.expand(1, -1).to(device)
    image_id = image_id.expand(1, -1).to(device)
    gen = torch.Generator(device=device).manual_seed(length)
    q, k, v = (torch.randn(1, h, length, args.head_dim, generator=gen, device=device, dtype=dtype).requires_grad_()
               for h in (args.heads, args.kv_heads, args.kv_heads))
    grad_out = torch.randn_like(q)

    def run(forward: Callable[[], torch.Tensor]):
        def step() -> None:
            forward().backward(grad_out)
            q.grad = k.grad = v.grad = None
        return timed(step, device, args.warmup, args.iters)

    codes = (modality, image_id)
    path, (ms, mib, status) = first_that_runs(
        ours, lambda fn: run(lambda: fn(q, k, v, *codes, image_rows=args.image_rows)))
    out = [line("a", case, "ours: mmca_attention", f"{path}, image_rows={args.image_rows}", ms,
                tflops(pairs, args, ms), mib, "-", status, attended_pairs=pairs)]
    causal_pairs = length * (length + 1) // 2
    path, (s_ms, s_mib, s_status) = first_that_runs(sdpa, lambda fn: run(lambda: fn(q, k, v)))
    vs = "-" if None in (ms, s_ms) else f"ours {ms / s_ms:.2f}x SDPA time"
    out.append(line("a", case, "peer: SDPA causal", path, s_ms, tflops(causal_pairs, args, s_ms), s_mib, vs,
                    s_status, attended_pairs=causal_pairs, ours_over_peer_time=None if vs == "-" else ms / s_ms))

    start = time.perf_counter()
    masks = dsvc_masks(modality, dtype)
    if device.type == "cuda":
        torch.cuda.synchronize()
    build_ms = (time.perf_counter() - start) * 1e3
    need = DSVC_BYTES_PER_SCORE * args.heads * length * length
    if device.type == "cuda" and need > torch.cuda.mem_get_info(device)[0]:
        d_ms, d_mib, d_status = None, None, "skip (would not fit)"
    else:
        d_ms, d_mib, d_status = run(lambda: dsvc_mmca_attention(q, k, v, masks))
    vs = "-" if None in (ms, d_ms) else f"DS-VC {d_ms / ms:.1f}x ours time"
    out.append(line("a", case, "peer: DS-VC eager MMCA", "dense [L,L], two fp32 softmaxes; masks prebuilt", d_ms,
                    tflops(pairs, args, d_ms), d_mib, vs, d_status, attended_pairs=pairs,
                    peer_over_ours_time=None if vs == "-" else d_ms / ms))
    out.append(line("a", case, "peer: DS-VC mask build", "once per forward, per-token loop with a host sync",
                    build_ms, vs="not in the ratios"))
    return out


# ---------------------------------------------------------------------------------------------------- row b
def llm_matmul_params(llm: LLMConfig, vocab_size: int) -> int:
    """Weights that multiply activations: every decoder linear and the output layer (the embedding is a lookup)."""
    hidden, kv = llm.hidden_size, llm.query_groups * llm.head_dim
    per_layer = hidden * (hidden + 2 * kv) + hidden * hidden + 3 * hidden * llm.ffn_hidden_size
    return llm.num_layers * per_layer + hidden * vocab_size


def step_batch(args, model: VisualChatModel, vocab_size: int, device: torch.device) -> dict:
    """One row of --seq-length positions: --step-images images evenly spaced in random text."""
    image_tokens = model.vision.num_output_tokens
    text = args.seq_length - args.step_images * image_tokens
    if text < args.step_images + 1:
        raise ValueError(f"--seq-length {args.seq_length} leaves no text around {args.step_images} images of "
                         f"{image_tokens} tokens")
    gaps = [text // (args.step_images + 1)] * args.step_images
    parts = [part for n, gap in enumerate(gaps) for part in ("t" * gap, n)] + ["t" * (text - sum(gaps))]
    batch = visualchat_batch([parts], image_tokens, vocab_size, image_size=model.vision.encoder.image_size)
    return {name: t.to(device) for name, t in batch.items()}


def visualchat_step(model: VisualChatModel, batch: dict) -> None:
    """Forward and backward of our training step (the projector's update is left out, as in the peer)."""
    output, loss_func = visualchat_forward_step(iter([batch]), model)
    loss_func(output)[0].backward()
    model.zero_grad(set_to_none=True)


def peak_tflops(args, device: torch.device) -> float | None:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def step_rows(args, device: torch.device, dtype: torch.dtype, peak: float | None) -> list[dict]:
    initialize_parallel(ParallelConfig(), seed=0, rank=0, world_size=1,
                        init_method=f"tcp://127.0.0.1:{free_port()}")
    try:
        return measure_steps(args, device, dtype, peak)
    finally:
        destroy_parallel()


def linear_backend(choice: str, device: torch.device) -> tuple[str, str]:
    """(attention.backend, what the path column says) for --backend."""
    if choice != "auto":
        return choice, "Transformer-Engine linears" if choice == "te" else "local linears"
    if device.type != "cuda":
        return "local", "local linears (CPU)"
    if importlib.util.find_spec("transformer_engine"):
        return "te", "Transformer-Engine linears"
    return "local", "local linears (Transformer-Engine not installed)"


def measure_steps(args, device: torch.device, dtype: torch.dtype, peak: float | None) -> list[dict]:
    backend, linears = linear_backend(args.backend, device)
    cfg = VisualChatConfig(llm=LLM_PRESETS[args.preset], attention=AttentionConfig(backend=backend),
                           vision=VisionConfig(encoder=args.encoder, projector="linear"))
    model = VisualChatModel(cfg, params_dtype=dtype).to(device)
    apply_trainable_policy(model, cfg.trainable)
    model.train()
    vocab = cfg.llm.padded_vocab_size(1)
    batch = step_batch(args, model, vocab, device)
    tokens = batch["tokens"].numel()
    flops_per_step = 4 * llm_matmul_params(cfg.llm, vocab) * tokens
    case = f"{args.preset} + {args.encoder}, {args.step_images} img, 1x{args.seq_length}"

    def rate(ms: float | None) -> str:
        if ms is None:
            return "-"
        mfu = "" if peak is None else f", MFU {flops_per_step / (ms * 1e-3) / 1e12 / peak:.1%}"
        return f"{tokens / (ms * 1e-3):,.0f} tok/s{mfu}"

    attention = "FlexAttention, torch.compile" if device.type == "cuda" else "dense reference MMCA (CPU)"
    ms, mib, status = timed(partial(visualchat_step, model, batch), device, args.step_warmup, args.step_iters)
    lines = [line("b", case, "ours: megatron-core VisualChat",
                  f"MMCA image_rows={cfg.attention.image_rows}, {attention}; {linears}", ms, rate(ms), mib,
                  status=status, tokens=tokens, flops_per_step=flops_per_step)]
    vision = model.vision
    del model
    free_memory(device)
    if importlib.util.find_spec("transformers") is None:
        return lines + [line("b", case, "peer: HF LlamaForCausalLM", "-", status="skip (transformers missing)")]
    from peers.hf_llama import build_hf_llama, hf_visualchat_step  # transformers is an optional dependency

    hf = build_hf_llama(cfg.llm, vocab, dtype, device)
    h_ms, h_mib, h_status = timed(partial(hf_visualchat_step, hf, vision, batch), device, args.step_warmup,
                                  args.step_iters)
    vs = "-" if None in (ms, h_ms) else f"ours {h_ms / ms:.2f}x HF tok/s"
    lines.append(line("b", case, "peer: HF LlamaForCausalLM", f"attn_implementation={hf.config._attn_implementation}"
                      ", same vision tower", h_ms, rate(h_ms), h_mib, vs, h_status, tokens=tokens,
                      ours_over_peer_tokens_per_s=None if vs == "-" else h_ms / ms))
    return lines


# ---------------------------------------------------------------------------------------------------- row c
def chat_rows(args) -> list[dict]:
    options = argparse.Namespace(preset=args.preset, encoder=args.chat_encoder, mode="mmca", modality_split="none",
                                 dtype=args.dtype, tokenizer=None, rounds=args.rounds, new_tokens=args.new_tokens,
                                 repeats=args.repeats, max_length=None)
    model, tokenizer, device = chat.build(options)
    reuse = chat.measure(model, tokenizer, options, True)
    recompute = chat.measure(model, tokenizer, options, False)
    attention = "FlexAttention, torch.compile" if device.type == "cuda" else "dense reference MMCA (CPU)"
    lines = []
    for k, (ours, peer) in enumerate(zip(reuse, recompute), start=1):
        case = f"{args.preset} + {args.chat_encoder}, round {k}"
        lines.append(line("c", case, "ours: KV reuse", f"prefills {ours['prefilled']}; {attention}", ours["first"],
                          vs=f"{ours['first'] / reuse[0]['first']:.2f}x round 1", prefilled=ours["prefilled"]))
        lines.append(line("c", case, "peer: re-encode all (DS-VC)", f"prefills {peer['prefilled']}", peer["first"],
                          vs=f"re-encode {peer['first'] / ours['first']:.1f}x ours", prefilled=peer["prefilled"]))
    return lines


# ---------------------------------------------------------------------------------------------------- main
def environment(args, device: torch.device) -> dict:
    def version(name: str) -> str:
        if importlib.util.find_spec(name) is None:
            return "not installed"
        return getattr(__import__(name), "__version__", "installed")

    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "triton": version("triton"), "transformer_engine": version("transformer_engine"),
        "transformers": version("transformers"), "dtype": args.dtype, "command": " ".join(sys.argv),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    if device.type == "cuda":
        # One process runs every shape of the sweep, the model and the chat's growing caches through the same
        # compiled flex_attention (a training run sees one shape): room for their recompilations.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    dtype = DTYPES[args.dtype]
    peak = peak_tflops(args, device)
    env = environment(args, device)
    results = {"environment": env, "args": vars(args), "peak_tflops": peak, "seconds": {}, "lines": []}
    print(" · ".join(f"{k} {v}" for k, v in env.items() if k != "command"))
    print("a: forward+backward, mean of --iters after --warmup; TFLOP/s = 14 x head_dim x heads x attended pairs "
          "/ time. b: one forward+backward (frozen LLM: no weight gradients; projector trainable); tok/s counts "
          "every position; MFU = 4 x N x tokens / time / peak, N = LLM matmul weights (decoder linears + output "
          f"layer; attention scores and vision encoder not counted), peak = {peak or 'unknown'} TFLOP/s. c: "
          "first-token latency, median of --repeats. peak GiB = most memory allocated above the inputs.\n")
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "|".join("---" for _ in COLUMNS) + "|", flush=True)
    rows = {"a": lambda: attention_rows(args, device, dtype), "b": lambda: step_rows(args, device, dtype, peak),
            "c": lambda: chat_rows(args)}
    failed = False
    for row in args.rows:
        start = time.perf_counter()
        try:
            lines = rows[row]()
        except Exception as error:  # say so in the table and go on with the other rows
            traceback.print_exc()
            failed = True
            lines = [line(row, "-", "row failed", "-", status=f"{type(error).__name__}: {error}"[:300])]
        for entry in lines:
            print("| " + " | ".join(cells(entry)) + " |", flush=True)
        results["lines"] += lines
        results["seconds"][row] = round(time.perf_counter() - start, 1)
        print(f"row {row} done in {results['seconds'][row]} s", file=sys.stderr, flush=True)
        if args.json:  # after every row: a run stopped by a time limit keeps what it measured
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
        free_memory(device)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
