"""A synthetic "draw a <colour> <shape>" set for the images-as-tokens demo, and its verdict on drawn pictures.

Drawing records (``jsonl_images_out`` format, ``data/formats/images_out.py``): "Draw a red circle." is answered
"Here is a red circle: OUTPUT#1", the output image one shape drawn by ``data/synthetic.py``'s renderer (its colours
and shapes; side and height vary). Text records (``jsonl``, no images) talk about the same words, for a text model:
"How many corners does a square have?" -> "four". Held-out prompts come as an ``eval-replay`` file. Whether a
drawing shows the requested colour is decided by ``dominant_colour``, the measure ``train-image-tokenizer``
reports as "dominant colour kept"; the baseline is the best a model ignoring the prompt can do (always drawing
the colour most often requested).

Files under ``out``:
* ``draw.jsonl`` + ``images/draw-<i>.png``: ``{"id", "colour", "shape", "rounds": [{"question", "answer",
  "output_images": ["images/draw-<i>.png"]}]}``;
* ``text.jsonl``: ``{"id", "rounds": [{"question", "answer"}, ...]}`` (1-2 rounds);
* ``eval_draw.json``: ``{"eval-<i>": [{"question": "Draw a blue square."}]}``, and ``eval_draw.jsonl`` with each
  one's ``{"id": "eval-<i>", "colour", "shape"}``; ``eval_text.json``: held-out text rounds with their answers
  (``eval-replay`` scores them by exact match);
* ``tokenizer/`` (CLI only): a tiny sentencepiece tokenizer trained on ``drawing_corpus_lines``.
Same arguments -> byte-identical files.
CLI: ``python -m megatron_visualchat.data.synthetic_drawing --out DIR --num-samples N --seed S``; ``... report
--data DIR --results EVAL_OUT/results.jsonl`` scores an ``eval-replay`` run of ``eval_draw.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..config import check_choice
from .conversation import Conversation, Round
from .synthetic import COLOURS, SHAPES, SIDES, ShapeImage
from .templates import TEMPLATES
from .tokenizer import train_tiny_sentencepiece

PLACEMENTS = ("random", "fixed")
DRAW_PROMPTS = ("Draw a {colour} {shape}.", "Please draw a {colour} {shape}.", "Can you draw a {colour} {shape}?")
DRAW_ANSWER = "Here is a {colour} {shape}: OUTPUT#1"
TOKENIZER_VOCAB = 512  # the CLI's tokenizer: enough pieces for the template's system prompt to take ~55 tokens
CORNERS = {"circle": "zero", "square": "four", "triangle": "three"}
TEXT_ROUNDS = (  # (question, answer) templates over one colour and shape
    ("How many corners does a {shape} have?", "{corners}"),
    ("Describe a {colour} {shape}.", "A {colour} {shape} has {corners} corners."),
    ("What colour is a {colour} {shape}?", "{colour}"),
)


@dataclass(frozen=True)
class DrawingDataset:
    draw_path: str
    text_path: str
    eval_replay_path: str
    eval_path: str
    eval_text_path: str
    num_draw: int
    num_eval: int


def _request(rng: random.Random) -> tuple[str, str, str]:
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    return colour, shape, rng.choice(DRAW_PROMPTS).format(colour=colour, shape=shape)


def _text_rounds(rng: random.Random) -> list[tuple[str, str]]:
    out = []
    for _ in range(rng.randint(1, 2)):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        q, a = rng.choice(TEXT_ROUNDS)
        fill = {"colour": colour, "shape": shape, "corners": CORNERS[shape]}
        out.append((q.format(**fill), a.format(**fill)))
    return out


def _write_jsonl(path: str, records) -> None:
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def generate_drawing_dataset(out_dir: str, num_samples: int, seed: int = 0, image_size: int = 16,
                             num_text: int | None = None, num_eval: int = 100,
                             placement: str = "random") -> DrawingDataset:
    """Write the files of the module docstring: ``num_samples`` drawing records, ``num_text`` text records (default
    ``num_samples``), ``num_eval`` held-out drawing prompts and as many text conversations. ``placement``: "random"
    (each picture's side, height and jitter drawn anew) or "fixed" (one picture per colour and shape: an easier
    task, learnt in fewer steps). Same arguments -> byte-identical files."""
    num_text = num_samples if num_text is None else num_text
    check_choice("placement", placement, PLACEMENTS)
    if num_samples < 1 or num_text < 0 or num_eval < 1 or image_size < 16:
        raise ValueError(f"need num_samples >= 1, num_text >= 0, num_eval >= 1 and image_size >= 16, got "
                         f"{num_samples=} {num_text=} {num_eval=} {image_size=}")
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    draws = []
    for i in range(num_samples):
        rng = random.Random(f"{seed}:draw:{i}")
        colour, shape, prompt = _request(rng)
        name = f"images/draw-{i:06d}.png"
        place = rng if placement == "random" else random.Random(f"{seed}:{colour}:{shape}")
        ShapeImage(colour, shape, 1, place.choice(SIDES)).render(image_size, place).save(
            os.path.join(out_dir, name), format="PNG")
        draws.append({"id": f"draw-{i}", "colour": colour, "shape": shape,
                      "rounds": [{"question": prompt, "answer": DRAW_ANSWER.format(colour=colour, shape=shape),
                                  "output_images": [name]}]})
    texts = [{"id": f"text-{i}", "rounds": [{"question": q, "answer": a}
                                            for q, a in _text_rounds(random.Random(f"{seed}:text:{i}"))]}
             for i in range(num_text)]
    evals = [(f"eval-{i}", *_request(random.Random(f"{seed}:eval:{i}"))) for i in range(num_eval)]
    paths = {name: os.path.join(out_dir, name) for name in ("draw.jsonl", "text.jsonl", "eval_draw.json",
                                                            "eval_draw.jsonl", "eval_text.json")}
    _write_jsonl(paths["draw.jsonl"], draws)
    _write_jsonl(paths["text.jsonl"], texts)
    _write_jsonl(paths["eval_draw.jsonl"], [{"id": n, "colour": c, "shape": s} for n, c, s, _ in evals])
    with open(paths["eval_draw.json"], "w") as f:
        json.dump({n: [{"question": prompt}] for n, _, _, prompt in evals}, f, indent=1)
    with open(paths["eval_text.json"], "w") as f:
        json.dump({f"text-eval-{i}": [{"question": q, "answer": a}
                                      for q, a in _text_rounds(random.Random(f"{seed}:text-eval:{i}"))]
                   for i in range(num_eval)}, f, indent=1)
    return DrawingDataset(paths["draw.jsonl"], paths["text.jsonl"], paths["eval_draw.json"], paths["eval_draw.jsonl"],
                          paths["eval_text.json"], num_samples, num_eval)


def drawing_corpus_lines(num_samples: int = 200, seed: int = 0) -> list[str]:
    """Text to train a tiny tokenizer on: drawing requests (answers without their image) and text rounds, rendered
    with every registered template."""
    lines = []
    for i in range(num_samples):
        rng = random.Random(f"{seed}:corpus:{i}")
        colour, shape, prompt = _request(rng)
        rounds = [(prompt, DRAW_ANSWER.format(colour=colour, shape=shape).replace("OUTPUT#1", "")),
                  *_text_rounds(rng)]
        conv = Conversation(tuple(Round(q, a, ()) for q, a in rounds))
        lines += [template.render_text(conv) for template in TEMPLATES.values()]
    return lines


def score_drawings(requested: list[str], drawn: list) -> dict:
    """How often the dominant colour of each drawn picture (an ``[3, S, S]`` tensor in [0, 1], or None when nothing
    was drawn: a miss) is the requested one, against always drawing the most requested colour."""
    from megatron_visualchat.model.image_tokenizer.train import dominant_colour

    if not requested or len(requested) != len(drawn):
        raise ValueError(f"need one drawing per request, got {len(requested)} requests and {len(drawn)} drawings")
    names = list(COLOURS)
    hits, found = 0, Counter()
    for colour, picture in zip(requested, drawn):
        index = -1 if picture is None else int(dominant_colour(picture[None].float())[0])
        found[names[index] if index >= 0 else "none"] += 1
        hits += index >= 0 and names[index] == colour
    return {"drawings": len(requested), "accuracy": hits / len(requested),
            "baseline": max(Counter(requested).values()) / len(requested), "drawn_colours": dict(found)}


def report(data_dir: Path, results: Path) -> dict:
    """``score_drawings`` over the held-out prompts an ``eval-replay`` run answered (its ``results.jsonl``): a
    prompt's drawing is the first image its answer drew (``output_images``); an answer without one is a miss."""
    import numpy as np
    import torch
    from PIL import Image

    drawn_by = {}
    for line in Path(results).read_text().splitlines():
        record = json.loads(line)
        drawn_by.setdefault(record["conversation"], (record.get("output_images") or [None])[0])
    requested, drawn = [], []
    for line in (Path(data_dir) / "eval_draw.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["id"] in drawn_by:
            path = drawn_by[record["id"]]
            requested.append(record["colour"])
            drawn.append(None if path is None else torch.from_numpy(
                np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1))
    return score_drawings(requested, drawn)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    score = sub.add_parser("report", help="score drawn pictures of the held-out prompts")
    score.add_argument("--data", type=Path, required=True, help="the directory this module wrote")
    score.add_argument("--results", type=Path, required=True, help="eval-replay's results.jsonl (eval_draw.json)")
    parser.add_argument("--out", help="output directory")
    parser.add_argument("--num-samples", type=int, help="drawing records")
    parser.add_argument("--num-text", type=int, default=None, help="text records (default: --num-samples)")
    parser.add_argument("--num-eval", type=int, default=100, help="held-out drawing prompts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=16, help="pixels (the image tokenizer's image size)")
    parser.add_argument("--placement", choices=PLACEMENTS, default="random",
                        help="fixed: one picture per colour and shape (easier)")
    args = parser.parse_args(argv)
    if args.command == "report":
        r = report(args.data, args.results)
        print(f"requested colour drawn in {r['accuracy']:.1%} of {r['drawings']} held-out drawings; always drawing "
              f"the most requested colour: {r['baseline']:.1%} (drawn: {r['drawn_colours']})")
        return
    if args.out is None or args.num_samples is None:
        parser.error("give --out and --num-samples (or the report command)")
    d = generate_drawing_dataset(args.out, args.num_samples, args.seed, args.image_size, args.num_text, args.num_eval,
                                 args.placement)
    tokenizer = os.path.join(args.out, "tokenizer")
    train_tiny_sentencepiece(tokenizer, drawing_corpus_lines(400, args.seed), TOKENIZER_VOCAB)
    print(f"wrote {d.num_draw} drawing records to {d.draw_path}, text records to {d.text_path}, {d.num_eval} "
          f"held-out prompts to {d.eval_replay_path}, a tokenizer for them to {tokenizer}")


if __name__ == "__main__":
    main()
