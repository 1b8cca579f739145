"""The dense MMCA oracle against hand-computed expectations on small hand-built layouts."""

import functools
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from megatron_visualchat.model.mmca import mmca_attention, mmca_attention_reference
from megatron_visualchat.model.mmca.fast import _mmca_attention_fast
from megatron_visualchat.model.token_codes import MODALITY_PAD, codes_from_layout

D = 8


def make_inputs(layouts, heads_q=1, heads_kv=1, seed=0, dtype=torch.float32):
    """Random q/k/v for a batch of equal-length layout strings, plus batched codes."""
    codes = [codes_from_layout(layout) for layout in layouts]
    modality, image_id, sample_id = (torch.stack(c) for c in zip(*codes))
    batch, length = modality.shape
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads_q, length, D, generator=gen, dtype=dtype)
    k = torch.randn(batch, heads_kv, length, D, generator=gen, dtype=dtype)
    v = torch.randn(batch, heads_kv, length, D, generator=gen, dtype=dtype)
    return q, k, v, modality, image_id, sample_id


def attend(q_row, k, v, keys):
    """softmax(q_row . k[keys] / sqrt(D)) @ v[keys] for one query row and one head; 0 for no keys."""
    if not keys:
        return torch.zeros_like(q_row)
    scores = k[keys] @ q_row / math.sqrt(D)
    return torch.softmax(scores, dim=0) @ v[keys]


def test_text_rows_before_first_image_get_no_image_branch():
    # The DS-VisualChat code leaks a near-uniform average over future images into these rows.
    q, k, v, modality, image_id, _ = make_inputs(["ttt000tt"])
    for combine in ("sum", "mean"):
        out = mmca_attention_reference(q, k, v, modality, image_id, combine=combine)
        for i in range(3):
            expected = attend(q[0, 0, i], k[0, 0], v[0, 0], list(range(i + 1)))
            torch.testing.assert_close(out[0, 0, i], expected)


def test_text_row_sees_all_earlier_images_under_one_joint_softmax():
    q, k, v, modality, image_id, _ = make_inputs(["t00t11t"])
    out = mmca_attention_reference(q, k, v, modality, image_id)
    qi, k0, v0 = q[0, 0, 6], k[0, 0], v[0, 0]
    text = attend(qi, k0, v0, [0, 3, 6])
    joint_images = attend(qi, k0, v0, [1, 2, 4, 5])
    torch.testing.assert_close(out[0, 0, 6], text + joint_images)
    per_image = attend(qi, k0, v0, [1, 2]) + attend(qi, k0, v0, [4, 5])
    assert not torch.allclose(out[0, 0, 6], text + per_image)
    # Row 3 sees only image 0 (image 1 is in its future).
    torch.testing.assert_close(out[0, 0, 3], attend(q[0, 0, 3], k0, v0, [0, 3]) + attend(q[0, 0, 3], k0, v0, [1, 2]))


@pytest.mark.parametrize("image_rows", ["self", "self+text", "image"])
def test_image_rows(image_rows):
    # GQA as in megatron: 4 query heads on 2 kv heads, query head h uses kv head h // 2.
    q, k, v, modality, image_id, _ = make_inputs(["t000t11t"], heads_q=4, heads_kv=2)
    out = mmca_attention_reference(q, k, v, modality, image_id, image_rows=image_rows)
    for h in range(4):
        kh, vh = k[0, h // 2], v[0, h // 2]
        for i, own_image in ((1, [1, 2, 3]), (2, [1, 2, 3]), (3, [1, 2, 3]), (5, [5, 6]), (6, [5, 6])):
            earlier_text = [j for j in (0, 4) if j < i]
            qi = q[0, h, i]
            expected = {
                "self": vh[i],
                "self+text": vh[i] + attend(qi, kh, vh, earlier_text),
                "image": attend(qi, kh, vh, own_image),
            }[image_rows]
            torch.testing.assert_close(out[0, h, i], expected)
        # Text rows do not depend on image_rows.
        text_row = attend(q[0, h, 7], kh, vh, [0, 4, 7]) + attend(q[0, h, 7], kh, vh, [1, 2, 3, 5, 6])
        torch.testing.assert_close(out[0, h, 7], text_row)


def test_combine_mean_halves_rows_with_two_non_empty_branches():
    q, k, v, modality, image_id, _ = make_inputs(["00tt11t"])
    for image_rows in ("self", "self+text", "image"):
        summed = mmca_attention_reference(q, k, v, modality, image_id, image_rows=image_rows, combine="sum")
        mean = mmca_attention_reference(q, k, v, modality, image_id, image_rows=image_rows, combine="mean")
        # Text rows 2, 3, 6 all follow image 0: two branches.
        torch.testing.assert_close(mean[0, 0, [2, 3, 6]], summed[0, 0, [2, 3, 6]] / 2)
        # Image 0 has no earlier text, so its rows have one branch under every option.
        torch.testing.assert_close(mean[0, 0, [0, 1]], summed[0, 0, [0, 1]])
        # Image 1 follows text: two branches (self + text) only under "self+text".
        halve = 2 if image_rows == "self+text" else 1
        torch.testing.assert_close(mean[0, 0, [4, 5]], summed[0, 0, [4, 5]] / halve)


@pytest.mark.parametrize("layout", ["tt00tpp", "pptt00t", "tt0p0tp"])
@pytest.mark.parametrize("mode", ["mmca", "causal"])
def test_pad_rows_are_zero_and_pad_keys_are_never_attended(layout, mode):
    q, k, v, modality, image_id, _ = make_inputs([layout])
    out = mmca_attention_reference(q, k, v, modality, image_id, mode=mode, image_rows="self+text")
    pad = modality[0] == MODALITY_PAD
    assert torch.equal(out[0, 0, pad], torch.zeros_like(out[0, 0, pad]))
    k2, v2 = k.clone(), v.clone()
    k2[..., pad, :] += 100.0
    v2[..., pad, :] -= 100.0
    out2 = mmca_attention_reference(q, k2, v2, modality, image_id, mode=mode, image_rows="self+text")
    torch.testing.assert_close(out2, out)


@pytest.mark.parametrize("mode, image_rows", [("mmca", "self"), ("mmca", "self+text"), ("mmca", "image"),
                                              ("causal", "self")])
def test_packed_samples_do_not_attend_across(mode, image_rows):
    q, k, v, modality, image_id, sample_id = make_inputs(["tt00t|t00ttp"])
    out = mmca_attention_reference(q, k, v, modality, image_id, sample_id=sample_id, mode=mode, image_rows=image_rows)
    second = sample_id[0] == 1
    k2, v2 = k.clone(), v.clone()
    k2[..., second, :] = torch.randn_like(k2[..., second, :])
    v2[..., second, :] = torch.randn_like(v2[..., second, :])
    out2 = mmca_attention_reference(q, k2, v2, modality, image_id, sample_id=sample_id, mode=mode,
                                    image_rows=image_rows)
    torch.testing.assert_close(out2[..., ~second, :], out[..., ~second, :])
    # Both samples number their images from 0; the second sample's first text row has no earlier image.
    first = int(second.nonzero()[0])
    torch.testing.assert_close(out[0, 0, first], v[0, 0, first])
    # Without sample_id, the same row sees the first sample.
    unpacked = mmca_attention_reference(q, k, v, modality, image_id, mode=mode, image_rows=image_rows)
    assert not torch.allclose(unpacked[0, 0, first], out[0, 0, first])


@pytest.mark.parametrize(
    "mode, image_rows, combine",
    [("mmca", r, c) for r, c in itertools.product(["self", "self+text", "image"], ["sum", "mean"])]
    + [("causal", "self", "sum")],
)
def test_decode_rows_equal_last_rows_of_full_computation(mode, image_rows, combine):
    q, k, v, modality, image_id, sample_id = make_inputs(["t00tt11t|t22ttp", "tt0000t111tttt"], heads_q=4,
                                                         heads_kv=2)
    kwargs = dict(mode=mode, image_rows=image_rows, combine=combine, sample_id=sample_id)
    full = mmca_attention_reference(q, k, v, modality, image_id, **kwargs)
    for len_q in (1, 3, 6):
        last = mmca_attention_reference(q[:, :, -len_q:], k, v, modality, image_id, **kwargs)
        torch.testing.assert_close(last, full[:, :, -len_q:])


def test_causal_mode_equals_sdpa_is_causal():
    q, k, v, modality, image_id, _ = make_inputs(["tt000t11tt", "t0t1t2t3tt"], heads_q=4, heads_kv=2)
    for scale in (None, 0.3):
        out = mmca_attention_reference(q, k, v, modality, image_id, mode="causal", softmax_scale=scale,
                                       image_rows="image", combine="mean")
        expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
        torch.testing.assert_close(out, expected)


def test_softmax_scale_overrides_default():
    q, k, v, modality, image_id, _ = make_inputs(["t00t"])
    out = mmca_attention_reference(q, k, v, modality, image_id, softmax_scale=1.0 / math.sqrt(D))
    torch.testing.assert_close(out, mmca_attention_reference(q, k, v, modality, image_id))
    other = mmca_attention_reference(q, k, v, modality, image_id, softmax_scale=2.0)
    assert not torch.allclose(out, other)


def test_output_dtype_and_float32_math():
    q, k, v, modality, image_id, _ = make_inputs(["tt00tt"], dtype=torch.bfloat16)
    out = mmca_attention_reference(q, k, v, modality, image_id)
    assert out.dtype == torch.bfloat16
    expected = mmca_attention_reference(q.float(), k.float(), v.float(), modality, image_id)
    torch.testing.assert_close(out, expected.to(torch.bfloat16))


@pytest.mark.parametrize("mode, image_rows, combine", [("mmca", "self", "sum"), ("mmca", "self+text", "mean"),
                                                       ("mmca", "image", "mean"), ("causal", "self", "sum")])
def test_gradients_are_finite_with_empty_branches_and_pads(mode, image_rows, combine):
    q, k, v, modality, image_id, sample_id = make_inputs(["pp00tt11t|0tpp"], heads_q=2, heads_kv=1)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = mmca_attention_reference(q, k, v, modality, image_id, sample_id=sample_id, mode=mode,
                                   image_rows=image_rows, combine=combine)
    out.square().sum().backward()
    pad = modality[0] == MODALITY_PAD
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
        assert torch.equal(t.grad[..., pad, :], torch.zeros_like(t.grad[..., pad, :]))


def _case(name, edit, match):
    return pytest.param(edit, match, id=name)


BAD_INPUTS = [
    _case("image_rows", lambda a: a.update(image_rows="text"), r"image_rows='text' is not one of \['image', 'self', 'self\+text'\]"),
    _case("combine", lambda a: a.update(combine="max"), r"combine='max' is not one of \['mean', 'sum'\]"),
    _case("mode", lambda a: a.update(mode="cross"), r"mode='cross' is not one of \['causal', 'mmca'\]"),
    _case("q_3d", lambda a: a.update(q=a["q"][0]), r"q must be 4-D"),
    _case("kv_shape", lambda a: a.update(v=a["v"][:, :1]), r"k and v must have the same shape"),
    _case("gqa", lambda a: a.update(q=a["q"][:, :3]), r"query heads \(3\) must be a multiple of key/value heads \(2\)"),
    _case("head_dim", lambda a: a.update(q=a["q"][..., :4]), r"head_dim differs"),
    _case("batch", lambda a: a.update(q=torch.cat([a["q"], a["q"]])), r"batch size differs"),
    _case("lq_gt_lk", lambda a: a.update(k=a["k"][:, :, :3], v=a["v"][:, :, :3]), r"query length 6 exceeds key"),
    _case("codes_shape", lambda a: a.update(sample_id=a["sample_id"][:, :5]), r"sample_id must have shape"),
    _case("codes_dtype", lambda a: a.update(modality=a["modality"].float()), r"modality must be an integer"),
    _case("dtype_mix", lambda a: a.update(v=a["v"].double()), r"q, k, v must share a dtype"),
    _case("modality_value", lambda a: a["modality"].__setitem__((0, 1), 3), r"modality\[0, 1\] = 3"),
    _case("image_without_id", lambda a: a["image_id"].__setitem__((0, 2), -1), r"image_id\[0, 2\] = -1"),
    _case("text_with_id", lambda a: a["image_id"].__setitem__((0, 0), 0), r"image_id\[0, 0\] = 0"),
]


@pytest.mark.parametrize(
    "attention",
    [mmca_attention_reference, mmca_attention, functools.partial(_mmca_attention_fast, compile=False)],
    ids=["reference", "public", "flex"],
)
@pytest.mark.parametrize("edit, match", BAD_INPUTS)
def test_bad_input_raises_clear_value_error(attention, edit, match):
    q, k, v, modality, image_id, sample_id = make_inputs(["tt00tt"], heads_q=4, heads_kv=2)
    args = dict(q=q, k=k, v=v, modality=modality, image_id=image_id, sample_id=sample_id)
    edit(args)
    with pytest.raises(ValueError, match=match):
        attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("modality"), args.pop("image_id"), **args)
