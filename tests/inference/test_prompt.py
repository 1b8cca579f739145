"""Chat prompts are token-for-token the training format (ConversationEncoder + collator expansion) for every
template, and rows batch with left padding that carries pad codes."""

import pytest
import torch

from megatron_visualchat.data import ConversationEncoder
from megatron_visualchat.data.conversation import Conversation, Round
from megatron_visualchat.data.images import FileImage
from megatron_visualchat.data.templates import TEMPLATES
from megatron_visualchat.inference.prompt import Chunk, Segment, answer_segment, round_segment
from megatron_visualchat.model.token_codes import MODALITY_IMAGE, MODALITY_TEXT, NO_IMAGE, codes_from_layout

T = 5
ROUNDS = [("What is in image 1?", "A red square.", 1), ("Compare image 2 and image 3.", "Both are round.", 2),
          ("Which one is the biggest?", None, 0)]


def _training_tokens(tok, template):
    conv = Conversation(tuple(Round(q, a, tuple(FileImage(f"{q}{k}.png") for k in range(n))) for q, a, n in ROUNDS))
    enc = ConversationEncoder(tok, template, max_seq_len=100_000, num_image_tokens=T).encode(conv)
    ids = torch.tensor(enc.input_ids)
    return ids.repeat_interleave(torch.where(ids == tok.image_id, T, 1)).tolist()


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_chat_rounds_are_the_training_format(tok, template):
    seg, shown = Segment(), 0
    for index, (question, answer, n) in enumerate(ROUNDS):
        pixels = [torch.full((3, 2, 2), float(shown + k)) for k in range(n)]
        seg = seg + round_segment(tok, TEMPLATES[template], index, question, pixels, images_before=shown,
                                  num_image_tokens=T)
        if answer is not None:
            seg = seg + answer_segment(tok, TEMPLATES[template], index, answer)
        shown += n
    assert seg.tokens == _training_tokens(tok, template)
    is_image = [t == tok.image_id for t in seg.tokens]
    assert seg.modality == [MODALITY_IMAGE if i else MODALITY_TEXT for i in is_image]
    assert [i for i in seg.image_id if i != NO_IMAGE] == [k for k in range(3) for _ in range(T)]
    assert [float(p[0, 0, 0]) for p in seg.pixel_values] == [0.0, 1.0, 2.0]
    if template == "dsvc":
        text = tok.decode(seg.tokens)
        assert "### Image 1:" in text and "### Image 3:" in text and text.endswith("### Answer:\n")


def test_rows_are_left_padded_with_pad_codes(tok):
    a = Segment.text([5, 6, 7])
    b = Segment([tok.image_id] * 2 + [9], [MODALITY_IMAGE, MODALITY_IMAGE, MODALITY_TEXT], [0, 0, NO_IMAGE],
                [torch.zeros(3, 2, 2)])
    c = Segment.text([8])
    chunk = Chunk.from_segments([a, b, c], tok.pad_id)
    assert chunk.tokens.tolist() == [[5, 6, 7], [tok.image_id, tok.image_id, 9], [tok.pad_id, tok.pad_id, 8]]
    rows = [codes_from_layout(layout) for layout in ("ttt", "00t", "ppt")]  # c is left-padded with pad codes
    assert chunk.modality.tolist() == [r[0].tolist() for r in rows]
    assert chunk.image_id.tolist() == [r[1].tolist() for r in rows]
    assert chunk.pixel_values.shape == (1, 3, 2, 2) and chunk.num_images.tolist() == [0, 1, 0]
    with pytest.raises(ValueError, match="at least one new position"):
        Chunk.from_segments([a, Segment()], tok.pad_id)
