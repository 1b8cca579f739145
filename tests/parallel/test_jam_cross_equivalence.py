"""JAM-Cross (two towers, cross links after layers 2 and 4, the ``[h_A ; h_B]`` p2p tensor) gives the same loss and
gradients at TP=2, PP=2 and TP=2 x PP=2 as at TP=1 from the same weights, gates open, towers trained, packed
samples and pads in the batch."""

import pytest
import torch

from megatron_visualchat.config import LLM_PRESETS, FusionConfig, TrainableConfig, VisualChatConfig
from megatron_visualchat.testing.batches import batch_from_layouts
from megatron_visualchat.testing.distributed import run_parallel
from megatron_visualchat.testing.equivalence import current_parallel, merge_rank_results, run_step_on_shard
from megatron_visualchat.training.step import visualchat_forward_step

LLM = LLM_PRESETS["tiny"]
LAYOUTS = [["tttt|ttttppp", "ttttttttttt"], ["ttttttttttp", "ttt|ttt|ttttt"]]
SEQ, MBS = 11, 2


def _build(vp_stage=None):
    from megatron_visualchat.model.jam_cross import JamCrossModel, apply_jam_cross_trainable

    cfg = VisualChatConfig(llm=LLM, fusion=FusionConfig(kind="jam-cross", cross_interval=2),
                           trainable=TrainableConfig(llm=True), parallel=current_parallel())
    model = JamCrossModel(cfg, vp_stage=vp_stage)
    apply_jam_cross_trainable(model, cfg.trainable)
    return model


def _full():
    """Gates open and the B half of the head off zero: at the start only they would get a gradient."""
    torch.manual_seed(11)
    model = _build()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("cross_attention.gate"):
                p.fill_(0.5)
            elif name.startswith("tower_b_output_layer"):
                p.normal_(0.0, 0.05)
    return {k: v.clone() for k, v in model.state_dict().items() if "_extra_state" not in k}


def _step(full):
    batches = [batch_from_layouts(layouts, LLM.vocab_size, seed=i) for i, layouts in enumerate(LAYOUTS)]
    return run_step_on_shard(_build, full, LLM, batches, seq_length=SEQ, micro_batch_size=MBS,
                             forward_step=visualchat_forward_step)


@pytest.fixture(scope="module")
def full():
    return run_parallel(_full)[0]


@pytest.fixture(scope="module")
def reference(full):
    return merge_rank_results(run_parallel(_step, args=(full,)), 1)


def test_every_weight_gets_a_gradient(reference):
    _, grads = reference
    assert sorted({k.split(".")[1] for k in grads if k.startswith("cross_layers.")}) == ["2", "4"]
    zero = sorted(k for k, g in grads.items() if not g.any())
    assert zero == [], zero


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (2, 2)])
def test_layouts_match_single_process(full, reference, tp, pp):
    ref_loss, ref_grads = reference
    loss, grads = merge_rank_results(run_parallel(_step, tp=tp, pp=pp, args=(full,)), tp)
    # Measured: equal losses; PP gradients bit-identical, TP ones within 6.5e-7 of each tensor's largest entry.
    assert abs(loss - ref_loss) < 1e-6 * max(1.0, abs(ref_loss)), (loss, ref_loss)
    assert grads.keys() == ref_grads.keys()
    worst = max(((grads[k] - g).abs().max() / g.abs().max()).item() for k, g in ref_grads.items())
    assert worst < (5e-6 if tp > 1 else 1e-12), worst
