"""Checkpoints: N steps straight == N/2 steps, stop, resume, N/2 more (loss by loss); atomic saves; resume at
another data-parallel size with the distributed optimizer (other layouts: tests/parallel/test_resume_layout.py);
refusal of a checkpoint from another config, of a converted base checkpoint, of a --load without a checkpoint, of a
changed LR schedule (unless overridden) and of a layout change for a checkpoint written before resharding; damaged
files named with the iterations to fall back to (--load-iteration); checkpoints without checksums."""

import json
import os
import shutil

import pytest
import torch

from megatron_visualchat.checkpoint import training_state
from megatron_visualchat.checkpoint.checksums import CHECKSUM_FILE
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


PACKED = ["--pack", "--seq-length", "320"]  # bins of 320 positions hold 1-3 synthetic samples


@pytest.mark.parametrize("tp,pp,extra", [(2, 1, []), (1, 2, []), (1, 2, FROZEN_LAST_STAGE), (1, 2, PACKED)],
                         ids=["tp2", "pp2", "pp2-frozen-last-stage", "pp2-packed"])
def test_stop_and_resume_reproduces_the_straight_run(cache, tmp_path, tp, pp, extra):
    layout = ["--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp), *extra]
    straight = run_parallel(_train, tp=tp, pp=pp, args=(_argv(cache, tmp_path / "a", *layout),))[0]
    first = run_parallel(_train, tp=tp, pp=pp, args=(_argv(cache, tmp_path / "b", "--exit-interval", "2", *layout),))[0]
    assert first["iteration"] == 2 and latest_iteration(str(tmp_path / "b")) == 2
    consumed = json.loads((iteration_dir(str(tmp_path / "b"), 2) / "meta.json").read_text())["consumed_samples"]
    assert (consumed > 2 * 8) == (extra is PACKED)  # packed: 2 steps of 8 bins hold more than 16 samples
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
    # Same samples per step, split over 2 ranks x 2 microbatches or 1 rank x 4: the gradients are summed in another
    # order, so the losses agree to float32 rounding (measured 2e-8 relative), not bit for bit.
    torch.testing.assert_close(torch.tensor(resumed["losses"], dtype=torch.float64),
                               torch.tensor(straight["losses"][2:], dtype=torch.float64), rtol=1e-6, atol=0)


def test_checkpoint_from_another_config_is_refused(cache, tmp_path):
    save = tmp_path / "f"
    run_parallel(_train, args=(_argv(cache, save, "--exit-interval", "2"),))
    with pytest.raises(RankFailed, match="was saved with another model or layout") as e:
        run_parallel(_train, args=(_argv(cache, save, "--projector", "mlp"),))
    refusal = str(e.value).splitlines()[-1]  # the differing field alone, not two whole configs
    assert 'model.vision.projector: saved "linear", this run "mlp". Resume with the saved' in refusal
    assert "hidden_size" not in refusal


def test_converted_base_checkpoint_is_not_resumed(tmp_path):
    """A converted LLM shares the tracker and iter_ directories, but it is --llm-load's input, not a resume point."""
    write_tracker(tmp_path, 0)
    iteration_dir(tmp_path, 0).mkdir()
    with pytest.raises(CheckpointError, match="meta.json not found: .* is not a training checkpoint"):
        training_state.load_checkpoint(tmp_path, [], None, None, distributed_optimizer=False, config_record={})


def test_load_without_a_checkpoint_is_refused(cache, tmp_path):
    """A mistyped --load used to start a fresh run without a word."""
    with pytest.raises(RankFailed, match=f"--load {tmp_path / 'typo'} holds no checkpoint"):
        run_parallel(_train, args=(_argv(cache, tmp_path / "g", "--load", str(tmp_path / "typo")),))


def _rank_state(save, iteration) -> dict:
    return torch.load(iteration_dir(save, iteration) / "mp_rank_00_000" / "trainable.pt", weights_only=True)


def test_changed_schedule_is_refused_unless_overridden(cache, tmp_path):
    save = tmp_path / "h"
    run_parallel(_train, args=(_argv(cache, save),))  # 4 iterations: the cosine schedule ends at lr 0
    longer = _argv(cache, save, "--train-iters", "6", "--lr", "1e-3", "--save-interval", "1")
    with pytest.raises(RankFailed, match=r"lr_decay_steps: saved 32, this run 48 \(--train-iters.*"
                                         "Pass --override-opt-param-scheduler"):
        run_parallel(_train, args=(longer,))
    resumed = run_parallel(_train, args=(longer + ["--override-opt-param-scheduler"],))[0]
    assert resumed["iteration"] == 6 and len(resumed["losses"]) == 2
    at4, at5, at6 = (_rank_state(save, i) for i in (4, 5, 6))
    assert at6["scheduler"]["max_lr"] == 1e-3 and at6["scheduler"]["lr_decay_steps"] == 48
    groups = at5["optimizer"]["common"]["param_groups"]  # lr of step 6, from the new --lr and --train-iters
    assert all(g["max_lr"] == 1e-3 and 0 < g["lr"] < 1e-3 for g in groups)
    moved = [n for n, w in at4["model"][0].items() if not torch.equal(w, at6["model"][0][n])]
    assert len(moved) > len(at4["model"][0]) // 2  # the extra steps trained (at lr 0 nothing would move)


@pytest.fixture(scope="module")
def saved(cache, tmp_path_factory):
    """Iterations 1 and 2 of a 2-step run (copy before damaging)."""
    save = tmp_path_factory.mktemp("saved") / "ckpt"
    run_parallel(_train, args=(_argv(cache, save, "--train-iters", "2", "--save-interval", "1"),))
    return save


def _load_only(root, iteration, record):
    """load_checkpoint up to the file checks (no model: it fails after them, on the missing scheduler)."""
    try:
        training_state.load_checkpoint(root, [], None, None, distributed_optimizer=False, config_record=record,
                                       iteration=iteration)
    except CheckpointError as e:
        return str(e)
    except AttributeError:
        return "files passed"


def test_damaged_files_are_named_with_the_iterations_left(saved, tmp_path):
    save = shutil.copytree(saved, tmp_path / "ckpt")
    record = json.loads((iteration_dir(saved, 2) / "meta.json").read_text())

    def load(iteration):
        return run_parallel(_load_only, args=(save, iteration, record))[0]

    rank_file = iteration_dir(save, 2) / "mp_rank_00_000" / "trainable.pt"
    data = rank_file.read_bytes()
    assert load(2) == "files passed"
    rank_file.write_bytes(data[: len(data) // 2])  # truncated
    assert load(2) == (f"{rank_file} is corrupt (checksum mismatch): resume from an earlier iteration with "
                       "--load-iteration N (available: 1)")
    rank_file.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])  # one flipped bit: torch.load takes it
    assert load(2).startswith(f"{rank_file} is corrupt (checksum mismatch)")
    meta = iteration_dir(save, 1) / "meta.json"
    meta.write_text(meta.read_text()[:-20])
    assert load(1) == (f"{meta} is corrupt (checksum mismatch): resume from an earlier iteration with "
                       "--load-iteration N (available: 2)")
    (iteration_dir(save, 2) / CHECKSUM_FILE).unlink()  # as written before checksums: read errors name the file
    rank_file.write_bytes(data[: len(data) // 2])
    assert load(2).startswith(f"{rank_file} is corrupt (cannot be read: RuntimeError: PytorchStreamReader failed")


def test_load_iteration_resumes_an_earlier_checkpoint(cache, saved, tmp_path):
    save = shutil.copytree(saved, tmp_path / "ckpt")
    (iteration_dir(save, 2) / "mp_rank_00_000" / "trainable.pt").write_bytes(b"truncated")
    with pytest.raises(RankFailed, match=r"--load-iteration 7: .* has no iter_0000007 \(available: 1, 2\)"):
        run_parallel(_train, args=(_argv(cache, save, "--load-iteration", "7"),))
    resumed = run_parallel(_train, args=(_argv(cache, save, "--train-iters", "2", "--load-iteration", "1"),))[0]
    assert resumed["iteration"] == 2 and len(resumed["losses"]) == 1
    assert latest_iteration(save) == 2 and _rank_state(save, 2)["iteration"] == 2  # the damaged one, rewritten


def test_checkpoint_without_checksums_still_loads(cache, saved, tmp_path):
    save = shutil.copytree(saved, tmp_path / "ckpt")
    for it in (1, 2):
        (iteration_dir(save, it) / CHECKSUM_FILE).unlink()
    resumed = run_parallel(_train, args=(_argv(cache, save, "--train-iters", "2", "--load-iteration", "1"),))[0]
    assert resumed["iteration"] == 2 and len(resumed["losses"]) == 1


def test_checkpoint_from_before_resharding_resumes_at_its_own_layout_only(cache, saved, tmp_path):
    """Written before rank files held their layer ranges and named optimizer state: same layout (any DP) only."""
    save = shutil.copytree(saved, tmp_path / "ckpt")
    directory = iteration_dir(save, 1)
    state = _rank_state(save, 1)
    for key in ("layers", "optimizer_named"):
        del state[key]
    torch.save(state, directory / "mp_rank_00_000" / "trainable.pt")
    meta = json.loads((directory / "meta.json").read_text())
    del meta["format"]
    (directory / "meta.json").write_text(json.dumps(meta))
    (directory / CHECKSUM_FILE).unlink()
    with pytest.raises(RankFailed, match="written before checkpoints could change layout.*tp: saved 1, this run 2. "
                                         "Resume with the saved --tensor-model-parallel-size"):
        run_parallel(_train, tp=2, args=(_argv(cache, save, "--load-iteration", "1", "--tensor-model-parallel-size",
                                                "2"),))
    resumed = run_parallel(_train, args=(_argv(cache, save, "--train-iters", "2", "--load-iteration", "1"),))[0]
    assert resumed["iteration"] == 2 and len(resumed["losses"]) == 1
