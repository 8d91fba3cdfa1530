"""Task `loss-curve` (Fig. 11): per-step losses of a variant, live predictors trained on first use and reused."""

import json
import math

import pytest
import torch
from conftest import tiny_setup

from longexposure.suite.context import RunContext
from longexposure.tasks.loss_curve import LossCurveCase, _slow_steps, loss_curve, timed_from

LIVE = {
    "source": "predicted",
    "predictors": "auto",
    "mlp_block": 32,
    "attn_block": 16,
    "mlp_backend": "torch-gather",
    "attention_backend": "eager",
}


def _case(**over):
    short = {"attn": "eager", "steps": 4, "predictor_batches": 3, "predictor_steps": 5}
    return tiny_setup(LossCurveCase, **{**short, **over})


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
    assert all(s["total_ms"] > 2 * live["total_ms"]["p50"] for s in live["slow_steps"])
    assert live["timed_from_step"] == 1 and live["total_ms"]["n"] == 3, "no graph: timing_warmup (1) alone"
    assert live["info"]["sparsity_source"].startswith("predicted: live predictors from")
    banks = list((tmp_path / "cache" / "predictors").iterdir())
    assert len(banks) == 1
    stamp = (banks[0] / "predictors.pt").stat().st_mtime_ns
    loss_curve(_case(exposure=LIVE), ctx)
    assert (banks[0] / "predictors.pt").stat().st_mtime_ns == stamp, "the cached bank is reused, not retrained"


def test_slow_steps_name_the_steps_a_mean_paid_for():
    times = [{"total_ms": ms, "refresh_ms": 0.0} for ms in (900.0, 10.0, 11.0, 10.5, 65.0, 10.0, 740.0, 10.2)]
    times[4]["refresh_ms"] = 55.0
    slow = _slow_steps(times, start=1, median=10.2)
    assert [s["step"] for s in slow] == [6, 4], "slowest first; the warmup step (900 ms) is not timed"
    assert slow[1]["refresh_ms"] == 55.0, "each keeps its phases"
    assert _slow_steps(times, start=1, median=10.2, limit=1) == slow[:1]
    assert _slow_steps(times[:4], start=0, median=1000.0) == []


def test_timing_starts_after_the_first_graph_capture():
    """On the H200 (d4335b4) a compiled step whose warm-up recompiled captured its graph at step 3, the first
    timed step of `timing_warmup: 3`: 1.7 s of capture in a 300-step mean (20.5 ms against a 13.6 ms median)."""
    assert timed_from(3, [], 300) == 3, "no graph: the warm-up alone"
    assert timed_from(3, [2], 300) == 3, "captured inside the warm-up"
    assert timed_from(3, [3, 120], 300) == 4, "captured late: timing starts after it; the recapture at 120 counts"
    assert timed_from(0, [5], 7) == 6
    with pytest.raises(ValueError, match="no step left to time: the first CUDA graph capture was at step 5 of 6"):
        timed_from(0, [5], 6)


def test_bad_loss_curve_cases():
    with pytest.raises(ValueError, match="steps must be >= 2"):
        _case(steps=1)
    with pytest.raises(ValueError, match="reorder_batches needs weights"):
        _case(reorder_batches=2)
    with pytest.raises(ValueError, match="needs data_split: train"):  # refused before any step, not after
        _case(dataset="e2e")
    with pytest.raises(ValueError, match="corpus fine-tuning with held_out_batches needs data_split: train"):
        _case(dataset="corpus")  # the corpus's held-out tail, likewise
    with pytest.raises(ValueError, match="held_out_batches must be >= 0, got -1"):
        _case(held_out_batches=-1)
    with pytest.raises(ValueError, match="need 0 <= timing_warmup < steps, got 4, 4"):
        _case(timing_warmup=4)


def test_reordered_checkpoint_trains_the_same_function(tmp_path, monkeypatch):
    """`reorder_batches` saves a neuron-permuted checkpoint once and fine-tunes it: exact, so dense LoRA's
    loss curve is the original's, while the neurons (fc1 rows) did move."""
    from longexposure.models import build_model

    monkeypatch.setenv("LONGEXPOSURE_CACHE", str(tmp_path / "cache"))
    ckpt = tmp_path / "ckpt"
    build_model("opt-tiny", attn_implementation="eager", seed=3).save_pretrained(ckpt)
    recipe = {"steps": 7, "batch": 2, "seq_len": 32, "act_l1": 2.0}  # as if `longexposure pretrain` made it
    (ckpt / "pretrain.json").write_text(json.dumps({"preset": "relu-micro", "recipe": recipe, "held_out_loss": 5.0}))
    ctx = RunContext(device=torch.device("cpu"), preset="cpu-tiny", out_dir=tmp_path)
    exact = {"model_options": {"dropout": 0.0, "attention_dropout": 0.0}, "method_options": {"dropout": 0.0}}
    plain = loss_curve(_case(weights=str(ckpt), **exact), ctx)
    moved = loss_curve(_case(weights=str(ckpt), reorder_batches=2, **exact), ctx)
    curves = torch.tensor(moved["loss_curve"]), torch.tensor(plain["loss_curve"])
    torch.testing.assert_close(*curves, rtol=1e-4, atol=1e-4)
    assert plain["info"]["neuron_reorder"] == "none"
    assert moved["info"]["neuron_reorder"].startswith(f"MLP neurons of {ckpt} reordered by activation mass on 2")
    (saved,) = (tmp_path / "cache" / "reordered").iterdir()
    for result, path in ((plain, ckpt), (moved, saved)):  # the pretraining record travels with the reordering
        assert (
            result["info"]["weights"] == f"{path} (longexposure pretrain --preset relu-micro: 7 steps of 2x32, "
            "act_l1 2.0, held-out loss 5.000)"
        )
    fc1 = "model.decoder.layers.0.fc1.weight"
    before, after = (build_model("opt-tiny", weights=str(p)).state_dict()[fc1] for p in (ckpt, saved))
    assert not torch.equal(before, after) and torch.equal(before.sum(1).sort().values, after.sum(1).sort().values)


def test_predictor_cost_counts_the_calls_and_the_refresh(tmp_path, monkeypatch):
    """`predict_graph_ms` times every predicting layer's call on the run's last MLP inputs; a layer on its dense
    fallback predicts nothing in a step, so it is not timed; `predictor_share` adds the refresh's mean."""
    from longexposure.predictor_cost import mlp_predict_ms

    monkeypatch.setenv("LONGEXPOSURE_CACHE", str(tmp_path / "cache"))
    ctx = RunContext(device=torch.device("cpu"), preset="cpu-tiny", out_dir=tmp_path)
    out = loss_curve(_case(exposure={**LIVE, "refresh_every": 2}), ctx)
    layers = out["predict_graph_layers"]
    assert layers == len(out["info"]["mlp_density_per_layer"]) and out["predict_graph_ms"] > 0
    assert out["predict_graph_timed"] == "eager"
    share = (out["predict_graph_ms"] + out["refresh_ms_mean"]) / out["step_ms_mean"]
    assert out["predictor_share"] == pytest.approx(share)
    each = out["refresh_ms_each"]  # every refresh (after steps 2, 4, ...), the untimed warm-up's included
    assert [r["step"] for r in each] == list(range(1, len(out["loss_curve"]), 2)) and all(r["ms"] > 0 for r in each)
    assert "predict_graph_ms" not in loss_curve(_case(exposure=LIVE), ctx), "no refresh: no inputs kept, not timed"

    from longexposure.measure import Timer
    from longexposure.training import Trainer

    (bank,) = (tmp_path / "cache" / "predictors").iterdir()
    trainer = Trainer(_case(exposure={**LIVE, "predictors": str(bank), "refresh_every": 2}), "cpu", seed=0)
    trainer.step(Timer("cpu"))
    exposure = trainer.exposure
    exposure.layer_states[0].dense_mlp = True
    assert mlp_predict_ms(exposure, exposure.last_mlp_inputs, reps=2)["predict_graph_layers"] == layers - 1
    assert mlp_predict_ms(exposure, {}, reps=2) == {"predict_graph_ms": 0.0, "predict_graph_layers": 0}
