import json

import pytest

from megatron_visualchat.data import TEMPLATES, Conversation, SampleError, open_source


def dialogue(*turns):
    return {"dialogue": list(turns)}


def user(text, *ids):
    turn = {"role": "user", "content": text}
    if ids:
        turn["images"] = [{"image_id": i} for i in ids]
    return turn


def assistant(text):
    return {"role": "assistant", "content": text}


@pytest.fixture
def sparkles(tmp_path, write_png):
    for i in (14, 1417, 804):
        write_png(f"images/{i}.jpg")
    records = [
        dialogue(user("Compare IMAGE#1417<Img><ImageHere></Img> and IMAGE#14<Img><ImageHere></Img>.", 1417, 14),
                 assistant("IMAGE#14 is older than IMAGE#1417."),
                 user("And IMAGE#804<Img><ImageHere></Img>?", 804), assistant("IMAGE#804 is a truck.")),
        dialogue(user("What about IMAGE#99?", 14), assistant("Unknown.")),
        dialogue(user("hi", 14), {"role": "narrator", "content": "x"}),
    ]
    (tmp_path / "SparklesDialogueCC.json").write_text(json.dumps(records))
    return str(tmp_path / "SparklesDialogueCC.json"), str(tmp_path / "images")


def test_image_tags_become_numbered_references(sparkles):
    path, images = sparkles
    conv = open_source("sparkles", path, images=images).conversation(0)
    assert [[i.name for i in r.images] for r in conv.rounds] == [["1417.jpg", "14.jpg"], ["804.jpg"]]
    text = TEMPLATES["dsvc"].render_text(conv)
    assert "### Question:\nCompare image 1 and image 2.\n\n### Answer:\nimage 2 is older than image 1.</s>" in text
    assert "<s>### Image 3:\n<image>\n\n### Question:\nAnd image 3?\n\n### Answer:\nimage 3 is a truck.</s>" in text
    # after concatenation the references follow the continued numbering
    merged = TEMPLATES["dsvc"].render_text(Conversation.concat([conv, conv]))
    assert "Compare image 4 and image 5." in merged and "And image 6?" in merged


def test_unknown_image_tag_and_unknown_role(sparkles):
    path, images = sparkles
    source = open_source("sparkles", path, images=images)
    with pytest.raises(SampleError, match="IMAGE#99") as e:
        source.conversation(1)
    assert e.value.reason == "malformed_conversation"
    with pytest.raises(SampleError) as e:
        source.conversation(2)
    assert e.value.reason == "unknown_role"
