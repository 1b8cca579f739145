"""A synthetic grounding set a tiny model can learn on CPU: find a shape from a short description, name a boxed one.

Each square image shows 2-4 shapes (circle / square / triangle, red / green / blue, small / big; ``num_shapes``
fixes the count, 1 makes a pure localisation task; ``sizes`` limits the sizes: with one, fewer distinct boxes),
each in its own cell of a 3 x 3 grid (``grid``; 2 x 2 is easier still), optionally shifted by up to ``jitter``
pixels, no two with the same colour and shape. One shape per image is the target, described by a unique
expression: "the red circle", "the small red circle", or "the red circle left of the blue square" (relations from
the cells). Its box is the exact extent of its drawn pixels.

Files (``refexp`` format, see ``data/formats/grounding.py``; train on them with the dataset option
``tasks="rec,reg"`` for both directions):
* ``train.jsonl`` / ``eval.jsonl``: ``{"id", "image": "images/<split>-<i>.png", "bbox": [x, y, w, h],
  "expression", "target": index into "shapes", "shapes": [{"colour", "shape", "size", "bbox": [x1, y1, x2, y2]}]}``;
* ``eval_rec.json``: the eval split as an ``eval-replay`` file (REC: the answer is the source-pixel box, read from
  the model's text with ``box_text``).
Same arguments -> byte-identical files (``random.Random`` streams per split and sample; PNGs written by PIL).
CLI: ``python -m megatron_visualchat.data.synthetic_grounding --out DIR --num-samples N --seed S``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

from ..argtypes import name_list
from .boxes import BOX_FORMATS, get_box_format
from .conversation import Conversation, Round
from .formats.grounding import REC_PROMPT, REG_PROMPT
from .images import FileImage
from .templates import TEMPLATES

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220)}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "big")
BACKGROUND = (245, 245, 245)


@dataclass(frozen=True)
class PlacedShape:
    colour: str
    shape: str
    size: str
    cell: tuple[int, int]  # (column, row)
    centre: tuple[int, int]
    radius: int

    def draw(self, draw: ImageDraw.ImageDraw, fill) -> None:
        (cx, cy), r = self.centre, self.radius
        if self.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif self.shape == "square":
            draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)

    def bbox(self, image_size: int) -> list[int]:
        """[x1, y1, x2, y2] of the drawn pixels (x2, y2 exclusive: continuous pixel edges)."""
        mask = Image.new("L", (image_size, image_size), 0)
        self.draw(ImageDraw.Draw(mask), 255)
        return list(mask.getbbox())


def _relation(a: PlacedShape, b: PlacedShape) -> str:
    if a.cell[0] != b.cell[0]:
        return "left of" if a.cell[0] < b.cell[0] else "right of"
    return "above" if a.cell[1] < b.cell[1] else "below"


def _scene(rng: random.Random, image_size: int, jitter: int, grid: int, num_shapes: int | None = None,
           sizes: tuple[str, ...] = SIZES) -> tuple[list[PlacedShape], int, str]:
    """Shapes, the target's index and its expression (``num_shapes`` None: 2-4)."""
    cell = image_size // grid
    radii = {"small": max(2, image_size // 16), "big": max(3, image_size // 8)}
    jitter = max(0, min(jitter, cell // 2 - radii["big"] - 1))
    kinds = rng.sample([(c, s) for c in COLOURS for s in SHAPES], num_shapes or rng.randint(2, min(4, grid * grid)))
    cells = rng.sample([(i, j) for j in range(grid) for i in range(grid)], len(kinds))
    shapes = []
    for (colour, shape), (i, j) in zip(kinds, cells):
        centre = tuple(k * cell + cell // 2 + rng.randint(-jitter, jitter) for k in (i, j))
        size = rng.choice(sizes)
        shapes.append(PlacedShape(colour, shape, size, (i, j), centre, radii[size]))
    target = rng.randrange(len(shapes))
    t = shapes[target]
    styles = ("plain",) + ("size",) * (len(sizes) > 1) + ("relation",) * (len(shapes) > 1)
    style = rng.choice(styles)
    if style == "plain":
        expression = f"the {t.colour} {t.shape}"
    elif style == "size":
        expression = f"the {t.size} {t.colour} {t.shape}"
    else:
        other = shapes[rng.choice([k for k in range(len(shapes)) if k != target])]
        expression = f"the {t.colour} {t.shape} {_relation(t, other)} the {other.colour} {other.shape}"
    return shapes, target, expression


def render(shapes: list[PlacedShape], image_size: int) -> Image.Image:
    im = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(im)
    for s in shapes:
        s.draw(draw, COLOURS[s.colour])
    return im


@dataclass(frozen=True)
class GroundingDataset:
    train_path: str
    eval_path: str
    replay_path: str
    image_dir: str
    num_train: int
    num_eval: int


def _write_split(out_dir: str, split: str, count: int, seed: int, image_size: int, jitter: int,
                 grid: int, num_shapes: int | None, sizes: tuple[str, ...]) -> list[dict]:
    records = []
    with open(os.path.join(out_dir, f"{split}.jsonl"), "w") as f:
        for i in range(count):
            shapes, target, expression = _scene(random.Random(f"{seed}:grounding:{split}:{i}"), image_size, jitter,
                                                grid, num_shapes, sizes)
            name = f"images/{split}-{i:06d}.png"
            render(shapes, image_size).save(os.path.join(out_dir, name), format="PNG")
            boxes = [s.bbox(image_size) for s in shapes]
            x1, y1, x2, y2 = boxes[target]
            record = {"id": f"{split}-{i}", "image": name, "bbox": [x1, y1, x2 - x1, y2 - y1],
                      "expression": expression, "target": target,
                      "shapes": [{"colour": s.colour, "shape": s.shape, "size": s.size, "bbox": b}
                                 for s, b in zip(shapes, boxes)]}
            f.write(json.dumps(record) + "\n")
            records.append(record)
    return records


def generate_grounding_dataset(out_dir: str, num_samples: int, seed: int = 0, image_size: int = 64,
                               num_eval: int | None = None, jitter: int = 0, box_format: str = "norm3",
                               grid: int = 3, num_shapes: int | None = None,
                               sizes: tuple[str, ...] = SIZES) -> GroundingDataset:
    """Write ``train.jsonl`` (num_samples), ``eval.jsonl`` (default num_samples // 10, at least 1), ``eval_rec.json``
    (eval-replay file; the model's boxes read as ``box_format``) and ``images/`` under ``out_dir``. ``num_shapes``
    (default: 2-4 per image) fixes the shapes per image; ``sizes`` the sizes drawn (with one, no expression names
    a size)."""
    if num_samples < 1 or image_size < 32 or not 2 <= grid <= image_size // 16:
        raise ValueError(f"need num_samples >= 1, image_size >= 32 and 2 <= grid <= image_size // 16, got "
                         f"{num_samples=} {image_size=} {grid=}")
    if num_shapes is not None and not 1 <= num_shapes <= min(len(COLOURS) * len(SHAPES), grid * grid):
        raise ValueError(f"num_shapes={num_shapes} must be between 1 and the grid's {grid * grid} cells")
    sizes = tuple(sizes)
    if not sizes or not set(sizes) <= set(SIZES) or len(set(sizes)) != len(sizes):
        raise ValueError(f"sizes={list(sizes)} must be distinct names out of {list(SIZES)}")
    get_box_format(box_format)
    num_eval = max(1, num_samples // 10) if num_eval is None else num_eval
    if num_eval < 0:
        raise ValueError(f"num_eval={num_eval} must be >= 0")
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    _write_split(out_dir, "train", num_samples, seed, image_size, jitter, grid, num_shapes, sizes)
    evals = _write_split(out_dir, "eval", num_eval, seed, image_size, jitter, grid, num_shapes, sizes)
    replay = {r["id"]: [{"question": REC_PROMPT.format(expression=r["expression"]), "images": [r["image"]],
                         "answer": r["shapes"][r["target"]]["bbox"], "box_text": box_format}] for r in evals}
    replay_path = os.path.join(out_dir, "eval_rec.json")
    with open(replay_path, "w") as f:
        json.dump(replay, f)
    return GroundingDataset(os.path.join(out_dir, "train.jsonl"), os.path.join(out_dir, "eval.jsonl"), replay_path,
                            os.path.join(out_dir, "images"), num_samples, num_eval)


def grounding_corpus_lines(num_samples: int = 200, seed: int = 0, image_size: int = 64) -> list[str]:
    """Text to train a tiny tokenizer on: REC / REG rounds with boxes in every format, in every template."""
    lines = []
    for i in range(num_samples):
        shapes, target, expression = _scene(random.Random(f"{seed}:grounding-corpus:{i}"), image_size, 0, 3)
        fmt = BOX_FORMATS[sorted(BOX_FORMATS)[i % len(BOX_FORMATS)]]
        box = fmt.format(shapes[target].bbox(image_size), (image_size, image_size))
        conv = Conversation((Round(REC_PROMPT.format(expression=expression), box, (FileImage("x"),)),
                             Round(REG_PROMPT.format(box=box), expression)))
        lines += [template.render_text(conv) for template in TEMPLATES.values()]
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--num-samples", type=int, required=True, help="training images (one target each)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--num-eval", type=int, default=None, help="held-out images (default: num_samples // 10)")
    parser.add_argument("--jitter", type=int, default=0, help="shift each shape by up to this many pixels")
    parser.add_argument("--grid", type=int, default=3, help="shapes sit in the cells of a grid x grid layout")
    parser.add_argument("--num-shapes", type=int, default=None,
                        help="shapes per image (default 2-4; 1: the target alone, a pure localisation task)")
    parser.add_argument("--sizes", type=name_list, default=SIZES,
                        help="comma list of shape sizes drawn (default small,big; one size: fewer distinct boxes)")
    parser.add_argument("--box-format", default="norm3", choices=sorted(BOX_FORMATS),
                        help="how eval_rec.json reads the model's boxes (train with the same)")
    args = parser.parse_args(argv)
    out = generate_grounding_dataset(args.out, args.num_samples, args.seed, args.image_size, args.num_eval,
                                     args.jitter, args.box_format, args.grid,
                                     args.num_shapes, args.sizes)
    print(f"wrote {out.num_train} train / {out.num_eval} eval grounding samples to {out.train_path}, "
          f"{out.eval_path}; eval-replay file {out.replay_path}; images in {out.image_dir}")


if __name__ == "__main__":
    main()
