import numpy as np
import pytest
import torch
from PIL import Image

from megatron_visualchat.data import VisualChatCollator
from megatron_visualchat.model.token_codes import (
    MODALITY_IMAGE,
    MODALITY_PAD,
    NO_IMAGE,
    codes_from_layout,
)
from megatron_visualchat.model.vision.preprocess import default_image_transform

IMG, PAD, N = 9, 0, 3  # <image> id, pad id, tokens per image
IDS = {"image_id": IMG, "pad_id": PAD}
X = -100


def image(value: int) -> Image.Image:
    return Image.new("RGB", (4, 4), (value, 0, 0))


def raw_pixels(im):
    """Identity transform: the red channel identifies the image."""
    return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float()


def sample(ids, labels, images, index=0):
    ids = torch.tensor(ids)
    return {"input_ids": ids, "labels": torch.tensor(labels), "image_positions": (ids == IMG).nonzero().flatten(),
            "images": images, "index": index}


# BOS q <image> q answer EOS ; BOS <image> <image> q answer EOS
S0 = sample([1, 5, IMG, 6, 7, 2], [X, X, X, X, 7, 2], [image(10)])
S1 = sample([1, IMG, IMG, 4, 5, 2], [X, X, X, X, 5, 2], [image(20), image(30)])


def collator(**kw):
    kw.setdefault("max_seq_len", 20)
    return VisualChatCollator(IDS, N, raw_pixels, image_size=4, **kw)


def collate(samples, **kw):
    return collator(**kw)(samples)


def test_unpacked_batch_exact_values():
    b = collate([S0, S1])
    assert b["tokens"].tolist() == [[1, 5, IMG, IMG, IMG, 6, 7, 2, PAD, PAD], [1] + [IMG] * 6 + [4, 5, 2]]
    assert b["labels"].tolist() == [[X, X, X, X, X, 7, 2, X, X, X], [X] * 7 + [5, 2, X]]
    assert b["loss_mask"].tolist() == (b["labels"] != X).float().tolist() and b["loss_mask"].dtype == torch.float32
    modality, image_id, _ = (torch.stack(c) for c in zip(*map(codes_from_layout, ["tt000tttpp", "t000111ttt"])))
    assert torch.equal(b["modality"], modality) and torch.equal(b["image_id"], image_id)
    assert b["position_ids"].tolist() == [list(range(10)), list(range(10))]  # pads continue counting
    assert b["sample_id"].tolist() == [[0] * 8 + [-1] * 2, [0] * 10]
    assert b["num_images"].tolist() == [1, 2]
    assert b["pixel_values"][:, 0, 0, 0].tolist() == [10, 20, 30]
    assert all(v.dtype == torch.long for k, v in b.items() if k not in ("loss_mask", "pixel_values"))


def test_packed_row_exact_values():
    b = collator(pad_to=20).collate_bins([[S0, S1]])
    assert b["tokens"].shape == (1, 20)
    assert b["sample_id"][0].tolist() == [0] * 8 + [1] * 10 + [-1] * 2
    assert b["position_ids"][0].tolist() == list(range(8)) + list(range(10)) + [10, 11]
    assert b["image_id"][0].tolist() == [-1, -1, 0, 0, 0, -1, -1, -1] + [-1, 1, 1, 1, 2, 2, 2, -1, -1, -1] + [-1] * 2
    # the last position of sample 0 does not predict sample 1's BOS
    assert b["labels"][0].tolist() == [X, X, X, X, X, 7, 2, X] + [X] * 7 + [5, 2, X] + [X] * 2
    assert b["num_images"].tolist() == [3] and b["pixel_values"][:, 0, 0, 0].tolist() == [10, 20, 30]


def test_bins_are_rows_of_exactly_pad_to_positions():
    c = collator(max_seq_len=18, pad_to=18)
    assert [c.length(S0), c.length(S1)] == [8, 10]
    b = c.collate_bins([[S0, S1], [S0]])
    assert b["tokens"].shape == (2, 18)
    assert b["sample_id"][1].tolist() == [0] * 8 + [-1] * 10
    assert b["num_images"].tolist() == [3, 1]
    assert b["pixel_values"][:, 0, 0, 0].tolist() == [10, 20, 30, 10]
    with pytest.raises(ValueError, match=r"bin 0 \(samples \[0, 0, 0\]\) holds 24 positions > pad_to=18"):
        c.collate_bins([[S0, S0, S0]])
    with pytest.raises(ValueError, match="needs pad_to"):
        collator().collate_bins([[S0]])


@pytest.mark.parametrize("pack", [False, True])
def test_image_positions_in_row_major_order_match_pixel_values(pack):
    rng = np.random.default_rng(0)
    samples, value = [], 1
    for i in range(6):
        ids, labels, images = [1], [X], []
        for _ in range(int(rng.integers(0, 4))):
            ids += [5, IMG]
            labels += [X, X]
            images.append(image(value))
            value += 1
        ids += [7, 2]
        labels += [7, 2]
        samples.append(sample(ids, labels, images, index=i))
    c = collator(max_seq_len=40, pad_to=64)
    b = c.collate_bins([samples[:3], samples[3:]]) if pack else c(samples)
    image_tokens = b["tokens"][b["modality"] == MODALITY_IMAGE].reshape(-1, N)
    assert image_tokens.shape[0] == b["pixel_values"].shape[0] == b["num_images"].sum() == value - 1
    assert (image_tokens == IMG).all()
    chunk_ids = b["image_id"][b["modality"] == MODALITY_IMAGE].reshape(-1, N)
    assert (chunk_ids == chunk_ids[:, :1]).all()  # one image per chunk
    running = torch.cat([torch.arange(n) for n in b["num_images"].tolist()])
    assert chunk_ids[:, 0].tolist() == running.tolist()
    assert b["pixel_values"][:, 0, 0, 0].tolist() == list(range(1, value))  # same order as the chunks
    labelled = b["labels"] != X  # the samples put a supervised token right after images: still never labelled
    before_image = torch.zeros_like(labelled)
    before_image[:, :-1] = b["modality"][:, 1:] == MODALITY_IMAGE
    assert not (labelled & ((b["modality"] == MODALITY_IMAGE) | before_image | (b["modality"] == MODALITY_PAD))).any()


def test_batch_without_images_has_empty_pixel_values():
    b = VisualChatCollator(IDS, N, default_image_transform(8), max_seq_len=10)([sample([1, 5, 2], [X, 5, 2], [])])
    assert b["pixel_values"].shape == (0, 3, 8, 8)
    assert b["image_id"].eq(NO_IMAGE).all() and b["num_images"].tolist() == [0]


def test_contract_violations_are_refused():
    with pytest.raises(ValueError, match="pad_to=8 must be >= max_seq_len=20"):
        VisualChatCollator(IDS, N, raw_pixels, 20, pad_to=8, image_size=4)
    with pytest.raises(ValueError, match="image_size"):
        VisualChatCollator(IDS, N, raw_pixels, 20)
    with pytest.raises(ValueError, match="after image expansion > max_seq_len=5"):
        collate([S0], max_seq_len=5)
    bad = dict(S1, image_positions=torch.tensor([1]))
    with pytest.raises(ValueError, match="image_positions"):
        collate([bad])
    with pytest.raises(ValueError, match="2 <image> placeholders but 1 images"):
        collate([dict(S1, images=[image(1)])])
    with pytest.raises(ValueError, match="expected \\(3, 8, 8\\)"):
        VisualChatCollator(IDS, N, raw_pixels, 20, image_size=8)([S0])
