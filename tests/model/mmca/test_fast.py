"""The FlexAttention path against the dense reference on random layouts (eager flex on CPU; compiled on CUDA)."""

import itertools
import math
import random

import pytest
import torch

from megatron_visualchat.model.mmca import fast, mmca_attention, mmca_attention_reference
from megatron_visualchat.model.mmca.fast import _mmca_attention_fast
from megatron_visualchat.model.token_codes import (
    MODALITY_IMAGE,
    MODALITY_PAD,
    MODALITY_TEXT,
    NO_IMAGE,
    PerCodesCache,
    codes_from_layout,
)

CONFIGS = [("mmca", rows, combine) for rows, combine in itertools.product(["self", "self+text", "image"],
                                                                          ["sum", "mean"])]
CONFIGS.append(("causal", "self", "sum"))


def random_layout(rng: random.Random, length: int, samples: int, pads: int) -> str:
    """Alternating runs of text and images (ids from 0 in each packed sample), then `pads` trailing pads."""
    parts = []
    for size in _split(rng, length - pads, samples):
        sample, next_image = "t" * rng.randint(0, 3), 0
        while len(sample) < size:
            sample += str(next_image % 10) * rng.randint(2, 6) + "t" * rng.randint(1, 5)
            next_image += 1
        parts.append(sample[:size])
    return "|".join(parts) + "p" * pads


def _split(rng, total, parts):
    cuts = sorted(rng.sample(range(1, total), parts - 1))
    return [b - a for a, b in zip([0, *cuts], [*cuts, total])]


def random_inputs(seed, length=48, heads_q=4, heads_kv=2, dim=8, len_q=None, dtype=torch.float32):
    rng = random.Random(seed)
    layouts = [random_layout(rng, length, samples=2, pads=rng.randint(0, 5)),
               random_layout(rng, length, samples=1, pads=rng.randint(0, 5))]
    modality, image_id, sample_id = (torch.stack(c) for c in zip(*map(codes_from_layout, layouts)))
    gen = torch.Generator().manual_seed(seed)
    len_q = length if len_q is None else len_q
    q = torch.randn(2, heads_q, len_q, dim, generator=gen).to(dtype)
    k = torch.randn(2, heads_kv, length, dim, generator=gen).to(dtype)
    v = torch.randn(2, heads_kv, length, dim, generator=gen).to(dtype)
    return (q, k, v, modality, image_id), sample_id


def forward_backward(attention, inputs, grad_out, **kwargs):
    q, k, v = (t.detach().requires_grad_() for t in inputs[:3])
    out = attention(q, k, v, *inputs[3:], **kwargs)
    out.backward(grad_out)
    return out, q.grad, k.grad, v.grad


def flex_eager(*args, **kwargs):
    return _mmca_attention_fast(*args, compile=False, **kwargs)


def test_random_layouts_have_images_text_pads_and_packing():
    (_, _, _, modality, _), sample_id = random_inputs(seed=0)
    assert (modality == MODALITY_IMAGE).sum() >= 8
    assert sample_id[0].max() == 1


@pytest.mark.parametrize("len_q", [48, 5], ids=["train", "decode"])
@pytest.mark.parametrize("mode, image_rows, combine", CONFIGS)
def test_flex_matches_reference_forward_and_backward(mode, image_rows, combine, len_q):
    seed = CONFIGS.index((mode, image_rows, combine)) + len_q
    inputs, sample_id = random_inputs(seed, len_q=len_q)
    kwargs = dict(mode=mode, image_rows=image_rows, combine=combine, sample_id=sample_id)
    grad_out = torch.randn_like(inputs[0])
    expected = forward_backward(mmca_attention_reference, inputs, grad_out, **kwargs)
    got = forward_backward(flex_eager, inputs, grad_out, **kwargs)
    for name, a, b in zip(["out", "dq", "dk", "dv"], got, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")
    # Without autograd the public flex_attention frontend runs (the grad path calls its op directly).
    torch.testing.assert_close(flex_eager(*inputs, **kwargs), expected[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode, image_rows, combine", [("mmca", "self+text", "mean"), ("mmca", "image", "sum")])
def test_flex_matches_reference_in_bfloat16(mode, image_rows, combine):
    inputs, sample_id = random_inputs(seed=7, dtype=torch.bfloat16)
    kwargs = dict(mode=mode, image_rows=image_rows, combine=combine, sample_id=sample_id)
    grad_out = torch.randn_like(inputs[0])
    expected = forward_backward(mmca_attention_reference, inputs, grad_out, **kwargs)
    got = forward_backward(flex_eager, inputs, grad_out, **kwargs)
    assert got[0].dtype == torch.bfloat16
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=3e-2, rtol=3e-2)


def test_causal_without_pads_or_packing_uses_sdpa(monkeypatch):
    inputs, _ = random_inputs(seed=3)
    modality = torch.full_like(inputs[3], MODALITY_TEXT)
    image_id = torch.full_like(inputs[4], NO_IMAGE)
    inputs = (*inputs[:3], modality, image_id)

    def no_flex(*args, **kwargs):
        raise AssertionError("flex_attention used where SDPA applies")

    monkeypatch.setattr(fast, "_flex", no_flex)
    grad_out = torch.randn_like(inputs[0])
    expected = forward_backward(mmca_attention_reference, inputs, grad_out, mode="causal")
    got = forward_backward(flex_eager, inputs, grad_out, mode="causal")
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_a_leaking_image_mask_is_caught(monkeypatch):
    """The DS-VisualChat leak (text rows see every image, future ones included) must not match the oracle."""
    inputs, sample_id = random_inputs(seed=11)
    expected = mmca_attention_reference(*inputs, sample_id=sample_id)
    torch.testing.assert_close(flex_eager(*inputs, sample_id=sample_id), expected, atol=1e-5, rtol=1e-5)
    correct_mask_mod = fast._mask_mod

    def leaking_mask_mod(c, rules):
        correct = correct_mask_mod(c, rules)
        image_branch = bool(rules[MODALITY_TEXT, MODALITY_IMAGE] == fast.BEFORE)

        def mask_mod(b, h, q_idx, kv_idx):
            leak = (c.q_modality[b, q_idx] == MODALITY_TEXT) & (c.modality[b, kv_idx] == MODALITY_IMAGE)
            return correct(b, h, q_idx, kv_idx) | (leak & image_branch)

        return mask_mod

    monkeypatch.setattr(fast, "_mask_mod", leaking_mask_mod)
    monkeypatch.setattr(fast, "_CACHE", PerCodesCache())  # the correct masks are cached for these codes
    assert not torch.allclose(flex_eager(*inputs, sample_id=sample_id), expected, atol=1e-3)


def plain_attention(q, k, v, modality, image_id, *, mode="mmca", image_rows="self", combine="sum", sample_id=None):
    """docs/design/mmca.md written out row by row, independently of the reference's masks: per query the key
    sets T(i), I(i), {i}, Own(i) or C(i) as Python lists, one softmax each, combined by sum or mean."""
    batch, heads_q, len_q, dim = q.shape
    len_k, group = k.shape[2], heads_q // k.shape[1]
    k, v = (t.float().repeat_interleave(group, dim=1) for t in (k, v))
    m, img = modality.tolist(), image_id.tolist()
    smp = sample_id.tolist() if sample_id is not None else [[0] * len_k] * batch
    rows = []
    for b in range(batch):
        for i in range(len_k - len_q, len_k):
            same = [j for j in range(len_k) if smp[b][j] == smp[b][i]]
            text = [j for j in same if m[b][j] == MODALITY_TEXT and j <= i]
            if mode == "causal":
                branches = [[j for j in same if m[b][j] != MODALITY_PAD and j <= i]] if m[b][i] != MODALITY_PAD else []
            elif m[b][i] == MODALITY_TEXT:
                branches = [text, [j for j in same if m[b][j] == MODALITY_IMAGE and j < i]]
            elif m[b][i] == MODALITY_IMAGE:
                own = [j for j in same if m[b][j] == MODALITY_IMAGE and img[b][j] == img[b][i]]
                branches = {"self": [[i]], "self+text": [[i], text], "image": [own]}[image_rows]
            else:
                branches = []
            branches = [keys for keys in branches if keys]
            qi = q[b, :, i - (len_k - len_q)].float()  # all heads at once: [Hq, D]
            outs = [torch.softmax((k[b, :, keys] @ qi[..., None])[..., 0] / math.sqrt(dim), dim=-1)[:, None]
                    @ v[b, :, keys] for keys in branches]
            row = sum(outs)[:, 0] if outs else torch.zeros(heads_q, dim)
            if combine == "mean" and mode == "mmca":
                row = row / max(1, len(outs))
            rows.append(row)
    return torch.stack(rows).view(batch, len_q, heads_q, dim).transpose(1, 2).to(q.dtype)


@pytest.mark.parametrize("len_q", [48, 5], ids=["train", "decode"])
@pytest.mark.parametrize("mode, image_rows, combine", CONFIGS)
def test_public_and_flex_match_plain_per_row_attention(mode, image_rows, combine, len_q):
    """The public function (the dense reference on CPU) and the flex path against the semantics written out,
    forward and backward, on random layouts with images, pads, packing and GQA."""
    inputs, sample_id = random_inputs(CONFIGS.index((mode, image_rows, combine)) + 3 * len_q, len_q=len_q)
    kwargs = dict(mode=mode, image_rows=image_rows, combine=combine, sample_id=sample_id)
    grad_out = torch.randn_like(inputs[0])
    expected = forward_backward(plain_attention, inputs, grad_out, **kwargs)
    for attention in (mmca_attention, flex_eager):
        got = forward_backward(attention, inputs, grad_out, **kwargs)
        for name, a, b in zip(["out", "dq", "dk", "dv"], got, expected):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"{attention.__name__} {name}: {m}")


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (compiled FlexAttention)")


@cuda
@pytest.mark.parametrize("mode, image_rows, combine", CONFIGS)
def test_compiled_cuda_matches_reference_in_bfloat16(mode, image_rows, combine):
    # 300 keys: not a multiple of the 128-token flex block.
    inputs, sample_id = random_inputs(seed=1, length=300, heads_q=8, heads_kv=2, dim=64, dtype=torch.bfloat16)
    inputs = tuple(t.cuda() for t in inputs)
    kwargs = dict(mode=mode, image_rows=image_rows, combine=combine, sample_id=sample_id.cuda())
    grad_out = torch.randn_like(inputs[0])
    expected = forward_backward(mmca_attention_reference, inputs, grad_out, **kwargs)
    got = forward_backward(mmca_attention, inputs, grad_out, **kwargs)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=3e-2, rtol=3e-2)


@cuda
def test_compiled_cuda_does_not_materialise_scores():
    length, heads = 8192, 4
    inputs, sample_id = random_inputs(seed=2, length=length, heads_q=heads, heads_kv=heads, dim=64,
                                      dtype=torch.bfloat16)
    inputs = tuple(t.cuda() for t in inputs)
    grad_out = torch.randn_like(inputs[0])
    forward_backward(mmca_attention, inputs, grad_out, sample_id=sample_id.cuda())  # compile outside the window
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    forward_backward(mmca_attention, inputs, grad_out, sample_id=sample_id.cuda())
    one_score_map = 2 * heads * length * length * 2  # [B, H, L, L] in bf16
    assert torch.cuda.max_memory_allocated() - before < one_score_map / 4


def test_block_masks_are_built_once_per_codes_tensor(monkeypatch):
    """All layers of a forward share the codes tensor: the masks are built for the first and reused."""
    builds = []
    real = fast.create_block_mask
    monkeypatch.setattr(fast, "create_block_mask", lambda *a, **k: builds.append(1) or real(*a, **k))
    monkeypatch.setattr(fast, "_CACHE", PerCodesCache())
    modality, image_id, sample_id = (t.unsqueeze(0) for t in codes_from_layout("tt000tt11t"))
    q, k, v = (torch.randn(1, 2, 10, 8) for _ in range(3))
    outs = [fast._mmca_attention_fast(q, k, v, modality, image_id, sample_id=sample_id, compile=False)
            for _layer in range(3)]
    assert len(builds) == 2  # text branch + image branch, once
    assert all(torch.equal(o, outs[0]) for o in outs)
    modality[0, 0] = MODALITY_TEXT  # an in-place edit (version bump) is a new layout
    fast._mmca_attention_fast(q, k, v, modality, image_id, sample_id=sample_id, compile=False)
    assert len(builds) == 4
