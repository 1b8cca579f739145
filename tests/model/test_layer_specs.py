"""The MMCA layer spec on one process: equals megatron-core's stock spec in causal mode, keeps its state-dict
keys, gives image-side weights defined zero gradients without images, refuses what it cannot do."""

import pytest
import torch

from megatron_visualchat.config import LLM_PRESETS, AttentionConfig, ConfigError, VisualChatConfig
from megatron_visualchat.testing.batches import batch_from_layouts
from megatron_visualchat.testing.distributed import run_parallel

LLM = LLM_PRESETS["tiny"]


def _model(spec):
    from megatron_visualchat.model.gpt import build_gpt_model

    torch.manual_seed(3)
    return build_gpt_model(VisualChatConfig(llm=LLM), spec)


def _loss_and_grads(model, batch):
    loss = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"), labels=batch["labels"])
    loss = (loss * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
    loss.backward()
    return float(loss), {n: p.grad for n, p in model.named_parameters()}


def _causal_equals_stock():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_visualchat.model.layer_specs import get_mmca_layer_spec

    batch = batch_from_layouts(["tttttttttttt", "tttttttttttt"], LLM.vocab_size)
    stock = _model(get_gpt_layer_local_spec(normalization="RMSNorm"))
    ours = _model(get_mmca_layer_spec(AttentionConfig(mode="causal")))
    assert stock.state_dict().keys() == ours.state_dict().keys()
    ours.load_state_dict(stock.state_dict())
    stock_batch = {**batch, "attention_mask": None}  # stock: megatron's own causal mask
    return _loss_and_grads(stock, stock_batch), _loss_and_grads(ours, batch)


def test_causal_mode_without_split_equals_megatron_stock_spec():
    (l1, g1), (l2, g2) = run_parallel(_causal_equals_stock)[0]
    assert abs(l1 - l2) < 1e-6
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], rtol=1e-5, atol=1e-7)


def _split_facts(split):
    from megatron_visualchat.model.layer_specs import get_mmca_layer_spec

    model = _model(get_mmca_layer_spec(AttentionConfig(modality_split=split)))
    sd = model.state_dict()
    layer = "decoder.layers.0.self_attention."
    starts_as_copy = {}
    qkv = sd[layer + "linear_qkv.weight"]
    if split == "kv":
        groups, hpg, hn = LLM.query_groups, LLM.num_attention_heads // LLM.query_groups, LLM.head_dim
        text_kv = qkv.view(groups, hpg + 2, hn, -1)[:, hpg:].reshape(-1, qkv.shape[1])
        starts_as_copy["qkv"] = torch.equal(sd[layer + "linear_qkv.image_weight"], text_kv)
    else:
        starts_as_copy["qkv"] = torch.equal(sd[layer + "linear_qkv.image_weight"], qkv)
    if split == "qkvo":
        starts_as_copy["proj"] = torch.equal(sd[layer + "linear_proj.image_weight"], sd[layer + "linear_proj.weight"])
    text_only = batch_from_layouts(["tttttttttpp", "ttttttttttt"], LLM.vocab_size)
    _, grads = _loss_and_grads(model, text_only)
    image_grads = {n: g for n, g in grads.items() if "image_weight" in n}
    return sorted(sd), starts_as_copy, image_grads


@pytest.mark.parametrize("split", ["kv", "qkv", "qkvo"])
def test_split_projections_start_as_copies_and_get_zero_grads_without_images(split):
    keys, starts_as_copy, image_grads = run_parallel(_split_facts, args=(split,))[0]
    extra = {k for k in keys if "image_weight" in k}
    assert len(extra) == LLM.num_layers * (2 if split == "qkvo" else 1)
    assert all(starts_as_copy.values()), starts_as_copy
    assert image_grads and all(g is not None and not g.any() for g in image_grads.values())


def _image_side_only_moves_image_tokens():
    """With only image-side weights trainable, text-token losses before the first image cannot change them."""
    from megatron_visualchat.model.layer_specs import get_mmca_layer_spec

    model = _model(get_mmca_layer_spec(AttentionConfig(modality_split="qkvo")))
    for name, p in model.named_parameters():
        p.requires_grad_("image_weight" in name)
    batch = batch_from_layouts(["tttt000ttt"], LLM.vocab_size)
    batch["loss_mask"] = torch.tensor([[1, 1, 1, 0, 0, 0, 0, 0, 0, 0]], dtype=torch.float)  # text before image
    _, g_before = _loss_and_grads(model, batch)
    before = {n: float(g.abs().sum()) for n, g in g_before.items() if g is not None}
    model.zero_grad()
    batch["loss_mask"] = torch.tensor([[0, 0, 0, 0, 0, 0, 0, 1, 1, 1]], dtype=torch.float)  # text after image
    _, g_after = _loss_and_grads(model, batch)
    after = {n: float(g.abs().sum()) for n, g in g_after.items() if g is not None}
    frozen_with_grad = [n for n, g in g_after.items() if g is not None and "image_weight" not in n]
    return before, after, frozen_with_grad


def test_gradients_reach_exactly_the_trainable_image_side():
    before, after, frozen_with_grad = run_parallel(_image_side_only_moves_image_tokens)[0]
    assert not frozen_with_grad
    assert set(before) == set(after) and before
    assert all(v == 0.0 for v in before.values()), "text before the first image must not see image tokens"
    assert any(v > 0.0 for v in after.values())


def test_te_backend_without_transformer_engine_is_refused():
    """The one check left here: what only this machine can tell. Options and their combinations are
    ``AttentionConfig.validate``'s (tests/test_config.py)."""
    from megatron.core.extensions import transformer_engine as te

    from megatron_visualchat.model.layer_specs import get_mmca_layer_spec

    if getattr(te, "HAVE_TE", False):
        pytest.skip("Transformer-Engine is installed here")
    with pytest.raises(ConfigError, match="Transformer-Engine"):
        get_mmca_layer_spec(AttentionConfig(backend="te"))


def _modality_norm_facts():
    from megatron_visualchat.model.layer_specs import get_mmca_layer_spec

    model = _model(get_mmca_layer_spec(AttentionConfig(mode="causal", modality_split="kv", modality_norms=True)))
    sd = model.state_dict()
    norm = "decoder.layers.0.input_layernorm."
    starts_as_copy = torch.equal(sd[norm + "image_weight"], sd[norm + "weight"])
    _, grads = _loss_and_grads(model, batch_from_layouts(["tttttttt"], LLM.vocab_size))
    zero_without_images = not grads[norm + "image_weight"].any()
    model.zero_grad()
    with torch.no_grad():  # make the image scale differ, then only image tokens may change
        for name, p in model.named_parameters():
            if name.endswith("layernorm.image_weight"):
                p.mul_(3.0)
    batch = batch_from_layouts(["ttt00ttt"], LLM.vocab_size)
    out_images = model(batch["tokens"], batch["position_ids"], batch["attention_mask"])
    for name, p in model.named_parameters():
        if name.endswith("layernorm.image_weight"):
            p.data.div_(3.0)
    out_base = model(batch["tokens"], batch["position_ids"], batch["attention_mask"])
    changed = (out_images - out_base).abs().amax(dim=-1)[0] > 1e-6
    return starts_as_copy, zero_without_images, changed.tolist()


def test_modality_norms_scale_image_tokens_only():
    starts_as_copy, zero_without_images, changed = run_parallel(_modality_norm_facts)[0]
    assert starts_as_copy and zero_without_images
    assert changed[:3] == [False, False, False]  # text before the image does not see it
    assert all(changed[3:])  # the image tokens and the text after them do


def _tp_attributes(split):
    from megatron_visualchat.model.gpt import build_gpt_model
    from megatron_visualchat.model.layer_specs import get_mmca_layer_spec
    from megatron_visualchat.testing.equivalence import current_parallel

    attention = AttentionConfig(modality_split=split, modality_norms=True)
    model = build_gpt_model(VisualChatConfig(llm=LLM, attention=attention, parallel=current_parallel()),
                            get_mmca_layer_spec(attention))
    return {n: (getattr(p, "tensor_model_parallel", False), getattr(p, "partition_dim", None))
            for n, p in model.named_parameters()}


@pytest.mark.parametrize("split", ["kv", "qkvo"])
def test_tensor_parallel_attributes_follow_the_sharding_rules(split):
    """megatron-core's gradient norm counts a parameter flagged ``tensor_model_parallel`` on every TP rank and any
    other on TP rank 0 only: the flag and its dim must say how the parameter is really split (the checkpoint
    sharding rules), image-side weights and modality norms included."""
    from megatron_visualchat.checkpoint.sharding import split_kind

    attributes = run_parallel(_tp_attributes, tp=2, args=(split,))[0]
    expected = {"column": (True, 0), "glu": (True, 0), "row": (True, 1), "replicated": (False, None)}
    assert any(n.endswith("self_attention.linear_qkv.image_weight") for n in attributes)
    assert any(n.endswith("layernorm.image_weight") for n in attributes)
    wrong = {n: a for n, a in attributes.items() if a != expected[split_kind(n)]}
    assert not wrong, wrong
