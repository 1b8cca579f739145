"""LoRA under tensor and pipeline parallelism: from the same weights (adapters with non-zero B, on the decoder's
four linears, on modality-split image weights and on the vision encoder), TP=2, PP=2 and TP=2 x PP=2 give the loss,
the adapter gradients and the gradient norm of TP=1; replicated adapter matrices get the same gradient on every TP
rank, also with adapter dropout; the split ones carry megatron's tensor-parallel attributes."""

import pytest
import torch

from megatron_visualchat.config import LLM_PRESETS, AttentionConfig, LoraConfig, VisionConfig, VisualChatConfig
from megatron_visualchat.testing.batches import visualchat_batch
from megatron_visualchat.testing.distributed import run_parallel
from megatron_visualchat.testing.equivalence import (
    current_parallel, full_state_off_start, merge_rank_results, run_step_on_shard,
)
from megatron_visualchat.training.step import visualchat_forward_step

LLM = LLM_PRESETS["tiny"]
T = 17  # tiny encoder tokens per image
ROWS = [["tt", 0, "ttt", 1, "tttt"], ["tttttt", 0, "tttttttttttttppppppp"]]
MBS = 2
SEQ = 2 + 3 + 4 + 2 * T
_BUILT = []  # this rank's chunks, for the gradient norm


def _cfg(split, dropout=0.0):
    return VisualChatConfig(llm=LLM, attention=AttentionConfig(mode="mmca", modality_split=split),
                            vision=VisionConfig(encoder="tiny", projector="linear"), parallel=current_parallel(),
                            lora=LoraConfig(rank=4, alpha=8.0, dropout=dropout, vision_rank=2))


def _build(split, dropout=0.0, vp_stage=None):
    from megatron_visualchat.model.visualchat import VisualChatModel, apply_trainable_policy

    model = VisualChatModel(_cfg(split, dropout), vp_stage=vp_stage)
    apply_trainable_policy(model, model.cfg.trainable)
    _BUILT.append(model)
    return model


def _full(split):
    """TP=1 weights with every adapter's B (and the image-side weights) moved off their start."""
    torch.manual_seed(11)
    model = _build(split)
    return full_state_off_start(model)


def _step(split, full, dropout=0.0):
    from functools import partial

    from megatron.core import parallel_state as ps
    from megatron.core.optimizer.clip_grads import get_grad_norm_fp32
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    batches = [visualchat_batch(ROWS, T, LLM.vocab_size, seed=i) for i in range(2)]
    assert batches[0]["tokens"].shape[1] == SEQ
    _BUILT.clear()
    out = run_step_on_shard(partial(_build, split, dropout), full, LLM, batches, seq_length=SEQ, micro_batch_size=MBS,
                            forward_step=visualchat_forward_step)
    params = [(n, p) for m in _BUILT for n, p in m.named_parameters() if p.grad is not None]
    out["grad_norm"] = get_grad_norm_fp32([p.grad for _, p in params if param_is_not_tensor_parallel_duplicate(p)],
                                          grad_stats_parallel_group=ps.get_model_parallel_group())
    out["tp_split"] = sorted(n for n, p in params if "lora" in n and getattr(p, "tensor_model_parallel", False))
    return out


def _assert_replicas_agree(results, tp):
    """Replicated adapter matrices get the same gradient on every TP rank (else the replicas would drift apart)."""
    replicated = {}
    for r in results:
        for _, shard in r["shards"]:
            for name, g in shard.items():
                if g is not None and "lora" in name and name not in r["tp_split"]:
                    replicated.setdefault((r["pp_rank"], name), []).append(g)
    assert replicated and all(len(gs) == tp for gs in replicated.values())
    for (_, name), gs in replicated.items():
        for g in gs[1:]:
            torch.testing.assert_close(g, gs[0], rtol=0, atol=0, msg=lambda m: f"{name}: {m}")


_FULL, _REFERENCE = {}, {}


def _reference(split):
    if split not in _REFERENCE:
        _FULL[split] = run_parallel(_full, args=(split,))[0]
        results = run_parallel(_step, args=(split, _FULL[split]))
        _REFERENCE[split] = (*merge_rank_results(results, 1), results[0]["grad_norm"])
    return _FULL[split], _REFERENCE[split]


@pytest.mark.parametrize("split,tp,pp", [("qkvo", 2, 1), ("qkvo", 1, 2), ("qkvo", 2, 2), ("kv", 2, 2),
                                         ("none", 2, 2)])
def test_layouts_match_single_process(split, tp, pp):
    full, (ref_loss, ref_grads, ref_norm) = _reference(split)
    results = run_parallel(_step, tp=tp, pp=pp, args=(split, full))
    loss, grads = merge_rank_results(results, tp)
    assert abs(loss - ref_loss) < 1e-5 * max(1.0, abs(ref_loss))
    assert grads.keys() == ref_grads.keys()
    adapters = [n for n in ref_grads if "lora" in n]
    image_pairs = {"none": 0, "kv": 1, "qkvo": 2}[split]  # per layer
    assert len(adapters) == 2 * ((4 + image_pairs) * LLM.num_layers + 4 * 2)  # + 4 per tiny vision block (2)
    # the last layer's image-side output projection only feeds image positions, which carry no loss
    last_image_o = f"decoder.layers.{LLM.num_layers - 1}.self_attention.linear_proj.image_lora_"
    assert sorted(n for n in adapters if not ref_grads[n].any()) == \
        ([f"language_model.{last_image_o}a", f"language_model.{last_image_o}b"] if split == "qkvo" else [])
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    # the gradient norm (clipping, logging) counts split adapters on every TP rank, replicated ones once
    norms = {r["grad_norm"] for r in results}
    assert len(norms) == 1 and abs(norms.pop() - ref_norm) < 1e-5 * ref_norm
    _assert_replicas_agree(results, tp)
    split_kinds = {".".join(n.split(".")[-2:]) for r in results for n in r["tp_split"]}
    assert split_kinds == {"linear_qkv.lora_b", "linear_fc1.lora_b", "linear_proj.lora_a", "linear_fc2.lora_a"} | \
        ({"linear_qkv.image_lora_b"} if image_pairs else set()) | \
        ({"linear_proj.image_lora_a"} if split == "qkvo" else set())


def test_dropout_keeps_tensor_parallel_replicas_in_step():
    """Column-parallel adapters drop their replicated input with the generator TP ranks share (the same mask on
    every rank), row-parallel ones their own input columns with megatron's model-parallel RNG tracker."""
    full, (ref_loss, _, _) = _reference("qkvo")
    results = run_parallel(_step, tp=2, args=("qkvo", full, 0.3))
    _assert_replicas_agree(results, 2)
    loss, _ = merge_rank_results(results, 2)
    assert abs(loss - ref_loss) > 1e-4  # the dropout did act
