"""Live sparsity sources in the exposed model (issue 6): predictors, oracle and random patterns computed
every step from the model's own activations, on the pretrained micro ReLU model."""

import pytest
import torch
from longexposure.predictors.fit import fit_predictors
from relu_fixture import ATTN_BLOCK, MLP_BLOCK, SEQ, e2e_ids, micro_checkpoint  # noqa: F401

from longexposure.expose import expose
from longexposure.measure import Timer
from longexposure.methods.builtin import apply_method
from longexposure.models import build_model
from longexposure.training import Trainer, TrainingSetup

REFERENCE_BACKENDS = {"mlp_backend": "torch-gather", "attention_backend": "eager"}
BLOCKS = {"mlp_block": MLP_BLOCK, "attn_block": ATTN_BLOCK}


def _live_mlp(bank_dir, **over) -> dict:
    """`expose` options of a live-predicted MLP (no attention) on the micro model, on the torch-gather backend."""
    return dict(source="predicted", predictors=str(bank_dir), attention=False, mlp_block=MLP_BLOCK,
                mlp_backend="torch-gather", **over)  # fmt: skip


def _micro(checkpoint, method="lora"):
    model = build_model("relu-micro", weights=str(checkpoint), attn_implementation="eager", seed=0)
    torch.manual_seed(0)  # the same LoRA initialisation in every copy
    return apply_method(model, method).eval()


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def bank_dir(micro_checkpoint, e2e_ids, tmp_path_factory):  # noqa: F811
    model = build_model("relu-micro", weights=str(micro_checkpoint), attn_implementation="eager")
    model.requires_grad_(False)
    out = tmp_path_factory.mktemp("bank")
    fit_predictors(model, e2e_ids[:4], out, mlp_block=MLP_BLOCK, attn_block=ATTN_BLOCK, steps=40)
    return out


def test_oracle_at_zero_threshold_is_the_dense_model(micro_checkpoint, e2e_ids):  # noqa: F811
    """theta 0 drops only never-firing neuron blocks and tau 1 keeps every key block: exact dense math."""
    ids = e2e_ids[0]
    ref, model = _micro(micro_checkpoint), _micro(micro_checkpoint)
    expose(model, source="oracle", theta=0.0, tau=1.0, **BLOCKS, **REFERENCE_BACKENDS)
    l0, g0 = _loss_and_grads(ref, ids)
    l1, g1 = _loss_and_grads(model, ids)
    torch.testing.assert_close(l1, l0, atol=1e-4, rtol=1e-4)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], atol=1e-4, rtol=1e-3, msg=name)


def test_live_sources_report_what_they_computed(micro_checkpoint, e2e_ids, bank_dir):  # noqa: F811
    ids = e2e_ids[0]
    dense_loss, _ = _loss_and_grads(_micro(micro_checkpoint), ids)
    densities = {}
    for source in ("predicted", "oracle", "random"):
        model = _micro(micro_checkpoint)
        exposure = expose(model, source=source, predictors=str(bank_dir), theta=0.9, **BLOCKS, **REFERENCE_BACKENDS)
        loss, grads = _loss_and_grads(model, ids)
        assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads.values())
        report = exposure.report()
        assert report["sparsity_source"].startswith(source)
        mlp, attn = report["mlp_block_density"], report["attention_block_density_of_causal"]
        assert 0 < mlp <= 1 and 0 < attn <= 1
        assert len(report["mlp_density_per_layer"]) == len(exposure.layers)
        densities[source] = (mlp, attn)
        if source == "oracle":
            # the micro model's blocks are nearly equally important (no block sparsity at theta 0.1-0.5):
            # theta 0.9 makes the oracle drop some, so the check below has something to see
            assert mlp < 1, "some neuron blocks are below 0.9 x the peak block's importance"
            assert not torch.allclose(loss, dense_loss), "dropping blocks must change the loss"
    # random keeps as many blocks as the oracle would on the same input (its inputs differ from the oracle
    # run's after layer 0, so the totals differ): below 1 wherever the oracle is
    assert densities["oracle"][0] < 1 and densities["random"][0] < 1


def test_mixed_sources_and_the_predict_phase(micro_checkpoint, bank_dir):  # noqa: F811
    exposure = {
        "source": "predicted",
        "attention_source": "random",
        "predictors": str(bank_dir),
        **BLOCKS,
        **REFERENCE_BACKENDS,
    }
    setup = TrainingSetup(
        model="relu-micro",
        weights=str(micro_checkpoint),
        method="lora",
        batch=2,
        seq_len=SEQ,
        precision="fp32",
        attn="eager",
        exposure=exposure,
    )
    trainer = Trainer(setup, "cpu")
    timer = Timer("cpu")
    trainer.step(timer)
    phases = timer.elapsed_ms()
    assert phases["predict_ms"] > 0 and phases["predict_ms"] < phases["forward_ms"]
    source = trainer.describe()["sparsity_source"]
    assert "mlp: predicted: live predictors from" in source and "attention: random" in source


def test_bad_live_configurations_are_clear_errors(micro_checkpoint, bank_dir):  # noqa: F811
    with pytest.raises(ValueError, match="needs predictors="):
        expose(_micro(micro_checkpoint), source="predicted", **BLOCKS)
    with pytest.raises(ValueError, match="mlp_source: sparsity source 'guess' is not one of"):
        expose(_micro(micro_checkpoint), source="oracle", mlp_source="guess", **BLOCKS)
    with pytest.raises(ValueError, match="set mlp_block=32"):
        expose(
            _micro(micro_checkpoint), source="predicted", predictors=str(bank_dir), mlp_block=64, attn_block=ATTN_BLOCK
        )
    with pytest.raises(FileNotFoundError, match="no saved predictors"):
        expose(_micro(micro_checkpoint), source="predicted", predictors="/nonexistent/bank", **BLOCKS)


@pytest.mark.parametrize("source", ["predicted", "oracle"])
def test_compiled_predictors_match_eager_calls(micro_checkpoint, e2e_ids, bank_dir, source):  # noqa: F811
    """compile_predictors runs the same patterns (hence the same loss, gradients and densities) through
    torch.compile, and one compilation per target serves every layer."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    ids = e2e_ids[0]
    results = []
    for compile_predictors in (False, True):
        model = _micro(micro_checkpoint)
        opts = {"predictors": str(bank_dir), "theta": 0.9, "compile_predictors": compile_predictors}
        exposure = expose(model, source=source, **opts, **BLOCKS, **REFERENCE_BACKENDS)
        before = counters["stats"]["unique_graphs"]
        loss, grads = _loss_and_grads(model, ids)
        graphs = counters["stats"]["unique_graphs"] - before
        results.append((loss, grads, exposure.report(), graphs))
    (l0, g0, r0, graphs0), (l1, g1, r1, graphs1) = results
    assert graphs0 == 0 and graphs1 == 2, "one program for the MLP predictors and one for attention, all layers"
    assert len(r1["mlp_density_per_layer"]) > 1
    torch.testing.assert_close(l1, l0)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], msg=name)
    assert r1["mlp_density_per_layer"] == r0["mlp_density_per_layer"]
    assert r1["attention_density_per_layer"] == r0["attention_density_per_layer"]
    if source == "oracle":  # (a saved bank keeps its own calibrated threshold; theta is the oracle's)
        assert r1["mlp_block_density"] < 1, "some blocks dropped, so equal results mean equal patterns"


def test_refresh_every_retrains_the_mlp_predictors_after_training_steps_only(micro_checkpoint, e2e_ids, bank_dir):  # noqa: F811
    model = _micro(micro_checkpoint)
    exposure = expose(model, **_live_mlp(bank_dir, refresh_every=2, refresh_steps=5))
    loaded = [p.detach().clone() for m in exposure.predictors["mlp"] for p in m.parameters()]
    with torch.no_grad():
        model(input_ids=e2e_ids[0])  # eval mode, no grad: not a training forward
    assert exposure.training_forwards == 0
    model.train()
    _loss_and_grads(model, e2e_ids[0])
    _loss_and_grads(model, e2e_ids[1])
    assert not exposure.refreshes, "a refresh runs after a step (after_step), never inside a forward"
    for step in range(4):
        exposure.after_step()
        _loss_and_grads(model, e2e_ids[step % 2])
    exposure.after_step()
    report = exposure.report()
    rows = report["mlp_refreshes"]
    assert exposure.training_forwards == 6 and [r["layer"] for r in rows] == list(range(len(exposure.layers)))
    assert all(r["step"] == 4 and 0 <= r["recall_after"] <= 1 for r in rows), rows
    assert report["steps_recorded"] == 5 and 0 < report["mlp_block_density_mean_over_steps"] <= 1
    now = [p for m in exposure.predictors["mlp"] for p in m.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(loaded, now, strict=True)), "the refreshes trained nothing"
    assert "refreshed every 2 training steps" in report["sparsity_source"]
    assert {r.config.recall_target for r in exposure._refreshers.values()} == {0.97}
    with pytest.raises(ValueError, match="refresh_every refreshes the MLP predictors of predicted and random-as-pre"):
        expose(_micro(micro_checkpoint), source="oracle", refresh_every=2, **BLOCKS)
    forgotten = _micro(micro_checkpoint)
    expose(forgotten, **_live_mlp(bank_dir, refresh_every=1))
    forgotten.train()
    _loss_and_grads(forgotten, e2e_ids[0])
    _loss_and_grads(forgotten, e2e_ids[0])
    with pytest.raises(RuntimeError, match="after_step"):
        _loss_and_grads(forgotten, e2e_ids[0])


def test_refresh_keeps_the_mlp_input_in_the_autocast_dtype(micro_checkpoint, e2e_ids, bank_dir):  # noqa: F811
    """Under bf16 autocast the residual stream (and so the MLP input) is fp32; the refresh gets the bf16 input
    the MLP multiplies, so on a GPU its fc1 and predictor training run bf16 matmuls, as `layer_data` documents."""
    model = _micro(micro_checkpoint)
    exposure = expose(model, **_live_mlp(bank_dir, refresh_every=2, refresh_steps=2))
    model.train()
    model(input_ids=e2e_ids[0], labels=e2e_ids[0]).loss.backward()  # no autocast: the model's own dtype
    assert all(state.kept["mlp"].dtype == torch.float32 for state in exposure.layer_states)
    exposure.after_step()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=e2e_ids[1], labels=e2e_ids[1]).loss.backward()
    kept = [state.kept["mlp"] for state in exposure.layer_states]
    assert kept and all(x.dtype == torch.bfloat16 for x in kept), [x.dtype for x in kept]
    exposure.after_step()  # the refresh, on the bf16 inputs
    assert [r["layer"] for r in exposure.report()["mlp_refreshes"]] == list(range(len(exposure.layers)))
    # and a forward without autocast after one with it runs on the weights, not the last step's bf16 copy
    assert model(input_ids=e2e_ids[0], labels=e2e_ids[0]).loss.dtype == torch.float32


@pytest.mark.slow
def test_compiled_layers_keep_the_refresh_input_in_the_autocast_dtype(micro_checkpoint, e2e_ids, bank_dir):  # noqa: F811
    """The same inside compiled decoder layers (where the kept input is a value the compiled program returns), and
    the refresh then runs on it."""
    from longexposure.compiled_model import compile_layers_, fresh_dynamo

    model = _micro(micro_checkpoint)
    exposure = expose(model, **_live_mlp(bank_dir, refresh_every=1, refresh_steps=2))
    fresh_dynamo()
    compile_layers_(model)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=e2e_ids[0], labels=e2e_ids[0]).loss.backward()
    assert all(state.kept["mlp"].dtype == torch.bfloat16 for state in exposure.layer_states)
    exposure.after_step()
    assert [r["layer"] for r in exposure.report()["mlp_refreshes"]] == list(range(len(exposure.layers)))


def test_dense_above_runs_the_first_step_and_refreshed_dense_layers_dense(micro_checkpoint, e2e_ids, bank_dir):  # noqa: F811
    """`dense_above`: the first training step runs every MLP dense (the dense model's loss), then the layers go
    back to their predictors; a refresh that predicts a layer at least that dense switches it to the dense MLP,
    which then computes the dense model's MLP and skips its predictor (so step densities say 1.0)."""

    def fresh():  # training mode without dropout, so the losses compare exactly
        model = build_model("relu-micro", weights=str(micro_checkpoint), attn_implementation="eager", seed=0,
                            dropout=0.0, attention_dropout=0.0)  # fmt: skip
        torch.manual_seed(0)
        return apply_method(model, "lora", dropout=0.0).train()

    ids = e2e_ids[0][:1]  # one sequence: the union of its tokens' blocks leaves some out
    dense_loss, dense_grads = _loss_and_grads(fresh(), ids)
    opts = _live_mlp(bank_dir, refresh_every=2, refresh_steps=3)
    model = fresh()
    exposure = expose(model, dense_above=1e-6, **opts)  # every layer predicted above it: all go dense
    calls = []
    predict = exposure._predict
    exposure._predict = lambda *a: calls.append(a[0].index) or predict(*a)
    loss, grads = _loss_and_grads(model, ids)
    torch.testing.assert_close(loss, dense_loss, atol=1e-5, rtol=1e-5)
    for name in dense_grads:
        torch.testing.assert_close(grads[name], dense_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    assert calls == [], "a dense layer runs no predictor"
    exposure.after_step()
    assert not any(s.dense_mlp for s in exposure.layer_states) and exposure.dense_switches == 1
    for pred in exposure.predictors["mlp"]:  # the micro model's blocks are about equally important: a threshold
        pred.theta_scale.fill_(9.0)  # of 0.9 x the peak block drops some (the refresh recalibrates it)
    _loss_and_grads(model, ids)
    n_blocks = model.config.ffn_dim // MLP_BLOCK
    assert calls == list(range(len(exposure.layers)))
    assert any(int(s.last["mlp"][1]) < n_blocks for s in exposure.layer_states), "step 2 ran sparse"
    exposure.after_step()  # step 2: the refresh puts every layer above 1e-6
    assert all(s.dense_mlp for s in exposure.layer_states) and exposure.dense_switches == 2
    calls.clear()
    loss, _ = _loss_and_grads(model, ids)
    torch.testing.assert_close(loss, dense_loss, atol=1e-5, rtol=1e-5)
    assert calls == []
    exposure.after_step()
    report = exposure.report()
    assert report["mlp_dense_layers"] == list(range(len(exposure.layers))) and report["mlp_dense_switches"] == 2
    assert set(report["mlp_density_per_layer"].values()) == {1.0}
    assert report["mlp_block_density_mean_over_steps"] < 1  # step 2 ran sparse
    assert "runs its MLP dense" in report["sparsity_source"]

    strict = expose(fresh(), dense_above=1.0, **opts)  # only a fully dense prediction
    for _ in range(2):
        _loss_and_grads(strict.model, ids)
        strict.after_step()
    full = {r["layer"] for r in strict.refreshes.values() if r["density_after"] >= 1.0}
    assert {s.index for s in strict.layer_states if s.dense_mlp} == full
    for bad in ({"dense_above": 0.5, "refresh_every": 0}, {"dense_above": 1.5}):
        with pytest.raises(ValueError, match="dense_above must be in"):
            expose(_micro(micro_checkpoint), **{**opts, **bad})


def test_refresh_keep_graph_needs_refresh_every_and_is_reported(micro_checkpoint, bank_dir):  # noqa: F811
    opts = _live_mlp(bank_dir)
    with pytest.raises(ValueError, match="refresh_keep_graph .* needs refresh_every"):
        expose(_micro(micro_checkpoint), refresh_keep_graph=True, **opts)
    exposure = expose(_micro(micro_checkpoint), refresh_every=3, refresh_keep_graph=True, **opts)
    assert "captured training step kept between refreshes" in exposure.report()["sparsity_source"]


@pytest.fixture(scope="module")
def strict_bank(micro_checkpoint, e2e_ids, tmp_path_factory):  # noqa: F811
    """MLP predictors for theta 0.9: the micro model's blocks are nearly equally important (see above)."""
    base = build_model("relu-micro", weights=str(micro_checkpoint), attn_implementation="eager")
    out = tmp_path_factory.mktemp("strict-bank")
    fit_predictors(base.requires_grad_(False), e2e_ids[:4], out, attention=False, mlp_block=MLP_BLOCK,
                   theta=0.9, steps=40)
    return out


def test_held_out_swaps_keep_the_weights_and_change_only_the_blocks(micro_checkpoint, e2e_ids, strict_bank):  # noqa: F811
    """`mlp_pattern_swaps`: one model, the same batches, each kind of MLP blocks in every layer. Every block is
    the dense model; random keeps as many blocks as the prediction; the exposure is left as it was."""
    from longexposure.held_out import SwappedMlpPattern, held_out_metrics

    batches = [{"input_ids": ids, "labels": ids} for ids in e2e_ids[4:6]]
    dense = _micro(micro_checkpoint)
    with torch.no_grad():
        dense_loss = sum(float(dense(**b).loss) for b in batches) / len(batches)
    model = _micro(micro_checkpoint)
    exposure = expose(model, source="predicted", predictors=str(strict_bank), theta=0.9, attention=False,
                      mlp_block=MLP_BLOCK, mlp_backend="torch-gather")
    own = [s.predictors["mlp"] for s in exposure.layer_states]
    out = held_out_metrics(model, batches, exposure=exposure, mlp_block=MLP_BLOCK, theta=0.9)
    assert out["held_out_loss_mlp_all"] == pytest.approx(dense_loss, rel=1e-5)
    assert out["held_out_mlp_density_all"] == 1.0 and out["held_out_mlp_density_none"] == 0.0
    assert out["held_out_loss_mlp_predicted"] == pytest.approx(out["held_out_loss"], rel=1e-6), "no dense fallback"
    assert 0 < out["held_out_mlp_density_predicted"] < 1
    # random keeps the prediction's count on the input each layer sees: layer 0's is the predicted run's
    predicted, random = out["held_out_mlp_density_predicted_per_layer"], out["held_out_mlp_density_random_per_layer"]
    assert random["0"] == predicted["0"] and random["1"] == pytest.approx(predicted["1"], abs=0.2)
    assert len(set(out["held_out_loss_mlp_random_draws"])) == 3, "three different random draws"
    assert out["held_out_loss_mlp_none"] != pytest.approx(out["held_out_loss_mlp_all"], rel=1e-3)
    assert out["held_out_random_swap_ratio"] == out["held_out_loss_mlp_random"] / out["held_out_loss_mlp_predicted"]
    assert [s.predictors["mlp"] for s in exposure.layer_states] == own, "the layers' own predictors are back"
    assert not model.training
    with pytest.raises(ValueError, match="unknown MLP swap 'best'; valid: "):
        SwappedMlpPattern("best", own[0], exposure.layer_states[0].mlp["base1"], theta=0.9)
    with pytest.raises(ValueError, match="2 predictors for"), exposure.mlp_patterns_from(own[:2]):
        pass


def test_pattern_swaps_need_a_dynamic_mlp_source(micro_checkpoint):  # noqa: F811
    exposure = expose(_micro(micro_checkpoint), source="all-active", mlp_block=MLP_BLOCK, attention=False,
                      mlp_backend="torch-gather")
    with pytest.raises(ValueError, match="needs a dynamic MLP source, not 'all-active'"):
        exposure.mlp_patterns_from([]).__enter__()


def test_random_as_predicted_keeps_the_predicted_count_of_other_blocks(micro_checkpoint, e2e_ids, strict_bank):  # noqa: F811
    """The control at the predicted density: per layer and step as many random blocks as the live predictor keeps
    (layer 0 sees the same input in both models, so the same count), not the same blocks; refreshed like
    `predicted`; eager only."""
    ids = e2e_ids[0]
    opts = {"predictors": str(strict_bank), "theta": 0.9, "attention": False, "mlp_block": MLP_BLOCK,
            "mlp_backend": "torch-gather"}  # fmt: skip
    runs = {}
    for source in ("predicted", "random-as-predicted"):
        model = _micro(micro_checkpoint)
        exposure = expose(model, source=source, **opts)
        loss, grads = _loss_and_grads(model, ids)
        assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads.values())
        ids0, count0 = exposure.layer_states[0].last["mlp"]
        runs[source] = (set(ids0[: int(count0)].tolist()), exposure.report())
    (pred_blocks, _), (rand_blocks, rand_report) = runs["predicted"], runs["random-as-predicted"]
    assert 0 < len(pred_blocks) < 512 // MLP_BLOCK
    assert len(rand_blocks) == len(pred_blocks)
    assert rand_report["sparsity_source"].startswith("random-as-predicted: random blocks, as many as the live")
    model = _micro(micro_checkpoint)
    exposure = expose(model, source="random-as-predicted", **opts)
    draws = set()
    for _ in range(4):  # the drawn blocks change from call to call (the predicted ones would not)
        _loss_and_grads(model, ids)
        ids0, count0 = exposure.layer_states[0].last["mlp"]
        draws.add(frozenset(ids0[: int(count0)].tolist()))
    assert len(draws) > 1 and {len(d) for d in draws} == {len(pred_blocks)}

    setup = TrainingSetup(model="relu-micro", weights=str(micro_checkpoint), method="lora", batch=2, seq_len=SEQ,
                          precision="fp32", attn="eager",
                          exposure={"source": "random-as-predicted", "refresh_every": 2, "refresh_steps": 3, **opts})
    trainer = Trainer(setup, "cpu")
    for _ in range(4):
        trainer.step(Timer("cpu"))
    assert sorted(trainer.exposure.refreshes) == [0, 1, 2, 3], "every layer's predictor was refreshed"
    with pytest.raises(ValueError, match="cuda_graph cannot replay the `random-as-predicted` sparsity source"):
        TrainingSetup(model="relu-micro", method="lora", cuda_graph=True,
                      exposure={"source": "random-as-predicted", **opts})
    with pytest.raises(ValueError, match="random-as-predicted is an MLP source"):
        expose(_micro(micro_checkpoint), source="predicted", attention_source="random-as-predicted",
               predictors=str(strict_bank), **BLOCKS)


def test_recall_target_reaches_every_refresh_and_is_checked(micro_checkpoint, bank_dir):  # noqa: F811
    model = _micro(micro_checkpoint)
    exposure = expose(model, **_live_mlp(bank_dir, refresh_every=2, refresh_steps=2, recall_target=0.8))
    model.train()
    model(input_ids=torch.zeros(1, 8, dtype=torch.long))
    assert {r.config.recall_target for r in exposure._refreshers.values()} == {0.8}
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="recall_target must be in"):
            expose(_micro(micro_checkpoint), source="predicted", predictors=str(bank_dir), recall_target=bad, **BLOCKS)


def test_the_refresh_warm_up_runs_once_on_copies_and_changes_nothing(micro_checkpoint, e2e_ids, bank_dir, monkeypatch):  # noqa: F811
    """The first step's throwaway refresh (on a GPU; forced here) leaves the real predictors, their thresholds
    and refresh counts as they were: the run's refreshes and patterns equal a run without it."""
    import longexposure.expose as expose_module

    def run(warm: bool):
        monkeypatch.setattr(expose_module, "_warms_refresh", lambda inputs: warm)
        model = _micro(micro_checkpoint)
        exposure = expose(model, **_live_mlp(bank_dir, refresh_every=2, refresh_steps=3))
        model.train()
        _loss_and_grads(model, e2e_ids[0])
        exposure.after_step()
        state = [t.detach().clone() for m in exposure.predictors["mlp"] for t in (*m.parameters(), *m.buffers())]
        counts = [r.count for r in exposure._refreshers.values()]
        for step in range(3):
            _loss_and_grads(model, e2e_ids[step % 2])
            exposure.after_step()
        return exposure, state, counts

    warmed, state_w, counts_w = run(True)
    plain, state_p, counts_p = run(False)
    assert warmed.refresh_warmup_ms is not None and warmed.refresh_warmup_ms > 0 and plain.refresh_warmup_ms is None
    assert counts_w == counts_p == [0] * len(counts_w), "the warm-up refreshed no real predictor"
    for a, b in zip(state_w, state_p, strict=True):
        assert torch.equal(a, b)
    assert warmed.refreshes == plain.refreshes
    report = warmed.report()
    assert report["refresh_warmup_ms"] == warmed.refresh_warmup_ms
    assert "warmed the process up" in report["sparsity_source"]
    assert "refresh_warmup_ms" not in plain.report()
