"""Checkpoints: N steps straight == N/2 steps, stop, resume, N/2 more (loss by loss); atomic saves; resume at
another data-parallel size with the distributed optimizer; refusal of a checkpoint from another config or of a
converted base checkpoint."""

import os

import pytest

from megatron_visualchat.checkpoint import training_state
from megatron_visualchat.checkpoint.errors import CheckpointError
from megatron_visualchat.checkpoint.layout import iteration_dir, latest_iteration, write_tracker
from megatron_visualchat.testing.distributed import RankFailed, run_parallel


def _train(argv):
    from megatron_visualchat.training.arguments import parse_args
    from megatron_visualchat.training.pretrain import train

    return train(parse_args(argv))


def _argv(cache, save, *extra):
    return ["--synthetic", "64", "--data-cache-dir", str(cache), "--micro-batch-size", "2",
            "--global-batch-size", "8", "--seq-length", "160", "--train-iters", "4", "--trainable", "all",
            "--modality-split", "qkvo", "--lr", "3e-3", "--save", str(save), "--no-progress-bar", "--log-interval",
            "100", *extra]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


FROZEN_LAST_STAGE = ["--modality-split", "none", "--trainable", "projector", "--use-distributed-optimizer"]


@pytest.mark.parametrize("tp,pp,extra", [(2, 1, []), (1, 2, []), (1, 2, FROZEN_LAST_STAGE)],
                         ids=["tp2", "pp2", "pp2-frozen-last-stage"])
def test_stop_and_resume_reproduces_the_straight_run(cache, tmp_path, tp, pp, extra):
    layout = ["--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp), *extra]
    straight = run_parallel(_train, tp=tp, pp=pp, args=(_argv(cache, tmp_path / "a", *layout),))[0]
    first = run_parallel(_train, tp=tp, pp=pp, args=(_argv(cache, tmp_path / "b", "--exit-interval", "2", *layout),))[0]
    assert first["iteration"] == 2 and latest_iteration(str(tmp_path / "b")) == 2
    second = run_parallel(_train, tp=tp, pp=pp, args=(_argv(cache, tmp_path / "b", *layout),))[0]
    assert len(straight["losses"]) == 4 and second["iteration"] == 4
    assert first["losses"] + second["losses"] == straight["losses"]


def test_crash_mid_save_leaves_previous_checkpoint_loadable(cache, tmp_path):
    save = tmp_path / "c"
    run_parallel(_train, args=(_argv(cache, save, "--exit-interval", "2"),))
    os.makedirs(save / ".tmp_iter_0000004" / "mp_rank_00_000")  # a save that died half-way
    (save / ".tmp_iter_0000004" / "mp_rank_00_000" / "trainable.pt").write_bytes(b"truncated")
    assert latest_iteration(str(save)) == 2
    resumed = run_parallel(_train, args=(_argv(cache, save),))[0]
    assert resumed["iteration"] == 4 and len(resumed["losses"]) == 2


def test_resume_at_another_data_parallel_size_with_distributed_optimizer(cache, tmp_path):
    save = tmp_path / "d"
    straight = run_parallel(_train, dp=2, args=(_argv(cache, tmp_path / "e", "--use-distributed-optimizer"),))[0]
    run_parallel(_train, dp=2, args=(_argv(cache, save, "--use-distributed-optimizer", "--exit-interval", "2"),))
    resumed = run_parallel(_train, dp=1, args=(_argv(cache, save, "--use-distributed-optimizer"),))[0]
    assert resumed["iteration"] == 4 and resumed["dp"] == 1
    # Same samples per step, split differently over microbatches: close, not bit-equal.
    for a, b in zip(resumed["losses"], straight["losses"][2:]):
        assert abs(a - b) < 2e-2 * abs(b)


def test_checkpoint_from_another_config_is_refused(cache, tmp_path):
    save = tmp_path / "f"
    run_parallel(_train, args=(_argv(cache, save, "--exit-interval", "2"),))
    with pytest.raises(RankFailed, match="was saved with model="):
        run_parallel(_train, args=(_argv(cache, save, "--projector", "mlp"),))


def test_converted_base_checkpoint_is_not_resumed(tmp_path):
    """A converted LLM shares the tracker and iter_ directories, but it is --llm-load's input, not a resume point."""
    write_tracker(tmp_path, 0)
    iteration_dir(tmp_path, 0).mkdir()
    with pytest.raises(CheckpointError, match="meta.json not found: .* is not a training checkpoint"):
        training_state.load_checkpoint(tmp_path, [], None, None, distributed_optimizer=False, config_record={})
