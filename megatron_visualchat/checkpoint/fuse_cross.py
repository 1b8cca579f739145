"""JAM-Cross fusion (``fuse --method cross``): both parents kept whole as the towers of one dual-tower model.

Layout of the output directory::

    <out>/megatron_visualchat_config.json   the fusion's record (format ``megatron_visualchat.jam_cross/1``): the
                                            towers' architecture, the cross interval, the parents
    <out>/tower_a/, <out>/tower_b/          each an ordinary converted checkpoint (``hf-to-megatron`` layout) of
                                            one parent at the output's TP/PP, streamed tensor by tensor

The trainer reads the record with ``--model-preset from-llm-load --llm-load OUT``, builds ``model/jam_cross.py``'s
model and fills its towers (``load_towers``). The model initialises the new weights (cross links with tanh gates at
0, the B half of the joint head at 0), so at step 0 its logits are parent A's. Tools that expect one converted LLaMA
(``megatron-to-hf``, another fusion) refuse the directory by its record's format.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

from megatron_visualchat.checkpoint.convert import (
    MEGATRON_OUTPUTS, TOKENIZER_DIR, copy_side_files, prepare_out, removed_on_failure,
)
from megatron_visualchat.checkpoint.errors import CheckpointError
from megatron_visualchat.checkpoint.fuse import FullTensorReader, tokenizer_digest, write_rank_files
from megatron_visualchat.checkpoint.layout import write_tracker
from megatron_visualchat.checkpoint.legacy_format import (
    RECORD_FILE, VOCAB_KEYS, ConversionRecord, dtype_from_name, load_megatron_checkpoint,
)
from megatron_visualchat.checkpoint.sharding import pad_vocab_rows
from megatron_visualchat.config import JAM_CROSS, FusionConfig, LLMConfig, ParallelConfig

JAM_CROSS_FORMAT = "megatron_visualchat.jam_cross/1"
TOWER_DIRS = ("tower_a", "tower_b")  # the names of JamCrossModel's towers too


@dataclass(frozen=True)
class JamCrossRecord:
    llm: LLMConfig  # both towers'
    cross_interval: int
    fused_from: dict

    @property
    def fusion(self) -> FusionConfig:
        return FusionConfig(kind=JAM_CROSS, cross_interval=self.cross_interval)

    def save(self, out: Path) -> None:
        data = {"format": JAM_CROSS_FORMAT, "llm": dataclasses.asdict(self.llm), "cross_interval": self.cross_interval,
                "towers": list(TOWER_DIRS), "fused_from": self.fused_from}
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
                       fused_from=dict(data.get("fused_from") or {}))
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: malformed jam-cross record ({e})") from None


def _write_tower(src, out: Path, parallel: ParallelConfig, dtype: str) -> None:
    """``src`` (a ``fuse.FullTensorReader``) as an ordinary converted checkpoint at ``parallel``, one tensor at a
    time."""
    llm = src.record.llm
    record = ConversionRecord(llm=llm, tp=parallel.tp, pp=parallel.pp, pp_layers=parallel.pp_layers, dtype=dtype,
                              hf_config=src.record.hf_config)
    target, vocab_rows = dtype_from_name(dtype), llm.padded_vocab_size(parallel.tp)

    def full(name: str, *, meta: bool = False):
        t = src.read(name, meta=meta).to(target)
        return pad_vocab_rows(t, vocab_rows) if name in VOCAB_KEYS else t

    write_rank_files(out, record, parallel, target, full)
    copy_side_files(src.dir / TOKENIZER_DIR, out / TOKENIZER_DIR)
    record.save(out)
    write_tracker(out, record.iteration)


def fuse_cross(model_a: Union[str, Path], model_b: Union[str, Path], out_dir: Union[str, Path], *,
               cross_interval: int = 1, tp: int = 1, pp: int = 1, pp_layers: Optional[Sequence[int]] = None,
               dtype: Optional[str] = None, force: bool = False) -> Path:
    """Write the cross fusion of two converted checkpoints of one architecture into ``out_dir``; returns it."""
    a, b = FullTensorReader(Path(model_a)), FullTensorReader(Path(model_b))
    la, lb = a.record.llm, b.record.llm
    if la != lb:
        raise CheckpointError(f"cross fusion keeps both parents as towers of one model with cross-attention between "
                              f"their layer outputs: they need the same architecture ({la} vs {lb}); towers of "
                              "different widths or depths are not supported")
    if tokenizer_digest(a.dir) != tokenizer_digest(b.dir):
        raise CheckpointError(f"{a.dir} and {b.dir} have different tokenizer files: both towers read the same token "
                              "ids, so cross fusion needs one shared vocabulary (merging vocabularies is done by "
                              "--method uniform / width only)")
    fusion = FusionConfig(kind=JAM_CROSS, cross_interval=cross_interval)
    fusion.validate()
    if cross_interval > la.num_layers:
        raise CheckpointError(f"--cross-interval {cross_interval} exceeds the {la.num_layers} layers: the towers "
                              "would never exchange anything")
    if not la.untie_embeddings:
        raise CheckpointError("cross fusion starts the joint head from tower A's own output layer: tied embeddings "
                              "are not supported")
    parallel = ParallelConfig(tp=tp, pp=pp, pp_layers=tuple(pp_layers) if pp_layers else None)
    parallel.validate(la)
    outputs = (*MEGATRON_OUTPUTS, *TOWER_DIRS)
    out = prepare_out(out_dir, force=force, inputs=[a.dir, b.dir], replaced=outputs)
    with removed_on_failure(out, outputs):
        for src, name in zip((a, b), TOWER_DIRS):
            _write_tower(src, out / name, parallel, dtype or a.record.dtype)
        JamCrossRecord(llm=la, cross_interval=cross_interval,
                       fused_from={"method": "cross", "model_a": str(a.dir), "model_b": str(b.dir),
                                   "vocabulary": "shared (model A's tokenizer)"}).save(out)
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
