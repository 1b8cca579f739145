import dataclasses

import pytest

from megatron_visualchat.data import TEMPLATES, Conversation, ConversationEncoder, Round, SampleError
from megatron_visualchat.data.encode import IGNORE_INDEX
from megatron_visualchat.data.images import FileImage

IMG = FileImage("x.png")


def conv3() -> Conversation:
    return Conversation(
        (
            Round("What colour is it?", "red", (IMG,)),
            Round("And these?", "blue and green", (IMG, IMG)),
            Round("How many?", "three"),
        ),
        origin="file.jsonl:line 7",
    )


def encoder(tok, max_seq_len=10_000, num_image_tokens=4, max_images=None, template="dsvc"):
    return ConversationEncoder(tok, template, max_seq_len=max_seq_len, num_image_tokens=num_image_tokens,
                               max_images=max_images)


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_labels_cover_exactly_answers_and_eos(tok, template):
    enc = encoder(tok, template=template).encode(conv3())
    supervised = [(i, t) for i, (t, lab) in enumerate(zip(enc.input_ids, enc.labels)) if lab != IGNORE_INDEX]
    assert all(enc.labels[i] == t for i, t in supervised)
    eos_positions = [i for i, t in supervised if t == tok.eos_id]
    assert len(eos_positions) == 3
    answers, start = [], 0
    for end in eos_positions:
        answers.append(tok.decode([t for i, t in supervised if start <= i < end]).strip())
        start = end + 1
    assert answers == ["red", "blue and green", "three"]
    assert enc.labels[0] == IGNORE_INDEX  # BOS
    assert all(enc.labels[p] == IGNORE_INDEX for p in enc.image_positions)
    assert [enc.input_ids[p] for p in enc.image_positions] == [tok.image_id] * 3


def test_round_tokens_follow_the_template_text(tok):
    enc = encoder(tok).encode(conv3())
    assert tok.decode(enc.input_ids) == TEMPLATES["dsvc"].render_text(conv3()).replace("<s>", "").replace(
        "</s>", "").replace("### Answer:\n", "### Answer:\n ")  # the answer piece's sentencepiece dummy-prefix space


def test_length_counts_image_tokens(tok):
    enc = encoder(tok, num_image_tokens=257).encode(conv3())
    assert enc.expanded_length(257) == len(enc.input_ids) + 3 * 256
    assert (enc.num_rounds, enc.num_images) == (3, 3)


def test_truncation_drops_whole_trailing_rounds_never_part_of_an_image(tok):
    full = encoder(tok, num_image_tokens=50).encode(conv3())
    one = encoder(tok, num_image_tokens=50).encode(conv3().first_rounds(1))
    two = encoder(tok, num_image_tokens=50).encode(conv3().first_rounds(2))
    # a budget that ends inside round 2's second image keeps round 1 only
    cut = encoder(tok, max_seq_len=two.expanded_length(50) - 10, num_image_tokens=50).encode(conv3())
    assert (cut.num_rounds, cut.num_images, cut.input_ids, cut.labels) == (1, 1, one.input_ids, one.labels)
    exact = encoder(tok, max_seq_len=two.expanded_length(50), num_image_tokens=50).encode(conv3())
    assert exact.num_rounds == 2 and exact.input_ids == two.input_ids
    assert full.num_rounds == 3 and full.input_ids[: len(two.input_ids)] == two.input_ids


def test_first_round_too_long_is_refused_with_origin(tok):
    one = encoder(tok, num_image_tokens=50).encode(conv3().first_rounds(1))
    with pytest.raises(SampleError, match="file.jsonl:line 7: too_long") as e:
        encoder(tok, max_seq_len=one.expanded_length(50) - 1, num_image_tokens=50).encode(conv3())
    assert e.value.reason == "too_long"


def test_max_images_drops_rounds_or_refuses(tok):
    assert encoder(tok, max_images=2).encode(conv3()).num_rounds == 1
    assert encoder(tok, max_images=3).encode(conv3()).num_rounds == 3
    many = Conversation((Round("q", "a", (IMG,) * 3),))
    with pytest.raises(SampleError) as e:
        encoder(tok, max_images=2).encode(many)
    assert e.value.reason == "too_many_images"


def test_empty_conversation_and_bad_arguments(tok):
    with pytest.raises(SampleError) as e:
        encoder(tok).encode(Conversation(()))
    assert e.value.reason == "empty_conversation"
    with pytest.raises(ValueError, match="max_seq_len=0"):
        encoder(tok, max_seq_len=0)


def test_generation_prompt_has_no_labels(tok):
    conv = dataclasses.replace(conv3(), rounds=conv3().rounds[:1] + (Round("Next?", None),))
    enc = encoder(tok).encode(conv)
    assert enc.input_ids[-1] != tok.eos_id
    assert tok.decode(enc.input_ids).endswith("### Question:\nNext?\n\n### Answer:\n")
