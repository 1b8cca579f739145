"""The data side of a training run from its command line: ``parse_args`` -> ``training/data_setup`` datasets."""

import json
from collections import Counter

import pytest

from megatron_visualchat.config import ConfigError
from megatron_visualchat.data import SampleError
from megatron_visualchat.training.arguments import parse_args
from megatron_visualchat.training.data_setup import build_datasets


def record(k):
    return {"rounds": [{"images": ["ok.png"], "question": f"Question {k}?", "answer": "red"}]}


@pytest.fixture
def blend(write_png, write_jsonl):
    """Two JSONL files of 5 and 3 records."""
    write_png("ok.png")
    return write_jsonl("a.jsonl", [record(k) for k in range(5)]), write_jsonl("b.jsonl", [record(k) for k in range(3)])


def datasets(tok, *argv):
    return build_datasets(parse_args(["--seq-length", "300", *argv]), tok, num_image_tokens=4)


def per_file(dataset) -> Counter:
    return Counter(dataset.plan.item(i)[0] for i in range(len(dataset)))


def test_weighted_blend_draws_train_iters_x_global_batch(blend, tok):
    a, b = blend
    train, evalset = datasets(tok, "--data", f"jsonl:{a}:3", "--data", f"jsonl:{b}:1", "--train-iters", "3",
                              "--global-batch-size", "8")
    assert len(train) == 24 and per_file(train) == {0: 18, 1: 6} and evalset is None
    assert train[0]["input_ids"].numel() > 0


def test_data_total_samples_sets_the_blend_size(blend, tok):
    a, b = blend
    for schedule in (["--train-iters", "3"], ["--train-epochs", "2"]):
        train, _ = datasets(tok, "--data", f"jsonl:{a}:0.5", "--data", f"jsonl:{b}:0.5", "--data-total-samples",
                            "10", *schedule)
        assert len(train) == 10 and per_file(train) == {0: 5, 1: 5}


@pytest.mark.parametrize("argv,message", [
    (["--data", "jsonl:A:1", "--train-epochs", "2"], "give --data-total-samples N"),
    (["--data", "jsonl:A:1", "--train-iters", "3", "--pack"], "with --pack: .* give --data-total-samples N"),
    (["--data", "jsonl:A", "--train-iters", "3", "--data-total-samples", "10"],
     "--data-total-samples only applies to weighted --data specs"),
    (["--data", "jsonl:A:1", "--train-iters", "3", "--data-total-samples", "0"], "--data-total-samples 0 must be >= 1"),
    (["--data", "jsonl:A:heavy", "--train-iters", "3"], "--data: dataset spec 'jsonl:.*:heavy': could not convert"),
])
def test_blend_flags_that_cannot_work_are_refused_naming_the_flag(blend, tok, argv, message):
    argv = [x.replace("A", blend[0]) if x.startswith("jsonl") else x for x in argv]
    with pytest.raises(ConfigError, match=message):
        datasets(tok, *argv)


def test_unweighted_files_are_used_whole(blend, tok):
    train, _ = datasets(tok, "--data", f"jsonl:{blend[0]}", "--data", f"jsonl:{blend[1]}", "--train-epochs", "1")
    assert per_file(train) == {0: 5, 1: 3}


def test_weighted_eval_blend_draws_what_one_evaluation_reads(blend, tok):
    a, b = blend
    _, evalset = datasets(tok, "--data", f"jsonl:{a}", "--eval-data", f"jsonl:{a}:1", "--eval-data", f"jsonl:{b}:1",
                          "--train-iters", "3", "--global-batch-size", "4", "--eval-interval", "1", "--eval-iters", "2")
    assert len(evalset) == 8 and per_file(evalset) == {0: 4, 1: 4}


def test_strict_data_stops_at_the_first_bad_record_naming_file_and_line(blend, tok, write_jsonl):
    bad = write_jsonl("bad.jsonl", [record(0), json.dumps({"rounds": "nope"})])
    argv = ["--data", f"jsonl:{bad}", "--train-iters", "1"]
    lenient, _ = datasets(tok, *argv)
    [lenient[i] for i in range(len(lenient))]
    assert lenient.skipped == {"malformed_conversation": 1}
    strict, _ = datasets(tok, *argv, "--strict-data")
    with pytest.raises(SampleError, match=r"bad.jsonl:line 2: malformed_conversation"):
        [strict[i] for i in range(len(strict))]
