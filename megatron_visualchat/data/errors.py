"""Sample-level errors and the skip counter.

Training wants a long run to survive a few bad records: skip, count, warn once per reason. ``--strict-data`` wants
the first bad record to stop everything, with its file and index. ``megatron-visualchat validate-data``
(``validate.py``) scans every record and prints the counts by reason with the first offenders. All three are driven
by one exception type whose ``reason`` is a stable key from ``SKIP_REASONS``.
"""

from __future__ import annotations

import logging
from collections import Counter

SKIP_REASONS = frozenset(
    {
        "malformed_json",  # a JSONL line / JSON element that does not parse, is not UTF-8 or is not an object
        "malformed_conversation",  # missing fields, wrong types, non-alternating turns, empty text, bad IMAGE# ref
        "empty_conversation",  # no question/answer round at all
        "unknown_role",  # a turn whose role is not one of the known user/assistant spellings
        "image_count_mismatch",  # <image> placeholders and listed images disagree
        "missing_image",  # image file / id not found, or not readable
        "image_outside_root",  # an image path resolving (symlinks included) outside its image directory
        "image_not_a_file",  # an image path naming a directory, FIFO, device or socket
        "corrupt_image",  # undecodable, truncated, or not convertible to RGB
        "image_too_large",  # over the decompression-bomb pixel cap, or the encoded-bytes cap
        "too_long",  # the first round alone exceeds max_seq_len
        "too_many_images",  # the first round alone exceeds max_images_per_sample
        "box_outside",  # a grounding box the image crop cuts (--box-outside skip) or removes entirely
    }
)


class SampleError(ValueError):
    """One record cannot be turned into a training sample.

    ``where`` names the file and record (``path:line 12``, ``path[3]``, ``path:data[ID]``) once known.
    """

    def __init__(self, reason: str, detail: str, where: str = ""):
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; allowed: {sorted(SKIP_REASONS)}")
        self.reason = reason
        self.detail = detail
        self.where = where
        super().__init__(f"{where + ': ' if where else ''}{reason}: {detail}")

    def at(self, where: str) -> "SampleError":
        """The same error located at ``where`` (kept if already located)."""
        return self if self.where else SampleError(self.reason, self.detail, where)


class SkipLog:
    """Counts skipped *records* by reason, keeps the first few (key, error) of each reason, and logs a warning the
    first time each reason occurs (per process).

    A record is keyed by ``(dataset, record index)``: a bad record met again (the next epoch, or drawn twice by a
    blend) is counted once.
    """

    def __init__(self, logger: logging.Logger | None = None, examples_per_reason: int = 3):
        self.counts: Counter = Counter()
        self.examples: dict[str, list[tuple[tuple, SampleError]]] = {}
        self._seen: set = set()
        self._examples_per_reason = examples_per_reason
        self._logger = logger or logging.getLogger("megatron_visualchat.data")

    def record(self, error: SampleError, key: tuple) -> None:
        """Count ``error`` for the record ``key`` unless that record was counted already."""
        if key in self._seen:
            return
        self._seen.add(key)
        if error.reason not in self.counts:
            self._logger.warning("skipping sample (first '%s'; later ones are only counted): %s", error.reason, error)
        self.counts[error.reason] += 1
        examples = self.examples.setdefault(error.reason, [])
        if len(examples) < self._examples_per_reason:
            examples.append((key, error))
