"""Greedy / temperature / top-p choices, vocabulary padding and banned tokens, parameter checks."""

import pytest
import torch

from megatron_visualchat.inference.sampling import SamplingParams, restrict_vocabulary, sample_tokens


def test_greedy_takes_the_argmax():
    logits = torch.tensor([[0.1, 3.0, 2.9], [5.0, -1.0, 0.0]])
    assert sample_tokens(logits, SamplingParams()).tolist() == [1, 0]


def test_sampling_is_seeded_and_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(2000, 4)
    params = SamplingParams(temperature=1.0, top_p=0.75)
    a, b = (sample_tokens(logits, params, torch.Generator().manual_seed(1)) for _ in range(2))
    assert torch.equal(a, b)
    counts = torch.bincount(a, minlength=4)
    assert counts[2] == 0 and counts[3] == 0  # 0.5 + 0.3 >= 0.75: tokens 2 and 3 are outside the nucleus
    assert abs(counts[0] / 2000 - 0.5 / 0.8) < 0.05
    tiny_p = sample_tokens(logits, SamplingParams(temperature=1.0, top_p=1e-6), torch.Generator().manual_seed(2))
    assert (tiny_p == 0).all()  # the top token always survives
    hot = sample_tokens(logits, SamplingParams(temperature=100.0), torch.Generator().manual_seed(3))
    assert (torch.bincount(hot, minlength=4) > 300).all()  # high temperature flattens the distribution


def test_vocabulary_padding_and_banned_tokens_are_never_chosen():
    logits = torch.tensor([[1.0, 2.0, 9.0, 50.0]])  # column 3 is Megatron's vocab padding
    restricted = restrict_vocabulary(logits, 3, banned_ids=(2,))
    assert restricted.shape == (1, 3) and sample_tokens(restricted, SamplingParams()).item() == 1
    with pytest.raises(ValueError, match="fewer than the vocabulary"):
        restrict_vocabulary(logits, 5)


@pytest.mark.parametrize("kwargs,match", [({"max_new_tokens": 0}, "max_new_tokens"),
                                          ({"temperature": -1}, "temperature"),
                                          ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p")])
def test_bad_parameters_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)
