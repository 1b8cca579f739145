"""Tokenizer, datasets and data-parallel loaders for a training run, from its ``TrainingConfig``."""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_visualchat.config import ConfigError, VisualChatConfig
from megatron_visualchat.data.blend import parse_spec_text
from megatron_visualchat.data.dataset import build_train_dataset
from megatron_visualchat.data.loader import build_dataloader
from megatron_visualchat.data.synthetic import generate_synthetic_dataset, synthetic_corpus_lines
from megatron_visualchat.data.tokenizer import VisualChatTokenizer, train_tiny_sentencepiece
from megatron_visualchat.model.vision import ENCODERS, build_projector, get_encoder_spec
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


def load_tokenizer(run: TrainingConfig):
    if run.data.tokenizer_dir:
        return VisualChatTokenizer.load(run.data.tokenizer_dir)
    if run.data.synthetic is None:
        raise ConfigError("--tokenizer-dir is required with --data (a LLaMA-2 tokenizer.model saved by "
                          "VisualChatTokenizer.save)")
    path = synthetic_paths(run)["tokenizer"]
    _on_rank0_then_all(lambda: train_tiny_sentencepiece(path, synthetic_corpus_lines(400, run.batch.seed), 512), path)
    return VisualChatTokenizer.load(path)


def dataset_specs(run: TrainingConfig, which: str = "train") -> list[dict]:
    texts, flag = (run.data.data, "--data") if which == "train" else (run.data.eval_data, "--eval-data")
    try:
        specs = [s for text in texts for s in parse_spec_text(text)]
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

    Training: ``--data-total-samples``, else ``--train-iters`` x ``--global-batch-size`` as in Megatron. With
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
    if batch.train_iters is None:
        raise ConfigError("weighted --data specs draw a fixed number of samples, which --train-epochs cannot set: "
                          "give --data-total-samples N (then the epochs count passes over N samples), or "
                          "--train-iters (N = train iters x global batch size), or drop the weights")
    return batch.train_iters * batch.global_batch_size


def build_datasets(run: TrainingConfig, tokenizer, num_image_tokens: int):
    """(train dataset, eval dataset or None) over the whole blend; bad records are skipped and counted, or with
    ``--strict-data`` the first one stops the run naming its file and record."""
    batch, data = run.batch, run.data
    common = dict(num_image_tokens=num_image_tokens, max_seq_len=batch.seq_length, template=data.template,
                  max_images_per_sample=data.max_images, seed=batch.seed, strict=data.strict_data, split="all")
    train_specs = dataset_specs(run, "train")
    train = build_train_dataset(train_specs, tokenizer, total_samples=blend_total_samples(run, train_specs), **common)
    eval_specs = dataset_specs(run, "eval")
    if not (eval_specs and run.metrics.eval_interval):
        return train, None
    evalset = build_train_dataset(eval_specs, tokenizer, total_samples=blend_total_samples(run, eval_specs, "eval"),
                                  **common)
    return train, evalset


def image_geometry(cfg: VisualChatConfig):
    """(image transform, image tokens per image, image side) for the configured encoder + projector, without building
    weights (the projector is instantiated on the meta device to read its output count)."""
    spec = get_encoder_spec(cfg.vision.encoder)
    with torch.device("meta"):
        projector = build_projector(cfg.vision.projector, spec.hidden_size, cfg.llm.hidden_size,
                                    spec.num_image_tokens, spec.has_cls, **cfg.vision.projector_options)
    return ENCODERS[cfg.vision.encoder].preprocess.transform(), projector.num_output_tokens, spec.image_size


def build_loaders(run: TrainingConfig, cfg: VisualChatConfig, tokenizer):
    """(train loader, eval loader or None) for this data-parallel rank. With pipeline parallelism every sequence
    is padded to --seq-length (megatron's p2p buffers have a fixed shape)."""
    batch, data = run.batch, run.data
    transform, image_tokens, image_size = image_geometry(cfg)
    train, evalset = build_datasets(run, tokenizer, image_tokens)
    loader_args = dict(batch_size=batch.micro_batch_size, pad_to=batch.seq_length if cfg.parallel.pp > 1 else None,
                       pack=data.pack, image_size=image_size, dp_rank=ps.get_data_parallel_rank(),
                       dp_size=ps.get_data_parallel_world_size(), seed=batch.seed, num_workers=data.num_workers)
    train_loader = build_dataloader(train, transform, **loader_args)
    eval_loader = None if evalset is None else build_dataloader(evalset, transform, shuffle=False, **loader_args)
    return train_loader, eval_loader
