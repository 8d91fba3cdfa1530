"""Task `loss-curve` (Fig. 11): per-step losses of a variant, live predictors trained on first use and reused."""

import math

import pytest
import torch

from longexposure.suite.context import RunContext
from longexposure.tasks.loss_curve import LossCurveCase, loss_curve

LIVE = {
    "source": "predicted",
    "predictors": "auto",
    "mlp_block": 32,
    "attn_block": 16,
    "mlp_backend": "torch-gather",
    "attention_backend": "eager",
}


def _case(**over):
    base = dict(
        model="opt-tiny",
        method="lora",
        batch=2,
        seq_len=64,
        precision="fp32",
        attn="eager",
        dataset="synthetic",
        steps=4,
        predictor_batches=3,
        predictor_steps=5,
    )
    return LossCurveCase(**{**base, **over})


def test_loss_curve_records_every_step_and_reuses_trained_predictors(tmp_path, monkeypatch):
    monkeypatch.setenv("LONGEXPOSURE_CACHE", str(tmp_path / "cache"))
    ctx = RunContext(device=torch.device("cpu"), preset="cpu-tiny", out_dir=tmp_path)
    dense = loss_curve(_case(), ctx)
    live = loss_curve(_case(exposure=LIVE), ctx)
    for out in (dense, live):
        assert len(out["loss_curve"]) == 4 and all(math.isfinite(v) for v in out["loss_curve"])
        assert out["final_loss"] == pytest.approx(out["loss_curve"][-1])  # the last 10% of 4 steps: one step
    assert dense["loss_curve"][0] == pytest.approx(live["loss_curve"][0], rel=0.05), "same model, data, start"
    assert live["predict_ms"]["p50"] > 0 and 0 < live["mlp_block_density"] <= 1
    assert live["info"]["sparsity_source"].startswith("predicted: live predictors from")
    banks = list((tmp_path / "cache" / "predictors").iterdir())
    assert len(banks) == 1
    stamp = (banks[0] / "predictors.pt").stat().st_mtime_ns
    loss_curve(_case(exposure=LIVE), ctx)
    assert (banks[0] / "predictors.pt").stat().st_mtime_ns == stamp, "the cached bank is reused, not retrained"


def test_bad_loss_curve_cases():
    with pytest.raises(ValueError, match="steps must be >= 2"):
        _case(steps=1)
