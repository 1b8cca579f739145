"""Training-checkpoint rules that need no training run: where a run resumes (--load, --save, --load-iteration),
what keep-last may delete, how a config, layout or schedule mismatch is reported, the SHA256SUMS checks, and how
saved optimizer state merges across TP/PP ranks for a resume at another layout."""

import logging

import pytest
import torch

from megatron_visualchat.checkpoint.checksums import CHECKSUM_FILE, read_checksums, sha256, verify, write_checksums
from megatron_visualchat.checkpoint.errors import CheckpointError
from megatron_visualchat.checkpoint.layout import iteration_dir, write_tracker
from megatron_visualchat.checkpoint.training_state import (
    FORMAT,
    KeepLast,
    ResumePoint,
    check_compatible,
    check_layout_change,
    check_schedule,
    describe_layout,
    find_resume_point,
    resume_message,
)


def _checkpoints(root, *iterations):
    for it in iterations:
        iteration_dir(root, it).mkdir(parents=True)
    write_tracker(root, iterations[-1])
    return root


def test_load_must_hold_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match=f"--load {tmp_path / 'nothing'} holds no checkpoint .*"
                                              "latest_checkpointed_iteration.txt not found.*drop --load"):
        find_resume_point(str(tmp_path / "nothing"), None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        find_resume_point(str(tmp_path / "empty"), str(_checkpoints(tmp_path / "save", 2)))


def test_resume_point_and_message(tmp_path):
    assert find_resume_point(None, None) is None and find_resume_point(None, str(tmp_path / "new")) is None
    assert resume_message(None).endswith("training starts from scratch")
    save = _checkpoints(tmp_path / "save", 2, 4)
    assert find_resume_point(None, str(save)) == ResumePoint(save, 4)
    assert find_resume_point(str(save), str(tmp_path / "other")) == ResumePoint(save, 4)
    assert find_resume_point(None, str(save), load_iteration=2) == ResumePoint(save, 2)
    assert resume_message(ResumePoint(save, 2)) == f"resuming from {save / 'iter_0000002'} (iteration 2)"
    saved = {"tp": 2, "pp": 2, "vpp": None, "pp_layers": None, "distributed_optimizer": False}
    change = f"saved at {describe_layout(saved, 1)}, resumed at {describe_layout({**saved, 'tp': 1, 'pp': 1}, 2)}"
    assert change == "saved at TP2 x PP2 x DP1, resumed at TP1 x PP1 x DP2"
    assert resume_message(ResumePoint(save, 2), change).endswith("(iteration 2), saved at TP2 x PP2 x DP1, resumed "
                                                                 "at TP1 x PP1 x DP2")
    assert describe_layout({**saved, "vpp": 2, "distributed_optimizer": True}, None) == \
        "TP2 x PP2 (VPP 2) with the distributed optimizer"


def test_load_iteration_must_exist(tmp_path):
    save = _checkpoints(tmp_path / "save", 2, 4)
    with pytest.raises(CheckpointError, match=r"--load-iteration 3: .* has no iter_0000003 \(available: 2, 4\)"):
        find_resume_point(None, str(save), load_iteration=3)
    with pytest.raises(CheckpointError, match="--load-iteration 3: there is no checkpoint to load"):
        find_resume_point(None, str(tmp_path / "new"), load_iteration=3)


def test_tracker_naming_a_missing_iteration_lists_the_others(tmp_path):
    save = _checkpoints(tmp_path / "save", 2, 4)
    write_tracker(save, 6)
    with pytest.raises(CheckpointError, match=r"names iteration 6.*--load-iteration N \(available: 2, 4\)"):
        find_resume_point(None, str(save))


def test_keep_last_prunes_only_this_runs_checkpoints():
    fresh = KeepLast(2, written=[100, 200, 300])  # --save also holds another run's 800..1000
    assert fresh.to_delete([100, 200, 300, 800, 900, 1000], 300) == [100]
    resumed = KeepLast(2, resumed_from=400, written=[500, 600])  # its history (<= 400) is prunable, 700+ is not
    assert resumed.to_delete([200, 300, 400, 500, 600, 700, 800], 600) == [200, 300, 400]
    assert KeepLast(0, resumed_from=400, written=[500]).to_delete([300, 400, 500], 500) == []


def test_keep_last_for_run_counts_history_only_in_the_directory_resumed_from(tmp_path):
    resume = ResumePoint(tmp_path / "a", 4)
    assert KeepLast.for_run(3, str(tmp_path / "a"), resume).resumed_from == 4
    assert KeepLast.for_run(3, str(tmp_path / "b"), resume).resumed_from is None
    assert KeepLast.for_run(3, str(tmp_path / "a"), None).resumed_from is None


def test_config_mismatch_names_only_the_differing_fields(tmp_path):
    model = {"llm": {"hidden_size": 64, "num_layers": 2}, "vision": {"projector": "linear", "encoder": "tiny"}}
    saved = {"model": model, "tp": 1, "pp": 2, "vpp": None, "pp_layers": [1, 1], "dp": 2, "run": {"lr": 1}}
    current = {"model": {**model, "vision": {"projector": "mlp", "encoder": "tiny"}}, "tp": 1, "pp": 2,
               "vpp": None, "pp_layers": (1, 1), "dp": 1, "run": {"lr": 2}}
    with pytest.raises(CheckpointError) as e:
        check_compatible(saved, current, tmp_path)
    message = str(e.value)
    assert 'model.vision.projector: saved "linear", this run "mlp"' in message
    assert "hidden_size" not in message and "encoder" not in message and "pp_layers" not in message
    check_compatible(saved, {**current, "model": model}, tmp_path)  # dp and the run config may change


def test_layout_change_of_a_checkpoint_from_before_resharding_is_refused(tmp_path):
    saved = {"tp": 2, "pp": 1, "vpp": None, "pp_layers": None, "distributed_optimizer": True}
    current = {**saved, "tp": 1, "distributed_optimizer": False}
    check_layout_change({"format": FORMAT}, saved, current, tmp_path)
    check_layout_change({}, saved, saved, tmp_path)  # an old checkpoint at its own layout (any DP size)
    with pytest.raises(CheckpointError, match=r"written before checkpoints could change layout, so it resumes at "
                                              r"its own layout only \(any data-parallel size\): "
                                              "distributed_optimizer: saved true, this run false; tp: saved 2, this "
                                              "run 1. Resume with the saved --use-distributed-optimizer, "
                                              "--tensor-model-parallel-size"):
        check_layout_change({}, saved, current, tmp_path)


def test_schedule_mismatch_names_field_values_and_flag(tmp_path):
    saved = dict(max_lr=3e-3, min_lr=0.0, lr_warmup_steps=3, lr_decay_steps=32, lr_decay_style="cosine",
                 start_wd=0.0, end_wd=0.0, num_steps=32)
    with pytest.raises(CheckpointError, match=r"lr_decay_steps: saved 32, this run 48 \(--train-iters.*\)\. "
                                              "Pass --override-opt-param-scheduler"):
        check_schedule(saved, {**saved, "lr_decay_steps": 48}, tmp_path / "trainable.pt")
    check_schedule(saved, {**saved, "num_steps": 0}, tmp_path / "trainable.pt")


def test_checksums(tmp_path, caplog):
    (tmp_path / "a.pt").write_bytes(b"weights")
    with caplog.at_level(logging.WARNING):
        assert read_checksums(tmp_path, "FIX") is None
    assert f"has no {CHECKSUM_FILE}" in caplog.text and "without verification" in caplog.text
    verify(tmp_path, "a.pt", None, "FIX")  # an old checkpoint: not verified
    write_checksums(tmp_path, {"a.pt": sha256(tmp_path / "a.pt")})
    digests = read_checksums(tmp_path, "FIX")
    verify(tmp_path, "a.pt", digests, "FIX")
    (tmp_path / "a.pt").write_bytes(b"weighs")
    with pytest.raises(CheckpointError, match=r"a.pt is corrupt \(checksum mismatch\): FIX"):
        verify(tmp_path, "a.pt", digests, "FIX")
    (tmp_path / "b.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=f"b.pt is not listed in .*{CHECKSUM_FILE}: FIX"):
        verify(tmp_path, "b.pt", digests, "FIX")
    (tmp_path / CHECKSUM_FILE).write_text("abc")
    with pytest.raises(CheckpointError, match=f"{CHECKSUM_FILE} is corrupt .*: FIX"):
        read_checksums(tmp_path, "FIX")


def test_merged_optimizer_state_follows_the_split_of_its_parameter():
    """Two TP ranks of stage 0 (layer 0) and stage 1 (layer 1); a stage without trainable parameters saves None."""
    from megatron_visualchat.checkpoint.reshard import merge_rank_states

    qkv, norm = "decoder.layers.0.self_attention.linear_qkv.weight", "decoder.layers.0.input_layernorm.weight"
    full = torch.arange(8.0).view(4, 2)  # column-parallel: TP rank r holds rows 2r, 2r + 1

    def state(layers, tensors):
        named = [{n: {"param": t, "exp_avg": 2 * t, "exp_avg_sq": 3 * t, "step": torch.tensor(5.0)}
                  for n, t in tensors.items()}] if tensors else None
        return {"layers": [layers], "model": [tensors], "optimizer_named": named}

    states = [(0, 0, state([0, 1], {qkv: full[:2]})), (1, 0, state([0, 1], {qkv: full[2:]})),
              (0, 1, state([1, 2], {norm: torch.ones(2)})), (1, 1, state([1, 2], {norm: torch.ones(2)})),
              (0, 2, state([2, 3], {}))]
    weights, optim = merge_rank_states(states, saved_tp=2)
    assert weights.keys() == optim.keys() == {qkv, "decoder.layers.1.input_layernorm.weight"}
    assert torch.equal(weights[qkv], full) and torch.equal(optim[qkv]["exp_avg"], 2 * full)
    assert torch.equal(optim[qkv]["exp_avg_sq"], 3 * full) and optim[qkv]["step"] == 5
    assert torch.equal(optim["decoder.layers.1.input_layernorm.weight"]["param"], torch.ones(2))
