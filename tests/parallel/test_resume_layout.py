"""Resume at another parallel layout: N steps straight at layout A (saving at N/2) == resuming its N/2 checkpoint
at layout B for N/2 more (loss by loss, within the float tolerance measured), through the real training entry; and
right after the load at B, the trainable weights and Adam moments / steps gathered back to the full naming equal
the saved ones bit for bit (the saved rank files merged with the same helper). Resuming at the same layout is
tests/training/test_resume.py."""

import pytest
import torch

from megatron_visualchat.checkpoint.layout import iteration_dir, rank_dir
from megatron_visualchat.testing.distributed import run_parallel

# Every kind of trainable tensor: TP-split LLM weights (vocabulary padded differently per TP size), modality-split
# image-side projections, modality norms, the replicated vision tower and projector.
COMMON = ["--trainable", "all", "--modality-split", "qkvo", "--modality-norms"]
# Trainable-only (DS-VisualChat's subset): the frozen LLM comes from --llm-load at every layout; the projector, the
# image-side weights and a trainable copy of the input embeddings train.
SUBSET = ["--trainable", "projector,image_projections,embeddings", "--modality-split", "qkvo", "--modality-norms"]


def _argv(cache, save, layout, *extra):
    vpp = ["--virtual-pipeline-model-parallel-size", str(layout["vpp"])] if layout.get("vpp") else []
    return ["--synthetic", "32", "--data-cache-dir", str(cache), "--micro-batch-size", "2", "--global-batch-size",
            "4", "--seq-length", "160", "--train-iters", "4", "--lr", "3e-3", "--save", str(save),
            "--no-progress-bar", "--log-interval", "100", "--tensor-model-parallel-size", str(layout["tp"]),
            "--pipeline-model-parallel-size", str(layout["pp"]), *vpp, *extra]


def _train(argv):
    from megatron_visualchat.training.arguments import parse_args
    from megatron_visualchat.training.pretrain import train

    return train(parse_args(argv))


def _load_only(argv):
    """Build the run's model and optimizer as ``train`` does, resume, and report this rank's trainable weights and
    optimizer state by name (what the next save would write)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_visualchat.checkpoint import reshard, training_state
    from megatron_visualchat.training.arguments import model_config, parse_args
    from megatron_visualchat.training.data_setup import load_tokenizer
    from megatron_visualchat.training.optimizer import build_optimizer, build_scheduler, wrap_model
    from megatron_visualchat.training.pretrain import build_model_chunks, config_record

    run = parse_args(argv)
    tokenizer = load_tokenizer(run)
    cfg = model_config(run, dist.get_world_size(), vocab_size=tokenizer.vocab_size)
    distributed = run.parallelism.use_distributed_optimizer
    chunks = wrap_model(build_model_chunks(cfg, run, tuple(tokenizer.added_tokens.values())),
                        use_distributed_optimizer=distributed, fp16=run.precision.fp16, bf16=run.precision.bf16)
    optimizer = build_optimizer(chunks, run)
    scheduler = build_scheduler(optimizer, run, run.batch.train_iters)
    start = training_state.load_checkpoint(run.checkpoint.save, chunks, optimizer, scheduler,
                                           distributed_optimizer=distributed, config_record=config_record(cfg, run),
                                           iteration=run.checkpoint.load_iteration)
    named = reshard.named_optimizer_state(chunks, optimizer)
    if named is None:
        return None
    state = {"model": training_state.trainable_state_dict(chunks), "optimizer_named": named,
             "layers": [[r.start, r.stop] for r in reshard.layer_ranges(chunks)]}
    return (ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(), state,
            start, cfg.llm.vocab_size)


def _saved_states(save, iteration, tp, pp):
    return [(t, p, torch.load(rank_dir(iteration_dir(save, iteration), t, p, pp_suffix=True) / "trainable.pt",
                              weights_only=True)) for t in range(tp) for p in range(pp)]


def _cut(full, vocab):
    return {k: v[:vocab] if k.endswith(("word_embeddings.weight", "output_layer.weight")) else v
            for k, v in full.items()}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    """A random HF LLaMA of the tiny preset's architecture, converted at TP=1."""
    from megatron_visualchat.cli import main as cli
    from tests.training.test_llm_load import _save_tiny_llama

    tmp = tmp_path_factory.mktemp("llm")
    _save_tiny_llama(tmp / "hf")
    assert cli(["hf-to-megatron", "--hf-dir", str(tmp / "hf"), "--out", str(tmp / "mg"), "--dtype", "fp32"]) == 0
    return tmp / "mg"


def _layout(tp=1, pp=1, dp=1, vpp=None):
    return dict(tp=tp, pp=pp, dp=dp, vpp=vpp)


# |loss difference| over the resumed steps. fp32: measured at most 4.8e-7 (one float32 ulp at a loss of 6; TP / PP
# change the reduction order). bf16: measured 1.4e-4; unbroken bf16 runs at the two layouts differ by 7e-3 at step 1.
FP32_ATOL, BF16_ATOL = 1e-6, 3e-4
# (layout A, layout B, extra flags, loss tolerance)
CASES = {
    "tp2pp2-to-tp1pp1": (_layout(tp=2, pp=2), _layout(), COMMON, FP32_ATOL),
    "tp1dp2-lora-bf16-to-tp2": (_layout(dp=2), _layout(tp=2), COMMON + ["--lora-rank", "4", "--bf16"], BF16_ATOL),
    "pp2vpp2-to-pp1dp2-distributed-optimizer": (_layout(pp=2, vpp=2), _layout(dp=2),
                                                COMMON + ["--use-distributed-optimizer"], FP32_ATOL),
    "subset-tp2dp2-distributed-optimizer-to-pp2": (_layout(tp=2, dp=2), _layout(pp=2),
                                                   SUBSET + ["--use-distributed-optimizer", "--llm-load"], FP32_ATOL),
}


@pytest.mark.parametrize("a,b,extra,atol", CASES.values(), ids=CASES.keys())
def test_resume_at_another_layout(request, cache, tmp_path, a, b, extra, atol):
    from megatron_visualchat.checkpoint.reshard import merge_rank_states

    if extra[-1] == "--llm-load":
        extra = [*extra, str(request.getfixturevalue("llm"))]

    def run(fn, layout, save, *more):
        return run_parallel(fn, **layout, args=(_argv(cache, save, layout, *extra, *more),))

    save = tmp_path / "ckpt"
    straight = run(_train, a, save, "--save-interval", "2")[0]  # its iteration 2 is where layout B resumes

    # Right after the load at layout B: weights and optimizer state equal the saved ones, resharded.
    loaded = [r for r in run(_load_only, b, save, "--load-iteration", "2") if r is not None]
    vocab = loaded[0][4]
    assert loaded[0][3]["iteration"] == 2 and loaded[0][3]["consumed_samples"] == 8
    saved_weights, saved_optim = merge_rank_states(_saved_states(save, 2, a["tp"], a["pp"]), a["tp"])
    weights, optim = merge_rank_states([r[:3] for r in loaded], b["tp"])
    assert _cut(weights, vocab).keys() == _cut(saved_weights, vocab).keys()
    for name, w in _cut(saved_weights, vocab).items():
        assert torch.equal(_cut(weights, vocab)[name], w), name
    assert optim.keys() == saved_optim.keys() and optim
    for name, state in saved_optim.items():
        assert state.keys() == optim[name].keys() >= {"exp_avg", "exp_avg_sq", "step"}, name
        for key, value in state.items():
            got = optim[name][key]
            if key != "step" and name.endswith(("word_embeddings.weight", "output_layer.weight")):
                got, value = got[:vocab], value[:vocab]
            assert torch.equal(torch.as_tensor(got), torch.as_tensor(value)), (name, key)
    assert all(float(s["step"]) == 2 for s in optim.values())

    second = run(_train, b, save, "--load-iteration", "2")[0]
    assert second["iteration"] == 4 and len(second["losses"]) == 2
    assert second["losses"] == pytest.approx(straight["losses"][2:], abs=atol, rel=0)

