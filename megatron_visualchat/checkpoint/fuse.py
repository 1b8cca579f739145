"""JAM's model fusion (Aiello et al., ICLR 2024) on converted Megatron checkpoints: ``uniform`` and ``width``.

Both parents are ``hf-to-megatron`` outputs (any TP/PP each); the fused model is written in the same legacy
layout at any TP/PP, one decoder tensor at a time (each read merged over the parent's TP shards, fused, then split
for the output's ranks), so memory stays at a few tensors whatever the model size. The result is an ordinary
LLaMA-architecture checkpoint: train it with ``--model-preset from-llm-load --llm-load OUT``.

- ``uniform``: every weight is ``alpha * A + (1 - alpha) * B`` (computed in fp32). Same architecture required.
- ``width``: a model twice as wide (hidden, heads, query groups and FFN of A and B side by side, same depth and
  head size). Every matrix is the 2x2 block matrix ``[[A, X], [X', B]]`` over (A's outputs, B's outputs) x
  (A's inputs, B's inputs): heads and query groups of A first, then B's; the SwiGLU ``[gate; up]`` halves are
  interleaved as ``[gate_A; gate_B; up_A; up_B]`` so each rank's gate matches its up rows. The off-diagonal
  blocks ``X`` are zeros in the ``copy`` variant (each parent's weights only ever see its own half) and
  ``(A + B) / 2`` in the ``average`` variant (parents of equal shape). Embeddings and norm weights are
  concatenated; the output layer is ``[A | B] / 2``, so the logits are the mean of the two halves' logits.
  JAM gives neither the block layout nor the head arrangement; this one keeps every head whole (head size
  unchanged), so a fused ``copy`` model computes each parent's attention and MLP in its half exactly. The one
  coupling left is RMSNorm, which normalises over both halves: when both halves have the same RMS (e.g. A == B)
  the copy model reproduces the parent's logits exactly (tested), otherwise each half is rescaled by the joint
  RMS.

Parents with different vocabularies are merged (``vocab_merge.py``): A's vocabulary, then the tokens only B has.
A token both parents have rows for gets ``fuse_tensor`` of its two rows (by its id in each); a token one parent has
gets ``one_row`` of that parent's row: as it is (uniform), or in its parent's half with zeros in the other
(width; the output row is not halved, so its logit is that parent's).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import shutil
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch

from megatron_visualchat.checkpoint.convert import (
    MEGATRON_OUTPUTS, TOKENIZER_DIR, copy_side_files, open_rank_files, prepare_out, removed_on_failure,
)
from megatron_visualchat.checkpoint.errors import CheckpointError
from megatron_visualchat.checkpoint.hf_llama import stage_state_keys
from megatron_visualchat.checkpoint.layout import read_tracker, write_tracker
from megatron_visualchat.checkpoint.legacy_format import (
    CHECKPOINT_VERSION, VOCAB_KEYS, ConversionRecord, RankFileWriter, dtype_from_name, megatron_args, rank_file,
)
from megatron_visualchat.checkpoint.sharding import (
    global_layer_name, merge_tensors, pad_vocab_rows, split_kind, split_tensor, stage_layer_range,
)
from megatron_visualchat.checkpoint.vocab_merge import (
    MERGED_TOKENIZER_DIR, ParentVocab, VocabMerge, merge_vocabularies,
)
from megatron_visualchat.argtypes import int_list
from megatron_visualchat.config import LLMConfig, ParallelConfig
from megatron_visualchat.data.tokenizer import MODEL_FILE

WIDTH_VARIANTS = ("copy", "average")


@dataclass(frozen=True)
class FuseOptions:
    alpha: float = 0.5  # uniform: weight of model A
    variant: str = "copy"  # width: off-diagonal blocks
    cross_interval: int = 1  # cross: a cross link after every N-th layer


@dataclass(frozen=True)
class FuseMethod:
    """How to fuse two parents: the fused architecture, and one fused tensor from the parents' full tensors;
    ``one_row``: the fused embedding / output rows of tokens only one parent ("a" or "b") has (``vocab_merge``)."""

    fused_llm: Callable[[LLMConfig, LLMConfig, FuseOptions], LLMConfig]
    fuse_tensor: Callable[[str, torch.Tensor, torch.Tensor, LLMConfig, LLMConfig, FuseOptions], torch.Tensor]
    one_row: Callable[[str, torch.Tensor, str, LLMConfig, LLMConfig], torch.Tensor]


def _arch(llm: LLMConfig) -> LLMConfig:
    return dataclasses.replace(llm, vocab_size=0)


# ---------------------------------------------------------------------------------------------- uniform

def _uniform_llm(a: LLMConfig, b: LLMConfig, opts: FuseOptions) -> LLMConfig:
    if _arch(a) != _arch(b):
        raise CheckpointError(f"uniform fusion averages weights one to one: the parents differ ({a} vs {b})")
    if not 0.0 <= opts.alpha <= 1.0:
        raise CheckpointError(f"--alpha {opts.alpha} must lie in [0, 1]")
    return a


def _uniform_tensor(name, a, b, la, lb, opts: FuseOptions) -> torch.Tensor:
    if opts.alpha in (0.0, 1.0):  # exactly one parent, bit for bit
        return (a if opts.alpha == 1.0 else b).clone()
    return (opts.alpha * a.float() + (1.0 - opts.alpha) * b.float()).to(a.dtype)


def _uniform_one_row(name, rows, side, la, lb) -> torch.Tensor:
    return rows.clone()


# ------------------------------------------------------------------------------------------------ width

def _width_llm(a: LLMConfig, b: LLMConfig, opts: FuseOptions) -> LLMConfig:
    if opts.variant not in WIDTH_VARIANTS:
        raise CheckpointError(f"--variant {opts.variant!r}: choose one of {', '.join(WIDTH_VARIANTS)}")
    same = ("num_layers", "rms_norm_eps", "rope_base", "max_position_embeddings")
    wrong = [f"{k}: {getattr(a, k)} vs {getattr(b, k)}" for k in same if getattr(a, k) != getattr(b, k)]
    if not (a.untie_embeddings and b.untie_embeddings):
        wrong.append("tied embeddings: the fused input embedding [A | B] and output layer [A | B] / 2 differ")
    if a.head_dim != b.head_dim:
        wrong.append(f"head size: {a.head_dim} vs {b.head_dim}")
    if a.num_attention_heads // a.query_groups != b.num_attention_heads // b.query_groups:
        wrong.append("heads per query group differ (megatron-core needs one ratio for the fused model)")
    if opts.variant == "average" and _arch(a) != _arch(b):
        wrong.append("the 'average' variant fills off-diagonal blocks with (A + B) / 2: parents must be the same "
                     "shape (use --variant copy)")
    if wrong:
        raise CheckpointError("width fusion needs parents of one depth and head size: " + "; ".join(wrong))
    return dataclasses.replace(
        a, hidden_size=a.hidden_size + b.hidden_size, num_attention_heads=a.num_attention_heads + b.num_attention_heads,
        num_query_groups=a.query_groups + b.query_groups, ffn_hidden_size=a.ffn_hidden_size + b.ffn_hidden_size)


def _blocks(a: torch.Tensor, b: torch.Tensor, variant: str) -> torch.Tensor:
    """[[A, X], [X', B]] with X zeros (copy) or the parents' mean (average, equal shapes)."""
    if variant == "average":
        mean = ((a.float() + b.float()) / 2).to(a.dtype)
        top, bottom = (a, mean), (mean, b)
    else:
        top = (a, a.new_zeros(a.shape[0], b.shape[1]))
        bottom = (b.new_zeros(b.shape[0], a.shape[1]), b)
    return torch.cat([torch.cat(top, dim=1), torch.cat(bottom, dim=1)], dim=0)


def _width_tensor(name, a, b, la, lb, opts: FuseOptions) -> torch.Tensor:
    if a.ndim == 1:  # norm weights
        return torch.cat([a, b])
    if name.endswith("word_embeddings.weight"):
        return torch.cat([a, b], dim=1)
    if name.endswith("output_layer.weight"):
        return torch.cat([a, b], dim=1) / 2
    if split_kind(name) == "glu":  # [gate; up] -> [gate_A; gate_B; up_A; up_B]
        (ga, ua), (gb, ub) = a.chunk(2), b.chunk(2)
        return torch.cat([_blocks(ga, gb, opts.variant), _blocks(ua, ub, opts.variant)], dim=0)
    # linear_qkv rows are whole query groups, A's then B's; linear_proj / linear_fc2 columns are A's heads / FFN
    # units then B's: the plain block matrix already has that order.
    return _blocks(a, b, opts.variant)


def _width_one_row(name, rows, side, la, lb) -> torch.Tensor:
    """The parent's row in its half, zeros in the other; output rows are not halved (that parent's logit)."""
    zeros = rows.new_zeros(rows.shape[0], (lb if side == "a" else la).hidden_size)
    return torch.cat([rows, zeros] if side == "a" else [zeros, rows], dim=1)


FUSE_METHODS: dict[str, FuseMethod] = {
    "uniform": FuseMethod(_uniform_llm, _uniform_tensor, _uniform_one_row),
    "width": FuseMethod(_width_llm, _width_tensor, _width_one_row),
}
# Fusions that keep both parents whole as the towers of a dual-tower model write their own layout.
TOWER_METHODS = ("cross",)  # checkpoint/fuse_cross.py


# ------------------------------------------------------------------------------------------ streaming

class FullTensorReader:
    """A converted checkpoint's full (TP-merged, unpadded-vocab) tensors by global name, read one at a time."""

    def __init__(self, load_dir: Path):
        self.dir = load_dir
        self.record = ConversionRecord.load(load_dir)
        self.readers = open_rank_files(load_dir, self.record, read_tracker(load_dir))
        par, llm = self.record.parallel, self.record.llm
        # global tensor name -> (stage, the stage file's own name)
        self._where = {global_layer_name(k, stage_layer_range(llm, par, s)): (s, k)
                       for s, stage in enumerate(self.readers) for k in stage[0].keys()}
        self._shapes = [[r.shapes() for r in stage] for stage in self.readers]

    def read(self, name: str, *, meta: bool = False) -> torch.Tensor:
        """The full tensor ``name`` (global layer numbering); ``meta``: its shape only, nothing read."""
        if name == "output_layer.weight" and not self.record.llm.untie_embeddings:
            name = "embedding.word_embeddings.weight"  # tied: megatron's last-stage copy is the embedding
        stage, key = self._where[name]
        parts = ([torch.empty(shapes[key], device="meta") for shapes in self._shapes[stage]] if meta else
                 [r.read(key) for r in self.readers[stage]])
        full = merge_tensors(parts, split_kind(name))
        return full[:self.record.llm.vocab_size] if name in VOCAB_KEYS else full


def tokenizer_digest(load_dir: Path) -> Optional[str]:
    dirs = [load_dir / d for d in (TOKENIZER_DIR, MERGED_TOKENIZER_DIR)]
    files = sorted(p for d in dirs if d.is_dir() for p in d.iterdir() if p.is_file())
    if not files:
        return None
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.parent.name}/{p.name}".encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def merged_vocabulary(a: FullTensorReader, b: FullTensorReader) -> Optional[VocabMerge]:
    """None when the parents share one vocabulary (same size, same tokenizer files): rows fuse one to one.
    Otherwise the merge of their tokenizers (``vocab_merge.py``)."""
    la, lb = a.record.llm, b.record.llm
    if la.vocab_size == lb.vocab_size and tokenizer_digest(a.dir) == tokenizer_digest(b.dir):
        return None
    differ = (f"{a.dir} and {b.dir} have different vocabularies ({la.vocab_size} vs {lb.vocab_size} tokens, or "
              "different tokenizer files)")
    parents = [ParentVocab.read(r.dir, r.record.llm.vocab_size) for r in (a, b)]
    missing = [str(r.dir) for r, p in zip((a, b), parents) if p is None]
    if missing:
        raise CheckpointError(f"{differ}, and {' and '.join(missing)} has no sentencepiece tokenizer to merge them "
                              f"by ({TOKENIZER_DIR}/{MODEL_FILE} or {MERGED_TOKENIZER_DIR}/): convert it from a HF "
                              "directory holding its tokenizer.model")
    return merge_vocabularies(*parents)


def _fused_hf_config(parent: Optional[dict], llm: LLMConfig) -> dict:
    """Model A's HF config with the fused sizes, so ``megatron-to-hf`` exports the fused model like any other."""
    config = dict(parent or {})
    config.update(vocab_size=llm.vocab_size, hidden_size=llm.hidden_size, num_attention_heads=llm.num_attention_heads,
                  num_key_value_heads=llm.query_groups, intermediate_size=llm.ffn_hidden_size)
    if "head_dim" in config:
        config["head_dim"] = llm.head_dim
    return config


def write_rank_files(out: Path, record: ConversionRecord, parallel: ParallelConfig, target: torch.dtype,
                     full: Callable[..., torch.Tensor]) -> None:
    """Write every rank file of ``record``'s TP x PP layout, one tensor at a time: ``full(name, meta=...)`` gives
    the whole tensor (on the meta device first, for the files' layouts), split here for each TP rank."""
    llm, tp, pp = record.llm, parallel.tp, parallel.pp
    extra = {"args": megatron_args(record), "checkpoint_version": CHECKPOINT_VERSION, "iteration": record.iteration}
    for s in range(pp):
        layers = stage_layer_range(llm, parallel, s)
        tensors = {k: None if m is None else global_layer_name(k, layers) for k, m in stage_state_keys(llm, parallel, s)}
        shapes = {k: None if g is None else full(g, meta=True) for k, g in tensors.items()}
        layouts = [{k: None if t is None else (tuple(split_tensor(t, split_kind(k), tp, r).shape), target)
                    for k, t in shapes.items()} for r in range(tp)]
        with ExitStack() as files:  # on an error, the files are closed and the error is not masked
            writers = [files.enter_context(RankFileWriter(rank_file(out, record.iteration, r, s, pp), layouts[r],
                                                          extra)) for r in range(tp)]
            for k, g in tensors.items():
                if g is not None:
                    t = full(g)
                    for r, writer in enumerate(writers):
                        writer.write(k, [split_tensor(t, split_kind(k), tp, r)])


def fuse_checkpoints(model_a: Union[str, Path], model_b: Union[str, Path], out_dir: Union[str, Path], *,
                     method: str, options: FuseOptions = FuseOptions(), tp: int = 1, pp: int = 1,
                     pp_layers: Optional[Sequence[int]] = None, dtype: Optional[str] = None,
                     force: bool = False) -> Path:
    """Fuse two converted checkpoints into ``out_dir`` (legacy layout at ``tp`` x ``pp``); returns ``out_dir``."""
    if method in TOWER_METHODS:  # imported here: fuse_cross builds on this module's reader and writer
        from megatron_visualchat.checkpoint.fuse_cross import fuse_cross

        return fuse_cross(model_a, model_b, out_dir, cross_interval=options.cross_interval, tp=tp, pp=pp,
                          pp_layers=pp_layers, dtype=dtype, force=force)
    if method not in FUSE_METHODS:
        raise CheckpointError(f"unknown fusion method {method!r}: choose one of {', '.join(FUSE_METHODS)}")
    fuse = FUSE_METHODS[method]
    a, b = FullTensorReader(Path(model_a)), FullTensorReader(Path(model_b))
    la, lb = a.record.llm, b.record.llm
    llm = fuse.fused_llm(la, lb, options)
    vocab = merged_vocabulary(a, b)
    if vocab is not None:
        llm = dataclasses.replace(llm, vocab_size=vocab.vocab_size)
    parallel = ParallelConfig(tp=tp, pp=pp, pp_layers=tuple(pp_layers) if pp_layers else None)
    parallel.validate(llm)
    target = dtype_from_name(dtype or a.record.dtype)
    outputs = (*MEGATRON_OUTPUTS, MERGED_TOKENIZER_DIR)
    out = prepare_out(out_dir, force=force, inputs=[a.dir, b.dir], replaced=outputs)
    hf_config = _fused_hf_config(a.record.hf_config, llm)
    if vocab is not None:
        vocab.remap_ids(hf_config, f"{a.dir} (its HF config)")
    hf_config["fused_from"] = {"method": method, **dataclasses.asdict(options), "model_a": str(a.dir),
                               "model_b": str(b.dir),
                               "vocabulary": vocab.record() if vocab else "shared (model A's tokenizer)"}
    record = ConversionRecord(llm=llm, tp=tp, pp=pp, pp_layers=parallel.pp_layers, dtype=dtype or a.record.dtype,
                              hf_config=hf_config)
    vocab_rows = llm.padded_vocab_size(tp)

    def fused(name: str, *, meta: bool = False) -> torch.Tensor:
        ta, tb = a.read(name, meta=meta).to(target), b.read(name, meta=meta).to(target)
        if name not in VOCAB_KEYS:
            return fuse.fuse_tensor(name, ta, tb, la, lb, options)
        if vocab is None:
            return pad_vocab_rows(fuse.fuse_tensor(name, ta, tb, la, lb, options), vocab_rows)
        return pad_vocab_rows(vocab.rows(ta, tb, lambda x, y: fuse.fuse_tensor(name, x, y, la, lb, options),
                                         lambda rows, side: fuse.one_row(name, rows, side, la, lb)), vocab_rows)

    with removed_on_failure(out, outputs):
        write_rank_files(out, record, parallel, target, fused)
        if vocab is None:
            copy_side_files(a.dir / TOKENIZER_DIR, out / TOKENIZER_DIR)
            if (a.dir / MERGED_TOKENIZER_DIR).is_dir():
                shutil.copytree(a.dir / MERGED_TOKENIZER_DIR, out / MERGED_TOKENIZER_DIR)
        else:
            vocab.save(out, a.dir / TOKENIZER_DIR)
        record.save(out)
        write_tracker(out, record.iteration)  # last: a directory without it is an unfinished fusion
    return out


# ------------------------------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megatron-visualchat fuse", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--method", required=True, choices=sorted([*FUSE_METHODS, *TOWER_METHODS]))
    p.add_argument("--model-a", required=True, help="converted checkpoint (hf-to-megatron output)")
    p.add_argument("--model-b", required=True, help="converted checkpoint (hf-to-megatron output)")
    p.add_argument("--out", required=True)
    p.add_argument("--alpha", type=float, default=FuseOptions.alpha, help="uniform: the weight of model A")
    p.add_argument("--variant", choices=WIDTH_VARIANTS, default=FuseOptions.variant,
                   help="width: off-diagonal blocks zero (copy) or the parents' mean (average)")
    p.add_argument("--cross-interval", type=int, default=FuseOptions.cross_interval,
                   help="cross: a bi-directional cross-attention link after every N-th layer of the towers")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--pp-layers", type=int_list, default=None)
    p.add_argument("--dtype", default=None, help="default: model A's")
    p.add_argument("--force", action="store_true", help="replace an existing checkpoint in --out")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.method != "uniform" and args.alpha != FuseOptions.alpha:
        raise SystemExit(f"--alpha weighs the parents of a uniform fusion; it means nothing to --method {args.method}")
    if args.method != "width" and args.variant != FuseOptions.variant:
        raise SystemExit("--variant chooses the off-diagonal blocks of a width fusion; give it with --method width")
    if args.method != "cross" and args.cross_interval != FuseOptions.cross_interval:
        raise SystemExit("--cross-interval spaces the cross links of a cross fusion; give it with --method cross")
    try:
        out = fuse_checkpoints(args.model_a, args.model_b, args.out, method=args.method,
                               options=FuseOptions(alpha=args.alpha, variant=args.variant,
                                                   cross_interval=args.cross_interval), tp=args.tp, pp=args.pp,
                               pp_layers=args.pp_layers, dtype=args.dtype, force=args.force)
    except (CheckpointError, ValueError) as e:
        raise SystemExit(f"fuse: {e}") from None
    what = "two towers" if args.method in TOWER_METHODS else str(ConversionRecord.load(out).llm)
    tokenizer = out / MERGED_TOKENIZER_DIR
    print(f"fused ({args.method}) -> {out}: {what}; train it with --model-preset from-llm-load --llm-load {out}"
          + (f" --tokenizer-dir {tokenizer}" if tokenizer.is_dir() else ""))
    return 0
