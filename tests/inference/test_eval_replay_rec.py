"""REC scoring in eval-replay: the model's box is read from free text in its ``box_text`` format, in the frame its
encoder sees, mapped back through the session's preprocessing (pad-to-square here) and scored against the
source-pixel reference as accuracy@IoU>=0.5 and mean IoU. The session is a stand-in that answers scripted text
(the model side of replay is covered by test_eval_replay.py); everything else is the real code."""

import json

import pytest
from PIL import Image

from megatron_visualchat.data.boxes import get_box_format, map_box
from megatron_visualchat.inference.eval_replay import load_eval_file, replay, summarize, summary_table
from megatron_visualchat.inference.scoring import ScoreContext, box_iou, get_scorer
from megatron_visualchat.inference.session import ChatTurn
from megatron_visualchat.model.vision.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImagePreprocess

PAD = ImagePreprocess(32, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, "pad")
REFERENCE = [20, 10, 60, 30]  # source pixels of the 80 x 40 image


class ScriptedSession:
    """Answers each question with the next scripted text; keeps image sizes like ChatSession."""

    def __init__(self, answers):
        self.answers = iter(answers)
        self.image_transform = PAD.transform()
        self.image_sizes = []

    def clear(self):
        self.image_sizes = []

    def ask(self, question, images):
        first = len(self.image_sizes) + 1
        self.image_sizes += [Image.open(p).size for p in images]
        return ChatTurn(next(self.answers), [1, 2], "eos", list(range(first, len(self.image_sizes) + 1)), 5, 4,
                        0.0, 0.0)


def test_rec_rounds_score_accuracy_and_mean_iou(tmp_path):
    Image.new("RGB", (80, 40), (255, 0, 0)).save(tmp_path / "a.png")
    rounds = {f"c{k}": [{"question": "Where is the dog?", "images": ["a.png"], "answer": REFERENCE,
                         "box_text": "norm3"}] for k in range(3)}
    rounds["qwen"] = [{"question": "Where?", "images": ["a.png"], "answer": REFERENCE, "box_text": "qwen"}]
    (tmp_path / "eval.json").write_text(json.dumps(rounds))
    conversations = load_eval_file(tmp_path / "eval.json", image_root=tmp_path)

    frame = map_box(REFERENCE, PAD.geometry(80, 40))  # (8, 12, 24, 20): the model sees the image padded to square
    norm3, qwen = get_box_format("norm3"), get_box_format("qwen")
    shifted = (frame[0] + 4, frame[1], frame[2] + 4, frame[3])  # 4 of 16 frame pixels to the right
    answers = [f"The dog is at {norm3.format(frame, (32, 32))}.", f"It is {norm3.format(shifted, (32, 32))}",
               "a dog", f"<ref>dog</ref>{qwen.format(frame, (32, 32))}"]
    records = replay(ScriptedSession(answers), conversations)

    assert [r.score for r in records] == [1.0, 1.0, 0.0, 1.0]
    iou_shifted = box_iou((30, 10, 70, 30), REFERENCE)  # 4 frame pixels = 10 source pixels (scale 80 / 32)
    assert [r.iou for r in records] == [pytest.approx(1.0), pytest.approx(iou_shifted), 0.0, pytest.approx(1.0)]
    assert "no norm3 box" in records[2].score_detail
    (row, _) = summarize(records)
    assert row["scorer"] == "box_iou" and row["score"] == 75.0
    assert row["mean_iou"] == pytest.approx((3 + iou_shifted - 1) / 4)
    assert "| box_iou | 4 | 0 | 75.0 |" in summary_table(summarize(records))


def test_box_text_is_checked_and_needs_the_geometry(tmp_path):
    (tmp_path / "e.json").write_text(json.dumps({"c": [{"question": "q", "answer": "a", "box_text": "norm3"}]}))
    with pytest.raises(ValueError, match="box_text='norm3' needs a box answer"):
        load_eval_file(tmp_path / "e.json")
    (tmp_path / "e.json").write_text(json.dumps({"c": [{"question": "q", "answer": [1, 2, 3, 4], "box_text": "xy"}]}))
    with pytest.raises(ValueError, match="box_text='xy'"):
        load_eval_file(tmp_path / "e.json")
    with pytest.raises(ValueError, match="geometry is needed"):
        get_scorer("box_iou")("[0.1,0.1,0.2,0.2]", [1, 2, 3, 4], ScoreContext((8, 8), "pixel", "norm3"))
