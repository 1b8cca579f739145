"""VisualChatModel on one process: every projector x attention mode x modality split trains (its gradient is the
loss's: a small step along it lowers the loss by |g| x step), images land after their own "### Image k:" header,
placeholder/image mismatches name the sample, a text-only batch is the plain language model, trainable policy."""

import itertools

import pytest
import torch

from megatron_visualchat.config import (
    LLM_PRESETS, MODALITY_SPLITS, AttentionConfig, TrainableConfig, VisionConfig, VisualChatConfig,
)
from megatron_visualchat.testing.batches import visualchat_batch
from megatron_visualchat.testing.distributed import RankFailed, run_parallel

LLM = LLM_PRESETS["tiny"]
TINY_OPTIONS = {
    "linear": {}, "mlp": {}, "pool_adapter": {"pool_out": 2},
    "perceiver": {"num_queries": 4, "width": 32, "num_heads": 2},
    "abstractor": {"num_queries": 4, "num_layers": 2, "width": 32, "num_heads": 2, "ffn_hidden": 64},
}


def _model(projector="linear", mode="mmca", split="qkvo", trainable=TrainableConfig()):
    from megatron_visualchat.model.visualchat import VisualChatModel, apply_trainable_policy

    cfg = VisualChatConfig(llm=LLM, attention=AttentionConfig(mode=mode, modality_split=split),
                           vision=VisionConfig(encoder="tiny", projector=projector,
                                               projector_options=TINY_OPTIONS[projector]),
                           trainable=trainable)
    model = VisualChatModel(cfg)
    apply_trainable_policy(model, trainable, new_token_rows=(LLM.vocab_size - 2, LLM.vocab_size - 1))
    return model


def _loss(model, batch):
    from megatron_visualchat.training.step import visualchat_forward_step

    out, loss_fn = visualchat_forward_step(iter([batch]), model)
    loss, _ = loss_fn(out)
    return loss


STEP = 3e-3  # length of the probe step along the normalised gradient


def _matrix():
    """Per combination: (loss decrease of a STEP-long step down the gradient / |g| x STEP, whether gradients reach
    exactly the trainable parameters, how many there are)."""
    out = {}
    for projector, mode, split in itertools.product(TINY_OPTIONS, ("mmca", "causal"), MODALITY_SPLITS):
        model = _model(projector, mode, split)
        t = model.vision.num_output_tokens
        batch = visualchat_batch([["ttt", 0, "tt", 1, "tt"], ["tttt"], ["t", 0, "ttt"]], t, LLM.vocab_size)
        loss = _loss(model, batch)
        loss.backward()
        trainable = [p for p in model.parameters() if p.requires_grad]
        with_grad = [p for p in model.parameters() if p.grad is not None]
        grad_norm = float(sum(p.grad.square().sum() for p in trainable).sqrt())
        with torch.no_grad():
            for p in trainable:
                p.sub_(STEP / grad_norm * p.grad)
            decrease = float(loss) - float(_loss(model, batch))
        out[(projector, mode, split)] = (decrease / (STEP * grad_norm),
                                         {id(p) for p in trainable} == {id(p) for p in with_grad}, len(trainable))
    return out


def test_every_projector_mode_and_split_trains():
    results = run_parallel(_matrix, timeout=400)[0]
    assert len(results) == len(TINY_OPTIONS) * 2 * len(MODALITY_SPLITS)
    for key, (first_order, grads_match, n_trainable) in results.items():
        assert grads_match, f"{key}: gradients must reach exactly the trainable parameters"
        assert n_trainable > 0, key
        # Measured: within 0.0063 of 1 for every combination (second-order terms and float32 rounding).
        assert abs(first_order - 1) < 0.02, (key, first_order)


def _image_order():
    """Image k's embeddings sit at the positions after its header: compare the spliced decoder input with the
    projector output of each image."""
    from megatron_visualchat.model.splice import splice_image_embeddings
    from megatron_visualchat.model.token_codes import unpack_token_codes

    model = _model()
    t = model.vision.num_output_tokens
    batch = visualchat_batch([["tt", 0, "tt", 1, "tt", 2]], t, LLM.vocab_size)
    feats = model.vision(batch["pixel_values"])
    embeds = model.language_model.embedding(input_ids=batch["tokens"], position_ids=batch["position_ids"])
    spliced = splice_image_embeddings(embeds, feats, unpack_token_codes(batch["attention_mask"]).modality)
    starts = [2, 4 + t, 6 + 2 * t]
    return [torch.equal(spliced[s:s + t, 0], feats[k]) for k, s in enumerate(starts)]


def test_image_k_lands_after_its_own_header():
    assert run_parallel(_image_order)[0] == [True, True, True]


def _mismatch():
    model = _model()
    batch = visualchat_batch([["tt", 0, "tt"], ["tt", 0, "tt", 1]], model.vision.num_output_tokens, LLM.vocab_size)
    batch["num_images"] = torch.tensor([2, 1])
    _loss(model, batch)


def test_wrong_image_count_names_the_sample():
    with pytest.raises(RankFailed, match=r"sample 0: 17 image positions but 2 image\(s\)"):
        run_parallel(_mismatch)


def _new_rows_only():
    model = _model(trainable=TrainableConfig(projector=True, new_token_rows_only=True))
    batch = visualchat_batch([["tt", 0, "tt"]], model.vision.num_output_tokens, LLM.vocab_size)
    batch["tokens"][0, :2] = LLM.vocab_size - 1  # an added token is used
    _loss(model, batch).backward()
    grad = model.language_model.embedding.word_embeddings.weight.grad
    rows = grad.abs().sum(dim=1).nonzero().flatten().tolist()
    return rows


def test_new_token_rows_only_trains_just_those_rows():
    rows = run_parallel(_new_rows_only)[0]
    assert rows and set(rows) <= {LLM.vocab_size - 2, LLM.vocab_size - 1}


def _text_only_batch():
    from megatron_visualchat.training.step import masked_lm_loss

    model = _model()
    batch = visualchat_batch([["tttttt"], ["tttp"]], model.vision.num_output_tokens, LLM.vocab_size)
    batch.pop("pixel_values")
    loss = _loss(model, batch)
    loss.backward()
    with torch.no_grad():
        plain, _ = masked_lm_loss(batch["loss_mask"], model.language_model(
            batch["tokens"], batch["position_ids"], batch["attention_mask"], labels=batch["labels"]))
    return float(loss), float(plain), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_text_only_batch_is_the_language_model_and_gives_zero_grads():
    loss, plain, grads = run_parallel(_text_only_batch)[0]
    assert loss == plain
    assert grads and all(g is not None for g in grads.values())
    assert all(not g.any() for n, g in grads.items() if n.startswith("vision.projector."))
