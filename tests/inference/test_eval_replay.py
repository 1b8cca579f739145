"""Evaluation replay: DS-VisualChat's eval JSON (and the scored object form) is parsed strictly, replayed round by
round through one session per conversation, scored, and written to CSV / JSONL with a summary table."""

import csv
import json
import os

import pytest

from megatron_visualchat.inference import eval_replay
from megatron_visualchat.inference.eval_replay import (
    RoundRecord, load_eval_file, summarize, summary_table, write_csv, write_jsonl,
)
from megatron_visualchat.testing.distributed import run_parallel

from .tiny import build_model, tiny_cfg


def _write(tmp_path, data, name="eval.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


def test_load_ds_visualchat_and_scored_rounds(tmp_path):
    root = os.path.realpath(tmp_path / "data")
    path = _write(tmp_path, {
        "cats": [["Describe the image.", "a.jpg b.jpg"], ["Are they the same?"]],
        "vqa": [{"question": "Colour?", "images": [f"{root}/sub/c.png"], "answer": ["red", "red", "dark red"],
                 "scorer": "vqa_accuracy"},
                {"question": "Where is the cat?", "answer": [0.1, 0.2, 0.5, 0.9], "box_format": "normalized",
                 "box_image": 1},
                {"question": "Name it.", "answer": "tom"}],
    })
    cats, vqa = load_eval_file(path, image_root=root)
    assert cats.name == "cats" and cats.rounds[0].images == (f"{root}/a.jpg", f"{root}/b.jpg")
    assert cats.rounds[1].images == () and cats.rounds[1].scorer is None
    assert vqa.rounds[0].images == (f"{root}/sub/c.png",) and vqa.rounds[0].scorer == "vqa_accuracy"
    assert vqa.rounds[1].scorer == "box_iou" and vqa.rounds[1].box_format == "normalized"
    assert vqa.rounds[2].scorer == "exact_match"


@pytest.mark.parametrize("data,match", [
    ({"c": [{"question": "q", "hint": 1}]}, r"conversation 'c' round 1: unknown key\(s\) \['hint'\]"),
    ({"c": [{"question": "q", "answer": "a", "scorer": "bleu"}]}, "round 1: scorer='bleu'"),
    ({"c": [["q"], {"question": "q", "scorer": "exact_match"}]}, "round 2: scorer 'exact_match' needs a reference"),
    ({"c": [["q", "a.jpg", "extra"]]}, r"\[question\] or \[question, 'image paths'\]"),
    ({"c": [{"question": " "}]}, "'question' must be a non-empty string"),
    ({"c": [{"question": "q", "answer": [1, 2, 3, 4], "box_format": "xywh"}]}, "box_format='xywh'"),
    ({"c": []}, "conversation 'c' must be a non-empty list"),
    ([], "expected a non-empty object"),
    ("{not json", "cannot read the evaluation file"),
])
def test_bad_files_name_the_place(tmp_path, data, match):
    with pytest.raises(ValueError, match=match):
        load_eval_file(_write(tmp_path, data))


def test_image_paths_stay_inside_the_root(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    (tmp_path / "secret.png").write_bytes(b"not for the model")
    (root / "link.png").symlink_to(tmp_path / "secret.png")
    for name in ("../secret.png", "../../../../etc/passwd", str(tmp_path / "secret.png"), "/etc/passwd", "link.png"):
        path = _write(tmp_path, {"c": [["q"], ["Describe it.", f"ok.png {name}"]]})
        with pytest.raises(ValueError, match=rf"eval.json: conversation 'c' round 2: image '{name}': .*outside the "
                                             rf"root {root}"):
            load_eval_file(path, image_root=root)


def test_images_that_are_not_regular_files_are_refused_without_opening_them(tmp_path):
    os.mkfifo(tmp_path / "pipe.png")  # opening it for reading would block until a writer came
    (tmp_path / "dir.png").mkdir()
    for name in ("pipe.png", "dir.png"):
        path = _write(tmp_path, {"c": [["Describe it.", name]]})
        with pytest.raises(ValueError, match=rf"conversation 'c' round 1: image '{name}': .*not a regular file"):
            load_eval_file(path, image_root=tmp_path)


def test_images_over_the_byte_cap_are_refused_from_their_size(tmp_path, monkeypatch):
    monkeypatch.setattr(eval_replay, "DEFAULT_MAX_IMAGE_BYTES", 4)
    (tmp_path / "big.png").write_bytes(b"12345")
    with pytest.raises(ValueError, match=r"round 1: image 'big.png': .*big.png: 5 bytes > cap 4"):
        load_eval_file(_write(tmp_path, {"c": [["Describe it.", "big.png"]]}), image_root=tmp_path)


def test_an_eval_file_that_is_not_utf8_names_the_byte_and_line(tmp_path):
    path = tmp_path / "eval.json"
    path.write_bytes(b'{"c": [\n ["Qu\xe9 es?"]]}')
    with pytest.raises(ValueError, match=r"cannot read the evaluation file: .*eval.json: not UTF-8 at byte 13 "
                                         r"\(line 2"):
        load_eval_file(path)


def _replay(tok_dir, eval_path, image_root, out_dir):
    from megatron_visualchat.data import VisualChatTokenizer
    from megatron_visualchat.inference.eval_replay import load_eval_file, replay
    from megatron_visualchat.inference.sampling import SamplingParams
    from megatron_visualchat.inference.session import ChatSession

    tok = VisualChatTokenizer.load(tok_dir)
    session = ChatSession(build_model(tiny_cfg(tok.vocab_size)), tok, sampling=SamplingParams(max_new_tokens=6))
    first = replay(session, load_eval_file(eval_path, image_root))
    # Score the second pass against the first pass's (deterministic, greedy) answers: one hit, one miss.
    data = json.load(open(eval_path))
    data["multi"][1] = {"question": data["multi"][1][0], "answer": first[1].answer}
    data["multi"][2] = {"question": data["multi"][2][0], "answer": first[2].answer + " not", "scorer": "vqa_accuracy"}
    data["multi"].append({"question": "Box?", "answer": [1, 2, 10, 20]})
    with open(eval_path, "w") as f:
        json.dump(data, f)
    records = replay(session, load_eval_file(eval_path, image_root))
    return first, records


def test_replay_scores_and_writes_results(tok_dir, images, tmp_path):
    root = os.path.dirname(images[0])
    path = _write(tmp_path, {
        "multi": [["Describe both images.", "red.png green.png"], ["What differs?"], ["Which is red?"]],
        "broken": [["Describe it.", "missing.png"], ["Then describe this.", "blue.png"]],
    })
    first, records = run_parallel(_replay, args=(tok_dir, str(path), root, str(tmp_path)))[0]
    assert [(r.conversation, r.round) for r in records] == [("multi", 1), ("multi", 2), ("multi", 3), ("multi", 4),
                                                             ("broken", 1), ("broken", 2)]
    assert [r.answer for r in records[:3]] == [r.answer for r in first[:3]]  # replay is deterministic
    assert records[0].image_numbers == [1, 2] and records[0].prompt_positions > 0 and records[0].new_tokens > 0
    assert (records[1].scorer, records[1].score) == ("exact_match", 1.0)
    assert (records[2].scorer, records[2].score) == ("vqa_accuracy", 0.0)
    assert records[3].scorer == "box_iou" and records[3].score == 0.0 and "no box" in records[3].score_detail
    assert "missing.png" in records[4].error and records[4].answer == ""
    assert records[5].image_numbers == [1] and not records[5].error  # the conversation went on without it

    write_csv(records, tmp_path / "r.csv")
    write_jsonl(records, tmp_path / "r.jsonl")
    rows = list(csv.DictReader(open(tmp_path / "r.csv")))
    assert rows[0]["images"].endswith("green.png") and rows[0]["image_numbers"] == "1 2"
    assert rows[1]["score"] == "1" and rows[3]["reference"] == "1 2 10 20" and rows[4]["error"]
    lines = [json.loads(line) for line in open(tmp_path / "r.jsonl")]
    assert len(lines) == 6 and lines[3]["reference"] == [1, 2, 10, 20]

    summary = {r["scorer"]: r for r in summarize(records)}
    assert summary["exact_match"]["score"] == 100.0 and summary["vqa_accuracy"]["score"] == 0.0
    assert summary["all rounds"]["rounds"] == 6 and summary["all rounds"]["errors"] == 1
    table = summary_table(summarize(records))
    assert table.startswith("| scorer | rounds | errors |") and "| exact_match | 1 | 0 | 100.0 |" in table


def test_a_failed_scored_round_counts_as_a_miss():
    recs = [RoundRecord("c", 1, [], [], "q", scorer="exact_match", score=1.0),
            RoundRecord("c", 2, [], [], "q", scorer="exact_match", error="missing image")]
    row = summarize(recs)[0]
    assert row["score"] == 50.0 and row["errors"] == 1
