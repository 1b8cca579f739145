import base64

import numpy as np
import pytest

from megatron_visualchat.data import TEMPLATES, SampleError, load_image, open_source


def test_paths_inline_base64_and_references(tmp_path, write_png, write_jsonl, b64_png):
    write_png("img/a.png", (255, 0, 0))
    record = {"id": "s1", "rounds": [
        {"images": ["img/a.png", {"base64": b64_png((0, 255, 0))}], "question": "What colour is IMAGE#2?",
         "answer": "green"},
        {"images": [], "question": "And IMAGE#1?", "answer": "red"},
    ]}
    conv = open_source("jsonl", write_jsonl("d.jsonl", [record])).conversation(0)
    assert [np.asarray(load_image(i))[0, 0].tolist() for i in conv.images] == [[255, 0, 0], [0, 255, 0]]
    text = TEMPLATES["dsvc"].render_text(conv)
    assert "What colour is image 2?" in text and "And image 1?" in text


def test_images_from_a_lazily_read_base64_tsv(tmp_path, write_jsonl, png_bytes):
    tsv = tmp_path / "images.tsv"
    tsv.write_bytes(b"img-7\t" + base64.b64encode(png_bytes((0, 0, 255))) + b"\n")
    record = {"rounds": [{"images": ["img-7"], "question": "<image>\nColour?", "answer": "blue"}]}
    path = write_jsonl("d.jsonl", [record])
    conv = open_source("jsonl", path, images=str(tsv)).conversation(0)
    assert conv.rounds[0].question == "Colour?"
    assert (np.asarray(load_image(conv.images[0])) == [0, 0, 255]).all()


@pytest.mark.parametrize(
    "record,reason",
    [
        ({"rounds": [{"images": ["a.png"], "question": "<image><image> two?", "answer": "x"}]}, "image_count_mismatch"),
        ({"rounds": []}, "empty_conversation"),
        ({"rounds": "nope"}, "malformed_conversation"),
        ({"rounds": [{"question": "q", "answer": ""}]}, "malformed_conversation"),
        ({"rounds": [{"question": "IMAGE#2?", "answer": "a", "images": ["a.png"]}]}, "malformed_conversation"),
        ({"rounds": [{"question": "q", "answer": "a", "images": [3]}]}, "malformed_conversation"),
        # an image the answer writes would be trained as the literal text OUTPUT#1 (jsonl_images_out reads it)
        ({"rounds": [{"question": "Draw", "answer": "OUTPUT#1", "output_images": ["o.png"]}]}, "malformed_conversation"),
    ],
)
def test_bad_records(write_jsonl, record, reason):
    path = write_jsonl("d.jsonl", [record])
    with pytest.raises(SampleError, match="d.jsonl:line 1") as e:
        open_source("jsonl", path).conversation(0)
    assert e.value.reason == reason
