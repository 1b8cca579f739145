"""The training log's packing numbers: efficiency (non-pad fraction of the bins' positions) and samples per step
over each log interval."""

from collections import Counter

from megatron_visualchat.training.metrics import MetricsLogger


def test_packing_efficiency_and_samples_cover_the_log_interval(capsys):
    logger = MetricsLogger(enabled=True, total_iters=3, progress_bar=False, packing=True)
    common = dict(loss=1.0, lr=1e-3, grad_norm=0.5, image_tokens=0, skipped=Counter())
    first = logger.step(1, tokens=300, positions=400, samples=5, log=False, **common)
    assert first["packing_efficiency"] == 0.75 and first["samples_per_step"] == 5
    second = logger.step(2, tokens=100, positions=400, samples=2, log=True, **common)
    assert second["packing_efficiency"] == 0.5 and second["samples_per_step"] == 3.5  # steps 1-2
    assert "samples 3.5/step | pack eff 50.0% |" in capsys.readouterr().out
    third = logger.step(3, tokens=380, positions=400, samples=4, log=True, **common)  # a new interval
    assert third["packing_efficiency"] == 0.95 and "pack eff 95.0%" in capsys.readouterr().out
    unpacked = MetricsLogger(enabled=True, total_iters=1, progress_bar=False)
    unpacked.step(1, tokens=1, positions=2, samples=1, log=True, **common)
    assert "pack eff" not in capsys.readouterr().out
