"""A LLaMA-style GPTModel built through megatron-core from the same weights gives the same loss and gradients at
TP=1/PP=1, TP=2, PP=2 and TP=2 x PP=2 through get_forward_backward_func with 2 microbatches."""

import pytest
import torch

from megatron_visualchat.checkpoint.sharding import merge_state_dicts, shard_state_dict, stage_layer_range
from megatron_visualchat.config import LLM_PRESETS, ParallelConfig, VisualChatConfig
from megatron_visualchat.testing.distributed import run_parallel

LLM = LLM_PRESETS["tiny"]
SEQ, MBS, NUM_MB = 16, 2, 2


def _config():
    from megatron.core import parallel_state as ps

    par = ParallelConfig(tp=ps.get_tensor_model_parallel_world_size(), pp=ps.get_pipeline_model_parallel_world_size(),
                         dp=ps.get_data_parallel_world_size())
    return VisualChatConfig(llm=LLM, parallel=par)


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


def _full_state_dict():
    from megatron_visualchat.model.gpt import build_gpt_model

    return {k: v.clone() for k, v in build_gpt_model(_config()).state_dict().items() if "_extra_state" not in k}


def _step(full, corrupt_tp_order=False):
    from megatron.core import parallel_state as ps

    from megatron_visualchat.model.gpt import build_gpt_model, stage_flags
    from megatron_visualchat.training.step import run_schedule

    cfg = _config()
    tp, tp_rank, pp_rank = cfg.parallel.tp, ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    layers = stage_layer_range(cfg.llm, cfg.parallel, pp_rank)
    pre, post = stage_flags()
    model = build_gpt_model(cfg)
    shard_rank = (tp - 1 - tp_rank) if corrupt_tp_order else tp_rank
    shard = shard_state_dict(full, tp=tp, tp_rank=shard_rank, layers=layers, pre_process=pre, post_process=post)
    missing, unexpected = model.load_state_dict(shard, strict=False)
    assert not [k for k in missing if "_extra_state" not in k] and not unexpected, (missing, unexpected)
    losses = run_schedule([model], _batches(), num_microbatches=NUM_MB, seq_length=SEQ, micro_batch_size=MBS)
    loss = sum(float(d["lm loss"][0]) for d in losses) / NUM_MB if losses else None
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return dict(tp_rank=tp_rank, pp_rank=pp_rank, layers=layers, loss=loss, grads=grads)


def _loss_and_grads(results, tp):
    loss = [r["loss"] for r in results if r["loss"] is not None]
    assert len(set(loss)) == 1, f"TP ranks of the last stage disagree on the loss: {loss}"
    grads = merge_state_dicts(((r["tp_rank"], r["pp_rank"], r["layers"], r["grads"]) for r in results), tp)
    return loss[0], grads


@pytest.fixture(scope="module")
def full_weights():
    return run_parallel(_full_state_dict)[0]


@pytest.fixture(scope="module")
def reference(full_weights):
    return _loss_and_grads(run_parallel(_step, args=(full_weights,)), 1)


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (2, 2)])
def test_layouts_match_single_process(full_weights, reference, tp, pp):
    ref_loss, ref_grads = reference
    loss, grads = _loss_and_grads(run_parallel(_step, tp=tp, pp=pp, args=(full_weights,)), tp)
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
    assert abs(loss - torch.log(torch.tensor(float(LLM.padded_vocab_size(1)))).item()) < 0.5
