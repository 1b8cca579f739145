"""``megatron-visualchat validate-data``: check every record of a blend before training on it.

Each record of each ``--data`` file is built once, alone, exactly as training builds it (parse, template and
tokenize under ``--seq-length`` / ``--max-images``, open and decode the images it keeps), through the same
``VisualChatDataset`` code. Weights, sample counts and concatenation are ignored: the question is which records
training would skip. The report is the skip table by reason and the first offenders of each reason (file, record
index, message). Exit status: 0 when every record is usable, 1 when any was skipped, 2 when the data cannot be
opened at all (a missing or unparsable ``.json`` file, a bad spec). Grounding data writes its boxes in the frame of
``--vision-encoder`` (with ``--vision-encoder-options``), so boxes the encoder's crop cuts show up as ``box_outside``.
Data that writes images as codes (``jsonl_images_out``) and ``objective=cm3`` need ``--image-tokenizer`` as in
training.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from typing import Optional, Sequence, TextIO

import numpy as np

from .blend import SPEC_SYNTAX, BlendPlan, DatasetSpec, parse_spec_text
from .boxes import BOX_OUTSIDE, BoxRenderer
from .dataset import VisualChatDataset
from .encode import ConversationEncoder
from .formats import open_source
from .image_codes import CodeWritingTokenizer, ImageCodeCache, with_image_vocab_of
from .tokenizer import VisualChatTokenizer


def scan(specs: list[DatasetSpec | dict], tokenizer, *, template: str = "dsvc", seq_length: int = 4096,
         max_images: int = 8, image_tokens: int = 256, image_root: Optional[str] = None,
         image_preprocess=None, box_outside: str = "clip", image_codes=None) -> VisualChatDataset:
    """Build every record once; the returned dataset's ``skip_log`` holds the counts and first offenders.
    ``image_root`` is the image store of every spec that names none (its ``images`` option); grounding boxes are
    placed with ``image_preprocess`` (the encoder's) and ``box_outside`` as training does; ``image_codes`` (an
    ``ImageCodeCache``) writes output images as codes."""
    specs = [DatasetSpec.coerce(s) for s in specs]
    if image_root is not None:
        specs = [s if "images" in s.options else replace(s, options={**s.options, "images": image_root})
                 for s in specs]
    sources = [open_source(s.format, s.path, **s.options) for s in specs]
    items = [(d, np.asarray([r])) for d, source in enumerate(sources) for r in range(len(source))]
    if not items:
        raise ValueError(f"no records in {[s.path for s in specs]}")
    if image_codes is not None:
        tokenizer = CodeWritingTokenizer(tokenizer, image_codes)
    encoder = ConversationEncoder(tokenizer, template, max_seq_len=seq_length, num_image_tokens=image_tokens,
                                  max_images=max_images)
    boxes = None if image_preprocess is None else BoxRenderer(image_preprocess, encoder.template.box_format,
                                                              box_outside)
    dataset = VisualChatDataset(sources, BlendPlan.from_items(items), encoder, boxes=boxes,
                                objectives=[s.objective for s in specs])
    for item in range(len(dataset)):
        dataset.build_item(item)
    return dataset


def report(dataset: VisualChatDataset, out: TextIO) -> int:
    """Print the skip table and the first offenders; the number of records skipped."""
    log, total = dataset.skip_log, len(dataset)
    skipped = sum(log.counts.values())
    out.write(f"{total} record(s) in {len(dataset.sources)} file(s): {total - skipped} usable, {skipped} skipped\n")
    if not skipped:
        return 0
    out.write("\n| reason | records |\n|---|---:|\n")
    for reason, count in log.counts.most_common():
        out.write(f"| {reason} | {count} |\n")
    out.write("\nfirst offenders (file, record index, message):\n")
    for reason, _ in log.counts.most_common():
        for (source_id, record), error in log.examples[reason]:
            out.write(f"  {dataset.sources[source_id].path}  record {record}  {error}\n")
    return skipped


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megatron-visualchat validate-data",
                                description="check every record of a blend as training builds it; print the "
                                            "skipped records by reason (exit 0: clean, 1: some skipped, 2: unreadable)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", action="append", required=True, help=f"{SPEC_SYNTAX}; repeatable")
    p.add_argument("--image-root", default=None,
                   help="image directory or base64 store for specs without an 'images' option (default: each "
                        "annotation file's directory)")
    p.add_argument("--tokenizer-dir", required=True,
                   help="the VisualChatTokenizer directory training uses (lengths are counted in its tokens)")
    p.add_argument("--template", default="dsvc")
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--max-images", type=int, default=8)
    p.add_argument("--image-tokens", type=int, default=256,
                   help="positions per image, as the model sees them (the projector's output tokens: 256 for "
                        "qwen-vl-vit-bigg-14-448 + linear, 257 for clip-vit-l-14-224 + linear)")
    p.add_argument("--vision-encoder", default=None,
                   help="grounding data: the encoder whose preprocessing places the boxes (as training's flag)")
    p.add_argument("--vision-encoder-options", type=json.loads, default={},
                   help='grounding data: as training\'s flag, e.g. {"resize": "pad"}')
    p.add_argument("--box-outside", choices=BOX_OUTSIDE, default="clip", help="as training's flag")
    p.add_argument("--image-tokenizer", default=None, help="NAME:DIR, as training's flag (images written as codes)")
    p.add_argument("--image-code-cache-dir", default="runs/data/image_codes", help="as training's flag")
    return p


def main(argv: Optional[Sequence[str]] = None, *, stdout: Optional[TextIO] = None) -> int:
    args = build_parser().parse_args(argv)
    out = stdout or sys.stdout
    try:
        specs = [s for text in args.data for s in parse_spec_text(text)]
        preprocess = None
        if args.vision_encoder is not None:
            from megatron_visualchat.model.vision import EncoderOptions, get_encoder_spec  # timm: only when asked

            options = EncoderOptions.parse(args.vision_encoder, args.vision_encoder_options)
            preprocess = get_encoder_spec(args.vision_encoder).image_preprocess(options)
        tokenizer, image_codes = VisualChatTokenizer.load(args.tokenizer_dir), None
        if args.image_tokenizer is not None:
            from megatron_visualchat.model.image_tokenizer import load_image_tokenizer, parse_image_tokenizer_spec

            image_tokenizer = load_image_tokenizer(*parse_image_tokenizer_spec(args.image_tokenizer))
            tokenizer = with_image_vocab_of(tokenizer, image_tokenizer, f"--tokenizer-dir {args.tokenizer_dir}")
            image_codes = ImageCodeCache(args.image_code_cache_dir, image_tokenizer)
        dataset = scan(specs, tokenizer, template=args.template, seq_length=args.seq_length,
                       max_images=args.max_images, image_tokens=args.image_tokens, image_root=args.image_root,
                       image_preprocess=preprocess, box_outside=args.box_outside, image_codes=image_codes)
    except (ValueError, OSError) as e:
        out.write(f"validate-data: cannot read the data: {e}\n")
        return 2
    return 1 if report(dataset, out) else 0


if __name__ == "__main__":
    raise SystemExit(main())
