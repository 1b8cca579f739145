"""Boxes as text: format round-trips, parsing from free text, and boxes that follow the image transform exactly
(resize, pad-to-square, centre crop), clipped or refused where the crop cuts them."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from megatron_visualchat.data import SampleError
from megatron_visualchat.data.boxes import (
    BOX_FORMATS, BoxRenderer, box_marker, fit_box, get_box_format, has_boxes, map_box, parse_boxes, unmap_box,
)
from megatron_visualchat.data.conversation import Conversation, Round
from megatron_visualchat.data.images import FileImage
from megatron_visualchat.model.vision import EncoderOptions, VisionEncoder
from megatron_visualchat.model.vision.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImagePreprocess
from megatron_visualchat.training.arguments import model_config, parse_args
from megatron_visualchat.training.data_setup import image_geometry


def preprocess(resize, size=32):
    return ImagePreprocess(size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, resize)


@pytest.mark.parametrize("name,text,step", [
    ("norm3", "[0.125,0.250,0.500,0.750]", 0.0005 * 64),
    ("qwen", "<box>(125,250),(500,750)</box>", 0.0005 * 64),
    ("pixel", "[8,16,32,48]", 0.5),
])
def test_formats_round_trip(name, text, step):
    fmt = get_box_format(name)
    assert fmt.format((8, 16, 32, 48), (64, 64)) == text
    assert fmt.parse(text, (64, 64)) == [pytest.approx((8, 16, 32, 48))]
    box = (3.3, 7.1, 40.2, 61.9)
    assert fmt.parse(fmt.format(box, (64, 64)), (64, 64))[0] == pytest.approx(box, abs=step)


def test_parse_finds_every_box_in_free_text():
    text = "The dog [0.1, 0.2,0.3 ,0.4] sits left of the cat [0.5,0.5,0.6,0.7]; see 1, 2, 3, 4."
    assert parse_boxes(text, "norm3", (100, 100)) == [pytest.approx((10, 20, 30, 40)), pytest.approx((50, 50, 60, 70))]
    qwen = "<ref>the dog</ref><box>(100,200),(300,400)</box> and <box>(0,0),(1000,1000)</box>"
    assert parse_boxes(qwen, "qwen", (50, 50)) == [pytest.approx((5, 10, 15, 20)), pytest.approx((0, 0, 50, 50))]
    assert parse_boxes("no box here, [1, 2, 3]", "pixel", (8, 8)) == []
    with pytest.raises(ValueError, match="box format 'xyxy' is not one of"):
        parse_boxes("[1,2,3,4]", "xyxy", (8, 8))


def _drawn_box(with_box: torch.Tensor, without: torch.Tensor) -> tuple:
    """Extent of the red rectangle in [3, S, S] transform outputs (the image with and without it), from its mass
    per column and row: centre and width survive resampling, so the edges come out to a fraction of a pixel."""
    mass = (without[1] - with_box[1]).numpy()  # green lost to the rectangle; 0 on the background and the pad
    edges = []
    for profile in (mass.sum(axis=0), mass.sum(axis=1)):
        centre = (profile * (np.arange(len(profile)) + 0.5)).sum() / profile.sum()
        extent = profile.sum() / profile.max()
        edges.append((centre - extent / 2, centre + extent / 2))
    return edges[0][0], edges[1][0], edges[0][1], edges[1][1]


@pytest.mark.parametrize("resize", ["shortest_edge_center_crop", "squash", "pad"])
@pytest.mark.parametrize("size", [(120, 60), (60, 150)])
def test_box_follows_the_image_transform(resize, size):
    """The box mapped through geometry() lands on the rectangle's pixels in the real transform's output."""
    w, h = size
    box = (0.4 * w, 0.3 * h, 0.65 * w, 0.7 * h)
    blank = Image.new("RGB", size, (255, 255, 255))
    image = blank.copy()
    ImageDraw.Draw(image).rectangle([round(v) for v in (box[0], box[1], box[2] - 1, box[3] - 1)], fill=(255, 0, 0))
    box = tuple(float(round(v)) for v in box)
    pre = preprocess(resize)
    mapped = map_box(box, pre.geometry(w, h))
    assert _drawn_box(pre.transform()(image), pre.transform()(blank)) == pytest.approx(mapped, abs=0.2)
    assert unmap_box(mapped, pre.geometry(w, h)) == pytest.approx(box)


def test_pad_to_square_centres_the_image_like_llava():
    g = preprocess("pad").geometry(100, 50)
    assert (g.pad, g.canvas, g.resized, g.crop) == ((0, 25), (100, 100), (32, 32), (0, 0))
    assert map_box((0, 0, 100, 50), g) == pytest.approx((0, 8, 32, 24))  # the whole image, between pad bands
    out = preprocess("pad").transform()(Image.new("RGB", (100, 50), (255, 0, 0)))
    grey = (torch.tensor([int(m * 255) / 255 for m in OPENAI_CLIP_MEAN]) - torch.tensor(OPENAI_CLIP_MEAN)) / \
        torch.tensor(OPENAI_CLIP_STD)
    assert torch.allclose(out[:, 0, 0], grey, atol=1e-5) and torch.allclose(out[:, 31, 31], grey, atol=1e-5)


def test_a_box_the_crop_cuts_is_clipped_or_skipped():
    g = preprocess("shortest_edge_center_crop").geometry(96, 32)  # -> 96 x 32 resized, the middle 32 columns kept
    assert g.crop == (32, 0)
    cut = map_box((20, 4, 40, 12), g)  # half of it left of the crop
    assert fit_box(cut, 32, "clip") == pytest.approx((0, 4, 8, 12))
    with pytest.raises(SampleError, match="box_outside: .*cut by the 32x32 crop"):
        fit_box(cut, 32, "skip")
    with pytest.raises(SampleError, match="box_outside: .*outside the 32x32 image"):
        fit_box(map_box((0, 0, 10, 10), g), 32, "clip")  # entirely cropped away: refused either way
    assert fit_box(map_box((40, 4, 50, 12), g), 32, "skip") == pytest.approx((8, 4, 18, 12))


def test_renderer_writes_markers_in_the_frame_and_format():
    conv = Conversation((
        Round("Where is the cat?", box_marker(0, (20, 10, 60, 30)), (FileImage("a.png"),)),
        Round(f"And {box_marker(1, (0.5, 0.5, 1.0, 1.0), normalized=True, box_format='qwen')}?", "a dog",
              (FileImage("b.png"),)),
    ))
    assert has_boxes(conv)
    out = BoxRenderer(preprocess("pad"), "pixel").render(conv, [(80, 40), (64, 64)])
    assert out.rounds[0].answer == "[8,12,24,20]"  # (20, 10+20) * 32/80
    assert out.rounds[1].question == "And <box>(500,500),(1000,1000)</box>?"
    assert not has_boxes(out) and set(BOX_FORMATS) == {"norm3", "qwen", "pixel"}
    with pytest.raises(ValueError, match="box_outside='drop'"):
        BoxRenderer(preprocess("pad"), "pixel", "drop")


def test_pad_resize_is_an_encoder_option_shared_by_training_and_the_model():
    """--vision-encoder-options '{"resize": "pad"}' reaches both the data loader's transform and the model's (which
    chat and serve use), so boxes written at training time match what the model sees at inference."""
    run = parse_args(["--train-iters", "1", "--synthetic", "8", "--seq-length", "256",
                      "--vision-encoder-options", '{"resize": "pad"}', "--box-outside", "skip"])
    transform, _, _ = image_geometry(model_config(run, 1))
    assert transform.preprocess.resize == "pad" and run.data.box_outside == "skip"
    assert VisionEncoder("tiny", {"resize": "pad"}).image_transform.preprocess == transform.preprocess
    with pytest.raises(ValueError, match=r"resize='crop' is not one of \['shortest_edge_center_crop', 'squash', "):
        EncoderOptions.parse("tiny", {"resize": "crop"})
