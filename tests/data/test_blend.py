from collections import Counter

import numpy as np
import pytest

from megatron_visualchat.data import DatasetSpec, build_blend_plan
from megatron_visualchat.data.blend import random_groups


def spec(**kw):
    return DatasetSpec(format="jsonl", path="unused", **kw)


def items(plan):
    return [(s, tuple(m.tolist())) for s, m in (plan.item(i) for i in range(len(plan)))]


def test_same_seed_same_plan_other_seed_differs():
    specs = [spec(concat=3), spec(num_samples=40, concat=2)]
    a, b = build_blend_plan(specs, [50, 30], seed=7), build_blend_plan(specs, [50, 30], seed=7)
    assert items(a) == items(b)
    assert items(a) != items(build_blend_plan(specs, [50, 30], seed=8))


def test_per_dataset_counts_subsample_and_upsample():
    plan = build_blend_plan([spec(num_samples=5), spec(num_samples=25), spec()], [10, 10, 3], seed=0)
    used = Counter()
    for s, members in items(plan):
        used[s] += len(members)
    assert used == {0: 5, 1: 25, 2: 3}
    drawn = Counter(m for s, members in items(plan) if s == 1 for m in members)
    assert sorted(drawn.values()) == [2] * 5 + [3] * 5  # two full passes + 5 distinct extra
    assert len({m for s, members in items(plan) if s == 0 for m in members}) == 5  # no repeats when subsampling


def test_weights_split_total_samples_exactly():
    plan = build_blend_plan([spec(weight=3), spec(weight=1)], [100, 100], seed=1, total_samples=10)
    assert Counter(s for s, _ in items(plan)) == {0: 8, 1: 2}  # 7.5 / 2.5: the tie goes to the first dataset
    assert len(plan) == 10
    with pytest.raises(ValueError, match="every dataset spec has a weight"):
        build_blend_plan([spec(weight=1), spec()], [5, 5], seed=0, total_samples=4)
    with pytest.raises(ValueError, match="total_samples"):
        build_blend_plan([spec(weight=1)], [5], seed=0)
    with pytest.raises(ValueError, match="only used with weights"):
        build_blend_plan([spec()], [5], seed=0, total_samples=3)


def test_random_groups_cover_each_index_once_with_sizes_1_to_k():
    groups = random_groups(np.arange(100), 3, np.random.default_rng(0))
    sizes = Counter(len(g) for g in groups)
    assert set(sizes) == {1, 2, 3}
    assert sorted(np.concatenate(groups).tolist()) == list(range(100))


def test_split_is_disjoint_and_keeps_item_ids():
    plan = build_blend_plan([spec(concat=2)], [40], seed=3)
    train, held = plan.split(0.25)
    assert len(train) + len(held) == len(plan) and len(held) == round(0.25 * len(plan))
    assert set(train.item_ids.tolist()).isdisjoint(held.item_ids.tolist())
    assert items(train) + items(held) == items(plan)
    with pytest.raises(ValueError, match="eval_fraction"):
        plan.split(1.0)


def test_spec_validation():
    with pytest.raises(ValueError, match="concat=0"):
        spec(concat=0)
    with pytest.raises(ValueError, match="num_samples='some'"):
        spec(num_samples="some")
    with pytest.raises(ValueError, match="'bogus'"):
        DatasetSpec.coerce({"format": "jsonl", "path": "x", "bogus": 1})
    with pytest.raises(ValueError, match="empty dataset"):
        build_blend_plan([spec(num_samples=3)], [0], seed=0)
