import pytest
import torch

from megatron_visualchat.model.splice import splice_image_embeddings
from megatron_visualchat.model.token_codes import codes_from_layout


def _modality(layouts):
    return torch.stack([codes_from_layout(layout)[0] for layout in layouts])


def test_images_land_in_order_of_appearance_row_by_row():
    modality = _modality(["t00t11", "tt00tt"])  # row 0: images 0, 1; row 1: image 2 (T = 2 tokens each)
    text = torch.zeros(6, 2, 1)  # [s, b, h]
    images = torch.tensor([[[10.0], [11.0]], [[20.0], [21.0]], [[30.0], [31.0]]])
    out = splice_image_embeddings(text, images, modality, torch.tensor([2, 1]))
    assert out[:, 0, 0].tolist() == [0, 10, 11, 0, 20, 21]
    assert out[:, 1, 0].tolist() == [0, 0, 30, 31, 0, 0]


def test_mismatch_names_the_sample():
    modality = _modality(["t00t11", "tt00tt"])
    images = torch.zeros(2, 2, 1)
    with pytest.raises(ValueError, match=r"sample 1: 2 image positions but 0 image\(s\) x 2 tokens = 0"):
        splice_image_embeddings(torch.zeros(6, 2, 1), images, modality, torch.tensor([2, 0]))
    with pytest.raises(ValueError, match="do not match the images given"):
        splice_image_embeddings(torch.zeros(6, 2, 1), torch.zeros(1, 2, 1), modality)


def test_text_only_batch_keeps_projector_in_graph():
    w = torch.ones(1, requires_grad=True)
    images = torch.zeros(0, 2, 1) * w
    out = splice_image_embeddings(torch.zeros(3, 1, 1), images, _modality(["ttt"]), torch.tensor([0]))
    out.sum().backward()
    assert w.grad is not None and w.grad.item() == 0.0
