"""Packing: whole samples, in data order, into bins of at most ``capacity`` positions (``--seq-length``).

Next-fit: a bin takes samples while they fit; the first sample that does not fit opens the next bin. The bins are
therefore a function of the sample order alone, and packing restarted at any bin boundary gives the same bins as
an uninterrupted run, which is what makes a packed run resumable from a sample position (``PackedDataLoader``).
Next-fit never reorders samples, so a packed run sees samples in the same order as an unpacked one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def next_fit(items: Iterable[T], length: Callable[[T], int], capacity: int) -> Iterator[list[T]]:
    """Bins (lists of consecutive items, in order) of total ``length`` <= ``capacity``; the last may be partial."""
    if capacity < 1:
        raise ValueError(f"bin capacity {capacity} must be >= 1")
    current, used = [], 0
    for item in items:
        n = length(item)
        if n > capacity:
            where = item.get("index", "?") if isinstance(item, dict) else item
            raise ValueError(f"sample {where} takes {n} positions, more than a bin's {capacity} (--seq-length)")
        if current and used + n > capacity:
            yield current
            current, used = [], 0
        current.append(item)
        used += n
    if current:
        yield current
