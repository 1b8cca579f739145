"""Activation recompute changes memory, not numbers; bf16 training runs through Float16Module + fp32 main params."""

import pytest

from megatron_visualchat.testing.distributed import run_parallel


def _train(argv):
    from megatron_visualchat.training.arguments import parse_args
    from megatron_visualchat.training.pretrain import train

    return train(parse_args(argv))


def _argv(cache, *extra):
    return ["--synthetic", "32", "--data-cache-dir", str(cache), "--micro-batch-size", "2", "--global-batch-size",
            "4", "--seq-length", "160", "--train-iters", "2", "--trainable", "all", "--modality-split", "qkvo",
            "--no-progress-bar", "--tensor-model-parallel-size", "2", *extra]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


@pytest.mark.parametrize("recompute", [
    ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"],
    ["--recompute-granularity", "selective"],
], ids=["full", "selective"])
def test_recompute_gives_the_same_losses(cache, recompute):
    plain = run_parallel(_train, tp=2, args=(_argv(cache),))[0]["losses"]
    again = run_parallel(_train, tp=2, args=(_argv(cache, *recompute),))[0]["losses"]
    assert again == pytest.approx(plain, rel=1e-6)


def test_bf16_training_tracks_fp32(cache):
    fp32 = run_parallel(_train, tp=2, args=(_argv(cache),))[0]["losses"]
    bf16 = run_parallel(_train, tp=2, args=(_argv(cache, "--bf16"),))[0]["losses"]
    assert bf16 == pytest.approx(fp32, rel=2e-2)
