"""Dataset mixtures: which source records make up each training sample, fixed once by a seed.

A plan item is (source, [record indices]): more than one index means the records are concatenated into one
multi-round, multi-image sample with continued image numbering (DS-VisualChat's ``random_grouping``: shuffle, then
cut into groups of random size 1..k). Per dataset we first draw its sample count (``num_samples``: "all", or N —
subsampled without replacement, or repeated whole passes plus a random remainder when N exceeds the file; or a
share of ``total_samples`` by ``weight``), then group, then shuffle all items together. Everything comes from
``numpy.random.SeedSequence(seed)``, so the same specs + seed give the same plan on every rank and every restart.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields

import numpy as np

from .cm3 import OBJECTIVES


@dataclass(frozen=True)
class DatasetSpec:
    format: str  # a key of formats.READERS
    path: str
    num_samples: int | str = "all"
    weight: float | None = None
    concat: int = 1  # concatenate 1..concat records per sample
    options: dict = field(default_factory=dict)  # reader keyword options (images=..., max_rounds=...)
    objective: str = "next_token"  # applied to each encoded sample of this dataset (cm3.OBJECTIVES)

    def __post_init__(self):
        if not (self.num_samples == "all" or (isinstance(self.num_samples, int) and self.num_samples >= 0)):
            raise ValueError(f"{self.path}: num_samples={self.num_samples!r} must be 'all' or an int >= 0")
        if self.weight is not None and not self.weight > 0:
            raise ValueError(f"{self.path}: weight={self.weight!r} must be > 0")
        if not (isinstance(self.concat, int) and self.concat >= 1):
            raise ValueError(f"{self.path}: concat={self.concat!r} must be an int >= 1")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"{self.path}: objective={self.objective!r} is not one of {list(OBJECTIVES)}")

    @classmethod
    def coerce(cls, spec: "DatasetSpec | dict") -> "DatasetSpec":
        if isinstance(spec, DatasetSpec):
            return spec
        allowed = {f.name for f in fields(cls)}
        unknown = set(spec) - allowed
        if unknown:
            raise ValueError(f"dataset spec keys {sorted(unknown)} are not among {sorted(allowed)}")
        return cls(**spec)


SPEC_SYNTAX = ("FORMAT:PATH[:WEIGHT[:NUM_SAMPLES[:CONCAT]]][:KEY=VALUE...] (KEY: weight, num_samples, concat, "
               "objective) or a JSON list of dataset specs")
_FIELD_TYPES = {"weight": float, "num_samples": lambda v: v if v == "all" else int(v), "concat": int,
                "objective": str}


def parse_spec_text(text: str) -> list[dict]:
    """Dataset spec dicts from a command-line value (``SPEC_SYNTAX``), for ``DatasetSpec.coerce``."""
    try:
        if text.lstrip().startswith("["):
            specs = json.loads(text)
            if not all(isinstance(s, dict) for s in specs):
                raise ValueError("the JSON list must hold objects")
            return specs
        parts = text.split(":")
        named = [p for p in parts[2:] if "=" in p]
        positional = parts[:len(parts) - len(named)]
        if parts[len(positional):] != named:
            raise ValueError("KEY=VALUE fields must come after the positional ones")
        if not 2 <= len(positional) <= 5 or not parts[0] or not parts[1]:
            raise ValueError(f"{len(positional)} positional ':'-separated field(s)")
        spec: dict = {"format": parts[0], "path": parts[1]}
        for key, value in zip(("weight", "num_samples", "concat"), positional[2:]):
            if value:
                spec[key] = _FIELD_TYPES[key](value)
        for item in named:
            key, value = item.split("=", 1)
            if key not in _FIELD_TYPES:
                raise ValueError(f"unknown key {key!r} (one of {sorted(_FIELD_TYPES)})")
            if key in spec:
                raise ValueError(f"{key} is given twice")
            spec[key] = _FIELD_TYPES[key](value)
        return [spec]
    except ValueError as e:  # json.JSONDecodeError is one too
        raise ValueError(f"dataset spec {text!r}: {e}; expected {SPEC_SYNTAX}") from None


class BlendPlan:
    """Items as flat numpy arrays (cheap to copy into DataLoader workers)."""

    def __init__(self, source_ids: np.ndarray, offsets: np.ndarray, members: np.ndarray, item_ids: np.ndarray):
        self.source_ids, self.offsets, self.members, self.item_ids = source_ids, offsets, members, item_ids

    @classmethod
    def from_items(cls, items: list[tuple[int, np.ndarray]]) -> "BlendPlan":
        lengths = [len(m) for _, m in items]
        return cls(
            np.asarray([s for s, _ in items], dtype=np.int32),
            np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            np.concatenate([m for _, m in items]).astype(np.int64) if items else np.zeros(0, np.int64),
            np.arange(len(items), dtype=np.int64),
        )

    def __len__(self) -> int:
        return len(self.source_ids)

    def item(self, index: int) -> tuple[int, np.ndarray]:
        return int(self.source_ids[index]), self.members[self.offsets[index] : self.offsets[index + 1]]

    def select(self, indices: np.ndarray) -> "BlendPlan":
        items = [self.item(int(i)) for i in indices]
        plan = BlendPlan.from_items(items)
        plan.item_ids = self.item_ids[indices]  # keep the ids: per-item random draws do not depend on the split
        return plan

    def split(self, eval_fraction: float) -> tuple["BlendPlan", "BlendPlan"]:
        """(train, eval): the last ``eval_fraction`` of the (already shuffled) items are held out."""
        if not 0.0 <= eval_fraction < 1.0:
            raise ValueError(f"eval_fraction={eval_fraction} must be in [0, 1)")
        n_eval = max(1, round(eval_fraction * len(self))) if eval_fraction > 0 else 0
        if n_eval >= len(self):
            raise ValueError(f"eval_fraction={eval_fraction} leaves no training items out of {len(self)}")
        cut = len(self) - n_eval
        return self.select(np.arange(cut)), self.select(np.arange(cut, len(self)))


def draw_indices(available: int, wanted: int, rng: np.random.Generator) -> np.ndarray:
    """``wanted`` record indices out of ``available``: whole shuffled passes, then a random subset for the rest."""
    if wanted and not available:
        raise ValueError(f"cannot draw {wanted} samples from an empty dataset")
    full, rest = divmod(wanted, available) if available else (0, 0)
    parts = [rng.permutation(available) for _ in range(full)] + [rng.choice(available, rest, replace=False)]
    return np.concatenate(parts).astype(np.int64)


def random_groups(indices: np.ndarray, max_group: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle ``indices`` and cut them into consecutive groups of random size in [1, max_group]."""
    indices = rng.permutation(indices)
    if max_group == 1:
        return [indices[i : i + 1] for i in range(len(indices))]
    sizes = rng.integers(1, max_group + 1, size=len(indices))
    cuts = np.cumsum(sizes)
    cuts = cuts[cuts < len(indices)]
    return np.split(indices, cuts)


def sample_counts(specs: list[DatasetSpec], lengths: list[int], total_samples: int | None) -> list[int]:
    """Records to draw per dataset: explicit counts, or weights x total_samples (largest remainder, exact total)."""
    weighted = [s.weight is not None for s in specs]
    if any(weighted):
        if not all(weighted):
            raise ValueError("either every dataset spec has a weight (with total_samples) or none has")
        if total_samples is None or total_samples < 1:
            raise ValueError(f"weights need total_samples >= 1, got {total_samples!r}")
        if any(s.num_samples != "all" for s in specs):
            raise ValueError("give a dataset either a weight or num_samples, not both")
        total_weight = sum(s.weight for s in specs)
        exact = [total_samples * s.weight / total_weight for s in specs]
        counts = [math.floor(x) for x in exact]
        for i in sorted(range(len(specs)), key=lambda i: counts[i] - exact[i])[: total_samples - sum(counts)]:
            counts[i] += 1
        return counts
    if total_samples is not None:
        raise ValueError("total_samples is only used with weights; give num_samples per dataset instead")
    return [n if s.num_samples == "all" else s.num_samples for s, n in zip(specs, lengths)]


def build_blend_plan(
    specs: list[DatasetSpec], lengths: list[int], seed: int, total_samples: int | None = None
) -> BlendPlan:
    """The shuffled plan over all datasets (``lengths[d]`` = number of records in dataset d)."""
    if len(specs) != len(lengths) or not specs:
        raise ValueError(f"need one length per spec, got {len(lengths)} lengths for {len(specs)} specs")
    rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(len(specs) + 1)]
    items = []
    for d, (spec, available, wanted) in enumerate(zip(specs, lengths, sample_counts(specs, lengths, total_samples))):
        chosen = draw_indices(available, wanted, rngs[d])
        items += [(d, group) for group in random_groups(chosen, spec.concat, rngs[d])]
    if not items:
        raise ValueError("the blend is empty (every dataset has 0 samples)")
    order = rngs[-1].permutation(len(items))
    return BlendPlan.from_items([items[i] for i in order])
