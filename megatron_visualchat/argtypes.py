"""argparse ``type=`` converters shared by the command lines (trainer, checkpoint converter)."""

from __future__ import annotations

import argparse


def int_list(text: str) -> tuple[int, ...]:
    """Comma-separated integers (per-stage layer counts, e.g. 18,22,20,20)."""
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 18,22, got {text!r}") from None
