"""What a run leaves on disk: pruned checkpoints (keep-last-k, this run's only), TensorBoard events, the tokenizer
beside them."""

import os
import shutil

from megatron_visualchat.checkpoint.layout import iteration_dir, latest_iteration, write_tracker
from megatron_visualchat.testing.distributed import run_parallel


def _train(argv):
    from megatron_visualchat.training.arguments import parse_args
    from megatron_visualchat.training.pretrain import train

    return train(parse_args(argv))


def _argv(tmp_path, save, *extra):
    return ["--synthetic", "32", "--data-cache-dir", str(tmp_path / "data"), "--micro-batch-size", "2",
            "--global-batch-size", "4", "--seq-length", "160", "--train-iters", "3", "--no-progress-bar",
            "--save", str(save), *extra]


def test_keep_last_tensorboard_and_tokenizer(tmp_path):
    save, tb = tmp_path / "ckpt", tmp_path / "tb"
    argv = _argv(tmp_path, save, "--save-interval", "1", "--keep-last", "2", "--tensorboard-dir", str(tb),
                 "--eval-interval", "3", "--eval-iters", "1")
    result = run_parallel(_train, args=(argv,))[0]
    assert sorted(d for d in os.listdir(save) if d.startswith("iter_")) == ["iter_0000002", "iter_0000003"]
    assert latest_iteration(str(save)) == 3
    assert not [d for d in os.listdir(save) if d.startswith(".tmp")]
    assert os.path.isfile(save / "tokenizer" / "tokenizer.model")
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tb))
    assert len(result["eval_losses"]) == 1 and 0.0 <= result["eval_accuracy"][0] <= 1.0


def test_keep_last_never_prunes_another_runs_checkpoints_or_the_latest(tmp_path):
    """--save already holds a higher iteration of another run: keep-last used to keep that one and delete each new
    checkpoint right after writing it, while the tracker named it."""
    first, save = tmp_path / "first", tmp_path / "ckpt"
    run_parallel(_train, args=(_argv(tmp_path, first, "--exit-interval", "1"),))
    shutil.copytree(iteration_dir(first, 1), iteration_dir(save, 50))  # another run's, higher
    write_tracker(save, 50)
    run_parallel(_train, args=(_argv(tmp_path, save, "--load", str(first), "--save-interval", "1",
                                     "--keep-last", "1"),))
    assert sorted(d for d in os.listdir(save) if d.startswith("iter_")) == ["iter_0000003", "iter_0000050"]
    assert latest_iteration(save) == 3
