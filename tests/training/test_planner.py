"""``megatron-visualchat plan``: its per-rank parameter counts equal meta-device builds of the real model (one layout
per LLaMA-2 size, different encoders and trainable parts); the memory model's formulas, the pipeline bubble, the
lighter first stage and the ranking; the command's output."""

import pytest

from megatron_visualchat.config import LLM_PRESETS, TrainableConfig
from megatron_visualchat.planner.cli import main
from megatron_visualchat.planner.counts import stage_params, vision_shape
from megatron_visualchat.planner.layouts import Layout, pipeline_flags, plan
from megatron_visualchat.planner.memory import Workload, in_flight_microbatches, layer_activation_bytes, stage_memory
from megatron_visualchat.argtypes import trainable_parts
from megatron_visualchat.training.arguments import model_config, parse_args
from megatron_visualchat.training.dry_run import rank_reports

LAYOUTS = [  # preset, encoder, tp, pp, pipeline layers, trainable
    ("llama2-7b", "clip-vit-l-14-336", 2, 1, None, "projector"),
    ("llama2-13b", "siglip-so400m-14-384", 1, 2, "18,22", "projector,embeddings,vision_encoder"),
    ("llama2-70b", "qwen-vl-vit-bigg-14-448", 1, 4, "14,22,22,22", "all"),
]


@pytest.mark.parametrize("preset,encoder,tp,pp,layers,trainable", LAYOUTS, ids=[row[0] for row in LAYOUTS])
def test_parameter_counts_match_meta_builds(tmp_path, preset, encoder, tp, pp, layers, trainable):
    argv = ["--model-preset", preset, "--vision-encoder", encoder, "--tensor-model-parallel-size", str(tp),
            "--pipeline-model-parallel-size", str(pp), "--trainable", trainable, "--synthetic", "8",
            "--train-iters", "1", "--data-cache-dir", str(tmp_path)]
    if layers:
        argv += ["--pipeline-layers", layers]
    run = parse_args(argv)
    cfg = model_config(run, tp * pp)
    reports, _ = rank_reports(run, cfg, tp * pp)
    split = cfg.parallel.pp_layers or (cfg.llm.num_layers,)
    vision = vision_shape(encoder, "linear", cfg.llm.hidden_size)
    for r in reports:
        predicted = stage_params(cfg.llm, vision, cfg.trainable, tp=tp, layers=split[r.pp], first=r.pp == 0,
                                 last=r.pp == pp - 1)
        assert (predicted.total, predicted.trainable) == (r.parameters, r.trainable), r


def test_activation_formula_as_documented():
    s, h, a, t = 4096, 8192, 64, 8  # 70B at TP 8: s*b*h*(10 + 24/8 + 5*64*4096/(8192*8)) = s*h*33 bytes
    assert layer_activation_bytes(s, 1, h, a, t, "none") == s * h * 33
    assert layer_activation_bytes(s, 2, h, a, t, "selective") == 2 * s * h * 13
    assert layer_activation_bytes(s, 1, h, a, t, "full") == s * h * 2


def test_sequence_parallel_activation_formula_as_documented():
    """With sequence parallelism the norm/residual part is split too: s*b*h*(34/t + 5*a*s/(h*t))."""
    s, h, a, t = 4096, 8192, 64, 8  # 34/8 + 5*64*4096/(8192*8) = 4.25 + 20
    assert layer_activation_bytes(s, 1, h, a, t, "none", sp=True) == s * h * 24.25
    assert layer_activation_bytes(s, 2, h, a, t, "selective", sp=True) == 2 * s * h * 4.25
    assert layer_activation_bytes(s, 1, h, a, t, "full", sp=True) == s * h * 2 / 8
    assert layer_activation_bytes(s, 1, h, a, 1, "none", sp=True) == layer_activation_bytes(s, 1, h, a, 1, "none")


def test_in_flight_microbatches_under_1f1b_and_interleaving():
    assert [in_flight_microbatches(4, 1, stage, 16) for stage in range(4)] == [4, 3, 2, 1]
    assert in_flight_microbatches(4, 1, 0, 2) == 2  # never more than the step has
    assert in_flight_microbatches(4, 2, 0, 16) == 4 * (1 + 3 / 8)


def test_optimizer_state_is_divided_by_data_parallel_size_only_with_the_distributed_optimizer():
    llm, vision = LLM_PRESETS["llama2-7b"], vision_shape("clip-vit-l-14-224", "linear", 4096)
    params = stage_params(llm, vision, TrainableConfig(), tp=1, layers=32, first=True, last=True)
    memory = {}
    for distributed in (True, False):
        work = Workload(4096, 1, 1, distributed_optimizer=distributed, train_vision_encoder=False)
        memory[distributed] = stage_memory(llm, vision, params, work, tp=1, pp=1, vpp=1, dp=4, stage=0, layers=32,
                                           recompute="full", num_microbatches=8)
    assert params.trainable == vision.projector_params
    assert memory[False].optimizer == params.trainable * 12 == 4 * memory[True].optimizer
    assert memory[True].gradients == params.trainable * 4 and memory[True].weights == params.total * 2


def _plan_70b(**overrides):
    llm = LLM_PRESETS["llama2-70b"]
    vision = vision_shape("qwen-vl-vit-bigg-14-448", "linear", llm.hidden_size)
    work = Workload(4096, 1, 1, distributed_optimizer=True, train_vision_encoder=False)
    options = dict(gpus=32, gpu_memory_gib=80, reserve_gib=4, global_batch_size=128, max_tp=8, max_vpp=8)
    return plan(llm, vision, trainable_parts("projector"), work, **{**options, **overrides})


def test_ranking_bubble_and_lighter_first_stage():
    layouts = _plan_70b()
    assert layouts == sorted(layouts, key=Layout.sort_key)
    fitting = [layout for layout in layouts if layout.fits]
    assert fitting and all(layout.fits for layout in layouts[:len(fitting)])
    assert all(layout.peak_gib <= 76 for layout in fitting)
    assert all(layout.tp <= 8 and layout.vpp <= 8 for layout in layouts)
    pp4 = next(x for x in layouts if (x.tp, x.pp, x.vpp, x.recompute) == (2, 4, 1, "selective"))
    assert pp4.bubble == 3 / 32  # (PP-1)/(VPP*m), m = 128/(1*4)
    # stage 0 holds the vision tower and 4 in-flight micro-batches (the last stage 1): fewer layers balance it
    assert pipeline_flags(pp4) and pp4.pp_layers[0] < min(pp4.pp_layers[1:]) and sum(pp4.pp_layers) == 80
    assert not any(x.fits for x in _plan_70b(gpu_memory_gib=8))


def test_plan_uses_sequence_parallelism_where_tp_divides_the_sequence():
    with_sp, without = _plan_70b(), _plan_70b(sequence_parallel=False)
    assert all(x.sp == (x.tp > 1) for x in with_sp) and not any(x.sp for x in without)
    key = lambda x: (x.tp, x.pp, x.vpp, x.recompute)  # noqa: E731
    base = {key(x): x for x in without}
    same_split = [(x, base[key(x)]) for x in with_sp if x.pp_layers == base[key(x)].pp_layers]
    assert len(same_split) > len(with_sp) // 2
    for x, y in same_split:  # the same weights and optimizer state; fewer activation bytes under TP
        for a, b in zip(x.stages, y.stages):
            assert (a.weights, a.optimizer) == (b.weights, b.optimizer)
            assert (a.activations < b.activations) == (x.tp > 1)
    assert sum(x.fits for x in with_sp) > sum(x.fits for x in without)
    llm = LLM_PRESETS["llama2-70b"]
    odd = plan(llm, vision_shape("qwen-vl-vit-bigg-14-448", "linear", llm.hidden_size), trainable_parts("projector"),
               Workload(4097, 1, 1, distributed_optimizer=True, train_vision_encoder=False), gpus=8,
               gpu_memory_gib=80, reserve_gib=4, global_batch_size=128, max_tp=8, max_vpp=1)
    assert not any(x.sp for x in odd)  # TP does not divide 4097 positions


def test_plan_command(capsys):
    argv = ["--model-preset", "llama2-70b", "--vision-encoder", "qwen-vl-vit-bigg-14-448", "--gpus", "32",
            "--gpu-memory-gib", "80", "--top", "3"]
    assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert "layouts fit (predicted, not measured on a GPU" in out[0]
    # columns: tp sp pp vpp dp recompute; sequence parallelism lets TP=4 fit without full recompute
    assert len(out) == 3 + 3 and out[3].split()[:6] == ["4", "yes", "1", "1", "8", "selective"]
    assert main(argv + ["--no-sequence-parallel"]) == 0
    assert capsys.readouterr().out.splitlines()[3].split()[:6] == ["8", "no", "1", "1", "4", "selective"]
    assert main(argv[:-4] + ["--gpu-memory-gib", "8"]) == 1
