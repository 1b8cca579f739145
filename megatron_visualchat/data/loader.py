"""A seeded, data-parallel-sharded, resumable DataLoader over a VisualChatDataset.

Order: per epoch a permutation drawn from (seed, epoch); consecutive *global* batches of ``batch_size * dp_size``
samples, rank r taking slice r of each. An incomplete last global batch is dropped so every rank sees the same
number of steps. Position = samples consumed globally (Megatron's ``consumed_samples``), so resuming from a
checkpoint's ``state_dict()`` — or passing ``start_index=consumed_samples`` — continues with exactly the batches an
uninterrupted run would have produced.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import numpy as np
from torch.utils.data import DataLoader, Sampler

from .collate import VisualChatCollator
from .dataset import VisualChatDataset


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
        if not self.shuffle:
            return np.arange(self.num_samples)
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.num_samples)

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
                f"start position {consumed_samples} must be a multiple of the global batch {self.global_batch}"
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
            for key, reason in skipped.items():
                if key not in self._skipped_records:
                    self._skipped_records.add(key)
                    self.skipped[reason] += 1
            yield batch
        self.epoch, self.consumed = self.epoch + 1, 0

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
    """Dataset + VisualChatCollator (tokenizer, image-token count and max_seq_len taken from the dataset's encoder)."""
    encoder = dataset.encoder
    collator = VisualChatCollator(
        encoder.tokenizer, encoder.num_image_tokens, image_transform, encoder.max_seq_len,
        pad_to=pad_to, pack=pack, image_size=image_size,
    )
    return VisualChatDataLoader(
        dataset, collator, batch_size=batch_size, dp_rank=dp_rank, dp_size=dp_size, seed=seed, shuffle=shuffle,
        num_workers=num_workers, start_index=start_index, pin_memory=pin_memory,
    )
