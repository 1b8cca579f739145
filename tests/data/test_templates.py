import dataclasses

import pytest

from megatron_visualchat.data import TEMPLATES, Conversation, Round, get_template, image_ref
from megatron_visualchat.data.images import FileImage

A, B, C, D = (FileImage(f"{x}.png") for x in "abcd")

SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the user "
    "provides, and assist the user with a variety of tasks using natural language.\n\n"
)


def two_round_three_images() -> Conversation:
    return Conversation(
        (
            Round(f"What is in {image_ref(0)}?", "A red square.", (A,)),
            Round(f"Compare {image_ref(1)} and {image_ref(2)}.", "Both are blue.", (B, C)),
        )
    )


def test_dsvc_exact_string_two_rounds_three_images():
    expected = (
        "<s>" + SYSTEM + "### Image 1:\n<image>\n\n### Question:\nWhat is in image 1?\n\n### Answer:\nA red square.</s>"
        "<s>### Image 2:\n<image>\n### Image 3:\n<image>\n\n### Question:\nCompare image 2 and image 3.\n\n"
        "### Answer:\nBoth are blue.</s>"
    )
    assert TEMPLATES["dsvc"].render_text(two_round_three_images()) == expected


def test_dsvc_round_without_image_and_system_only_first():
    conv = Conversation((Round("Hi?", "Hello.", (A,)), Round("And now?", "Still here.")))
    text = TEMPLATES["dsvc"].render_text(conv)
    assert text.endswith("</s><s>### Question:\nAnd now?\n\n### Answer:\nStill here.</s>")
    assert text.count("You are a helpful") == 1


def test_concatenation_continues_numbering_and_shifts_references():
    first = two_round_three_images()
    second = Conversation((Round(f"What colour is the shape in {image_ref(0)}?", "red", (D,)),))
    text = TEMPLATES["dsvc"].render_text(Conversation.concat([first, second]))
    assert "<s>### Image 4:\n<image>\n\n### Question:\nWhat colour is the shape in image 4?" in text
    assert text.count("You are a helpful") == 1
    assert text.count("<s>") == 3 and text.count("</s>") == 3


def test_llama2_chat_exact_string():
    conv = Conversation((Round(f"What is {image_ref(0)}?", "A cat.", (A,)), Round("Sure?", "Yes.")))
    expected = (
        "<s>[INST] <<SYS>>\nSYS\n<</SYS>>\n\nImage 1: <image>\nWhat is image 1? [/INST] A cat. </s>"
        "<s>[INST] Sure? [/INST] Yes. </s>"
    )
    template = dataclasses.replace(TEMPLATES["llama2_chat"], system="SYS")
    assert template.render_text(conv) == expected


def test_llava_v1_exact_string():
    conv = Conversation((Round("What is it?", "A cat.", (A,)), Round("Sure?", "Yes.")))
    expected = "<s>SYS USER: <image>\nWhat is it? ASSISTANT: A cat.</s>USER: Sure? ASSISTANT: Yes.</s>"
    assert dataclasses.replace(TEMPLATES["llava_v1"], system="SYS").render_text(conv) == expected


def test_supervision_marks_only_answers_and_eos():
    for name, template in TEMPLATES.items():
        for pieces in template.render(two_round_three_images()):
            supervised = [p for p in pieces if p.supervised]
            assert [p.kind for p in supervised] == ["text", "eos"], name
            assert supervised[0].text.strip() in ("A red square.", "Both are blue."), name


def test_generation_prompt_has_no_answer_or_eos():
    conv = Conversation((Round("Q1", "A1", (A,)), Round("Q2", None, (B,))))
    text = TEMPLATES["dsvc"].render_text(conv)
    assert text.endswith("<s>### Image 2:\n<image>\n\n### Question:\nQ2\n\n### Answer:\n")


def test_unknown_template_names_allowed():
    with pytest.raises(ValueError, match="dsvc"):
        get_template("vicuna")
    assert get_template("dsvc") is TEMPLATES["dsvc"]
    assert set(TEMPLATES) == {"dsvc", "llama2_chat", "llava_v1"}
