"""Tokenizer, datasets and data-parallel loaders for a training run, from its ``TrainingConfig``."""

from __future__ import annotations

import json
import os
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_visualchat.config import ConfigError, VisualChatConfig
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


def _parse_spec(text: str) -> list[dict]:
    if text.lstrip().startswith("["):
        return json.loads(text)
    parts = text.split(":")
    if len(parts) < 2:
        raise ConfigError(f"--data {text!r}: expected FORMAT:PATH[:WEIGHT[:NUM_SAMPLES[:CONCAT]]]")
    spec = {"format": parts[0], "path": parts[1]}
    if len(parts) > 2 and parts[2]:
        spec["weight"] = float(parts[2])
    if len(parts) > 3 and parts[3]:
        spec["num_samples"] = parts[3] if parts[3] == "all" else int(parts[3])
    if len(parts) > 4 and parts[4]:
        spec["concat"] = int(parts[4])
    return [spec]


def dataset_specs(run: TrainingConfig, which: str = "train") -> list[dict]:
    texts = run.data.data if which == "train" else run.data.eval_data
    specs = [s for text in texts for s in _parse_spec(text)]
    if not specs and run.data.synthetic is not None:
        paths = synthetic_paths(run)
        _on_rank0_then_all(lambda: generate_synthetic_dataset(paths["root"], run.data.synthetic, seed=run.batch.seed),
                           paths["train"])
        specs = [{"format": "jsonl", "path": paths[which]}]
    return specs


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
    common = dict(num_image_tokens=image_tokens, max_seq_len=batch.seq_length, template=data.template,
                  max_images_per_sample=data.max_images, seed=batch.seed)
    train = build_train_dataset(dataset_specs(run, "train"), tokenizer, split="all", **common)
    loader_args = dict(batch_size=batch.micro_batch_size, pad_to=batch.seq_length if cfg.parallel.pp > 1 else None,
                       pack=data.pack, image_size=image_size, dp_rank=ps.get_data_parallel_rank(),
                       dp_size=ps.get_data_parallel_world_size(), seed=batch.seed, num_workers=data.num_workers)
    train_loader = build_dataloader(train, transform, **loader_args)
    eval_specs = dataset_specs(run, "eval")
    eval_loader: Optional[object] = None
    if eval_specs and run.metrics.eval_interval:
        evalset = build_train_dataset(eval_specs, tokenizer, split="all", **common)
        eval_loader = build_dataloader(evalset, transform, shuffle=False, **loader_args)
    return train_loader, eval_loader
