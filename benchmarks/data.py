"""Data-loading throughput on the bundled synthetic set: samples/s and image tokens/s through the real dataset,
collator and DataLoader workers, so we know whether loading can feed a GPU.

    .venv/bin/python benchmarks/data.py --num-samples 2000 --workers 0 2 --batch-size 16 --encoder tiny
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from megatron_visualchat.data.dataset import build_train_dataset
from megatron_visualchat.data.loader import build_dataloader
from megatron_visualchat.data.synthetic import generate_synthetic_dataset, synthetic_corpus_lines
from megatron_visualchat.data.tokenizer import train_tiny_sentencepiece
from megatron_visualchat.model.token_codes import MODALITY_IMAGE, MODALITY_PAD
from megatron_visualchat.model.vision import get_encoder_spec


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-samples", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--encoder", default="tiny", help="encoder whose preprocessing and token count to use")
    p.add_argument("--max-seq-len", type=int, default=4096)
    p.add_argument("--pack", action="store_true")
    p.add_argument("--data-dir", default=None, help="reuse a generated synthetic set")
    args = p.parse_args(argv)

    root = args.data_dir or tempfile.mkdtemp(prefix="vchat-data-bench-")
    if not os.path.exists(os.path.join(root, "train.jsonl")):
        generate_synthetic_dataset(root, args.num_samples, seed=0)
    tokenizer = train_tiny_sentencepiece(os.path.join(root, "tokenizer"), synthetic_corpus_lines(200), 512)
    spec = get_encoder_spec(args.encoder)
    dataset = build_train_dataset([{"format": "jsonl", "path": os.path.join(root, "train.jsonl")}], tokenizer,
                                  num_image_tokens=spec.num_image_tokens, max_seq_len=args.max_seq_len, split="all")
    print("| encoder | workers | batch | samples/s | image tokens/s | tokens/s |\n|---|---|---|---|---|---|")
    for workers in args.workers:
        loader = build_dataloader(dataset, spec.preprocess.transform(), batch_size=args.batch_size,
                                  image_size=spec.image_size, num_workers=workers, pack=args.pack,
                                  pad_to=args.max_seq_len if args.pack else None)
        start, samples, image_tokens, tokens = time.perf_counter(), 0, 0, 0
        for batch in loader:
            samples += int((batch["sample_id"].max(dim=1).values + 1).sum())  # packed bins hold several
            image_tokens += int((batch["modality"] == MODALITY_IMAGE).sum())
            tokens += int((batch["modality"] != MODALITY_PAD).sum())
        dt = time.perf_counter() - start
        print(f"| {args.encoder} | {workers} | {args.batch_size} | {samples / dt:.0f} | {image_tokens / dt:.0f} | "
              f"{tokens / dt:.0f} |")


if __name__ == "__main__":
    main()
