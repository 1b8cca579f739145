import json

import numpy as np
import pytest
import torch

from megatron_visualchat.data import (
    ResumableShardedSampler,
    VisualChatDataLoader,
    build_dataloader,
    build_train_dataset,
)
from megatron_visualchat.data.synthetic import generate_synthetic_dataset
from megatron_visualchat.model.token_codes import MODALITY_IMAGE
from megatron_visualchat.model.vision.preprocess import default_image_transform


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, tok):
    out = tmp_path_factory.mktemp("syn")
    syn = generate_synthetic_dataset(str(out), num_samples=40, seed=1, image_size=16)
    with open(syn.train_path, "a") as f:  # one bad record, to see skip counts travel back from workers
        f.write(json.dumps({"rounds": [{"images": ["images/missing.png"], "question": "q", "answer": "a"}]}) + "\n")
    return build_train_dataset([{"format": "jsonl", "path": syn.train_path, "concat": 2}], tok, num_image_tokens=4,
                               max_seq_len=512, seed=3)


def loader(dataset, **kw):
    kw.setdefault("batch_size", 2)
    return build_dataloader(dataset, default_image_transform(16), seed=5, **kw)


def take(it, n):
    return [next(it) for _ in range(n)]


def across_epochs(data_loader, n):
    """The next n batches, continuing into following epochs."""
    it = data_loader.forever()
    return [next(it) for _ in range(n)]


def same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b)
    )


def test_sampler_shards_each_global_batch_across_ranks():
    kw = dict(batch_size=3, dp_size=2, seed=0)
    ranks = [list(ResumableShardedSampler(20, dp_rank=r, **kw)) for r in range(2)]
    order = ResumableShardedSampler(20, **kw).order()
    assert len(ranks[0]) == len(ranks[1]) == 9  # 20 // 6 * 6 = 18 usable
    for step in range(3):
        assert ranks[0][3 * step : 3 * step + 3] == order[6 * step : 6 * step + 3].tolist()
        assert ranks[1][3 * step : 3 * step + 3] == order[6 * step + 3 : 6 * step + 6].tolist()
    assert list(ResumableShardedSampler(20, consumed=12, **kw)) == order[12:15].tolist()
    assert sorted(ranks[0] + ranks[1]) == sorted(order[:18].tolist())
    with pytest.raises(ValueError, match="multiple of 6"):
        ResumableShardedSampler(20, consumed=5, **kw)


def test_epochs_reshuffle_deterministically(dataset):
    a, b = loader(dataset), loader(dataset)
    epoch0, epoch1 = list(a), list(a)
    assert same(epoch0, list(b)) and same(epoch1, list(b))
    assert not same(epoch0, epoch1)
    assert len(a) == len(dataset) // 2 and a.consumed_samples == 2 * len(a) * 2


def test_resume_from_state_dict_continues_identically_across_an_epoch_boundary(dataset):
    reference = loader(dataset)
    uninterrupted = list(reference) + list(reference)
    first = loader(dataset)
    it = iter(first)
    k = len(first) - 2
    head = take(it, k)
    state = first.state_dict()
    resumed = loader(dataset)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON checkpoint
    tail = list(resumed) + list(resumed)
    assert same(head + tail[: len(uninterrupted) - k], uninterrupted)
    started = loader(dataset, start_index=state["consumed_samples"])
    assert same(across_epochs(started, 4), uninterrupted[k : k + 4])


def test_state_mismatch_and_bad_positions_are_refused(dataset):
    state = loader(dataset).state_dict()
    with pytest.raises(ValueError, match="seed"):
        build_dataloader(dataset, default_image_transform(16), batch_size=2, seed=6).load_state_dict(state)
    with pytest.raises(ValueError, match="global_batch_size"):
        loader(dataset, batch_size=1).load_state_dict(state)
    with pytest.raises(ValueError, match="multiple of the global batch 4"):
        loader(dataset, dp_size=2, start_index=3)
    with pytest.raises(ValueError, match="dp_rank"):
        loader(dataset, dp_rank=2, dp_size=2)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        loader(dataset, batch_size=len(dataset) + 1)


class IndexDataset(torch.utils.data.Dataset):
    def __len__(self):
        return 21

    def __getitem__(self, index):
        return {"index": index}


def collate_indices(samples):
    return {"index": torch.tensor([s["index"] for s in samples])}


def test_data_parallel_ranks_see_disjoint_samples_and_resume_per_rank():
    def run(rank, start=0):
        dl = VisualChatDataLoader(IndexDataset(), collate_indices, batch_size=2, dp_rank=rank, dp_size=3, seed=1,
                                  start_index=start)
        return [b["index"].tolist() for b in dl]

    ranks = [run(r) for r in range(3)]
    flat = [sorted(i for batch in r for i in batch) for r in ranks]
    assert all(len(f) == 6 for f in flat)  # 21 // 6 * 6 = 18 samples per epoch, 6 per rank
    assert len(set(flat[0] + flat[1] + flat[2])) == 18
    assert [run(r, start=6) for r in range(3)] == [r[1:] for r in ranks]


def test_workers_give_the_same_batches_and_report_skips(dataset):
    serial = loader(dataset)
    parallel = loader(dataset, num_workers=2)
    assert same(list(serial), list(parallel))
    assert parallel.skipped == serial.skipped and parallel.skipped.get("missing_image", 0) >= 1


def test_fixed_length_batches_for_pipeline_parallel(dataset):
    batch = next(iter(loader(dataset, pad_to=512)))
    assert batch["tokens"].shape == (2, 512) and batch["pixel_values"].shape[1:] == (3, 16, 16)
    assert batch["pixel_values"].shape[0] == batch["num_images"].sum() == (batch["modality"] == MODALITY_IMAGE).sum() // 4
    packed = next(iter(loader(dataset, batch_size=4, pad_to=512, pack=True)))
    assert packed["tokens"].shape[1] == 512 and packed["sample_id"].max() >= 1
    assert np.array_equal(packed["position_ids"][0, :3].numpy(), [0, 1, 2])


def test_a_bad_record_is_counted_once_however_many_epochs_meet_it(tmp_path, tok):
    syn = generate_synthetic_dataset(str(tmp_path), num_samples=3, seed=1, image_size=16)
    with open(syn.train_path, "a") as f:
        f.write(json.dumps({"rounds": [{"images": ["images/missing.png"], "question": "q", "answer": "a"}]}) + "\n")
    dataset = build_train_dataset([{"format": "jsonl", "path": syn.train_path}], tok, num_image_tokens=4,
                                  max_seq_len=512, seed=3)
    data_loader = loader(dataset)
    assert len(dataset) == 4 and len(data_loader) == 2  # every item, the bad one included, in each epoch
    for _ in range(2):
        list(data_loader)
    assert data_loader.skipped == {"missing_image": 1} and dataset.skipped == {"missing_image": 1}
