"""Context parallelism (``--context-parallel-size``): the load-balanced chunking and the gathers, MMCA for local
queries against gathered keys, the held-out accuracy judging answers that span ranks, the flag, and VisualChatModel
at CP=2, TP=2 x CP=2 (and with sequence parallelism) giving the same loss and DDP-reduced gradients as CP=1 from the
same weights, through megatron-core's schedule, in ``mmca`` and ``causal`` modes, with images straddling chunk
boundaries and a packed row of two samples."""

import dataclasses

import pytest
import torch

from megatron_visualchat.config import LLM_PRESETS, AttentionConfig, ConfigError, VisionConfig, VisualChatConfig
from megatron_visualchat.model.mmca.context_parallel import check_seq_length, rank_positions, split_sequence
from megatron_visualchat.model.mmca.fast import _mmca_attention_fast
from megatron_visualchat.model.mmca.reference import mmca_attention_reference
from megatron_visualchat.model.token_codes import codes_from_layout
from megatron_visualchat.testing.batches import visualchat_batch
from megatron_visualchat.testing.distributed import run_parallel
from megatron_visualchat.testing.equivalence import current_parallel, load_full_state_dict, merge_rank_results

LLM = LLM_PRESETS["tiny"]
T = 17  # tiny encoder: CLS + 4x4 patches, linear projector keeps them all
# 48 positions = 4 chunks of 12 at CP=2: rank 0 holds [0, 12) + [36, 48), rank 1 [12, 36). Row 0's images span
# 3..19 and 22..38 (both cross chunk and rank boundaries); row 1 packs two samples, the second from position 24.
ROWS = [["ttt", 0, "tt", 1, "ttttttttt"], ["tttt", 0, "ttt|tttt", 1, "ttp"]]
SEQ, MBS, NUM_MB = 48, 2, 2
CPU = torch.device("cpu")


def test_rank_positions_are_megatrons_load_balanced_chunks():
    assert rank_positions(16, 2, 0, CPU).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert rank_positions(16, 2, 1, CPU).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    every = torch.cat([rank_positions(24, 3, r, CPU) for r in range(3)])
    assert sorted(every.tolist()) == list(range(24))
    with pytest.raises(ValueError, match="not divisible by 2 x context_parallel_size = 4.*multiple of 4"):
        check_seq_length(18, 2)


@pytest.mark.parametrize("mode,image_rows", [("mmca", "self"), ("mmca", "image"), ("mmca", "self+text"),
                                             ("causal", "self")])
def test_local_queries_against_all_keys_match_whole_sequence_rows(mode, image_rows):
    """What one CP rank computes (its query rows at their global positions, every key) is those rows of the
    whole-sequence attention, in the reference and the FlexAttention path."""
    modality, image_id, sample_id = (t[None] for t in codes_from_layout("tt000t11tt|t2222ttp"))
    L = modality.shape[1] - 2  # 16, divisible by 2 x CP=2
    modality, image_id, sample_id = modality[:, :L], image_id[:, :L], sample_id[:, :L]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, L, 8, generator=g) for _ in range(3))
    k, v = k[:, :2], v[:, :2]  # GQA
    kw = dict(image_rows=image_rows, combine="mean", sample_id=sample_id, mode=mode)
    whole = mmca_attention_reference(q, k, v, modality, image_id, **kw)
    for rank in range(2):
        pos = rank_positions(L, 2, rank, CPU)
        local = mmca_attention_reference(q[:, :, pos], k, v, modality, image_id, query_positions=pos, **kw)
        torch.testing.assert_close(local, whole[:, :, pos], rtol=0, atol=1e-6)
        fast = _mmca_attention_fast(q[:, :, pos], k, v, modality, image_id, compile=False, query_positions=pos, **kw)
        torch.testing.assert_close(fast, whole[:, :, pos], rtol=1e-5, atol=1e-5)


def _gather_roundtrip():
    """split_batch keeps this rank's chunks; the gather restores the whole sequence in order, and its backward
    sums every rank's gradient of the whole sequence into this rank's chunks."""
    from megatron.core import parallel_state as ps

    from megatron_visualchat.model.mmca.context_parallel import gather_codes, gather_sequence
    from megatron_visualchat.training.context_parallel import split_batch

    batch = visualchat_batch(ROWS, T, LLM.vocab_size)
    local = split_batch(batch)
    assert gather_codes(local["attention_mask"]).equal(batch["attention_mask"])
    w = torch.arange(SEQ, dtype=torch.float32)
    x = local["tokens"].float().t().contiguous().requires_grad_()  # [s_local, b]
    whole = gather_sequence(x, 0)
    assert whole.equal(batch["tokens"].float().t())
    (whole * w[:, None]).sum().backward()
    pos = rank_positions(SEQ, 2, ps.get_context_parallel_rank(), CPU)
    assert x.grad.equal(2 * w[pos][:, None].expand(-1, MBS))
    return {k: v for k, v in local.items() if torch.is_tensor(v) and k != "pixel_values"}, _answer_stats(batch)


def _answer_stats(batch):
    """Held-out accuracy judges an answer on the whole sequence: answer 8..15 of row 0 spans both ranks and is
    wrong at 14 (rank 1); answer 30..40 of row 1 spans both ranks and is right. Judged per rank, rank 0 would
    count 2 of 2 right."""
    from megatron_visualchat.training.accuracy import _correct_answers
    from megatron_visualchat.training.context_parallel import split_batch

    mask = torch.zeros(MBS, SEQ)
    mask[0, 8:16], mask[1, 30:41] = 1, 1
    predicted = batch["labels"].clone()
    predicted[0, 14] += 1
    logits = torch.nn.functional.one_hot(predicted % LLM.vocab_size, LLM.vocab_size).float()
    local = split_batch({"labels": batch["labels"], "loss_mask": mask})
    return _correct_answers(local, split_sequence(logits, 1))[1]["answers"].tolist()


def test_split_batch_and_gathers_on_two_cp_ranks():
    full = visualchat_batch(ROWS, T, LLM.vocab_size)
    ranks = run_parallel(_gather_roundtrip, cp=2)
    assert [stats for _, stats in ranks] == [[1.0, 2.0]] * 2
    for rank, (local, _) in enumerate(ranks):
        pos = rank_positions(SEQ, 2, rank, CPU)
        assert local["tokens"].equal(full["tokens"][:, pos])
        assert local["attention_mask"].equal(full["attention_mask"][:, :, pos])
        assert local["num_images"].equal(full["num_images"])  # images stay whole


def _cfg(mode, sp):
    attention = AttentionConfig(mode=mode, modality_split="qkvo" if mode == "mmca" else "none")
    return VisualChatConfig(llm=LLM, attention=attention, vision=VisionConfig(encoder="tiny", projector="linear"),
                            parallel=dataclasses.replace(current_parallel(), sequence_parallel=sp))


def _build(mode, sp=False):
    from megatron_visualchat.model.visualchat import VisualChatModel, apply_trainable_policy

    model = VisualChatModel(_cfg(mode, sp))
    apply_trainable_policy(model, model.cfg.trainable)
    return model


def _full(mode):
    torch.manual_seed(11)
    model = _build(mode)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "image_weight" in name:
                p.add_(0.05 * torch.randn_like(p))
    return {k: v.clone() for k, v in model.state_dict().items() if "_extra_state" not in k}


def _step(mode, full, sp=False):
    """One schedule call through megatron-core DDP: the returned gradients are DDP's, reduced over DP x CP."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import finalize_model_grads

    from megatron_visualchat.training.optimizer import wrap_model
    from megatron_visualchat.training.step import run_schedule, visualchat_forward_step

    model = _build(mode, sp)
    cp = ps.get_context_parallel_world_size()
    assert (model.config.sequence_parallel, model.config.context_parallel_size) == (sp, cp)
    load_full_state_dict(model, full, LLM)
    (chunk,) = wrap_model([model], use_distributed_optimizer=False, fp16=False, bf16=False)
    chunk.config.finalize_model_grads_func = finalize_model_grads
    batches = [visualchat_batch(ROWS, T, LLM.vocab_size, seed=i) for i in range(NUM_MB)]
    losses = run_schedule([chunk], batches, num_microbatches=NUM_MB, seq_length=SEQ, micro_batch_size=MBS,
                          forward_step=visualchat_forward_step)
    grads = {n: p.main_grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return dict(tp_rank=ps.get_tensor_model_parallel_rank(), pp_rank=0, cp_rank=ps.get_context_parallel_rank(),
                loss=sum(float(d["lm loss"][0]) for d in losses) / NUM_MB, shards=[(range(LLM.num_layers), grads)])


@pytest.fixture(scope="module")
def references():
    """mode -> (full weights, CP=1 loss and gradients), built on first use."""
    cache = {}

    def get(mode):
        if mode not in cache:
            full = run_parallel(_full, args=(mode,))[0]
            cache[mode] = full, merge_rank_results(run_parallel(_step, args=(mode, full)), 1)
        return cache[mode]

    return get


@pytest.mark.parametrize("mode,tp,sp", [("mmca", 1, False), ("mmca", 2, False), ("mmca", 2, True),
                                        ("causal", 1, False), ("causal", 2, False)])
def test_context_parallel_matches_single_process(references, mode, tp, sp):
    """CP=2, TP=2 x CP=2, and TP=2 x CP=2 with sequence parallelism (each CP rank's chunks sharded over TP)."""
    full, (ref_loss, ref_grads) = references(mode)
    results = run_parallel(_step, tp=tp, cp=2, args=(mode, full, sp))
    for r in results:  # every CP rank reports the whole-sequence loss and holds the reduced gradients
        assert r["loss"] == results[0]["loss"]
    loss, grads = merge_rank_results([r for r in results if r["cp_rank"] == 0], tp)
    _, other = merge_rank_results([r for r in results if r["cp_rank"] == 1], tp)
    # Measured here: loss within 1.3e-7 relative, gradients within 5.2e-9 absolute (CP=2 and TP=2 x CP=2).
    assert abs(loss - ref_loss) < 1e-6 * abs(ref_loss), (loss, ref_loss)
    assert grads.keys() == ref_grads.keys() and any(k.startswith("vision.projector.") for k in grads)
    for name, g in ref_grads.items():
        assert g.abs().max() > 0 or "linear_proj" in name, name
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=5e-8, msg=lambda m: f"{name}: {m}")
        assert other[name].equal(grads[name]), name


def test_context_parallel_flag_sets_the_layout_and_refuses_what_it_cannot_split():
    from megatron_visualchat.training.arguments import model_config, parse_args

    base = ["--synthetic", "16", "--train-iters", "2", "--seq-length", "64", "--global-batch-size", "8"]
    run = parse_args(base + ["--context-parallel-size", "2", "--tensor-model-parallel-size", "2"])
    assert run.parallelism.context_parallel_size == 2
    par = model_config(run, world_size=8).parallel
    assert (par.tp, par.cp, par.dp) == (2, 2, 2)
    with pytest.raises(ConfigError, match=r"tp\(2\) x pp\(1\) x cp\(2\)"):
        model_config(run, world_size=6)
    odd = parse_args(base[:-4] + ["--seq-length", "62", "--global-batch-size", "8", "--context-parallel-size", "2"])
    with pytest.raises(ConfigError, match="--seq-length 62 must be a multiple of 4"):
        model_config(odd, world_size=2)
    cross = parse_args(base + ["--context-parallel-size", "2", "--attention-mode", "cross"])
    with pytest.raises(ConfigError, match="context parallelism.*mode 'cross'"):
        model_config(cross, world_size=2)
