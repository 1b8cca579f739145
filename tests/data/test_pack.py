"""Packing (--pack): next-fit bins of whole samples in data order, every batch exactly [micro-batch, seq-length],
pads only at a bin's end, the same bins at any data-parallel size and after a resume from a saved position."""

import pytest
import torch

from megatron_visualchat.data import build_dataloader, build_train_dataset
from megatron_visualchat.data.loader import epoch_order
from megatron_visualchat.data.pack import next_fit
from megatron_visualchat.data.synthetic import generate_synthetic_dataset
from megatron_visualchat.model.token_codes import MODALITY_PAD
from megatron_visualchat.model.vision.preprocess import default_image_transform

L, T = 320, 4  # bin size (--seq-length), image tokens per image


def test_next_fit_keeps_order_and_opens_a_bin_when_the_next_item_does_not_fit():
    lengths = [3, 4, 2, 5, 1, 7, 6]
    bins = list(next_fit(range(len(lengths)), lengths.__getitem__, 7))
    assert bins == [[0, 1], [2, 3], [4], [5], [6]]
    with pytest.raises(ValueError, match="sample 2 takes 9 positions, more than a bin's 8"):
        list(next_fit([{"index": 1, "n": 8}, {"index": 2, "n": 9}], lambda s: s["n"], 8))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, tok):
    syn = generate_synthetic_dataset(str(tmp_path_factory.mktemp("syn")), num_samples=40, seed=1, image_size=16)
    return build_train_dataset([{"format": "jsonl", "path": syn.train_path}], tok, num_image_tokens=T,
                               max_seq_len=L, seed=3)


def packed_loader(dataset, record=None, **kw):
    """A packed loader; ``record`` gets the plan indices of each batch's bins."""
    kw.setdefault("batch_size", 2)
    loader = build_dataloader(dataset, default_image_transform(16), pad_to=L, pack=True, seed=5, **kw)
    if record is not None:
        collate_bins = loader.collator.collate_bins
        loader.collator.collate_bins = lambda bins: record.append([[s["index"] for s in b] for b in bins]) or \
            collate_bins(bins)
    return loader


def test_bins_are_fixed_rows_of_whole_samples_in_order_with_pads_only_at_the_end(dataset):
    bins, lengths = [], {}
    loader = packed_loader(dataset, bins)
    batches = [b for b in loader]
    assert len(batches) == len(bins) >= 4 and loader.epoch == 1
    samples_read = {}
    for i in epoch_order(len(dataset), 5, 0):  # what the loader read, in its order
        s = dataset[int(i)]
        samples_read[int(i)] = s["index"]
        lengths[s["index"]] = loader.collator.length(s)
    order = [samples_read[int(i)] for i in epoch_order(len(dataset), 5, 0)]
    flat = [i for batch in bins for b in batch for i in b]
    assert flat == order[:len(flat)]  # every sample once, none split, in data order
    rows = [b for batch in bins for b in batch]
    for row, following in zip(rows, rows[1:] + [None]):  # next-fit: the next sample did not fit
        assert following is None or sum(lengths[i] for i in row) + lengths[following[0]] > L
    assert sum(b["sample_id"].max(1).values.sum() + 2 for b in batches) == len(flat)  # 2 rows per batch
    for batch, batch_bins in zip(batches, bins):
        assert batch["tokens"].shape == (2, L) and batch["pixel_values"].shape[0] == batch["num_images"].sum()
        for r, row_bin in enumerate(batch_bins):
            fill = sum(lengths[i] for i in row_bin)
            sample_id, positions = batch["sample_id"][r], batch["position_ids"][r]
            assert (batch["modality"][r, :fill] != MODALITY_PAD).all() and (batch["modality"][r, fill:] == 0).all()
            assert (sample_id[fill:] == -1).all()
            starts = torch.tensor([0] + [lengths[i] for i in row_bin[:-1]]).cumsum(0)
            assert starts.tolist() == [int((sample_id == k).nonzero()[0]) for k in range(len(row_bin))]
            assert (positions[starts] == 0).all() and int((positions[:fill] == 0).sum()) == len(row_bin)


def test_bins_do_not_depend_on_the_data_parallel_size(dataset):
    single, ranks = [], [[], []]
    take = 3
    it = iter(packed_loader(dataset, single))
    for _ in range(take):
        next(it)
    for rank in range(2):
        it = iter(packed_loader(dataset, ranks[rank], batch_size=1, dp_rank=rank, dp_size=2))
        for _ in range(take):
            next(it)
    assert [ranks[0][k] + ranks[1][k] for k in range(take)] == single


def test_a_seek_to_a_saved_position_continues_with_the_same_bins_also_with_workers(dataset):
    straight = packed_loader(dataset).forever()
    batches = [next(straight) for _ in range(9)]  # into the second epoch
    first = packed_loader(dataset)
    it = first.forever()
    for _ in range(3):
        next(it)
    resumed = packed_loader(dataset, start_index=first.consumed_samples, num_workers=2).forever()
    for expected in batches[3:]:
        got = next(resumed)
        assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_too_little_data_for_one_global_batch_of_bins_is_refused(dataset):
    with pytest.raises(ValueError, match="fewer than one global batch of 32 bins"):
        next(iter(packed_loader(dataset, batch_size=32)))
    with pytest.raises(ValueError, match="packing needs the bin size"):
        build_dataloader(dataset, default_image_transform(16), batch_size=2, pack=True)
