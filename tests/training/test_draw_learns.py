"""A tiny model learns to draw what it is asked: "Draw a red circle." -> "Here is a red circle: <boi> 16 codes <eoi>",
and the dominant colour of the drawn picture is the requested one far more often than a model that ignores the
request could manage (always drawing the most requested colour). The path is the real one: the tiny VQ-VAE trained
on the synthetic shapes, ``pretrain_vchat.py``'s trainer with ``--image-tokenizer`` on the ``jsonl_images_out``
records of ``data/synthetic_drawing.py``, a chat checkpoint holding the image tokenizer, ``eval-replay`` drawing
PNGs, scored by ``synthetic_drawing.report`` (the colour measure ``train-image-tokenizer`` reports). The trained
checkpoint then goes through ``chat-to-megatron`` (TP=2) and ``megatron-to-hf``, tensor for tensor.

The smallest setting that still learns, for a 2-core machine (examples/draw_demo.sh is the full demo, with a text
model and JAM fusion): 16 px images, codebook 32, 1000 VQ-VAE steps (600 keep the colour of only ~70% of single
shapes); 400 requests with one picture per colour and shape (``placement="fixed"``), 150 steps of 16 at lr 1e-2; 24
held-out requests drawn greedily. Measured here: 88% of the drawings in the requested colour against 33% for the
baseline (seed 1; seeds 2 / 3: 100% / 92% against 33% / 29%); the training process used 52 CPU seconds, the test
~61 in all. With random placement, or 600 VQ-VAE steps, or lr 5e-3, 150 steps stay near the baseline (13-54%); 200
steps at lr 1e-2 reach 88%, 250 at 5e-3 100%."""

import os
from pathlib import Path

import torch

from megatron_visualchat.testing.distributed import run_parallel

MARGIN = 0.3


def _train_draw_and_score(tmp, seed, samples, vq_steps, iters, num_eval, lr="5e-3", placement="fixed"):
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
    argv = ["--tokenizer-dir", os.path.join(tmp, "tok"), "--image-tokenizer", f"tiny_vqvae:{tmp}/vq",
            "--data", f"jsonl_images_out:{data.draw_path}", "--data-cache-dir", os.path.join(tmp, "cache"),
            "--attention-mode", "causal", "--trainable", "llm,embeddings", "--micro-batch-size", "16",
            "--global-batch-size", "16", "--seq-length", "96", "--train-iters", str(iters), "--lr", lr,
            "--seed", str(seed), "--export-dir", os.path.join(tmp, "chat"), "--no-progress-bar",
            "--log-interval", "1000"]
    losses = train(parse_args(argv))["losses"]
    out = os.path.join(tmp, "eval")
    with open(os.devnull, "w") as quiet:  # the image tokenizer comes from the chat checkpoint
        assert eval_main(["--load", os.path.join(tmp, "chat"), "--data", data.eval_replay_path, "--out-dir", out,
                          "--max-new-tokens", "32"], stdout=quiet) == 0
    return losses, report(Path(tmp) / "data", Path(out) / "results.jsonl")


def _chat_llm_round_trips(chat: Path, tmp: Path) -> None:
    """chat-to-megatron at TP=2, back with megatron-to-hf: every LLM tensor as the chat file holds it, and the
    tokenizer with its image vocabulary."""
    from megatron_visualchat.checkpoint.chat import WEIGHTS_FILE, read_chat_config
    from megatron_visualchat.checkpoint.chat_to_megatron import chat_to_megatron
    from megatron_visualchat.checkpoint.convert import megatron_to_hf
    from megatron_visualchat.checkpoint.hf_llama import hf_tensors, stage_state_keys
    from megatron_visualchat.checkpoint.weight_files import HFWeights
    from megatron_visualchat.config import ParallelConfig
    from megatron_visualchat.data import VisualChatTokenizer

    chat_to_megatron(chat, tmp / "mg", tp=2)
    assert VisualChatTokenizer.load(str(tmp / "mg" / "chat_tokenizer")).image_codebook_size == 32
    back = HFWeights(megatron_to_hf(tmp / "mg", tmp / "hf"))
    llm, held = read_chat_config(chat).llm, HFWeights(chat / WEIGHTS_FILE)
    expected = {}
    for _, tmap in stage_state_keys(llm, ParallelConfig(), 0):
        if tmap is not None and tmap.export:
            expected.update(hf_tensors(tmap, [held["language_model." + tmap.megatron]], llm))
    assert sorted(back) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(back[name], tensor), name


def test_tiny_model_draws_the_requested_colour(tmp_path):
    losses, r = run_parallel(_train_draw_and_score, args=(str(tmp_path), 1, 400, 1000, 150, 24, "1e-2"),
                             timeout=400)[0]
    assert losses[-1] < losses[0] / 10, losses
    assert r["drawings"] == 24, r
    assert r["accuracy"] >= r["baseline"] + MARGIN, r
    _chat_llm_round_trips(tmp_path / "chat", tmp_path)
