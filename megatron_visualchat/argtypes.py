"""argparse ``type=`` converters shared by the command lines (trainer, planner, checkpoint converter)."""

from __future__ import annotations

import argparse
import dataclasses

from megatron_visualchat.config import TrainableConfig

TRAINABLE_PARTS = {f.name for f in dataclasses.fields(TrainableConfig)}


def int_list(text: str) -> tuple[int, ...]:
    """Comma-separated integers (per-stage layer counts, e.g. 18,22,20,20)."""
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 18,22, got {text!r}") from None


def name_list(text: str) -> tuple[str, ...]:
    """Comma-separated names (checked against their option tuple by the config), e.g. qkv,proj."""
    return tuple(p.strip() for p in text.split(",") if p.strip())


def trainable_parts(text: str) -> TrainableConfig:
    """``--trainable``: a comma list of ``TrainableConfig`` fields, or ``all`` (every part but new_token_rows_only)."""
    parts = {p.strip() for p in text.split(",") if p.strip()}
    if parts == {"all"}:
        parts = TRAINABLE_PARTS - {"new_token_rows_only"}
    unknown = parts - TRAINABLE_PARTS
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown trainable part(s) {sorted(unknown)}; choose from "
                                         f"{sorted(TRAINABLE_PARTS)} or 'all'")
    return TrainableConfig(**{name: name in parts for name in TRAINABLE_PARTS})
