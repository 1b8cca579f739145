"""Grounding data: refexp / grounded_chat readers, pickle refusal, image paths confined to the data root, boxes
written in the encoder frame by the dataset, and the synthetic grounding set (deterministic, boxes = drawn pixels)."""

import filecmp
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from megatron_visualchat.data import SampleError, build_train_dataset, open_source, validate
from megatron_visualchat.data.boxes import BoxRenderer
from megatron_visualchat.data.synthetic_grounding import COLOURS, SHAPES, SIZES, generate_grounding_dataset
from megatron_visualchat.model.vision.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImagePreprocess

PAD32 = ImagePreprocess(32, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, "pad")


def _write_json(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


def _rendered(source, index, sizes):
    conv = source.conversation(index)
    return [(r.question, r.answer) for r in BoxRenderer(PAD32, "pixel").render(conv, sizes).rounds]


def test_refexp_records_become_rec_and_reg_rounds(tmp_path, write_png):
    write_png("img/a.png", size=(64, 32))
    path = _write_json(tmp_path, "refs.json", [
        {"image": "a.png", "bbox": [8, 4, 16, 8], "sentences": [{"sent": "the left dog"}, {"sent": "brown dog"}]},
        {"image": "a.png", "bbox": [8, 4, 0, 8], "expression": "flat"},
        {"image": "a.png", "bbox": [8, 4, 16, 8]},
    ])
    source = open_source("refexp", path, images=str(tmp_path / "img"), tasks="rec,reg")
    conv = source.conversation(0)
    assert [len(r.images) for r in conv.rounds] == [1, 0, 0]
    # pad: the 64 x 32 image sits 16..48 of a 64 canvas -> y + 16, then x 0.5
    assert _rendered(source, 0, [(64, 32)]) == [
        ("Where is the left dog? Answer with its box.", "[4,10,12,14]"),
        ("Where is brown dog? Answer with its box.", "[4,10,12,14]"),
        ("What is in the box [4,10,12,14]? Answer in a few words.", "the left dog")]
    with pytest.raises(SampleError, match=r"refs.json\[1\]: malformed_conversation: .*0 <= x1 < x2"):
        source.conversation(1)
    with pytest.raises(SampleError, match=r"refs.json\[2\]: malformed_conversation: needs 'expression'"):
        source.conversation(2)
    with pytest.raises(ValueError, match=r"tasks='rec,ground'"):
        open_source("refexp", path, tasks="rec,ground")


def test_grounded_chat_reads_box_placeholders_and_inline_boxes(tmp_path, write_png):
    write_png("a.png", size=(32, 32))
    path = _write_json(tmp_path, "chat.json", [
        {"image": "a.png", "boxes": [[0, 0, 16, 16], [16, 16, 32, 32]], "boxes_seq": [[1], [0, 1]],
         "conversations": [{"from": "human", "value": "<image>\nWhat is at <boxes>?"},
                           {"from": "gpt", "value": "A cat <boxes>, near [0.5,0,1,0.5]."}]},
        {"image": "a.png", "boxes": [[0, 0, 16, 16]], "conversations": [
            {"from": "human", "value": "<boxes> and <boxes>?"}, {"from": "gpt", "value": "x"}]},
    ])
    source = open_source("grounded_chat", path, box_format="norm3")
    assert _rendered(source, 0, [(32, 32)]) == [
        ("What is at [0.500,0.500,1.000,1.000]?",
         "A cat [0.000,0.000,0.500,0.500] [0.500,0.500,1.000,1.000], near [0.500,0.000,1.000,0.500].")]
    with pytest.raises(SampleError, match="more <boxes> placeholders than 'boxes_seq' entries"):
        source.conversation(1)


def test_pickles_are_refused_with_the_way_to_convert(tmp_path):
    for name, data in (("refs(unc).p", b"\x80\x04K\x01."), ("refs.json", b"\x80\x04K\x01.")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=r"a Python pickle; it is not read .*docs/grounding.md"):
            open_source("refexp", str(tmp_path / name))


def test_image_paths_stay_inside_the_data_root(tmp_path, write_png, tok):
    write_png("secret.png")
    write_png("data/ok.png")
    path = _write_json(tmp_path / "data", "refs.json", [
        {"image": "../secret.png", "bbox": [1, 1, 4, 4], "expression": "x"},
        {"image": "ok.png", "bbox": [1, 1, 4, 4], "expression": "red"}])
    ds = build_train_dataset([{"format": "refexp", "path": path}], tok, num_image_tokens=4, max_seq_len=300,
                             image_preprocess=PAD32)
    samples = [ds[i] for i in range(len(ds))]
    assert ds.skipped == {"image_outside_root": 1} and all(len(s["images"]) == 1 for s in samples)


def test_dataset_writes_boxes_in_the_encoder_frame(tmp_path, tok):
    out = generate_grounding_dataset(str(tmp_path / "g"), 3, seed=5, image_size=64, num_eval=1)
    spec = {"format": "refexp", "path": out.train_path, "options": {"tasks": "rec,reg", "box_format": "pixel"}}
    ds = build_train_dataset([spec], tok, num_image_tokens=4, max_seq_len=400, image_preprocess=PAD32, seed=0)
    record = json.loads(open(out.train_path).readline())
    x, y, w, h = record["bbox"]
    expected = f"[{round(x / 2)},{round(y / 2)},{round((x + w) / 2)},{round((y + h) / 2)}]"  # 64 px -> 32 px frame
    item = ds[0]
    texts = [tok.decode(ds[i]["input_ids"].tolist()) for i in range(len(ds))]
    assert any(expected in t and record["expression"] in t for t in texts), (expected, texts)
    assert item["images"][0].size == (64, 64)
    with pytest.raises(ValueError, match="grounding boxes are written in the frame the vision encoder sees"):
        build_train_dataset([spec], tok, num_image_tokens=4, max_seq_len=400)[0]


def test_synthetic_set_is_deterministic_and_its_boxes_are_the_drawn_pixels(tmp_path):
    a = generate_grounding_dataset(str(tmp_path / "a"), 6, seed=3, image_size=64, num_eval=2, jitter=2)
    generate_grounding_dataset(str(tmp_path / "b"), 6, seed=3, image_size=64, num_eval=2, jitter=2)
    names = ["train.jsonl", "eval.jsonl", "eval_rec.json"] + [f"images/{n}" for n in sorted(os.listdir(a.image_dir))]
    assert len(names) == 3 + 8
    assert all(filecmp.cmp(tmp_path / "a" / n, tmp_path / "b" / n, shallow=False) for n in names)
    c = generate_grounding_dataset(str(tmp_path / "c"), 6, seed=4, image_size=64, num_eval=2)
    assert open(a.train_path).read() != open(c.train_path).read()

    cell = 64 // 3
    for line in open(a.train_path):
        record = json.loads(line)
        pixels = np.asarray(Image.open(tmp_path / "a" / record["image"]))
        for shape in record["shapes"]:
            x1, y1, x2, y2 = shape["bbox"]
            i, j = x1 // cell, y1 // cell  # each shape lies inside its own grid cell
            region = pixels[j * cell:(j + 1) * cell, i * cell:(i + 1) * cell]
            ys, xs = np.nonzero((region == COLOURS[shape["colour"]]).all(axis=-1))
            assert [xs.min() + i * cell, ys.min() + j * cell, xs.max() + 1 + i * cell, ys.max() + 1 + j * cell] \
                == shape["bbox"]
        words = record["expression"].split()  # "the [small|big] <colour> <shape> [<relation> the <colour> <shape>]"
        shape = next(k for k, word in enumerate(words) if word in SHAPES)
        named = tuple(words[shape - 1:shape + 1])
        (target,) = [s["bbox"] for s in record["shapes"]
                     if (s["colour"], s["shape"]) == named and (words[1] not in SIZES or s["size"] == words[1])]
        x, y, w, h = record["bbox"]
        assert [x, y, x + w, y + h] == target == record["shapes"][record["target"]]["bbox"]
    replay = json.load(open(a.replay_path))
    assert len(replay) == 2 and all(r[0]["box_text"] == "norm3" and len(r[0]["answer"]) == 4 for r in replay.values())


def test_validate_data_places_boxes_with_the_named_encoder(tmp_path, tok):
    """validate-data counts what the training crop would cut (tiny: a centre crop keeping x 32..64 of 96 x 32)."""
    Image.new("RGB", (96, 32), (255, 0, 0)).save(tmp_path / "wide.png")
    path = _write_json(tmp_path, "refs.json", [{"image": "wide.png", "bbox": [20, 4, 20, 8], "expression": "cut"},
                                               {"image": "wide.png", "bbox": [40, 4, 10, 8], "expression": "kept"}])
    tok.save(str(tmp_path / "tok"))
    argv = ["--data", f"refexp:{path}", "--tokenizer-dir", str(tmp_path / "tok"), "--image-tokens", "17"]
    out = io.StringIO()
    assert validate.main(argv + ["--vision-encoder", "tiny", "--box-outside", "skip"], stdout=out) == 1
    assert "| box_outside | 1 |" in out.getvalue() and "refs.json[0]" in out.getvalue()
    out = io.StringIO()
    assert validate.main(argv + ["--vision-encoder", "tiny", "--vision-encoder-options", '{"resize": "pad"}',
                                 "--box-outside", "skip"], stdout=out) == 0  # padding cuts nothing
    out = io.StringIO()
    assert validate.main(argv, stdout=out) == 2 and "--vision-encoder" in out.getvalue()


def test_synthetic_grid_option(tmp_path):
    out = generate_grounding_dataset(str(tmp_path / "g"), 4, seed=0, image_size=64, num_eval=0, grid=2)
    for line in open(out.train_path):
        for shape in json.loads(line)["shapes"]:
            x1, y1, x2, y2 = shape["bbox"]
            assert x1 // 32 == (x2 - 1) // 32 and y1 // 32 == (y2 - 1) // 32  # inside one of the 2 x 2 cells
    with pytest.raises(ValueError, match="2 <= grid <= image_size // 16"):
        generate_grounding_dataset(str(tmp_path / "h"), 4, grid=1)
