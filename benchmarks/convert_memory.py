"""Peak memory and throughput of ``hf-to-megatron`` on LLaMA-2-70B-sized layers.

Writes a synthetic HF checkpoint with the real 70B dimensions (hidden 8192, 64 heads, 8 KV heads, ffn 28672,
vocab 32000, bf16) but only a few layers, in several safetensors shards with an index (one shard per layer, one for
the embedding, one for norm + head; smaller layer counts reuse the larger one's shards through symlinks). Each
conversion runs in a child process; its peak RSS comes from ``os.wait4`` (the kernel's ru_maxrss of that child).
Goal: peak RSS <= 2 decoder layers + 1 embedding, whatever the layer count.

    python benchmarks/convert_memory.py --layers 2 4 --layouts 1x1 8x2 --workdir /tmp/convert_bench
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LLAMA2_70B_DIMS = dict(hidden_size=8192, num_attention_heads=64, num_key_value_heads=8, intermediate_size=28672,
                       vocab_size=32000)
GB = 1024**3


def hf_config(num_layers: int) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "num_hidden_layers": num_layers, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16", **LLAMA2_70B_DIMS}


def _shard_of(name: str) -> str:
    if name.startswith("model.layers."):
        return f"layer-{int(name.split('.')[2]):03d}.safetensors"
    return "embed.safetensors" if name == "model.embed_tokens.weight" else "head.safetensors"


def write_synthetic_checkpoint(path: Path, num_layers: int, source: Path | None = None) -> dict[str, int]:
    """A bf16 HF directory of ``num_layers`` 70B-sized layers; shards already in ``source`` are linked, not
    rewritten. Returns the byte sizes {"total", "layer", "embedding"}. Runs in a child process (``--write``) so
    that the measuring parent never holds tensors: Linux hands a parent's RSS high-water mark to its children."""
    import torch
    from safetensors.torch import save_file

    from megatron_visualchat.checkpoint.hf_llama import hf_layer_prefix, hf_tensor_shapes, llm_config_from_hf

    config = hf_config(num_layers)
    shapes = hf_tensor_shapes(llm_config_from_hf(config))
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    weight_map = {name: _shard_of(name) for name in shapes}
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}, indent=2))
    gen = torch.Generator().manual_seed(0)
    for shard in sorted(set(weight_map.values())):
        if source is not None and (source / shard).is_file():
            (path / shard).symlink_to((source / shard).resolve())
            continue
        tensors = {n: torch.empty(shapes[n], dtype=torch.bfloat16).uniform_(-0.02, 0.02, generator=gen)
                   for n, s in weight_map.items() if s == shard}
        save_file(tensors, str(path / shard), metadata={"format": "pt"})
        del tensors
    nbytes = {n: 2 * torch.Size(s).numel() for n, s in shapes.items()}
    return {"total": sum(nbytes.values()),
            "layer": sum(b for n, b in nbytes.items() if n.startswith(hf_layer_prefix(0))),
            "embedding": nbytes["model.embed_tokens.weight"]}


def run_child(cmd: list[str], log: Path) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of a child process; raises with its log if it fails."""
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{log.read_text()[-4000:]}")
    return wall, usage.ru_maxrss * 1024  # Linux reports KiB


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4], help="layer counts to convert")
    parser.add_argument("--layouts", nargs="+", default=["1x1", "8x2"], help="TPxPP layouts, e.g. 1x1 8x2")
    parser.add_argument("--workdir", default=None, help="scratch directory (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic checkpoints")
    parser.add_argument("--write", nargs=2, metavar=("DIR", "SOURCE"), help=argparse.SUPPRESS)  # child mode
    args = parser.parse_args(argv)
    if args.write:
        source = Path(args.write[1]) if args.write[1] != "-" else None
        print(json.dumps(write_synthetic_checkpoint(Path(args.write[0]), args.layers[0], source)))
        return 0
    layouts = [tuple(int(x) for x in layout.lower().split("x")) for layout in args.layouts]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="convert_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        _, import_rss = run_child([sys.executable, "-c", "import megatron_visualchat.checkpoint.convert"],
                                  work / "import.log")
        rows, source = [], None
        for num_layers in sorted(args.layers, reverse=True):  # the largest first; smaller ones link its shards
            hf_dir = work / f"hf_{num_layers}l"
            writer = subprocess.run([sys.executable, __file__, "--layers", str(num_layers), "--write", str(hf_dir),
                                     str(source or "-")], check=True, capture_output=True, text=True)
            sizes = json.loads(writer.stdout.strip().splitlines()[-1])
            source = source or hf_dir
            budget = 2 * sizes["layer"] + sizes["embedding"]
            for tp, pp in layouts:
                out = work / f"mg_{num_layers}l_tp{tp}pp{pp}"
                cmd = [sys.executable, "-m", "megatron_visualchat.cli", "hf-to-megatron", "--hf-dir", str(hf_dir),
                       "--out", str(out), "--tp", str(tp), "--pp", str(pp), "--dtype", "bf16"]
                wall, rss = run_child(cmd, work / f"{out.name}.log")
                shutil.rmtree(out)
                rows.append((num_layers, tp, pp, sizes["total"] / GB, wall, sizes["total"] / 1e6 / wall, rss / GB,
                             budget / GB, "yes" if rss <= budget else "NO"))
        print(f"import-only child peak RSS: {import_rss / GB:.2f} GiB (python + torch + safetensors); "
              f"this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
        print("| layers | TP | PP | checkpoint GiB | wall s | MB/s | peak RSS GiB | budget: 2 layers + emb GiB | "
              "within |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in sorted(rows):
            print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.2f} | {r[4]:.1f} | {r[5]:.0f} | {r[6]:.2f} | {r[7]:.2f} | "
                  f"{r[8]} |")
        return 0 if all(r[8] == "yes" for r in rows) else 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
