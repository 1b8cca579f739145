import json

import numpy as np
import pytest

from megatron_visualchat.data import TEMPLATES, SampleError, load_image, open_source


def turns(*pairs):
    out = []
    for q, a in pairs:
        out += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return out


def reason_of(source, index):
    with pytest.raises(SampleError) as e:
        source.conversation(index)
    return e.value


@pytest.fixture
def llava_file(tmp_path, write_png):
    write_png("img/a.jpg", (255, 0, 0))
    write_png("img/b.jpg", (0, 0, 255))
    records = [
        {"id": "single", "image": "a.jpg",
         "conversations": turns(("<image>\nWhat is this?", "Red."), ("Sure?", "Yes."))},
        {"id": "multi", "image": ["a.jpg", "b.jpg"],
         "conversations": turns(("<image>\nFirst?", "Red."), ("Now <image> this one?", "Blue."))},
        {"id": "text", "conversations": turns(("Hello?", "Hi."))},
        {"id": "mismatch", "image": ["a.jpg", "b.jpg"], "conversations": turns(("<image>\nOnly one?", "Hm."))},
        {"id": "role", "image": "a.jpg",
         "conversations": [{"from": "robot", "value": "<image>"}, {"from": "gpt", "value": "x"}]},
        {"id": "order", "image": "a.jpg",
         "conversations": [{"from": "gpt", "value": "<image>x"}, {"from": "human", "value": "y"}]},
        {"id": "empty", "image": "a.jpg", "conversations": []},
        {"id": "odd", "conversations": turns(("q", "a")) + [{"from": "human", "value": "dangling"}]},
        {"id": "noanswer", "conversations": turns(("q", "  "))},
    ]
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(records))
    return str(path), str(tmp_path / "img")


def test_single_image_record(llava_file):
    path, images = llava_file
    conv = open_source("llava", path, images=images).conversation(0)
    assert [r.question for r in conv.rounds] == ["What is this?", "Sure?"]
    assert [len(r.images) for r in conv.rounds] == [1, 0]
    assert (np.asarray(load_image(conv.rounds[0].images[0])) == [255, 0, 0]).all()
    assert conv.origin.endswith("llava.json[0]")


def test_multi_image_placeholders_place_images_in_their_rounds(llava_file):
    path, images = llava_file
    conv = open_source("llava", path, images=images).conversation(1)
    assert [[i.name for i in r.images] for r in conv.rounds] == [["a.jpg"], ["b.jpg"]]
    assert conv.rounds[1].question == "Now  this one?"
    text = TEMPLATES["dsvc"].render_text(conv)
    assert "### Image 1:\n<image>\n\n### Question:\nFirst?" in text
    assert "<s>### Image 2:\n<image>\n\n### Question:\nNow  this one?" in text


def test_text_only_record_is_kept(llava_file):
    path, images = llava_file
    conv = open_source("llava", path, images=images).conversation(2)
    assert conv.num_images == 0 and conv.rounds[0].answer == "Hi."


@pytest.mark.parametrize(
    "index,reason",
    [(3, "image_count_mismatch"), (4, "unknown_role"), (5, "malformed_conversation"), (6, "empty_conversation"),
     (7, "malformed_conversation"), (8, "malformed_conversation")],
)
def test_bad_records_raise_located_errors(llava_file, index, reason):
    path, images = llava_file
    error = reason_of(open_source("llava", path, images=images), index)
    assert error.reason == reason and error.where.endswith(f"llava.json[{index}]")


def test_jsonl_variant_and_max_rounds(tmp_path, write_jsonl, write_png):
    write_png("a.jpg")
    path = write_jsonl("llava.jsonl", [{"image": "a.jpg", "conversations": turns(("<image>\nq1", "a1"), ("q2", "a2"))},
                                       "{not json"])
    source = open_source("llava", path, max_rounds=1)  # images default to the file's directory
    assert len(source.conversation(0).rounds) == 1
    error = reason_of(source, 1)
    assert error.reason == "malformed_json" and error.where.endswith("llava.jsonl:line 2")


def test_registry_errors(llava_file):
    path, images = llava_file
    with pytest.raises(ValueError, match="'jsonl'"):
        open_source("coco", path)
    with pytest.raises(ValueError, match="bad options"):
        open_source("llava", path, imgs=images)
    with pytest.raises(ValueError, match="not found"):
        open_source("llava", path + ".missing")
