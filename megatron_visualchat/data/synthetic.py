"""A synthetic multi-image, multi-round chat dataset that a tiny model can learn on CPU in minutes.

Each image shows 1-3 copies of one shape (circle / square / triangle) in one of 4 colours, all on the left or the
right half. A sample has 1-3 images over 1-2 rounds; every question names an image already shown ("What colour is
the shape in image 2?") and has a one-word answer (colour, shape, count word or side). Questions use the ``jsonl``
format's ``IMAGE#k`` references, so numbering stays right when samples are concatenated.

Everything derives from the seed (``random.Random`` streams per split and sample, PNGs written by PIL), so the same
seed gives byte-identical files.
CLI: ``python -m megatron_visualchat.data.synthetic --out DIR --num-samples N --seed S``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

from .conversation import Conversation, Round, image_ref
from .images import FileImage
from .templates import TEMPLATES

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30)}
SHAPES = ("circle", "square", "triangle")
COUNTS = {1: "one", 2: "two", 3: "three"}
SIDES = ("left", "right")
QUESTIONS = {  # {ref} names the image: "IMAGE#k" in the jsonl files
    "colour": "What colour is the shape in {ref}?",
    "shape": "What shape is in {ref}?",
    "count": "How many shapes are in {ref}?",
    "side": "On which side of {ref} are the shapes?",
}
BACKGROUND = (245, 245, 245)


@dataclass(frozen=True)
class ShapeImage:
    colour: str
    shape: str
    count: int
    side: str

    def answer(self, kind: str) -> str:
        return {"colour": self.colour, "shape": self.shape, "count": COUNTS[self.count], "side": self.side}[kind]

    def render(self, size: int, rng: random.Random) -> Image.Image:
        im = Image.new("RGB", (size, size), BACKGROUND)
        draw = ImageDraw.Draw(im)
        radius = max(2, size // 10)
        half = size // 2
        x0 = 0 if self.side == "left" else half
        for slot in sorted(rng.sample(range(3), self.count)):
            cx = x0 + half // 2 + rng.randint(-radius // 2, radius // 2)
            cy = (2 * slot + 1) * size // 6
            box = (cx - radius, cy - radius, cx + radius, cy + radius)
            colour = COLOURS[self.colour]
            if self.shape == "circle":
                draw.ellipse(box, fill=colour)
            elif self.shape == "square":
                draw.rectangle(box, fill=colour)
            else:
                draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=colour)
        return im


def _sample(rng: random.Random) -> tuple[list[ShapeImage], list[dict]]:
    """Images and rounds ({"images": [indices shown], "target": index asked about, "kind", "answer"})."""
    images = [
        ShapeImage(rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.randint(1, 3), rng.choice(SIDES))
        for _ in range(rng.randint(1, 3))
    ]
    first = len(images) if rng.randint(1, 2) == 1 else rng.randint(1, len(images))
    shown_per_round = [list(range(first))] + ([list(range(first, len(images)))] if first < len(images) else [])
    if len(shown_per_round) == 1 and rng.random() < 0.5:
        shown_per_round.append([])  # a second round about images already shown
    rounds = []
    for shown in shown_per_round:
        target = rng.choice(shown) if shown else rng.randrange(len(images))
        kind = rng.choice(list(QUESTIONS))
        rounds.append({"images": shown, "target": target, "kind": kind, "answer": images[target].answer(kind)})
    return images, rounds


@dataclass(frozen=True)
class SyntheticDataset:
    train_path: str
    eval_path: str
    image_dir: str
    num_train: int
    num_eval: int


def _write_split(out_dir: str, split: str, count: int, seed: int, image_size: int) -> str:
    path = os.path.join(out_dir, f"{split}.jsonl")
    with open(path, "w") as f:
        for i in range(count):
            rng = random.Random(f"{seed}:{split}:{i}")
            images, rounds = _sample(rng)
            names = [f"images/{split}-{i:06d}-{k}.png" for k in range(len(images))]
            for name, image in zip(names, images):
                image.render(image_size, rng).save(os.path.join(out_dir, name), format="PNG")
            record = {"id": f"{split}-{i}",
                      "rounds": [{"images": [names[k] for k in r["images"]],
                                  "question": QUESTIONS[r["kind"]].format(ref=f"IMAGE#{r['target'] + 1}"),
                                  "answer": r["answer"]} for r in rounds]}
            f.write(json.dumps(record) + "\n")
    return path


def generate_synthetic_dataset(
    out_dir: str, num_samples: int, seed: int = 0, image_size: int = 64, num_eval: int | None = None
) -> SyntheticDataset:
    """Write ``train.jsonl`` (num_samples), ``eval.jsonl`` (held out; default num_samples // 10, at least 1) and
    ``images/*.png`` under ``out_dir`` in the ``jsonl`` format. Same arguments -> byte-identical files."""
    if num_samples < 1 or image_size < 16:
        raise ValueError(f"need num_samples >= 1 and image_size >= 16, got {num_samples=} {image_size=}")
    num_eval = max(1, num_samples // 10) if num_eval is None else num_eval
    if num_eval < 0:
        raise ValueError(f"num_eval={num_eval} must be >= 0")
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    return SyntheticDataset(
        train_path=_write_split(out_dir, "train", num_samples, seed, image_size),
        eval_path=_write_split(out_dir, "eval", num_eval, seed, image_size),
        image_dir=os.path.join(out_dir, "images"),
        num_train=num_samples,
        num_eval=num_eval,
    )


def synthetic_corpus_lines(num_samples: int = 200, seed: int = 0) -> list[str]:
    """Text to train a tiny tokenizer on: synthetic conversations rendered with every registered template."""
    lines = []
    for i in range(num_samples):
        images, rounds = _sample(random.Random(f"{seed}:corpus:{i}"))
        conv = Conversation(tuple(
            Round(QUESTIONS[r["kind"]].format(ref=image_ref(r["target"])), r["answer"],
                  tuple(FileImage(str(k)) for k in r["images"]))
            for r in rounds
        ))
        lines += [template.render_text(conv) for template in TEMPLATES.values()]
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--num-samples", type=int, required=True, help="training samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--num-eval", type=int, default=None, help="held-out samples (default: num_samples // 10)")
    args = parser.parse_args(argv)
    result = generate_synthetic_dataset(args.out, args.num_samples, args.seed, args.image_size, args.num_eval)
    print(f"wrote {result.num_train} train samples to {result.train_path}, {result.num_eval} eval samples to "
          f"{result.eval_path}, images in {result.image_dir}")


if __name__ == "__main__":
    main()
