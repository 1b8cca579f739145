"""A seeded, data-parallel-sharded, resumable DataLoader over a VisualChatDataset.

Order: per epoch a permutation drawn from (seed, epoch); consecutive *global* batches of ``batch_size * dp_size``
samples, rank r taking slice r of each. An incomplete last global batch is dropped so every rank sees the same
number of steps. Position = samples consumed globally (Megatron's ``consumed_samples``), so resuming from a
checkpoint's ``state_dict()`` — or passing ``start_index=consumed_samples`` — continues with exactly the batches an
uninterrupted run would have produced.

Packed (``PackedDataLoader``, ``--pack``): the same epoch order, cut by ``data/pack.py`` into bins of exactly
``pad_to`` positions; a batch is ``batch_size`` bins, and the global batch ``batch_size * dp_size`` bins (rows, as
Megatron counts them), so the samples per batch vary. The position still counts samples.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import numpy as np
from torch.utils.data import DataLoader, Sampler

from .collate import VisualChatCollator
from .dataset import VisualChatDataset
from .pack import next_fit


def epoch_order(num_samples: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The sample order of one epoch: a permutation drawn from (seed, epoch), or 0..n-1 without shuffling."""
    if not shuffle:
        return np.arange(num_samples)
    return np.random.default_rng([seed, epoch]).permutation(num_samples)


def _check_layout(batch_size: int, dp_rank: int, dp_size: int) -> None:
    if batch_size < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ValueError(f"need batch_size >= 1 and 0 <= dp_rank < dp_size, got {batch_size=} {dp_rank=} {dp_size=}")


class ResumableShardedSampler(Sampler[int]):
    """This rank's sample indices for one epoch, starting after ``consumed`` global samples."""

    def __init__(self, num_samples, *, batch_size, dp_rank=0, dp_size=1, seed=0, shuffle=True, epoch=0, consumed=0):
        _check_layout(batch_size, dp_rank, dp_size)
        self.num_samples, self.batch_size, self.dp_rank, self.dp_size = num_samples, batch_size, dp_rank, dp_size
        self.seed, self.shuffle, self.epoch, self.consumed = seed, shuffle, epoch, consumed
        self.global_batch = batch_size * dp_size
        self.usable = num_samples // self.global_batch * self.global_batch
        if consumed % self.global_batch or not 0 <= consumed <= self.usable:
            raise ValueError(f"consumed={consumed} must be a multiple of {self.global_batch} in [0, {self.usable}]")

    def order(self) -> np.ndarray:
        return epoch_order(self.num_samples, self.seed, self.epoch, self.shuffle)

    def __iter__(self):
        order = self.order()
        first = self.dp_rank * self.batch_size
        for start in range(self.consumed, self.usable, self.global_batch):
            yield from (int(i) for i in order[start + first : start + first + self.batch_size])

    def __len__(self) -> int:
        return (self.usable - self.consumed) // self.dp_size


class _CollateWithSkips:
    """Runs in the worker: collates and returns the records skipped for the batch's samples alongside
    ({(dataset, record): reason})."""

    def __init__(self, collator: Callable):
        self.collator = collator

    def __call__(self, samples):
        skipped = {}
        for s in samples:
            skipped.update(s.get("skipped", {}))
        return self.collator(samples), skipped


class VisualChatDataLoader:
    """Iterate for one epoch from the current position; iterate again for the next epoch.

    ``skipped`` counts, by reason, the distinct records skipped for the batches yielded (from all workers) since
    construction: a bad record met again in a later epoch is not counted again.
    """

    def __init__(
        self,
        dataset: VisualChatDataset,
        collator: Callable,
        *,
        batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        num_workers: int = 0,
        start_index: int = 0,
        pin_memory: bool = False,
    ):
        _check_layout(batch_size, dp_rank, dp_size)
        self.dataset, self.collator = dataset, collator
        self.batch_size, self.dp_rank, self.dp_size = batch_size, dp_rank, dp_size
        self.seed, self.shuffle, self.num_workers, self.pin_memory = seed, shuffle, num_workers, pin_memory
        self.global_batch = batch_size * dp_size
        self.usable = len(dataset) // self.global_batch * self.global_batch
        if self.usable == 0:
            raise ValueError(f"dataset has {len(dataset)} samples, fewer than one global batch of {self.global_batch}")
        self.skipped: Counter = Counter()
        self._skipped_records: set = set()
        self.epoch, self.consumed = 0, 0
        self.seek(start_index)

    def seek(self, consumed_samples: int) -> None:
        """Position after ``consumed_samples`` global samples counted from the start of epoch 0."""
        if consumed_samples < 0 or consumed_samples % self.global_batch:
            raise ValueError(
                f"start position {consumed_samples} must be a multiple of the global batch {self.global_batch} "
                "(a position saved by a --pack run, which counts the samples in its bins, resumes only with --pack)"
            )
        self.epoch, self.consumed = divmod(consumed_samples, self.usable)

    @property
    def consumed_samples(self) -> int:
        return self.epoch * self.usable + self.consumed

    def __len__(self) -> int:
        """Batches per (full) epoch on this rank."""
        return self.usable // self.global_batch

    def __iter__(self):
        sampler = ResumableShardedSampler(
            len(self.dataset), batch_size=self.batch_size, dp_rank=self.dp_rank, dp_size=self.dp_size,
            seed=self.seed, shuffle=self.shuffle, epoch=self.epoch, consumed=self.consumed,
        )
        loader = DataLoader(
            self.dataset, batch_size=self.batch_size, sampler=sampler, collate_fn=_CollateWithSkips(self.collator),
            num_workers=self.num_workers, pin_memory=self.pin_memory, drop_last=True,
        )
        for batch, skipped in loader:
            self.consumed += self.global_batch
            self._count_skips(skipped)
            yield batch
        self.epoch, self.consumed = self.epoch + 1, 0

    def _count_skips(self, skipped: dict) -> None:
        """Count each (dataset, record) once, by reason."""
        for key, reason in skipped.items():
            if key not in self._skipped_records:
                self._skipped_records.add(key)
                self.skipped[reason] += 1

    def forever(self):
        """Batches without end, epoch after epoch (what a step-based training loop wants)."""
        while True:
            yield from self

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples, "seed": self.seed, "num_samples": len(self.dataset),
                "global_batch_size": self.global_batch}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("seed", "num_samples", "global_batch_size"):
            if state[key] != mine[key]:
                raise ValueError(f"cannot resume: checkpoint has {key}={state[key]}, this loader has {mine[key]}")
        self.seek(state["consumed_samples"])


def _as_is(sample):
    return sample


class PackedDataLoader(VisualChatDataLoader):
    """Batches of ``batch_size`` bins, each one row of exactly ``collator.pad_to`` positions holding whole samples.

    Every data-parallel rank walks the whole epoch order (reading each sample to learn its length; DataLoader
    workers read ahead), packs it into bins with ``next_fit`` and keeps bins ``dp_rank * batch_size`` .. of each
    group of ``batch_size * dp_size`` bins, so all ranks agree on the bins without communicating. Samples left at
    an epoch's end that fill less than a group are dropped. ``consumed_samples`` = epoch * len(dataset) + samples
    of this epoch up to the end of the last group yielded: a group ends on a bin boundary and next-fit restarts
    identically there, so ``seek`` to a saved position continues with the same bins, at any data-parallel size.
    ``skipped`` counts the records skipped for every rank's bins (the same numbers on every rank).
    """

    def __init__(self, dataset: VisualChatDataset, collator: VisualChatCollator, *, start_index: int = 0, **kw):
        if collator.pad_to is None:
            raise ValueError("packing needs the bin size: pass pad_to (--seq-length)")
        super().__init__(dataset, collator, **kw)
        self.usable = len(dataset)  # an epoch consumes every sample (those after the last full group are dropped)
        self.seek(start_index)

    def seek(self, consumed_samples: int) -> None:
        """Position after ``consumed_samples`` samples counted from the start of epoch 0 (a saved position)."""
        if consumed_samples < 0:
            raise ValueError(f"start position {consumed_samples} must be >= 0")
        self.epoch, self.consumed = divmod(consumed_samples, self.usable)

    def __len__(self) -> int:
        raise TypeError("a packed loader's batches per epoch depend on the samples' lengths")

    def __iter__(self):
        order = epoch_order(len(self.dataset), self.seed, self.epoch, self.shuffle)
        samples = DataLoader(self.dataset, sampler=order[self.consumed:].tolist(), batch_size=None,
                             collate_fn=_as_is, num_workers=self.num_workers)
        mine = slice(self.dp_rank * self.batch_size, (self.dp_rank + 1) * self.batch_size)
        group, start_epoch, yielded = [], self.consumed == 0, False
        for packed in next_fit(samples, self.collator.length, self.collator.pad_to):
            group.append(packed)
            if len(group) < self.global_batch:
                continue
            for sample in (s for b in group for s in b):
                self._count_skips(sample.get("skipped", {}))
            self.consumed += sum(len(b) for b in group)
            batch = self.collator.collate_bins(group[mine])
            group, yielded = [], True
            yield {k: v.pin_memory() for k, v in batch.items()} if self.pin_memory else batch
        if start_epoch and not yielded:
            raise ValueError(f"the {len(self.dataset)} samples pack into fewer than one global batch of "
                             f"{self.global_batch} bins of {self.collator.pad_to} positions: use more data or a "
                             "smaller --global-batch-size")
        self.epoch, self.consumed = self.epoch + 1, 0


def build_dataloader(
    dataset: VisualChatDataset,
    image_transform: Callable,
    *,
    batch_size: int,
    pad_to: int | None = None,
    pack: bool = False,
    image_size: int | tuple[int, int] | None = None,
    dp_rank: int = 0,
    dp_size: int = 1,
    seed: int = 0,
    shuffle: bool = True,
    num_workers: int = 0,
    start_index: int = 0,
    pin_memory: bool = False,
) -> VisualChatDataLoader:
    """Dataset + VisualChatCollator (tokenizer, image-token count and max_seq_len taken from the dataset's encoder).
    ``pack``: ``batch_size`` bins of ``pad_to`` positions per batch (``data/pack.py``), else ``batch_size`` samples."""
    encoder = dataset.encoder
    collator = VisualChatCollator(
        encoder.tokenizer, encoder.num_image_tokens, image_transform, encoder.max_seq_len,
        pad_to=pad_to, image_size=image_size,
    )
    return (PackedDataLoader if pack else VisualChatDataLoader)(
        dataset, collator, batch_size=batch_size, dp_rank=dp_rank, dp_size=dp_size, seed=seed, shuffle=shuffle,
        num_workers=num_workers, start_index=start_index, pin_memory=pin_memory,
    )
