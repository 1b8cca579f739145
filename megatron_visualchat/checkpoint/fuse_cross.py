"""JAM-Cross fusion (``fuse --method cross``): both parents kept whole as the towers of one dual-tower model.

Layout of the output directory::

    <out>/megatron_visualchat_config.json   the fusion's record (format ``megatron_visualchat.jam_cross/1``): the
                                            towers' architecture, the cross interval, the parents
    <out>/tower_a/, <out>/tower_b/          each an ordinary converted checkpoint (``hf-to-megatron`` layout) of
                                            one parent at the output's TP/PP, streamed tensor by tensor
    <out>/chat_tokenizer/, <out>/tokenizer/ parents with different tokenizers: the merged one (``vocab_merge.py``)

Different tokenizers: both towers read the merged vocabulary. Tower T (parent P, the other parent Q) takes, for each
merged token, P's embedding and output rows when P has the token; for a token only Q has, Q's embedding row (a
trained vector of the towers' width, as uniform fusion does; zeros would make the token invisible to the tower) and
a zero output row (a tower never predicts a token its parent did not know). The joint head's A half is tower A's
output layer; its B half gets tower B's output rows of the tokens only B has (``head_b_rows`` in the record, filled
by ``load_towers``) and zeros for A's tokens, so with the gates at 0 A's tokens' logits are parent A's and B's own
tokens get parent B's logits from tower B.

The trainer reads the record with ``--model-preset from-llm-load --llm-load OUT``, builds ``model/jam_cross.py``'s
model and fills its towers (``load_towers``). The model initialises the new weights (cross links with tanh gates at
0, the B half of the joint head at 0 but for ``head_b_rows``), so at step 0 its logits are parent A's (on A's
tokens). Tools that expect one converted LLaMA (``megatron-to-hf``, another fusion) refuse the directory by its
record's format.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from megatron_visualchat.checkpoint.convert import (
    MEGATRON_OUTPUTS, TOKENIZER_DIR, copy_side_files, prepare_out, removed_on_failure,
)
from megatron_visualchat.checkpoint.errors import CheckpointError
from megatron_visualchat.checkpoint.fuse import FullTensorReader, merged_vocabulary, write_rank_files
from megatron_visualchat.checkpoint.layout import write_tracker
from megatron_visualchat.checkpoint.legacy_format import (
    RECORD_FILE, VOCAB_KEYS, ConversionRecord, dtype_from_name, load_megatron_checkpoint,
)
from megatron_visualchat.checkpoint.sharding import pad_vocab_rows, split_tensor
from megatron_visualchat.checkpoint.vocab_merge import MERGED_TOKENIZER_DIR, VocabMerge
from megatron_visualchat.config import JAM_CROSS, FusionConfig, LLMConfig, ParallelConfig

JAM_CROSS_FORMAT = "megatron_visualchat.jam_cross/1"
TOWER_DIRS = ("tower_a", "tower_b")  # the names of JamCrossModel's towers too


@dataclass(frozen=True)
class JamCrossRecord:
    llm: LLMConfig  # both towers'
    cross_interval: int
    fused_from: dict
    head_b_rows: tuple = ()  # [start, stop) ranges of merged ids whose head row (B half) is tower B's output row

    @property
    def fusion(self) -> FusionConfig:
        return FusionConfig(kind=JAM_CROSS, cross_interval=self.cross_interval)

    def save(self, out: Path) -> None:
        data = {"format": JAM_CROSS_FORMAT, "llm": dataclasses.asdict(self.llm), "cross_interval": self.cross_interval,
                "towers": list(TOWER_DIRS), "fused_from": self.fused_from,
                "head_b_rows": [list(r) for r in self.head_b_rows]}
        (out / RECORD_FILE).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")

    @classmethod
    def find(cls, load_dir: Union[str, Path]) -> Optional["JamCrossRecord"]:
        """The record of a cross fusion in ``load_dir``, or None when the directory holds something else."""
        path = Path(load_dir) / RECORD_FILE
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None
        if not isinstance(data, dict) or data.get("format") != JAM_CROSS_FORMAT:
            return None
        try:
            return cls(llm=LLMConfig(**data["llm"]), cross_interval=int(data["cross_interval"]),
                       fused_from=dict(data.get("fused_from") or {}),
                       head_b_rows=tuple((int(a), int(b)) for a, b in data.get("head_b_rows") or ()))
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: malformed jam-cross record ({e})") from None


def _tower_rows(vocab: VocabMerge, name: str, side: str, a, b):
    """Tower ``side``'s rows of the merged vocabulary from the parents' (module docstring)."""
    def one(rows, parent: str):
        return rows if parent == side or name.endswith("word_embeddings.weight") else torch.zeros_like(rows)

    return vocab.rows(a, b, (lambda x, y: x) if side == "a" else (lambda x, y: y), one)


def _ranges(ids: torch.Tensor) -> tuple:
    """Ascending ids as [start, stop) ranges (B's own tokens are a few runs: its pieces, its image vocabulary)."""
    runs = []
    for i in ids.tolist():
        if runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return tuple(map(tuple, runs))


def _write_tower(src, other, side: str, out: Path, parallel: ParallelConfig, dtype: str,
                 vocab: Optional[VocabMerge]) -> None:
    """Parent ``src`` (a ``fuse.FullTensorReader``; ``other``: the other parent) as an ordinary converted checkpoint
    at ``parallel``, one tensor at a time; in the merged vocabulary when ``vocab`` is given."""
    llm, hf_config = src.record.llm, src.record.hf_config
    if vocab is not None:
        llm = dataclasses.replace(llm, vocab_size=vocab.vocab_size)
        hf_config = dict(hf_config or {}, vocab_size=vocab.vocab_size)
        vocab.remap_ids(hf_config, f"{src.dir} (its HF config)", side)
    record = ConversionRecord(llm=llm, tp=parallel.tp, pp=parallel.pp, pp_layers=parallel.pp_layers, dtype=dtype,
                              hf_config=hf_config)
    target, vocab_rows = dtype_from_name(dtype), llm.padded_vocab_size(parallel.tp)
    a, b = (src, other) if side == "a" else (other, src)

    def full(name: str, *, meta: bool = False):
        if name not in VOCAB_KEYS:
            return src.read(name, meta=meta).to(target)
        if vocab is None:
            return pad_vocab_rows(src.read(name, meta=meta).to(target), vocab_rows)
        rows = _tower_rows(vocab, name, side, a.read(name, meta=meta).to(target), b.read(name, meta=meta).to(target))
        return pad_vocab_rows(rows, vocab_rows)

    write_rank_files(out, record, parallel, target, full)
    if vocab is None:
        copy_side_files(src.dir / TOKENIZER_DIR, out / TOKENIZER_DIR)
    else:  # the merged tokenizer (A's HF side files, renumbered), so each tower's tokenizer fits its rows
        vocab.save(out, a.dir / TOKENIZER_DIR)
    record.save(out)
    write_tracker(out, record.iteration)


def fuse_cross(model_a: Union[str, Path], model_b: Union[str, Path], out_dir: Union[str, Path], *,
               cross_interval: int = 1, tp: int = 1, pp: int = 1, pp_layers: Optional[Sequence[int]] = None,
               dtype: Optional[str] = None, force: bool = False) -> Path:
    """Write the cross fusion of two converted checkpoints of one architecture into ``out_dir``; returns it."""
    a, b = FullTensorReader(Path(model_a)), FullTensorReader(Path(model_b))
    la, lb = a.record.llm, b.record.llm
    if dataclasses.replace(la, vocab_size=lb.vocab_size) != lb:
        raise CheckpointError(f"cross fusion keeps both parents as towers of one model with cross-attention between "
                              f"their layer outputs: they need the same architecture ({la} vs {lb}); towers of "
                              "different widths or depths are not supported")
    fusion = FusionConfig(kind=JAM_CROSS, cross_interval=cross_interval)
    fusion.validate()
    if cross_interval > la.num_layers:
        raise CheckpointError(f"--cross-interval {cross_interval} exceeds the {la.num_layers} layers: the towers "
                              "would never exchange anything")
    if not la.untie_embeddings:
        raise CheckpointError("cross fusion starts the joint head from tower A's own output layer: tied embeddings "
                              "are not supported")
    vocab = merged_vocabulary(a, b)  # None: one shared vocabulary
    llm = la if vocab is None else dataclasses.replace(la, vocab_size=vocab.vocab_size)
    parallel = ParallelConfig(tp=tp, pp=pp, pp_layers=tuple(pp_layers) if pp_layers else None)
    parallel.validate(llm)
    outputs = (*MEGATRON_OUTPUTS, *TOWER_DIRS, MERGED_TOKENIZER_DIR)
    out = prepare_out(out_dir, force=force, inputs=[a.dir, b.dir], replaced=outputs)
    with removed_on_failure(out, outputs):
        for src, other, side, name in ((a, b, "a", TOWER_DIRS[0]), (b, a, "b", TOWER_DIRS[1])):
            _write_tower(src, other, side, out / name, parallel, dtype or a.record.dtype, vocab)
        if vocab is not None:
            vocab.save(out, a.dir / TOKENIZER_DIR)
        vocabulary = "shared (model A's tokenizer)" if vocab is None else dict(vocab.record(), towers=(
            "tower T: its parent's embedding and output rows for its parent's tokens; for the other parent's own "
            "tokens that parent's embedding row and a zero output row; head B half: tower B's output rows of "
            "B's own tokens (head_b_rows), zeros elsewhere (docs/fusion.md)"))
        JamCrossRecord(llm=llm, cross_interval=cross_interval,
                       fused_from={"method": "cross", "model_a": str(a.dir), "model_b": str(b.dir),
                                   "vocabulary": vocabulary},
                       head_b_rows=() if vocab is None else _ranges(vocab.only("b"))).save(out)
        write_tracker(out, 0)  # last: a directory without it is an unfinished fusion
    return out


def load_towers(model, load_dir: Union[str, Path]) -> None:
    """Fill the towers of ``model`` (a ``model/jam_cross.py`` JamCrossModel stage) from a cross fusion in
    ``load_dir``: each tower from its converted checkpoint, resharded on load when the layouts differ."""
    for name in TOWER_DIRS:
        missing, unexpected = load_megatron_checkpoint(getattr(model, name), Path(load_dir) / name, strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        unexpected = [k for k in unexpected if not (name == "tower_b" and k.startswith("output_layer."))]
        if missing or unexpected:  # tower B's own output layer is not part of the model (the joint head is)
            raise CheckpointError(f"{load_dir}/{name} does not fit the jam-cross tower: missing {missing[:5]}, "
                                  f"unexpected {unexpected[:5]}")
    record = JamCrossRecord.find(load_dir)
    head = getattr(model, "tower_b_output_layer", None)  # the last pipeline stage's
    if head is not None and record is not None and record.head_b_rows:
        _fill_head_b(head, Path(load_dir) / TOWER_DIRS[1], record.head_b_rows)


def _fill_head_b(head, tower_b: Path, ranges: tuple) -> None:
    """The joint head's B half (this TP rank's rows): tower B's output rows of the merged ids in ``ranges``."""
    from megatron.core import parallel_state

    tp, rank = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
    rows = FullTensorReader(tower_b).read("output_layer.weight")
    ids = torch.cat([torch.arange(start, stop) for start, stop in ranges])
    weight = rows.new_zeros(head.weight.shape[0] * tp, rows.shape[1])
    weight[ids] = rows[ids]
    with torch.no_grad():
        head.weight.copy_(split_tensor(weight, "column", tp, rank))
