"""A LLaMA-style GPTModel built through megatron-core from the same weights gives the same loss and gradients at
TP=1/PP=1, TP=2, PP=2 and TP=2 x PP=2 through get_forward_backward_func with 2 microbatches."""

import math

import pytest
import torch

from megatron_visualchat.config import LLM_PRESETS, VisualChatConfig
from megatron_visualchat.testing.distributed import run_parallel
from megatron_visualchat.testing.equivalence import current_parallel, merge_rank_results, run_step_on_shard

LLM = LLM_PRESETS["tiny"]
SEQ, MBS, NUM_MB = 16, 2, 2


def _batches():
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(NUM_MB):
        tokens = torch.randint(0, LLM.vocab_size, (MBS, SEQ + 1), generator=g)
        mask = torch.ones(MBS, SEQ)
        mask[0, :3] = 0
        out.append(dict(tokens=tokens[:, :-1], labels=tokens[:, 1:], loss_mask=mask,
                        position_ids=torch.arange(SEQ).expand(MBS, SEQ)))
    return out


def _build():
    from megatron_visualchat.model.gpt import build_gpt_model

    return build_gpt_model(VisualChatConfig(llm=LLM, parallel=current_parallel()))


def _full_state_dict():
    return {k: v.clone() for k, v in _build().state_dict().items() if "_extra_state" not in k}


def _step(full, corrupt_tp_order=False):
    return run_step_on_shard(_build, full, LLM, _batches(), seq_length=SEQ, micro_batch_size=MBS,
                             corrupt_tp_order=corrupt_tp_order)


@pytest.fixture(scope="module")
def full_weights():
    return run_parallel(_full_state_dict)[0]


@pytest.fixture(scope="module")
def reference(full_weights):
    return merge_rank_results(run_parallel(_step, args=(full_weights,)), 1)


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (2, 2)])
def test_layouts_match_single_process(full_weights, reference, tp, pp):
    ref_loss, ref_grads = reference
    loss, grads = merge_rank_results(run_parallel(_step, tp=tp, pp=pp, args=(full_weights,)), tp)
    assert abs(loss - ref_loss) < 1e-5 * max(1.0, abs(ref_loss))
    assert grads.keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_misplaced_tp_shards_are_detected(full_weights, reference):
    """The comparison above is meaningful: swapping the TP ranks' shards changes the loss."""
    ref_loss, _ = reference
    results = run_parallel(_step, tp=2, args=(full_weights, True))
    loss = [r["loss"] for r in results if r["loss"] is not None][0]
    assert abs(loss - ref_loss) > 1e-4


def test_reference_loss_is_near_uniform(reference):
    """A randomly initialised tiny model predicts roughly uniformly over the vocabulary."""
    loss, _ = reference
    assert abs(loss - math.log(LLM.padded_vocab_size(1))) < 0.5
