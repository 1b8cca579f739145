"""A tiny model learns to draw what it is asked: "Draw a red circle." -> "Here is a red circle: <boi> 16 codes <eoi>",
and the dominant colour of the drawn picture is the requested one far more often than a model that ignores the
request could manage (always drawing the most requested colour). The whole path is the real one: the tiny VQ-VAE
trained on the synthetic shapes, ``pretrain_vchat.py``'s trainer with ``--image-tokenizer`` on the
``jsonl_images_out`` records of ``data/synthetic_drawing.py``, a chat checkpoint, ``eval-replay`` drawing PNGs,
scored by ``synthetic_drawing.report`` (the colour measure ``train-image-tokenizer`` reports).

The smallest setting that still learns, for a 2-core machine (examples/draw_demo.sh is the full demo, with a text
model and JAM fusion): 16 px images, codebook 32, 600 VQ-VAE steps; 150 steps of 16 on 400 requests; 24 held-out
requests drawn greedily. Measured here: see MEASURED."""

import os
from pathlib import Path

from megatron_visualchat.testing.distributed import run_parallel

MARGIN = 0.3
MEASURED = ""


def _train_draw_and_score(tmp, seed, samples, vq_steps, iters, num_eval, lr="5e-3", batch="16", placement="fixed"):
    from megatron_visualchat.data import train_tiny_sentencepiece
    from megatron_visualchat.data.synthetic_drawing import drawing_corpus_lines, generate_drawing_dataset, report
    from megatron_visualchat.inference.cli import eval_main
    from megatron_visualchat.model.image_tokenizer.tiny_vqvae import TinyVQVAEConfig, TinyVQVAETokenizer
    from megatron_visualchat.model.image_tokenizer.train import train_tiny_vqvae
    from megatron_visualchat.training.arguments import parse_args
    from megatron_visualchat.training.pretrain import train

    data = generate_drawing_dataset(os.path.join(tmp, "data"), samples, seed=seed, num_text=0, num_eval=num_eval,
                                    placement=placement)
    train_tiny_sentencepiece(os.path.join(tmp, "tok"), drawing_corpus_lines(200, seed), 512)
    vq, _ = train_tiny_vqvae(TinyVQVAEConfig(image_size=16, codebook_size=32), vq_steps, pool_size=1024, seed=seed)
    TinyVQVAETokenizer.save(vq, os.path.join(tmp, "vq"))
    image_tokenizer = f"tiny_vqvae:{os.path.join(tmp, 'vq')}"
    argv = ["--tokenizer-dir", os.path.join(tmp, "tok"), "--image-tokenizer", image_tokenizer,
            "--data", f"jsonl_images_out:{data.draw_path}", "--data-cache-dir", os.path.join(tmp, "cache"),
            "--attention-mode", "causal", "--trainable", "llm,embeddings", "--micro-batch-size", batch,
            "--global-batch-size", batch, "--seq-length", "96", "--train-iters", str(iters), "--lr", lr,
            "--seed", str(seed), "--export-dir", os.path.join(tmp, "chat"), "--no-progress-bar",
            "--log-interval", "1000"]
    losses = train(parse_args(argv))["losses"]
    out = os.path.join(tmp, "eval")
    with open(os.devnull, "w") as quiet:
        assert eval_main(["--load", os.path.join(tmp, "chat"), "--image-tokenizer", image_tokenizer, "--data",
                          data.eval_replay_path, "--out-dir", out, "--max-new-tokens", "32"], stdout=quiet) == 0
    return losses, report(Path(tmp) / "data", Path(out) / "results.jsonl")


def test_tiny_model_draws_the_requested_colour(tmp_path):
    losses, r = run_parallel(_train_draw_and_score, args=(str(tmp_path), 1, 400, 600, 150, 24), timeout=400)[0]
    assert losses[-1] < losses[0] / 4, losses
    assert r["drawings"] == 24 and "none" not in r["drawn_colours"], r
    assert r["accuracy"] >= r["baseline"] + MARGIN, r
