"""Short-answer scorers (VQA-style normalisation, exact match, VQA accuracy) and boxes written as text."""

import pytest

from megatron_visualchat.inference.scoring import (
    SCORERS, ScoreContext, box_iou, exact_match, get_scorer, normalize_answer, parse_box, vqa_accuracy,
)


@pytest.mark.parametrize("raw,norm", [("Two.", "2"), ("The red one!", "red 1"), ("  3.5 ", "3.5"),
                                      ("1,000 cats", "1000 cats"), ("yes\n", "yes"),
                                      ("An apple, a pear", "apple pear")])
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm


def test_exact_match_and_vqa_accuracy():
    assert exact_match("Red.", "red").value == 1.0
    assert exact_match("dark red", ["red", "crimson"]).value == 0.0
    humans = ["2"] * 2 + ["two"] + ["3"] * 7  # 3 of 10 say two
    assert vqa_accuracy("two", humans).value == 1.0
    assert vqa_accuracy("2", ["2", "3", "3", "3", "3", "3", "3", "3", "3", "3"]).value == pytest.approx(1 / 3)
    assert vqa_accuracy("Blue", "blue").value == 1.0  # one reference = exact match
    with pytest.raises(ValueError, match="short-answer reference"):
        exact_match("x", [1, 2])


def test_boxes_in_normalised_and_pixel_form():
    assert parse_box("It is at [0.1, 0.2, 0.5, 1.0].") == (0.1, 0.2, 0.5, 1.0)  # 1.0 parses (InfMLLM's regex: no)
    assert parse_box("<box>(10,20),(110,220)</box>") == (10.0, 20.0, 110.0, 220.0)
    assert parse_box("no box here, 1, 2") is None
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(1 / 3)
    assert box_iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    ctx = ScoreContext(image_size=(200, 100))
    assert get_scorer("box_iou")("[0.1, 0.2, 0.5, 0.8]", [20, 20, 100, 80], ctx).value == 1.0  # de-normalised
    assert get_scorer("box_iou")("[20, 20, 100, 80]", [20, 20, 100, 80], ctx).value == 1.0  # pixels
    assert get_scorer("box_iou")("[0, 0, 0.2, 0.2]", [20, 20, 100, 80], ctx).value == 0.0
    norm_ref = ScoreContext(image_size=(200, 100), reference_box_format="normalized")
    hit = get_scorer("box_iou")("[21, 19, 99, 81]", [0.1, 0.2, 0.5, 0.8], norm_ref)
    assert hit.value == 1.0 and "IoU 0.9" in hit.detail
    assert get_scorer("box_iou")("I cannot tell.", [1, 2, 3, 4], ctx).detail.startswith("no box")
    with pytest.raises(ValueError, match="needs the image size"):
        get_scorer("box_iou")("[0.1, 0.2, 0.5, 0.8]", [20, 20, 100, 80])


def test_unknown_scorer_is_refused():
    with pytest.raises(ValueError, match="scorer='bleu' is not one of"):
        get_scorer("bleu")
    assert set(SCORERS) == {"exact_match", "vqa_accuracy", "box_iou"}
