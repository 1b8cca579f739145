"""Cross mode (gated cross-attention layers every 2nd layer, image context sent on behind the hidden states through
the pipeline) gives the same loss and gradients at TP=2, PP=2 and TP=2 x PP=2 as at TP=1 from the same weights,
gates open and packed samples in the batch; and with virtual pipeline stages (PP=2 x VPP=2, where megatron-core's
own shape exchange would deadlock: parallel/p2p.py)."""

import pytest
import torch

from megatron_visualchat.config import LLM_PRESETS, AttentionConfig, VisionConfig, VisualChatConfig
from megatron_visualchat.testing.batches import batch_from_layouts
from megatron_visualchat.testing.distributed import run_parallel
from megatron_visualchat.testing.equivalence import current_parallel, merge_rank_results, run_step_on_shard
from megatron_visualchat.training.step import visualchat_forward_step

LLM = LLM_PRESETS["tiny"]
# One marker position per image; row 0 packs two samples, row 1 shows its second image late, microbatches 1 and 3
# have a row without images (so M, the most images per row, differs between microbatches: the p2p shape varies).
# Four microbatches, so that PP=2 x VPP=2 reaches its steady state (a forward and a backward tensor exchanged with
# the same peer in one call).
LAYOUTS = [["tt0ttt|t1tttpp", "ttt0ttttt1ttt"], ["tt0tt1tt2tttp", "ttttttttttttp"],
           ["t0tttt1tttttt", "tttt0tttttttp"], ["ttttttttttttt", "0t1t2t3ttttpp"]]
NUM_IMAGES = [[2, 2], [3, 0], [2, 1], [0, 4]]
SEQ, MBS = 13, 2


def _cfg():
    return VisualChatConfig(llm=LLM, attention=AttentionConfig(mode="cross", cross_attention_interval=2),
                            vision=VisionConfig(encoder="tiny", projector="linear"), parallel=current_parallel())


def _batches():
    out = []
    for i, (layouts, counts) in enumerate(zip(LAYOUTS, NUM_IMAGES)):
        batch = batch_from_layouts(layouts, LLM.vocab_size, seed=i)
        batch["num_images"] = torch.tensor(counts)
        batch["pixel_values"] = torch.randn(sum(counts), 3, 32, 32, generator=torch.Generator().manual_seed(9 + i))
        out.append(batch)
    return out


def _build(vp_stage=None):
    from megatron_visualchat.model.visualchat import VisualChatModel, apply_trainable_policy

    model = VisualChatModel(_cfg(), vp_stage=vp_stage)
    apply_trainable_policy(model, model.cfg.trainable)
    return model


def _full():
    torch.manual_seed(11)
    model = _build()
    with torch.no_grad():  # open the gates: at 0 nothing but the gates would get a gradient
        for name, p in model.named_parameters():
            if name.endswith("cross_attention.gate"):
                p.fill_(0.5)
    return {k: v.clone() for k, v in model.state_dict().items() if "_extra_state" not in k}


def _step(full):
    return run_step_on_shard(_build, full, LLM, _batches(), seq_length=SEQ, micro_batch_size=MBS,
                             forward_step=visualchat_forward_step)


@pytest.fixture(scope="module")
def full():
    return run_parallel(_full)[0]


@pytest.fixture(scope="module")
def reference(full):
    return merge_rank_results(run_parallel(_step, args=(full,)), 1)


def test_cross_layers_and_projector_get_gradients(reference):
    _, grads = reference
    assert all(k.startswith("vision.projector.") or ".cross_attention." in k or "pre_cross_attn" in k
               for k in grads), sorted(grads)
    assert sorted({k.split(".")[3] for k in grads if "decoder" in k}) == ["1", "3"]  # layers 2 and 4 (1-based)
    zero = sorted(k for k, g in grads.items() if not g.any())
    assert zero == [], zero


@pytest.mark.parametrize("tp,pp,vpp", [(2, 1, None), (1, 2, None), (2, 2, None), (1, 2, 2)])
def test_layouts_match_single_process(full, reference, tp, pp, vpp):
    ref_loss, ref_grads = reference
    loss, grads = merge_rank_results(run_parallel(_step, tp=tp, pp=pp, vpp=vpp, args=(full,)), tp)
    # Measured: equal losses; PP (and PP x VPP) gradients bit-identical, TP ones within 4.2e-9 (6e-6 of the largest
    # entry).
    assert abs(loss - ref_loss) < 1e-6 * max(1.0, abs(ref_loss))
    assert grads.keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-8, msg=lambda m: f"{name}: {m}")
