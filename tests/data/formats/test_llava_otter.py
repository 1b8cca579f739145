import json
import random

import pytest

from megatron_visualchat.data import TEMPLATES, open_source


def llava(image, *pairs):
    conv = []
    for q, a in pairs:
        conv += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return {"image": image, "conversations": conv}


@pytest.fixture
def blend_files(tmp_path, write_png):
    for n in ("000000000001", "000000000002", "000000000003"):
        write_png(f"coco/{n}.jpg")
    records = [
        llava("000000000001.jpg", ("<image>\nL1a?", "x"), ("L1b?", "y")),
        llava("000000000001.jpg", ("<image>\nL1c?", "z")),
        llava("000000000002.jpg", ("<image>\nL2?", "w")),
    ]
    (tmp_path / "llava.json").write_text(json.dumps(records))
    data = {
        "CGD_INS_1": {"instruction": "Difference?", "answer": "d1", "image_ids": ["CGD_IMG_000000000001",
                      "CGD_IMG_000000000002"], "rel_ins_ids": ["CGD_INS_2"]},
        "CGD_INS_2": {"instruction": "Similar?", "answer": "d2", "image_ids": ["CGD_IMG_000000000001",
                      "CGD_IMG_000000000002"], "rel_ins_ids": []},
        # image 3 has no LLaVA conversation and is not last: cannot keep image order -> left out
        "CGD_INS_3": {"instruction": "?", "answer": "n", "image_ids": ["CGD_IMG_000000000003",
                      "CGD_IMG_000000000001"], "rel_ins_ids": []},
    }
    (tmp_path / "CGD.json").write_text(json.dumps({"data": data}))
    return str(tmp_path / "CGD.json"), str(tmp_path / "llava.json"), str(tmp_path / "coco")


def test_blend_structure(blend_files):
    cgd, llava_path, coco = blend_files
    source = open_source("llava_otter", cgd, llava=[llava_path], images=coco)
    assert len(source) == 1
    for seed in range(20):
        conv = source.conversation(0, random.Random(seed))
        questions = [r.question for r in conv.rounds]
        cgd_rounds = [i for i, q in enumerate(questions) if q in ("Difference?", "Similar?")]
        assert cgd_rounds and cgd_rounds == list(range(cgd_rounds[0], len(questions)))  # CGD turns come last
        assert questions[0] in ("L1a?", "L1c?")  # image 1 always has LLaVA rounds first
        names = [i.name for r in conv.rounds for i in r.images]
        assert names == ["000000000001.jpg", "000000000002.jpg"]  # each image introduced once, in order
        assert conv.rounds[0].images[0].name == "000000000001.jpg"
        text = TEMPLATES["dsvc"].render_text(conv)
        assert text.index("### Image 1:") < text.index("### Image 2:")


def test_blend_draws_are_deterministic_by_rng(blend_files):
    cgd, llava_path, coco = blend_files
    source = open_source("llava_otter", cgd, llava=llava_path, images=coco)
    texts = {seed: [r.question for r in source.conversation(0, random.Random(seed)).rounds] for seed in range(10)}
    again = {seed: [r.question for r in source.conversation(0, random.Random(seed)).rounds] for seed in range(10)}
    assert texts == again and len({tuple(t) for t in texts.values()}) > 1
