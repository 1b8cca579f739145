"""GPTModel with the MMCA layer spec (modality-split projections, GQA) gives the same loss and gradients at
TP=2, PP=2 and TP=2 x PP=2 as at TP=1, from the same weights."""

import pytest
import torch

from megatron_visualchat.config import LLM_PRESETS, AttentionConfig, VisualChatConfig
from megatron_visualchat.testing.batches import batch_from_layouts
from megatron_visualchat.testing.distributed import run_parallel
from megatron_visualchat.testing.equivalence import current_parallel, merge_rank_results, run_step_on_shard

LLM = LLM_PRESETS["tiny"]
LAYOUTS = [
    ["ttt000tttt11tttpp", "t0000ttttttttttpp"],  # text before the first image, two images, padding
    ["tttttttt|tt0t11ttt", "tttttttttttttpppp"],  # packed samples; a row without images
]
SEQ, MBS = 17, 2


def _batches():
    return [batch_from_layouts(lay, LLM.vocab_size, seed=i) for i, lay in enumerate(LAYOUTS)]


def _build(mode, split, norms=False):
    from megatron_visualchat.model.gpt import build_gpt_model
    from megatron_visualchat.model.layer_specs import get_mmca_layer_spec

    def build():
        return build_gpt_model(VisualChatConfig(llm=LLM, parallel=current_parallel()),
                               get_mmca_layer_spec(AttentionConfig(mode=mode, modality_split=split,
                                                                   modality_norms=norms)))
    return build


def _full(mode, split, norms=False):
    model = _build(mode, split, norms)()
    torch.manual_seed(7)
    with torch.no_grad():  # image-side weights differ from the text ones, as after training
        for name, p in model.named_parameters():
            if "image_weight" in name:
                p.add_(0.05 * torch.randn_like(p))
    return {k: v.clone() for k, v in model.state_dict().items() if "_extra_state" not in k}


def _step(full, mode, split, norms=False):
    return run_step_on_shard(_build(mode, split, norms), full, LLM, _batches(), seq_length=SEQ,
                             micro_batch_size=MBS)


@pytest.mark.parametrize("mode,split,norms,layouts", [
    ("mmca", "qkvo", False, [(2, 1), (1, 2), (2, 2)]),
    ("mmca", "kv", False, [(2, 2)]),
    ("causal", "qkv", False, [(2, 2)]),
    ("causal", "kv", True, [(2, 2)]),  # mPLUG-Owl2's modality-adaptive module
])
def test_mmca_layouts_match_single_process(mode, split, norms, layouts):
    full = run_parallel(_full, args=(mode, split, norms))[0]
    ref_loss, ref_grads = merge_rank_results(run_parallel(_step, args=(full, mode, split, norms)), 1)
    assert any("image_weight" in k for k in ref_grads)
    if norms:
        assert any("layernorm.image_weight" in k for k in ref_grads)
    for tp, pp in layouts:
        loss, grads = merge_rank_results(run_parallel(_step, tp=tp, pp=pp, args=(full, mode, split, norms)), tp)
        assert abs(loss - ref_loss) < 1e-5 * max(1.0, abs(ref_loss)), (tp, pp, loss, ref_loss)
        assert grads.keys() == ref_grads.keys()
        for name, g in ref_grads.items():
            torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6,
                                       msg=lambda m: f"tp={tp} pp={pp} {name}: {m}")
