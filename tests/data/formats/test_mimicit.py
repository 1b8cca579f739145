import base64
import json

import numpy as np
import pytest

from megatron_visualchat.data import TEMPLATES, SampleError, load_image, open_source


def instruction(q, a, image_ids, rel=()):
    return {"instruction": q, "answer": a, "image_ids": list(image_ids), "rel_ins_ids": list(rel)}


@pytest.fixture
def mimicit(tmp_path, png_bytes):
    data = {
        "SD_INS_1": instruction(
            "<image>What changed?", "The colour.", ["SD_IMG_1", "SD_IMG_2"], ["SD_INS_2", "SD_INS_9"]),
        "SD_INS_2": instruction("Which is brighter?", "The second.", ["SD_IMG_1", "SD_IMG_2"], ["SD_INS_1"]),
        "SD_INS_3": instruction("Describe it.", "Green.", ["SD_IMG_3"]),
        "SD_INS_4": {"instruction": "no answer"},
    }
    (tmp_path / "SD_instructions.json").write_text(json.dumps({"meta": {}, "data": data}))
    colours = {"SD_IMG_1": (255, 0, 0), "SD_IMG_2": (0, 0, 255), "SD_IMG_3": (0, 255, 0)}
    images = {k: base64.b64encode(png_bytes(c)).decode() for k, c in colours.items()}
    (tmp_path / "SD.json").write_text(json.dumps(images))
    return str(tmp_path / "SD_instructions.json"), str(tmp_path / "SD.json")


def test_related_instructions_merge_into_one_multi_round_sample(mimicit):
    path, images = mimicit
    source = open_source("mimicit", path, images=images)
    assert len(source) == 3  # INS_2 merged into INS_1's group
    conv = source.conversation(0)
    assert [r.question for r in conv.rounds] == ["What changed?", "Which is brighter?"]
    assert [len(r.images) for r in conv.rounds] == [2, 0]  # all images shown in round 1
    assert (np.asarray(load_image(conv.rounds[0].images[1])) == [0, 0, 255]).all()  # lazily from the base64 map
    assert conv.origin.endswith("SD_instructions.json:data[SD_INS_1]")
    text = TEMPLATES["dsvc"].render_text(conv)
    assert "### Image 1:\n<image>\n### Image 2:\n<image>\n\n### Question:\nWhat changed?" in text


def test_malformed_instruction_is_located(mimicit):
    path, images = mimicit
    with pytest.raises(SampleError, match=r"data\[SD_INS_4\]: malformed_conversation"):
        open_source("mimicit", path, images=images).conversation(2)


def test_cgd_style_directory_images(tmp_path, write_png):
    write_png("coco/000000000139.jpg", (1, 2, 3))
    data = {"CGD_INS_1": instruction("Differences?", "None.", ["CGD_IMG_000000000139"])}
    (tmp_path / "CGD.json").write_text(json.dumps({"data": data}))
    source = open_source("mimicit", str(tmp_path / "CGD.json"), images=str(tmp_path / "coco"),
                         image_filename="{id_suffix}.jpg")
    image = source.conversation(0).rounds[0].images[0]
    assert image.name == "000000000139.jpg" and (np.asarray(load_image(image)) == [1, 2, 3]).all()


def test_not_a_mimicit_file(tmp_path):
    (tmp_path / "x.json").write_text("[]")
    with pytest.raises(ValueError, match="'data' object"):
        open_source("mimicit", str(tmp_path / "x.json"), images=str(tmp_path))
