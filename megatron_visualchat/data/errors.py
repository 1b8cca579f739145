"""Sample-level errors and the skip counter.

Training wants a long run to survive a few bad records (skip, count, warn once per reason); the validation tool
wants the first bad record to stop everything with its file and index. Both are driven by one exception type whose
``reason`` is a stable key from ``SKIP_REASONS``.
"""

from __future__ import annotations

import logging
from collections import Counter

SKIP_REASONS = frozenset(
    {
        "malformed_json",  # a JSONL line / JSON element that does not parse or is not an object
        "malformed_conversation",  # missing fields, wrong types, non-alternating turns, empty text, bad IMAGE# ref
        "empty_conversation",  # no question/answer round at all
        "unknown_role",  # a turn whose role is not one of the known user/assistant spellings
        "image_count_mismatch",  # <image> placeholders and listed images disagree
        "missing_image",  # image file / id not found
        "corrupt_image",  # undecodable, truncated, or not convertible to RGB
        "image_too_large",  # over the decompression-bomb pixel cap
        "too_long",  # the first round alone exceeds max_seq_len
        "too_many_images",  # the first round alone exceeds max_images_per_sample
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
    """Counts skipped records by reason and logs a warning the first time each reason occurs (per process)."""

    def __init__(self, logger: logging.Logger | None = None):
        self.counts: Counter = Counter()
        self._logger = logger or logging.getLogger("megatron_visualchat.data")

    def record(self, error: SampleError) -> None:
        if error.reason not in self.counts:
            self._logger.warning("skipping sample (first '%s'; later ones are only counted): %s", error.reason, error)
        self.counts[error.reason] += 1
