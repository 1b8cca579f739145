"""A tiny VisualChat learns the bundled multi-image task: held-out answer accuracy far above what the question
alone allows (predicting each question kind's most frequent answer gives ~35%). The signal has to travel vision
encoder -> projector -> MMCA -> answer-only loss."""

import pytest

from megatron_visualchat.testing.distributed import run_parallel

PRIOR_ONLY_ACCURACY = 0.35


def _train(argv):
    from megatron_visualchat.training.arguments import parse_args
    from megatron_visualchat.training.pretrain import train

    return train(parse_args(argv))


@pytest.mark.slow
def test_tiny_model_learns_multi_image_questions(tmp_path):
    argv = ["--synthetic", "2000", "--data-cache-dir", str(tmp_path), "--micro-batch-size", "16",
            "--global-batch-size", "32", "--seq-length", "256", "--train-iters", "400", "--lr", "1e-3",
            "--trainable", "projector,llm,embeddings,image_projections", "--eval-interval", "400",
            "--eval-iters", "2", "--no-progress-bar", "--log-interval", "1000"]
    result = run_parallel(_train, tp=2, args=(argv + ["--tensor-model-parallel-size", "2"],), timeout=900)[0]
    assert result["losses"][-1] < result["losses"][0] / 5
    assert result["eval_accuracy"][-1] > PRIOR_ONLY_ACCURACY + 0.2, result["eval_accuracy"]
