import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from megatron_visualchat.data import TEMPLATES, open_source
from megatron_visualchat.data.synthetic import (
    BACKGROUND,
    COLOURS,
    COUNTS,
    SHAPES,
    SIDES,
    generate_synthetic_dataset,
    main,
)


def contents(root) -> dict[str, bytes]:
    out = {}
    for directory, _, names in os.walk(root):
        for name in names:
            path = os.path.join(directory, name)
            out[os.path.relpath(path, root)] = open(path, "rb").read()
    return out


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        generate_synthetic_dataset(str(tmp_path / name), num_samples=100, seed=seed, image_size=32)
    a, b, c = (contents(tmp_path / n) for n in "abc")
    assert a == b and a != c
    # Exactly the work asked for: 100 training records, and one image file per image the records name.
    train, held = records(tmp_path / "a" / "train.jsonl"), records(tmp_path / "a" / "eval.jsonl")
    assert len(train) == 100
    named = {name for r in train + held for rnd in r["rounds"] for name in rnd["images"]}
    assert set(a) - {"train.jsonl", "eval.jsonl"} == named


def records(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_structure_and_answers_match_the_pixels(tmp_path):
    syn = generate_synthetic_dataset(str(tmp_path), num_samples=60, seed=0, image_size=48)
    train, held = records(syn.train_path), records(syn.eval_path)
    assert (len(train), len(held), syn.num_eval) == (60, 6, 6)
    assert {r["id"] for r in train}.isdisjoint(r["id"] for r in held)
    words = set(COLOURS) | set(SHAPES) | set(COUNTS.values()) | set(SIDES)
    checked = 0
    for record in train:
        images = [name for r in record["rounds"] for name in r["images"]]
        assert 1 <= len(images) <= 3 and 1 <= len(record["rounds"]) <= 2
        assert record["rounds"][0]["images"]
        shown = 0
        for r in record["rounds"]:
            shown += len(r["images"])
            assert r["answer"] in words and " " not in r["answer"]
            k = int(r["question"].split("IMAGE#")[1].split()[0].rstrip("?"))
            assert 1 <= k <= shown
            pixels = np.asarray(Image.open(tmp_path / images[k - 1]).convert("RGB")).astype(int)
            drawn = (np.abs(pixels - BACKGROUND).sum(-1) > 60)
            if r["question"].startswith("What colour"):
                colour = np.asarray(COLOURS[r["answer"]])
                assert (np.abs(pixels[drawn] - colour).sum(-1) < 30).mean() > 0.9
                checked += 1
            elif r["question"].startswith("On which side"):
                columns = np.nonzero(drawn.any(0))[0]
                assert (columns < 24).all() if r["answer"] == "left" else (columns >= 24).all()
                checked += 1
            elif r["question"].startswith("How many"):
                rows = [48 // 6, 3 * 48 // 6, 5 * 48 // 6]
                assert COUNTS[sum(drawn[y].any() for y in rows)] == r["answer"]
                checked += 1
    assert checked > 20


def test_reads_back_through_the_jsonl_reader(tmp_path):
    syn = generate_synthetic_dataset(str(tmp_path), num_samples=30, seed=2, image_size=32)
    source = open_source("jsonl", syn.train_path)
    texts = [TEMPLATES["dsvc"].render_text(source.conversation(i)) for i in range(len(source))]
    assert any("in image 2?" in t for t in texts) and not any("IMAGE#" in t for t in texts)


def test_cli(tmp_path):
    main(["--out", str(tmp_path / "x"), "--num-samples", "5", "--seed", "1", "--image-size", "16", "--num-eval", "2"])
    assert len(records(tmp_path / "x" / "eval.jsonl")) == 2
    done = subprocess.run(
        [sys.executable, "-m", "megatron_visualchat.data.synthetic", "--out", str(tmp_path / "y"), "--num-samples", "5",
         "--seed", "1", "--image-size", "16", "--num-eval", "2"],
        capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert "wrote 5 train samples" in done.stdout
    assert contents(tmp_path / "x") == contents(tmp_path / "y")


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_samples"):
        generate_synthetic_dataset("/nonexistent", num_samples=0)
