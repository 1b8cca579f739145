"""Training with images as tokens (docs/image_generation.md): the trainer reads ``jsonl_images_out`` answers
through the image tokenizer's code cache (an input image through the vision encoder and an output image as codes in
one sample), CM3 per dataset, per-modality loss weights in the loss (a weighted mean), the image-vocabulary rows
under ``new_token_rows_only``, and the tokenizer/image-tokenizer agreement."""

import dataclasses
import json
import os
import random

import pytest
import torch

from megatron_visualchat.config import LLM_PRESETS, AttentionConfig, ConfigError, TrainableConfig, VisionConfig
from megatron_visualchat.config import VisualChatConfig
from megatron_visualchat.data.encode import IGNORE_INDEX
from megatron_visualchat.data.synthetic import ShapeImage, synthetic_corpus_lines
from megatron_visualchat.data.tokenizer import VisualChatTokenizer, train_tiny_sentencepiece
from megatron_visualchat.model.image_tokenizer import ImageCodeVocab
from megatron_visualchat.model.image_tokenizer.tiny_vqvae import TinyVQVAE, TinyVQVAEConfig, TinyVQVAETokenizer
from megatron_visualchat.model.token_codes import MODALITY_TEXT, codes_from_layout, pack_token_codes
from megatron_visualchat.testing.distributed import run_parallel
from megatron_visualchat.testing.equivalence import (
    current_parallel, full_state_off_start, merge_rank_results, run_step_on_shard,
)
from megatron_visualchat.training.step import modality_weighted_forward_step, visualchat_forward_step

K = 16  # codebook; a 16 px image is 4 x 4 = 16 codes
SHAPES = [("red", "square"), ("blue", "circle"), ("green", "triangle"), ("red", "circle")]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A text tokenizer, a random tiny VQ-VAE and an ImageOutputJsonl set: 'Draw a <colour> <shape>.' -> codes, and
    'Draw IMAGE#1 again.' with that image shown through the encoder and written as codes."""
    root = tmp_path_factory.mktemp("image_codes")
    train_tiny_sentencepiece(str(root / "tok"), synthetic_corpus_lines(100) + ["Draw it again. Here it is."], 400)
    torch.manual_seed(0)
    TinyVQVAETokenizer.save(TinyVQVAE(TinyVQVAEConfig(image_size=16, codebook_size=K, embed_dim=4, channels=4)),
                            str(root / "vq"))
    records = []
    for i, (colour, shape) in enumerate(SHAPES):
        ShapeImage(colour, shape, 1, "left").render(16, random.Random(i)).save(root / f"out{i}.png")
        records.append({"id": f"d{i}", "rounds": [{"question": f"Draw a {colour} {shape}.", "answer": "Here it is: "
                                                   "OUTPUT#1", "output_images": [f"out{i}.png"]}]})
        records.append({"id": f"c{i}", "rounds": [{"images": [f"out{i}.png"], "question": "Draw IMAGE#1 again.",
                                                   "answer": "OUTPUT#1", "output_images": [f"out{i}.png"]}]})
    (root / "gen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    text = [{"id": f"t{i}", "rounds": [{"question": f"What is {c}?", "answer": f"a {s}"}]}
            for i, (c, s) in enumerate(SHAPES)]
    (root / "text.jsonl").write_text("".join(json.dumps(r) + "\n" for r in text))
    return root


def _argv(root, *extra):
    return ["--data", f"jsonl_images_out:{root / 'gen.jsonl'}", "--tokenizer-dir", str(root / "tok"),
            "--image-tokenizer", f"tiny_vqvae:{root / 'vq'}", "--image-code-cache-dir", str(root / "cache"),
            "--data-cache-dir", str(root / "data"), "--seq-length", "160", "--micro-batch-size", "8",
            "--global-batch-size", "8", "--no-progress-bar", "--log-interval", "1000", *extra]


def _train(argv):
    from megatron_visualchat.training.arguments import parse_args
    from megatron_visualchat.training.pretrain import train

    return train(parse_args(argv))


def test_trainer_learns_to_write_image_codes(files):
    """The tiny trainer on 8 samples, only the projector and the new tokens' rows trainable (input embeddings and
    output layer): the loss falls (measured 6.01 -> 1.42 in 12 steps); one cached code file per output image."""
    argv = _argv(files, "--train-iters", "12", "--lr", "2e-2", "--trainable", "projector,new_token_rows_only",
                 "--image-code-loss-weight", "2")
    losses = run_parallel(_train, args=(argv,), timeout=300)[0]["losses"]
    assert losses[-1] < 0.4 * losses[0], losses
    assert len(os.listdir(files / "cache")) == len(SHAPES)


def test_datasets_cache_codes_once_and_cm3_applies_per_dataset(files):
    """Two passes over a blend of the image set (cm3) and a text set (next_token): codes computed once per image;
    cm3 samples carry sentinels and keep the input image placeholder; text samples are unchanged."""
    from megatron_visualchat.training.arguments import parse_args
    from megatron_visualchat.training.data_setup import build_datasets, image_code_cache, load_tokenizer

    cache_dir = files / "cache_cm3"
    argv = _argv(files, "--train-iters", "1", "--image-code-cache-dir", str(cache_dir))
    argv[1] += ":objective=cm3"
    run = parse_args(argv + ["--data", f"jsonl:{files / 'text.jsonl'}"])
    tokenizer = load_tokenizer(run)
    vocab = tokenizer.image_vocab
    plain = parse_args(_argv(files, "--train-iters", "1", "--image-code-cache-dir", str(cache_dir))
                       + ["--data", f"jsonl:{files / 'text.jsonl'}"])
    train, _ = build_datasets(run, tokenizer, num_image_tokens=17)
    reference, _ = build_datasets(plain, tokenizer, num_image_tokens=17)
    cache = train.encoder.tokenizer.cache
    for _ in range(2):
        samples = [train[i] for i in range(len(train))]
    assert (cache.misses, cache.hits) == (len(SHAPES), 2 * 2 * len(SHAPES) - len(SHAPES))
    assert image_code_cache(run).directory == str(cache_dir)
    sentinels = set(vocab.sentinel_ids)
    for sample, ref in zip(samples, (reference[i] for i in range(len(reference)))):
        ids, ref_ids = sample["input_ids"].tolist(), ref["input_ids"].tolist()
        if train.plan.item(sample["index"])[0] == 1:  # the text set: next_token, untouched
            assert ids == ref_ids and torch.equal(sample["labels"], ref["labels"])
            continue
        used = [t for t in ids if t in sentinels]
        assert used and len(ids) == len(ref_ids) + len(used)  # each span: a sentinel in place + one at the end
        assert sorted(ids) == sorted(ref_ids + used)  # every token kept
        assert [ids[p] for p in sample["image_positions"]] == [tokenizer.image_id] * len(ref["image_positions"])
        assert sum(vocab.is_code(t) for t in ids) == K


def test_cm3_keeps_room_for_its_sentinels(files):
    """A cm3 dataset is encoded under --seq-length minus 8 (4 spans x 2 tokens): what fits plain may be skipped as
    too_long under cm3, named so in the skip log."""
    from megatron_visualchat.training.arguments import parse_args
    from megatron_visualchat.training.data_setup import build_datasets, load_tokenizer

    plain_run = parse_args(_argv(files, "--train-iters", "1"))
    tokenizer = load_tokenizer(plain_run)
    plain, _ = build_datasets(plain_run, tokenizer, num_image_tokens=17)
    longest = max(len(plain.build_item(i)["input_ids"]) + 16 * len(plain.build_item(i)["images"])
                  for i in range(len(plain)))
    argv = _argv(files, "--train-iters", "1", "--seq-length", str(longest + 4), "--strict-data")
    argv[1] += ":objective=cm3"
    cm3, _ = build_datasets(parse_args(argv), tokenizer, num_image_tokens=17)
    with pytest.raises(Exception, match=r"too_long: .*8 positions of \d+ kept free for objective 'cm3'"):
        [cm3[i] for i in range(len(cm3))]


def test_tokenizer_and_image_tokenizer_must_agree(files, tmp_path):
    from megatron_visualchat.training.arguments import parse_args
    from megatron_visualchat.training.data_setup import load_tokenizer

    base = VisualChatTokenizer.load(str(files / "tok"))
    grown = load_tokenizer(parse_args(_argv(files, "--train-iters", "1")))
    assert grown.image_vocab == ImageCodeVocab(base.vocab_size, K) and grown.sha256 == base.sha256
    base.with_image_vocab(K).save(str(tmp_path / "same"))
    assert load_tokenizer(parse_args(_argv(files, "--train-iters", "1", "--tokenizer-dir", str(tmp_path / "same")))
                          ).image_vocab == grown.image_vocab
    base.with_image_vocab(K + 1).save(str(tmp_path / "other"))
    with pytest.raises(ConfigError, match=f"{K + 1} codes but image tokenizer 'tiny_vqvae' has a codebook of {K}"):
        load_tokenizer(parse_args(_argv(files, "--train-iters", "1", "--tokenizer-dir", str(tmp_path / "other"))))
    text_only = ["--data", f"jsonl:{files / 'text.jsonl'}", "--train-iters", "1", "--data-cache-dir", str(tmp_path)]
    with pytest.raises(ConfigError, match="image vocabulary of 17 codes: give the image tokenizer"):
        load_tokenizer(parse_args(text_only + ["--tokenizer-dir", str(tmp_path / "other")]))
    with pytest.raises(ConfigError, match="--image-code-loss-weight: used only with images as tokens"):
        parse_args(text_only + ["--tokenizer-dir", str(files / "tok"), "--image-code-loss-weight", "2"])


def test_image_code_data_needs_an_image_tokenizer_and_spec_options_are_checked(files):
    from megatron_visualchat.data.blend import parse_spec_text
    from megatron_visualchat.training.arguments import parse_args
    from megatron_visualchat.training.data_setup import build_datasets, load_tokenizer

    for spec, problem in ((f"jsonl_images_out:{files / 'gen.jsonl'}", "its answers write images as codes"),
                          (f"jsonl:{files / 'text.jsonl'}:objective=cm3", "objective 'cm3' needs the image vocab")):
        run = parse_args(["--data", spec, "--tokenizer-dir", str(files / "tok"), "--train-iters", "1"])
        with pytest.raises(ValueError, match=f"{problem}.*--image-tokenizer NAME:DIR"):
            build_datasets(run, load_tokenizer(run), num_image_tokens=17)
    assert parse_spec_text("jsonl:a.jsonl:2::3:objective=cm3") == [
        {"format": "jsonl", "path": "a.jsonl", "weight": 2.0, "concat": 3, "objective": "cm3"}]
    for text, problem in (("jsonl:a:objective=cm3:2", "must come after the positional"),
                          ("jsonl:a:colour=red", "unknown key 'colour'"),
                          ("jsonl:a:2:weight=3", "weight is given twice")):
        with pytest.raises(ValueError, match=problem):
            parse_spec_text(text)
    with pytest.raises(ConfigError, match="objective='infill' is not one of"):
        build_datasets(parse_args(["--data", f"jsonl:{files / 'text.jsonl'}:objective=infill", "--tokenizer-dir",
                                   str(files / "tok"), "--train-iters", "1"]), None, num_image_tokens=17)


# --- the loss weights through megatron-core's schedule, TP=1 and TP=2 ---------------------------------------------

VOCAB = ImageCodeVocab(base_id=250, codebook_size=K)  # 272 ids: no padding at TP=1 or 2 (one full state dict)
LLM = dataclasses.replace(LLM_PRESETS["tiny"], vocab_size=VOCAB.base_id + VOCAB.num_tokens)
T = 17  # tiny encoder: CLS + 4x4 patches
ROWS = ["tt" + "0" * T + "t" * 16, "t" * 8 + "0" * T + "t" * 6 + "pppp"]
SEQ = len(ROWS[0])
TRAINABLE = TrainableConfig(projector=True, image_projections=False, new_token_rows_only=True)
NEW_ROWS = tuple(range(VOCAB.base_id - 2, LLM.vocab_size))  # <image>, <pad> and the image vocabulary


def _batch(mask_codes=None):
    """One microbatch whose labels are half text ids, half image codes; ``mask_codes``: keep only code (True) or
    only text (False) targets in the loss mask."""
    g = torch.Generator().manual_seed(3)
    modality, image_id, sample_id = (torch.stack(c) for c in zip(*(codes_from_layout(r) for r in ROWS)))
    text = torch.randint(0, VOCAB.base_id - 2, (2, SEQ), generator=g)
    codes = torch.randint(VOCAB.first_code_id, VOCAB.first_code_id + K, (2, SEQ), generator=g)
    labels = torch.where(torch.rand(2, SEQ, generator=g) < 0.5, text, codes)
    loss_mask = (modality == MODALITY_TEXT).float()
    labels = labels.masked_fill(loss_mask == 0, IGNORE_INDEX)
    if mask_codes is not None:
        is_code = (labels >= VOCAB.first_code_id) & (labels < VOCAB.first_code_id + K)
        loss_mask = loss_mask * (is_code == mask_codes)
    return dict(tokens=torch.randint(0, LLM.vocab_size, (2, SEQ), generator=g), labels=labels.clamp(min=0),
                loss_mask=loss_mask, position_ids=torch.arange(SEQ).expand(2, SEQ),
                attention_mask=pack_token_codes(modality, image_id, sample_id),
                pixel_values=torch.randn(2, 3, 32, 32, generator=g), num_images=torch.tensor([1, 1]))


def _build(vp_stage=None):
    from megatron_visualchat.model.visualchat import VisualChatModel, apply_trainable_policy

    cfg = VisualChatConfig(llm=LLM, attention=AttentionConfig(mode="mmca"), parallel=current_parallel(),
                           vision=VisionConfig(encoder="tiny", projector="linear"), trainable=TRAINABLE)
    model = VisualChatModel(cfg, vp_stage=vp_stage)
    apply_trainable_policy(model, TRAINABLE, new_token_rows=NEW_ROWS, new_output_rows=VOCAB.token_ids)
    return model


def _full():
    torch.manual_seed(5)
    return full_state_off_start(_build())


# case -> (loss mask: None all, True codes only, False text only; (text weight, code weight) or None: plain loss)
CASES = {"plain": (None, None), "codes": (True, None), "text": (False, None), "w11": (None, (1.0, 1.0)),
         "w22": (None, (2.0, 2.0)), "w01": (None, (0.0, 1.0)), "mixed": (None, (0.3, 2.0))}


def _steps(full, names):
    """This rank's ``run_step_on_shard`` result for each case in ``names``."""
    out = []
    for name in names:
        mask, weights = CASES[name]
        step = visualchat_forward_step if weights is None else modality_weighted_forward_step(VOCAB, *weights)
        out.append(run_step_on_shard(_build, full, LLM, [_batch(mask)], seq_length=SEQ, micro_batch_size=2,
                                     forward_step=step))
    return out


@pytest.fixture(scope="module")
def weight_results():
    """{tp: {case: (loss, full grads)}}: every case at TP=1, the plain and mixed-weight ones at TP=2."""
    full = run_parallel(_full)[0]
    results = {}
    for tp, names in ((1, list(CASES)), (2, ["plain", "mixed"])):
        ranks = run_parallel(_steps, tp=tp, args=(full, names))
        results[tp] = {name: merge_rank_results([r[i] for r in ranks], tp) for i, name in enumerate(names)}
    return results


def test_loss_weights_change_only_what_they_should(weight_results):
    r = weight_results[1]
    (plain, g_plain), (codes, g_codes), (text, g_text), (mixed, g_mixed) = (r[k] for k in ("plain", "codes", "text",
                                                                                          "mixed"))
    w11, w22, w01 = r["w11"], r["w22"], r["w01"]
    for loss, grads in (w11, w22):  # (1, 1) is the plain mean bit for bit; so is (2, 2) (scale-free)
        assert loss == plain and grads.keys() == g_plain.keys()
        assert all(torch.equal(grads[k], g) for k, g in g_plain.items())
    assert w01[0] == codes and all(torch.equal(w01[1][k], g) for k, g in g_codes.items())
    # mixed weights: the weighted mean of the text-only and code-only means (counts from the batch)
    batch = _batch()
    n_code = float((_batch(True)["loss_mask"]).sum())
    n_text = float(batch["loss_mask"].sum()) - n_code
    a, b = 0.3 * n_text, 2.0 * n_code
    assert mixed == pytest.approx((a * text + b * codes) / (a + b), rel=1e-6)
    for k, g in g_plain.items():
        torch.testing.assert_close(g_mixed[k], (a * g_text[k] + b * g_codes[k]) / (a + b), rtol=1e-5, atol=1e-7)
    # new_token_rows_only: the embedding trains only the new rows, the output layer only the image vocabulary's
    emb, out = g_plain["language_model.embedding.word_embeddings.weight"], g_plain["language_model.output_layer.weight"]
    rows = lambda g: set(torch.nonzero(g.abs().sum(1)).flatten().tolist())  # noqa: E731
    assert rows(emb) and rows(emb) <= set(NEW_ROWS)
    assert rows(out) == set(VOCAB.token_ids)


def test_loss_weights_tp2_matches_tp1(weight_results):
    for name, (loss2, grads2) in weight_results[2].items():
        loss1, grads1 = weight_results[1][name]
        assert abs(loss2 - loss1) < 1e-5 * max(1.0, abs(loss1))
        assert grads2.keys() == grads1.keys()
        for name, g in grads1.items():
            torch.testing.assert_close(grads2[name], g, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
