"""Tokenizer, datasets and data-parallel loaders for a training run, from its ``TrainingConfig``."""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_visualchat.config import ConfigError, VisualChatConfig
from megatron_visualchat.data.blend import DatasetSpec, parse_spec_text
from megatron_visualchat.data.dataset import build_train_dataset
from megatron_visualchat.data.image_codes import ImageCodeCache, with_image_vocab_of
from megatron_visualchat.data.loader import build_dataloader
from megatron_visualchat.data.synthetic import generate_synthetic_dataset, synthetic_corpus_lines
from megatron_visualchat.data.tokenizer import VisualChatTokenizer, train_tiny_sentencepiece
from megatron_visualchat.model.cross_attention import positions_per_image
from megatron_visualchat.model.image_tokenizer import load_image_tokenizer, parse_image_tokenizer_spec
from megatron_visualchat.model.vision import EncoderOptions, build_projector, get_encoder_spec
from megatron_visualchat.training.run_config import TrainingConfig


def _on_rank0_then_all(make, path: str):
    """Rank 0 creates ``path`` if missing (generation, tokenizer training); every rank waits for it."""
    if dist.get_rank() == 0 and not os.path.exists(path):
        make()
    dist.barrier()


def synthetic_paths(run: TrainingConfig) -> dict:
    data = run.data
    root = os.path.join(data.data_cache_dir, f"synthetic-{data.synthetic}-seed{run.batch.seed}")
    return {"root": root, "train": os.path.join(root, "train.jsonl"), "eval": os.path.join(root, "eval.jsonl"),
            "images": os.path.join(root, "images"), "tokenizer": os.path.join(root, "tokenizer")}


@functools.lru_cache(maxsize=4)
def _load_image_tokenizer(spec: str):
    name, directory = parse_image_tokenizer_spec(spec)
    try:
        return load_image_tokenizer(name, directory)
    except ValueError as e:
        raise ConfigError(f"--image-tokenizer {spec}: {e}") from None


def image_tokenizer(run: TrainingConfig):
    """The run's ``--image-tokenizer`` (loaded once per process), or None."""
    return None if run.data.image_tokenizer is None else _load_image_tokenizer(run.data.image_tokenizer)


def image_code_cache(run: TrainingConfig) -> Optional[ImageCodeCache]:
    """Where output images' codes are kept (``--image-code-cache-dir``, default under ``--data-cache-dir``)."""
    tok = image_tokenizer(run)
    if tok is None:
        return None
    return ImageCodeCache(run.data.image_code_cache_dir or os.path.join(run.data.data_cache_dir, "image_codes"), tok)


def load_tokenizer(run: TrainingConfig):
    """The text tokenizer; with ``--image-tokenizer`` it carries that tokenizer's image vocabulary (a saved one
    must already have the same codebook size; one saved without an image vocabulary gains it)."""
    image_tok = image_tokenizer(run)
    if run.data.tokenizer_dir:
        tokenizer = VisualChatTokenizer.load(run.data.tokenizer_dir)
    elif run.data.synthetic is None:
        raise ConfigError("--tokenizer-dir is required with --data (a LLaMA-2 tokenizer.model saved by "
                          "VisualChatTokenizer.save)")
    else:
        path = synthetic_paths(run)["tokenizer"]
        _on_rank0_then_all(lambda: train_tiny_sentencepiece(path, synthetic_corpus_lines(400, run.batch.seed), 512),
                           path)
        tokenizer = VisualChatTokenizer.load(path)
    saved = tokenizer.image_codebook_size
    if image_tok is None:
        if saved:
            raise ConfigError(f"--tokenizer-dir {run.data.tokenizer_dir} has an image vocabulary of {saved} codes: "
                              f"give the image tokenizer it belongs to (--image-tokenizer NAME:DIR, "
                              f"docs/image_generation.md)")
        return tokenizer
    try:
        return with_image_vocab_of(tokenizer, image_tok, f"--tokenizer-dir {run.data.tokenizer_dir}")
    except ValueError as e:
        raise ConfigError(f"{e} (--image-tokenizer {run.data.image_tokenizer})") from None


def dataset_specs(run: TrainingConfig, which: str = "train") -> list[dict]:
    texts, flag = (run.data.data, "--data") if which == "train" else (run.data.eval_data, "--eval-data")
    try:
        specs = [s for text in texts for s in parse_spec_text(text)]
        for spec in specs:
            DatasetSpec.coerce(spec)  # field checks (objective, weight, ...) name the flag here
    except ValueError as e:
        raise ConfigError(f"{flag}: {e}") from None
    if not specs and run.data.synthetic is not None:
        paths = synthetic_paths(run)
        _on_rank0_then_all(lambda: generate_synthetic_dataset(paths["root"], run.data.synthetic, seed=run.batch.seed),
                           paths["train"])
        specs = [{"format": "jsonl", "path": paths[which]}]
    return specs


def blend_total_samples(run: TrainingConfig, specs: list[dict], which: str = "train") -> Optional[int]:
    """Samples a weighted blend draws in all (None without weights: then every record is used once per epoch).

    Training: ``--data-total-samples``, else ``--train-iters`` x ``--global-batch-size`` as in Megatron (not with
    ``--pack``, whose global batch counts bins of several samples). With
    ``--train-epochs`` the blend's size would have to come from the epoch count, which needs the blend's size, so
    the total must be given. Evaluation: ``--eval-iters`` x ``--global-batch-size``, what one evaluation reads.
    """
    batch, total = run.batch, run.data.data_total_samples
    if total is not None and total < 1:
        raise ConfigError(f"--data-total-samples {total} must be >= 1")
    if not any(s.get("weight") is not None for s in specs):
        if which == "train" and total is not None:
            raise ConfigError("--data-total-samples only applies to weighted --data specs (FORMAT:PATH:WEIGHT); "
                              "without weights every record is used once per epoch")
        return None
    if which == "eval":
        return run.metrics.eval_iters * batch.global_batch_size
    if total is not None:
        return total
    if run.data.pack:
        raise ConfigError("weighted --data specs with --pack: a step trains --global-batch-size bins holding a "
                          "varying number of samples, so the blend's size cannot come from --train-iters: give "
                          "--data-total-samples N")
    if batch.train_iters is None:
        raise ConfigError("weighted --data specs draw a fixed number of samples, which --train-epochs cannot set: "
                          "give --data-total-samples N (then the epochs count passes over N samples), or "
                          "--train-iters (N = train iters x global batch size), or drop the weights")
    return batch.train_iters * batch.global_batch_size


def build_datasets(run: TrainingConfig, tokenizer, num_image_tokens: int, image_preprocess=None):
    """(train dataset, eval dataset or None) over the whole blend; bad records are skipped and counted, or with
    ``--strict-data`` the first one stops the run naming its file and record. ``image_preprocess`` (the encoder's)
    places grounding boxes in the frame the encoder sees."""
    batch, data = run.batch, run.data
    common = dict(num_image_tokens=num_image_tokens, max_seq_len=batch.seq_length, template=data.template,
                  max_images_per_sample=data.max_images, seed=batch.seed, strict=data.strict_data, split="all",
                  image_preprocess=image_preprocess, box_outside=data.box_outside, image_codes=image_code_cache(run))
    train_specs = dataset_specs(run, "train")
    train = build_train_dataset(train_specs, tokenizer, total_samples=blend_total_samples(run, train_specs), **common)
    eval_specs = dataset_specs(run, "eval")
    if not (eval_specs and run.metrics.eval_interval):
        return train, None
    evalset = build_train_dataset(eval_specs, tokenizer, total_samples=blend_total_samples(run, eval_specs, "eval"),
                                  **common)
    return train, evalset


def image_geometry(cfg: VisualChatConfig):
    """(image transform, sequence positions per image, image side) for the configured encoder + projector, without
    building weights (the projector is instantiated on the meta device to read its output count; mode ``cross``
    takes one marker position per image, ``model/cross_attention.py``)."""
    spec = get_encoder_spec(cfg.vision.encoder)
    options = EncoderOptions.parse(cfg.vision.encoder, cfg.vision.encoder_options)
    tokens, has_cls = spec.output_tokens(options)  # drop_cls leaves out the class token
    with torch.device("meta"):
        projector = build_projector(cfg.vision.projector, spec.hidden_size, cfg.llm.hidden_size,
                                    tokens, has_cls, **cfg.vision.projector_options)
    preprocess = spec.image_preprocess(options)
    positions = positions_per_image(cfg.attention.mode, projector.num_output_tokens)
    return preprocess.transform(), positions, spec.image_size


def build_loaders(run: TrainingConfig, cfg: VisualChatConfig, tokenizer):
    """(train loader, eval loader or None) for this data-parallel rank. With pipeline parallelism every sequence
    is padded to --seq-length (megatron's p2p buffers have a fixed shape), and with --sequence-parallel (it must
    split evenly over the TP ranks; --seq-length is checked to be a multiple of TP), and with context parallelism
    (2 x CP equal chunks; checked likewise). With ``--pack`` a microbatch is --micro-batch-size bins of exactly
    --seq-length positions at any layout, and the global batch counts bins."""
    batch, data = run.batch, run.data
    transform, image_tokens, image_size = image_geometry(cfg)
    train, evalset = build_datasets(run, tokenizer, image_tokens, transform.preprocess)
    if data.pack and dist.get_rank() == 0:
        print(f"--pack: each step trains {batch.global_batch_size} bins of {batch.seq_length} positions (the "
              "global batch counts bins, as Megatron counts rows); the samples per step vary, see 'samples' and "
              "'pack eff' in the log", flush=True)
    fixed = cfg.parallel.pp > 1 or cfg.parallel.sequence_parallel or cfg.parallel.cp > 1 or data.pack
    loader_args = dict(batch_size=batch.micro_batch_size, pad_to=batch.seq_length if fixed else None,
                       pack=data.pack, image_size=image_size, dp_rank=ps.get_data_parallel_rank(),
                       dp_size=ps.get_data_parallel_world_size(), seed=batch.seed, num_workers=data.num_workers)
    train_loader = build_dataloader(train, transform, **loader_args)
    eval_loader = None if evalset is None else build_dataloader(evalset, transform, shuffle=False, **loader_args)
    return train_loader, eval_loader
