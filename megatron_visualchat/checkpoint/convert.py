"""HF LLaMA <-> Megatron legacy checkpoints, streamed tensor by tensor with bounded memory, and their CLI.

``hf-to-megatron`` validates everything first (config.json, TP/PP against heads/groups/ffn/layers, every shard file
and tensor with its shape, the output directory) and writes nothing when anything is wrong. It then walks the
pipeline stages; for each megatron tensor it reads only the HF tensors it is made of (``weight_files.HFWeights``:
safetensors or ``.bin``, one tensor's bytes at a time), writes every TP rank's shard straight into that rank's file
and frees them: peak memory is about one fused tensor (gate + up) or the padded embedding, whatever the model size.
``megatron-to-hf`` reverses it, writing safetensors shards of at most ``--max-shard-size``. A refusal exits with 2;
a failure while writing (``OSError``: a full disk) exits with 1, and either way what was written is removed.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import shutil
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, Sequence, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from tqdm import tqdm

from megatron_visualchat.argtypes import int_list
from megatron_visualchat.checkpoint.errors import CheckpointError
from megatron_visualchat.checkpoint.hf_llama import (
    HF_IGNORED_SUFFIXES,
    HF_LM_HEAD,
    hf_tensor_shapes,
    hf_tensors,
    llm_config_from_hf,
    rank_parts,
    stage_state_keys,
)
from megatron_visualchat.checkpoint.layout import TRACKER_FILE, read_tracker, write_tracker
from megatron_visualchat.checkpoint.legacy_format import (
    CHECKPOINT_VERSION,
    RECORD_FILE,
    ConversionRecord,
    RankFileWriter,
    dtype_from_name,
    megatron_args,
    rank_file,
)
from megatron_visualchat.checkpoint.weight_files import SAFETENSORS_INDEX, HFWeights, TorchFile
from megatron_visualchat.config import DTYPES, ConfigError, LLMConfig, ParallelConfig

TOKENIZER_DIR = "tokenizer"  # where hf-to-megatron keeps the HF tokenizer files, for megatron-to-hf and training
SIDE_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "added_tokens.json", "generation_config.json")
# What --force replaces in an existing output directory (nothing else there is touched).
MEGATRON_OUTPUTS = (TRACKER_FILE, RECORD_FILE, "iter_*", "release", TOKENIZER_DIR)
HF_OUTPUTS = ("*.safetensors", SAFETENSORS_INDEX, "config.json", *SIDE_FILES)
VISION_NOTE = (
    "Vision encoders are not converted: megatron_visualchat.model.vision's load_encoder_weights reads HF CLIP, "
    "open_clip and Qwen-VL weights directly (config: vision.encoder_weights=PATH)."
)
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
_OS_ERROR = re.compile(r"\(os error (\d+)\)")


# ------------------------------------------------------------------------------------------ HF reading

class HFCheckpoint:
    """A HF model directory: its ``config.json`` and its weights, checked against what the config implies."""

    def __init__(self, hf_dir: Union[str, Path]):
        self.dir = Path(hf_dir)
        self.config_path = self.dir / "config.json"
        if not self.config_path.is_file():
            raise CheckpointError(f"{self.config_path} not found: --hf-dir must be a HF model directory")
        try:
            self.config = json.loads(self.config_path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{self.config_path}: invalid JSON ({e})") from None
        self.weights = HFWeights(self.dir)

    def check(self, expected: Mapping[str, tuple[int, ...]], *, tolerated: Iterable[str] = ()) -> None:
        """Every expected tensor is in its file with its shape; nothing else would be dropped silently."""
        tolerated = set(tolerated)
        problems = []
        weight_map = self.weights.weight_map
        missing = [n for n in expected if n not in weight_map]
        if missing:
            problems.append(f"missing tensors: {_short(missing)}")
        unexpected = [n for n in weight_map if n not in expected and n not in tolerated
                      and not n.endswith(HF_IGNORED_SUFFIXES)]
        if unexpected:
            problems.append(f"tensors this architecture does not have (would be dropped): {_short(unexpected)}")
        by_file: dict[Path, list[str]] = {}
        for name in expected:
            if name in weight_map:
                by_file.setdefault(weight_map[name], []).append(name)
        for path, names in by_file.items():
            shapes = self.weights.shapes(path)
            absent = [n for n in names if n not in shapes]
            if absent:
                problems.append(f"{path.name} lacks tensors its index assigns to it: {_short(absent)}")
            wrong = [f"{n} {shapes[n]} (expected {expected[n]})" for n in names
                     if n in shapes and shapes[n] != tuple(expected[n])]
            if wrong:
                problems.append(f"{path.name}: wrong shapes for config.json: {_short(wrong)}")
        if problems:
            raise CheckpointError(f"{self.dir}: " + "; ".join(problems))


def _short(items: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" ... ({len(items)} in all)" if len(items) > limit else "")


# -------------------------------------------------------------------------------------- output dirs

def prepare_out(out_dir: Union[str, Path], *, force: bool, inputs: Sequence[Path], replaced: Sequence[str]) -> Path:
    """Refuse an existing non-empty directory unless ``force`` (then remove only what this tool writes)."""
    out = Path(out_dir)
    if any(out.resolve() == Path(i).resolve() for i in inputs):
        raise CheckpointError(f"--out {out} is the input directory; write the conversion elsewhere")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise CheckpointError(f"output directory {out} is not empty; pass --force to replace the checkpoint "
                                  "files in it")
        _remove_outputs(out, replaced)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _remove_outputs(out: Path, patterns: Sequence[str]) -> None:
    """What this tool writes into ``out`` (the rest of the directory is not touched)."""
    for pattern in patterns:
        for path in out.glob(pattern):
            shutil.rmtree(path) if path.is_dir() else path.unlink()


@contextmanager
def removed_on_failure(out: Path, patterns: Sequence[str]):
    """A conversion that fails half-way (a full disk, an interrupt) leaves no partial files behind."""
    try:
        yield
    except BaseException:
        _remove_outputs(out, patterns)
        raise


def copy_side_files(src: Path, dst: Path) -> list[str]:
    present = [name for name in SIDE_FILES if (src / name).is_file()]
    if present:
        dst.mkdir(parents=True, exist_ok=True)
        for name in present:
            shutil.copy2(src / name, dst / name)
    return present


# ---------------------------------------------------------------------------------------- HF -> Megatron

def _rank_layouts(keys, llm: LLMConfig, tp: int, dtype: torch.dtype, shapes: Mapping[str, tuple[int, ...]]):
    """(shape, dtype) of every key on each TP rank, computed on meta tensors by the same code that fills them."""
    layouts: list[dict] = [{} for _ in range(tp)]
    for key, tmap in keys:
        sources = None if tmap is None else [torch.empty(shapes[n], dtype=dtype, device="meta") for n in tmap.hf]
        for r in range(tp):
            if sources is None:
                layouts[r][key] = None
            else:
                parts = rank_parts(tmap, sources, llm, tp, r)
                layouts[r][key] = ((sum(p.shape[0] for p in parts), *parts[0].shape[1:]), dtype)
    return layouts


def hf_to_megatron(
    hf_dir: Union[str, Path],
    out_dir: Union[str, Path],
    *,
    tp: int = 1,
    pp: int = 1,
    pp_layers: Optional[Sequence[int]] = None,
    dtype: str = "bf16",
    make_vocab_size_divisible_by: int = 128,
    force: bool = False,
) -> Path:
    """Convert a HF LlamaForCausalLM directory into Megatron's legacy layout at (tp, pp); returns ``out_dir``."""
    hf = HFCheckpoint(hf_dir)
    llm = llm_config_from_hf(hf.config, make_vocab_size_divisible_by=make_vocab_size_divisible_by,
                             source=str(hf.config_path))
    return write_megatron(hf, llm, out_dir, tp=tp, pp=pp, pp_layers=pp_layers, dtype=dtype, force=force)


def write_megatron(hf: HFCheckpoint, llm: LLMConfig, out_dir: Union[str, Path], *, tp: int, pp: int,
                   pp_layers: Optional[Sequence[int]], dtype: str, force: bool, hf_config: Optional[dict] = None,
                   also: Optional[Callable[[Path], None]] = None, also_outputs: Sequence[str] = ()) -> Path:
    """The streamed writer behind ``hf_to_megatron``: ``hf.weights`` holds ``llm``'s tensors under HF LLaMA names
    (a LLaVA directory passes a renaming view). ``hf_config`` (default ``hf.config``) is the config.json
    megatron-to-hf writes back; ``also(out)`` writes more files (``also_outputs``, removed on failure) before
    the record and the tracker."""
    target = dtype_from_name(dtype)
    parallel = ParallelConfig(tp=tp, pp=pp, pp_layers=tuple(pp_layers) if pp_layers else None)
    parallel.validate(llm)
    shapes = hf_tensor_shapes(llm)
    hf.check(shapes, tolerated=() if llm.untie_embeddings else (HF_LM_HEAD,))
    outputs = (*MEGATRON_OUTPUTS, *also_outputs)
    out = prepare_out(out_dir, force=force, inputs=[hf.dir], replaced=outputs)

    record = ConversionRecord(llm=llm, tp=tp, pp=pp, pp_layers=parallel.pp_layers, dtype=dtype,
                              hf_config=dict(hf.config if hf_config is None else hf_config))
    extra = {"args": megatron_args(record), "checkpoint_version": CHECKPOINT_VERSION, "iteration": record.iteration}
    stages = [stage_state_keys(llm, parallel, s) for s in range(pp)]
    with removed_on_failure(out, outputs), tqdm(
            total=sum(m is not None for keys in stages for _, m in keys), desc="hf-to-megatron", unit="tensor",
            disable=None) as bar:
        for s, keys in enumerate(stages):
            layouts = _rank_layouts(keys, llm, tp, target, shapes)
            with ExitStack() as files:  # on an error, the files are closed and the error is not masked
                writers = [files.enter_context(RankFileWriter(rank_file(out, record.iteration, r, s, pp), layouts[r],
                                                              extra)) for r in range(tp)]
                for key, tmap in keys:
                    if tmap is None:
                        continue
                    sources = [hf.weights[n].to(target) for n in tmap.hf]
                    for r, writer in enumerate(writers):
                        writer.write(key, rank_parts(tmap, sources, llm, tp, r))
                    del sources
                    bar.update()
        copy_side_files(hf.dir, out / TOKENIZER_DIR)
        if also is not None:
            also(out)
        record.save(out)
        write_tracker(out, record.iteration)  # last: a directory without it is an unfinished conversion
    return out


# ---------------------------------------------------------------------------------------- Megatron -> HF

def parse_size(text: str) -> int:
    """'2GB', '500MB', '1GiB' or a byte count -> bytes."""
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"size {text!r} is not a number with an optional unit {sorted(_SIZE_UNITS)}")
    value = int(float(m[1]) * _SIZE_UNITS[(m[2] or "B").upper()])
    if value <= 0:
        raise ValueError(f"size {text!r} must be positive")
    return value


class SafetensorsShards:
    """HF-style safetensors shards of at most ``max_bytes`` each (a bigger tensor gets a shard of its own)."""

    def __init__(self, out: Path, max_bytes: int):
        self.out, self.max_bytes = out, max_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_bytes:
            self._flush()
        self._pending[name] = tensor
        self._pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        path = self.out / f"model-{len(self._shards) + 1:05d}.partial.safetensors"
        try:
            save_file(self._pending, str(path), metadata={"format": "pt"})
        except SafetensorError as e:  # safetensors reports a failed write as "... (os error 28) ..."
            code = _OS_ERROR.search(str(e))
            if code is None:
                raise
            raise OSError(int(code[1]), os.strerror(int(code[1])), str(path)) from e
        self._shards.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[Path]:
        if self._pending:
            self._flush()
        n = len(self._shards)
        weight_map, files = {}, []
        for i, (path, names) in enumerate(self._shards, start=1):
            final = path.with_name(f"model-{i:05d}-of-{n:05d}.safetensors")
            path.rename(final)
            files.append(final)
            weight_map.update({name: final.name for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.out / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return files


def open_rank_files(load_dir: Path, record: ConversionRecord, iteration) -> list[list[TorchFile]]:
    """Readers for every rank file, after checking all of them exist and hold every expected tensor."""
    par = record.parallel
    paths = [[rank_file(load_dir, iteration, t, s, par.pp) for t in range(par.tp)] for s in range(par.pp)]
    missing = [str(p) for stage in paths for p in stage if not p.is_file()]
    if missing:
        raise CheckpointError(f"{load_dir}: missing rank files for TP={par.tp}, PP={par.pp}: {_short(missing)}")
    readers = [[TorchFile(p) for p in stage] for stage in paths]
    for s, stage in enumerate(readers):
        expected = [k for k, m in stage_state_keys(record.llm, par, s) if m is not None]
        for reader in stage:
            absent = [k for k in expected if k not in set(reader.keys())]
            if absent:
                raise CheckpointError(f"{reader.path}: missing tensors {_short(absent)}")
    return readers


def megatron_to_hf(
    load_dir: Union[str, Path],
    out_dir: Union[str, Path],
    *,
    dtype: Optional[str] = None,
    max_shard_size: Union[int, str] = "2GB",
    force: bool = False,
) -> Path:
    """Convert a checkpoint written by ``hf_to_megatron`` back to a HF directory (safetensors shards + index,
    config.json, tokenizer files); ``dtype`` defaults to the checkpoint's. Returns ``out_dir``."""
    load_dir = Path(load_dir)
    record = ConversionRecord.load(load_dir)
    if record.hf_config is None:
        raise CheckpointError(f"{load_dir / RECORD_FILE} has no HF config.json to write back")
    target = dtype_from_name(dtype or record.dtype)
    max_bytes = parse_size(max_shard_size) if isinstance(max_shard_size, str) else int(max_shard_size)
    iteration = read_tracker(load_dir)
    readers = open_rank_files(load_dir, record, iteration)
    out = prepare_out(out_dir, force=force, inputs=[load_dir], replaced=HF_OUTPUTS)

    llm, par = record.llm, record.parallel
    shards = SafetensorsShards(out, max_bytes)
    stages = [stage_state_keys(llm, par, s) for s in range(par.pp)]
    with removed_on_failure(out, HF_OUTPUTS), tqdm(
            total=sum(m is not None and m.export for keys in stages for _, m in keys), desc="megatron-to-hf",
            unit="tensor", disable=None) as bar:
        for s, keys in enumerate(stages):
            for key, tmap in keys:
                if tmap is None or not tmap.export:
                    continue
                for name, tensor in hf_tensors(tmap, [r.read(key) for r in readers[s]], llm).items():
                    # own, contiguous storage: safetensors refuses views sharing memory
                    shards.add(name, tensor.to(dtype=target, memory_format=torch.contiguous_format, copy=True))
                bar.update()
        shards.close()
        config = dict(record.hf_config)
        dtype_name = str(target).removeprefix("torch.")
        for key in [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]:
            config[key] = dtype_name
        (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        copy_side_files(load_dir / TOKENIZER_DIR, out)
    return out


# ----------------------------------------------------------------------------------------------- CLI

def size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-visualchat", description=__doc__, epilog=VISION_NOTE,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    h = sub.add_parser(
        "hf-to-megatron", epilog=VISION_NOTE,
        help="HF LlamaForCausalLM directory -> Megatron legacy checkpoint at a TP/PP layout",
        description="Convert a HF LLaMA-architecture checkpoint (LLaMA-2/3, Mistral without sliding window; "
                    "safetensors or .bin, sharded or not) to iter_0000000/mp_rank_XX[_YYY]/model_optim_rng.pt. "
                    "Load it with megatron_visualchat.checkpoint.legacy_format.load_megatron_checkpoint(model, DIR).")
    h.add_argument("--hf-dir", required=True, help="HF model directory (config.json + weights)")
    h.add_argument("--out", required=True, help="output directory (must be absent or empty, unless --force)")
    h.add_argument("--tp", type=int, default=1, help="tensor-parallel size (divides heads, query groups, ffn)")
    h.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (divides layers unless --pp-layers)")
    h.add_argument("--pp-layers", type=int_list, default=None, help="layers per stage, e.g. 18,22 (sum = layers)")
    h.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="dtype of the written weights")
    h.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                   help="vocab padded to a multiple of this x TP (Megatron's default 128)")
    h.add_argument("--force", action="store_true", help="replace a previous conversion in --out")
    m = sub.add_parser(
        "megatron-to-hf", epilog=VISION_NOTE, help="Megatron checkpoint written by hf-to-megatron -> HF directory",
        description="Merge the TP/PP shards back into HF safetensors shards + index + config.json (+ tokenizer).")
    m.add_argument("--load", required=True, help="directory written by hf-to-megatron")
    m.add_argument("--out", required=True, help="output directory (must be absent or empty, unless --force)")
    m.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: the checkpoint's dtype")
    m.add_argument("--max-shard-size", type=size_arg, default="2GB", help="per safetensors file, e.g. 2GB, 500MB")
    m.add_argument("--force", action="store_true", help="replace a previous export in --out")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``convert_checkpoint.py {hf-to-megatron|megatron-to-hf} ...``; returns the exit status (2: refused)."""
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    try:
        if args.command == "hf-to-megatron":
            out = hf_to_megatron(args.hf_dir, args.out, tp=args.tp, pp=args.pp, pp_layers=args.pp_layers,
                                 dtype=args.dtype, make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
                                 force=args.force)
        else:
            out = megatron_to_hf(args.load, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size,
                                 force=args.force)
    except (CheckpointError, ConfigError) as e:
        print(f"{args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # not a refusal: the machine failed the conversion (ENOSPC, EIO, ...)
        hint = (f"free space on the filesystem of {args.out} or choose another --out" if e.errno == errno.ENOSPC
                else "fix the cause and run the conversion again")
        print(f"{args.command}: error: {e.strerror or e} ({e.filename or args.out}); the partial output in "
              f"{args.out} was removed: {hint}", file=sys.stderr)
        return 1
    print(f"{args.command}: wrote {out} in {time.perf_counter() - start:.1f}s")
    return 0


def hf_to_megatron_main(argv: Sequence[str]) -> int:
    return main(["hf-to-megatron", *argv])


def megatron_to_hf_main(argv: Sequence[str]) -> int:
    return main(["megatron-to-hf", *argv])
