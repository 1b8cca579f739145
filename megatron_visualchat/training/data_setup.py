"""Tokenizer, datasets and data-parallel loaders for a training run, from the command-line flags."""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.distributed as dist

from megatron_visualchat.config import ConfigError, VisualChatConfig


def _on_rank0_then_all(make, path: str):
    """Rank 0 creates ``path`` if missing (generation, tokenizer training); every rank waits for it."""
    if dist.get_rank() == 0 and not os.path.exists(path):
        make()
    dist.barrier()


def synthetic_paths(args) -> dict:
    root = os.path.join(args.data_cache_dir, f"synthetic-{args.synthetic}-seed{args.seed}")
    return {"root": root, "train": os.path.join(root, "train.jsonl"), "eval": os.path.join(root, "eval.jsonl"),
            "images": os.path.join(root, "images"), "tokenizer": os.path.join(root, "tokenizer")}


def load_tokenizer(args):
    from megatron_visualchat.data.tokenizer import VisualChatTokenizer, train_tiny_sentencepiece

    if args.tokenizer_dir:
        return VisualChatTokenizer.load(args.tokenizer_dir)
    if args.synthetic is None:
        raise ConfigError("--tokenizer-dir is required with --data (a LLaMA-2 tokenizer.model saved by "
                          "VisualChatTokenizer.save)")
    from megatron_visualchat.data.synthetic import synthetic_corpus_lines

    path = synthetic_paths(args)["tokenizer"]
    _on_rank0_then_all(lambda: train_tiny_sentencepiece(path, synthetic_corpus_lines(400, args.seed), 512), path)
    return VisualChatTokenizer.load(path)


def _parse_spec(text: str) -> list[dict]:
    import json

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


def dataset_specs(args, which: str = "train") -> list[dict]:
    texts = args.data if which == "train" else args.eval_data
    specs = [s for text in texts for s in _parse_spec(text)]
    if not specs and args.synthetic is not None:
        from megatron_visualchat.data.synthetic import generate_synthetic_dataset

        paths = synthetic_paths(args)
        _on_rank0_then_all(lambda: generate_synthetic_dataset(paths["root"], args.synthetic, seed=args.seed),
                           paths["train"])
        specs = [{"format": "jsonl", "path": paths[which]}]
    return specs


def image_geometry(cfg: VisualChatConfig):
    """(image transform, image tokens per image, image side) for the configured encoder + projector, without building
    weights (the projector is instantiated on the meta device to read its output count)."""
    from megatron_visualchat.model.vision import ENCODERS, build_projector, get_encoder_spec

    spec = get_encoder_spec(cfg.vision.encoder)
    with torch.device("meta"):
        projector = build_projector(cfg.vision.projector, spec.hidden_size, cfg.llm.hidden_size,
                                    spec.num_image_tokens, spec.has_cls, **cfg.vision.projector_options)
    return ENCODERS[cfg.vision.encoder].preprocess.transform(), projector.num_output_tokens, spec.image_size


def build_loaders(args, cfg: VisualChatConfig, tokenizer, *, consumed_samples: int = 0):
    """(train loader, eval loader or None) for this data-parallel rank. With pipeline parallelism every sequence
    is padded to --seq-length (megatron's p2p buffers have a fixed shape)."""
    from megatron.core import parallel_state as ps

    from megatron_visualchat.data.dataset import build_train_dataset
    from megatron_visualchat.data.loader import build_dataloader

    transform, image_tokens, image_size = image_geometry(cfg)
    common = dict(num_image_tokens=image_tokens, max_seq_len=args.seq_length, template=args.template,
                  max_images_per_sample=args.max_images, seed=args.seed)
    train = build_train_dataset(dataset_specs(args, "train"), tokenizer, split="all", **common)
    loader_args = dict(batch_size=args.micro_batch_size, pad_to=args.seq_length if cfg.parallel.pp > 1 else None,
                       pack=args.pack, image_size=image_size, dp_rank=ps.get_data_parallel_rank(), dp_size=ps.get_data_parallel_world_size(),
                       seed=args.seed, num_workers=args.num_workers)
    train_loader = build_dataloader(train, transform, start_index=consumed_samples, **loader_args)
    eval_specs = dataset_specs(args, "eval")
    eval_loader: Optional[object] = None
    if eval_specs and args.eval_interval:
        evalset = build_train_dataset(eval_specs, tokenizer, split="all", **common)
        eval_loader = build_dataloader(evalset, transform, shuffle=False, **loader_args)
    return train_loader, eval_loader
