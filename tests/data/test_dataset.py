import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_visualchat.data import (
    SKIP_REASONS,
    BlendPlan,
    ConversationEncoder,
    SampleError,
    VisualChatDataset,
    build_train_dataset,
    open_source,
)
from megatron_visualchat.model.vision import ENCODERS


def good(name="ok.png"):
    return {"rounds": [{"images": [name], "question": "What colour is IMAGE#1?", "answer": "red"}]}


def one_image(name, question="Colour?"):
    return {"rounds": [{"images": [name], "question": question, "answer": "red"}]}


@pytest.fixture
def files(tmp_path, write_png):
    write_png("ok.png")
    write_png("big.png", size=(100, 100))
    (tmp_path / "garbage.png").write_bytes(b"\x89PNG but not really")
    full = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(full[: len(full) // 2])
    (tmp_path / "folder.png").mkdir()
    return tmp_path


def llava_unknown_role(tmp_path):
    path = tmp_path / "llava.json"
    path.write_text(json.dumps([{"image": "ok.png", "conversations": [{"from": "robot", "value": "<image>"},
                                                                      {"from": "gpt", "value": "x"}]},
                                {"image": "ok.png", "conversations": [{"from": "human", "value": "<image>\nq"},
                                                                      {"from": "gpt", "value": "red"}]}]))
    return {"format": "llava", "path": str(path)}


def refexp_box_outside(tmp_path):
    """A 96 x 32 image: the tiny encoder's centre crop keeps x 32..64, cutting the first record's box."""
    Image.new("RGB", (96, 32), (255, 0, 0)).save(tmp_path / "wide.png")
    records = [{"image": "wide.png", "bbox": [20, 4, 20, 8], "expression": "cut"},
               {"image": "wide.png", "bbox": [40, 4, 10, 8], "expression": "kept"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return {"format": "refexp", "path": str(tmp_path / "d.jsonl")}


CASES = {  # case -> (bad record, expected reason); "unknown_role" uses a LLaVA file, "box_outside" a refexp one
    "malformed_json": ('{"rounds": [', "malformed_json"),
    "malformed_conversation": ({"rounds": "nope"}, "malformed_conversation"),
    "empty_conversation": ({"rounds": []}, "empty_conversation"),
    "image_count_mismatch": (
        {"rounds": [{"images": ["ok.png"], "question": "<image> <image>?", "answer": "a"}]}, "image_count_mismatch"),
    "missing_image": (one_image("does-not-exist.png"), "missing_image"),
    "image_outside_root": (one_image("../ok.png"), "image_outside_root"),
    "image_not_a_file": (one_image("folder.png"), "image_not_a_file"),
    "corrupt_image": (one_image("garbage.png"), "corrupt_image"),
    "truncated_image": (one_image("truncated.png"), "corrupt_image"),
    "image_too_large": (one_image("big.png"), "image_too_large"),
    "too_long": (one_image("ok.png", question="red green blue " * 200), "too_long"),
    "too_many_images": ({"rounds": [{"images": ["ok.png"] * 3, "question": "q", "answer": "a"}]}, "too_many_images"),
    "unknown_role": (None, "unknown_role"),
    "box_outside": (None, "box_outside"),
}


def dataset_for(case, files, write_jsonl, tok, strict=False):
    if case == "unknown_role":
        spec = llava_unknown_role(files)
    elif case == "box_outside":
        spec = refexp_box_outside(files)
    else:
        spec = {"format": "jsonl", "path": write_jsonl("d.jsonl", [CASES[case][0], good()])}
    return build_train_dataset([spec], tok, num_image_tokens=4, max_seq_len=300, max_images_per_sample=2, seed=0,
                               strict=strict, max_image_pixels=5000, image_preprocess=ENCODERS["tiny"].preprocess,
                               box_outside="skip")


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_skipped_and_counted_by_reason(case, files, write_jsonl, tok, caplog):
    reason = CASES[case][1]
    ds = dataset_for(case, files, write_jsonl, tok)
    with caplog.at_level(logging.WARNING, logger="megatron_visualchat.data"):
        samples = [ds[i] for i in range(len(ds))]
    assert ds.skipped == {reason: 1}
    assert [(key, r) for s in samples for key, r in s["skipped"].items()] == [((0, 0), reason)]
    assert all(len(s["images"]) == len(s["image_positions"]) == 1 for s in samples)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and reason in warnings[0]
    assert "d.jsonl:line 1" in warnings[0] or "llava.json[0]" in warnings[0]


def test_warning_once_per_reason_but_every_record_counted_once(files, write_jsonl, tok, caplog):
    path = write_jsonl("d.jsonl", [one_image("gone1.png"), one_image("gone2.png"), good()])
    ds = build_train_dataset([{"format": "jsonl", "path": path}], tok, num_image_tokens=4, max_seq_len=300)
    with caplog.at_level(logging.WARNING, logger="megatron_visualchat.data"):
        for _ in range(2):  # a second pass meets the same bad records again
            for i in range(len(ds)):
                ds[i]
    assert ds.skipped == {"missing_image": 2}
    assert len(caplog.records) == 1
    assert [str(e) for _, e in ds.skip_log.examples["missing_image"]][0].startswith(path)


def test_image_paths_stay_inside_the_image_root(tmp_path, write_png, write_jsonl, tok):
    """``..``, an absolute path and a symlink out of the root are refused even when they name a real image."""
    outside = write_png("secret.png")
    write_png("data/ok.png")
    (tmp_path / "data" / "link.png").symlink_to(outside)
    path = write_jsonl("data/d.jsonl", [one_image("../secret.png"), one_image(outside), one_image("link.png"), good()])
    ds = build_train_dataset([{"format": "jsonl", "path": path}], tok, num_image_tokens=4, max_seq_len=300)
    samples = [ds[i] for i in range(len(ds))]
    assert ds.skipped == {"image_outside_root": 3}
    assert all(s["index"] == samples[0]["index"] for s in samples)  # only the good record is ever used
    strict = build_train_dataset([{"format": "jsonl", "path": path}], tok, num_image_tokens=4, max_seq_len=300,
                                 strict=True)
    with pytest.raises(SampleError, match=r"d.jsonl:line [123]: image_outside_root: .*outside the root"):
        [strict[i] for i in range(len(strict))]


def test_encoded_bytes_are_capped_before_decoding(files, write_jsonl, tok):
    path = write_jsonl("d.jsonl", [good(), good()])
    ds = build_train_dataset([{"format": "jsonl", "path": path}], tok, num_image_tokens=4, max_seq_len=300,
                             max_image_bytes=20)
    assert ds.build_item(0) is None and ds.skipped == {"image_too_large": 1}


@pytest.mark.parametrize("case", sorted(CASES))
def test_strict_mode_raises_with_file_and_index(case, files, write_jsonl, tok):
    ds = dataset_for(case, files, write_jsonl, tok, strict=True)
    with pytest.raises(SampleError) as e:
        for i in range(len(ds)):
            ds[i]
    assert e.value.reason == CASES[case][1]
    assert "d.jsonl:line 1" in str(e.value) or "llava.json[0]" in str(e.value)


def test_every_skip_reason_is_exercised():
    assert {reason for _, reason in CASES.values()} == SKIP_REASONS


def build(tok, path, members, max_seq_len=500, **kw):
    source = open_source("jsonl", path)
    plan = BlendPlan.from_items([(0, np.asarray(members))])
    encoder = ConversationEncoder(tok, "dsvc", max_seq_len=max_seq_len, num_image_tokens=4)
    return VisualChatDataset([source], plan, encoder, **kw)


def numbered(question, *names):
    return {"rounds": [{"images": list(names), "question": question, "answer": "red"}]}


def test_concatenation_numbers_images_across_samples(files, write_png, write_jsonl, tok):
    write_png("b.png", (0, 0, 255))
    path = write_jsonl("d.jsonl", [numbered("IMAGE#2?", "ok.png", "b.png"), numbered("IMAGE#1?", "b.png")])
    sample = build(tok, path, [0, 1])[0]
    text = tok.decode(sample["input_ids"])
    assert "### Image 1:\n<image>\n### Image 2:\n<image>\n\n### Question:\nimage 2?" in text
    assert "### Image 3:\n<image>\n\n### Question:\nimage 3?" in text and text.count("You are a helpful") == 1
    assert [np.asarray(im)[0, 0].tolist() for im in sample["images"]] == [[255, 0, 0], [0, 0, 255], [0, 0, 255]]
    assert sample["input_ids"][sample["image_positions"]].eq(tok.image_id).all()
    assert sample["labels"].dtype == torch.long and sample["labels"].shape == sample["input_ids"].shape


def test_a_failing_member_is_dropped_and_the_rest_kept(files, write_jsonl, tok):
    path = write_jsonl("d.jsonl", [numbered("a?", "ok.png"), numbered("b?", "gone.png"), numbered("c?", "ok.png")])
    ds = build(tok, path, [0, 1, 2])
    sample = ds[0]
    text = tok.decode(sample["input_ids"])
    assert "a?" in text and "b?" not in text and "### Image 2:\n<image>\n\n### Question:\nc?" in text
    assert ds.skipped == {"missing_image": 1} and sample["skipped"] == {(0, 1): "missing_image"}
    assert len(sample["images"]) == 2


def test_truncation_in_the_dataset_keeps_images_consistent(files, write_jsonl, tok):
    path = write_jsonl("d.jsonl", [numbered("a?", "ok.png"), numbered("b?", "ok.png", "ok.png")])
    full = build(tok, path, [0, 1])[0]
    first = build(tok, path, [0])[0]
    cut = build(tok, path, [0, 1], max_seq_len=len(full["input_ids"]) + 3 * 3 - 1)[0]
    assert torch.equal(cut["input_ids"], first["input_ids"]) and len(cut["images"]) == 1
    assert not build(tok, path, [0, 1]).skipped


def test_all_items_unusable_is_an_error(files, write_jsonl, tok):
    path = write_jsonl("d.jsonl", [one_image("gone.png")])
    with pytest.raises(RuntimeError, match="missing_image"):
        build(tok, path, [0])[0]
