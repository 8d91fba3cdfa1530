"""The CUDA-graph training step (GPU only): replaying forward + backward gives the same losses and the
same trained parameters as eager steps, for the dense model and for exposed ones: a static pattern, and
live patterns (oracle, predicted) that the replayed graph must recompute for every new batch."""

import pytest
import torch
from conftest import NO_DROPOUT, tiny_setup

from longexposure.measure import Timer
from longexposure.training import Trainer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

EXPOSED = {"source": "all-active", "attn_block": 16, "mlp_block": 32}
_LAST: dict = {}  # the last refresh run's trainer, for a look at what its graph predicted
ORACLE = {"source": "oracle", "attn_block": 16, "mlp_block": 32, "theta": 0.3, "tau": 0.8}


def _run(cuda_graph: bool, exposure, steps: int = 6, compile_: bool = False):
    setup = tiny_setup(precision="fp16-amp", cuda_graph=cuda_graph, compile=compile_, exposure=exposure, **NO_DROPOUT)
    trainer = Trainer(setup, "cuda", seed=0)
    timer = Timer("cuda")
    losses = [float(trainer.step(timer)) for _ in range(steps)]
    params = {n: p.detach().float().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    if cuda_graph:
        _LAST["trainer"] = trainer
    if exposure is not None and exposure.get("refresh_every"):
        params["refreshes"] = torch.tensor([len(trainer.exposure.refreshes)], dtype=torch.float32)
        for i, pred in enumerate(trainer.exposure.predictors["mlp"]):
            params[f"mlp_predictor_{i}_theta_scale"] = pred.theta_scale.detach().float().clone()
        _LAST["trainer"] = trainer
    return losses, params, timer.elapsed_ms()


@pytest.mark.parametrize(
    "exposure",
    [None, EXPOSED, ORACLE, "predicted", "predicted-compiled"],
    ids=["dense", "exposed", "oracle", "predicted", "predicted-compiled"],
)
def test_graph_replay_trains_like_eager_steps(exposure, request):
    if isinstance(exposure, str):
        compiled = exposure.endswith("compiled")
        bank = str(request.getfixturevalue("tiny_bank_cuda"))
        exposure = {**EXPOSED, "source": "predicted", "predictors": bank, "compile_predictors": compiled}
    eager_losses, eager_params, _ = _run(False, exposure)
    graph_losses, graph_params, phases = _run(True, exposure)
    assert "forward_backward_ms" in phases and "forward_ms" not in phases
    torch.testing.assert_close(torch.tensor(graph_losses), torch.tensor(eager_losses), atol=2e-3, rtol=2e-3)
    for name in eager_params:
        torch.testing.assert_close(graph_params[name], eager_params[name], atol=2e-3, rtol=2e-3, msg=name)


def test_compiled_graph_replay_trains_like_eager_steps():
    """The strongest dense baseline: Inductor-compiled layers captured in the step's CUDA graph."""
    from longexposure.training import GRAPH_WARMUP, MAX_GRAPH_WARMUP

    eager_losses, eager_params, _ = _run(False, None)
    _LAST.clear()
    graph_losses, graph_params, phases = _run(True, None, compile_=True)
    assert "forward_backward_ms" in phases
    captures = _LAST["trainer"].graph_captures
    assert len(captures) == 1 and GRAPH_WARMUP <= captures[0] <= MAX_GRAPH_WARMUP, captures
    torch.testing.assert_close(torch.tensor(graph_losses), torch.tensor(eager_losses), atol=2e-3, rtol=2e-3)
    for name in eager_params:
        torch.testing.assert_close(graph_params[name], eager_params[name], atol=2e-3, rtol=2e-3, msg=name)


@pytest.mark.parametrize("keep", [False, True], ids=["fresh", "kept"])
def test_graph_replay_with_predictor_refreshes_trains_like_eager_steps(request, keep):
    """Refreshes run after the step, outside the graph, and change the predictors in place: graph steps train
    like eager steps (losses, LoRA weights, refreshed thresholds), and the last replay predicted with the
    refreshed predictor, not the one captured.

    The predictors' own weights are not compared: Adam moves every weight by about lr per step whatever the
    gradient's size, so rounding-level differences in the MLP inputs (eager vs captured kernels) flip update
    signs and leave differences as large as the refresh's whole training delta."""
    from longexposure.predictors.compiled import compiled

    bank = str(request.getfixturevalue("tiny_bank_cuda"))
    exposure = {**EXPOSED, "source": "predicted", "predictors": bank, "compile_predictors": True,
                "refresh_every": 2, "refresh_steps": 5, "refresh_keep_graph": keep}  # fmt: skip
    eager_losses, eager_params, _ = _run(False, exposure, steps=7)
    graph_losses, graph_params, _ = _run(True, exposure, steps=7)
    assert eager_params["refreshes"].item() > 0
    torch.testing.assert_close(torch.tensor(graph_losses), torch.tensor(eager_losses), atol=2e-3, rtol=2e-3)
    for name in eager_params:
        torch.testing.assert_close(graph_params[name], eager_params[name], atol=2e-3, rtol=2e-3, msg=name)
    exposure_state = _LAST["trainer"].exposure
    assert exposure_state.steps_done == 7 and {r["step"] for r in exposure_state.refreshes.values()} == {6}
    for i, pred in enumerate(exposure_state.predictors["mlp"]):  # step 7 replayed after the step-6 refresh
        x = exposure_state.last_mlp_inputs[i]
        with torch.no_grad():
            ids, count = compiled("mlp")(pred, x[None] if x.dim() == 2 else x)
        replayed_ids, replayed_count = exposure_state._last[("mlp", i)]
        assert int(count) == int(replayed_count), f"layer {i}: the replay used a stale predictor"
        torch.testing.assert_close(replayed_ids[: int(count)], ids[: int(count)], msg=f"layer {i}")


@pytest.mark.parametrize("compile_", [False, True], ids=["graph", "compile-graph"])
def test_graph_steps_recapture_when_layers_switch_to_dense(request, compile_):
    """`dense_above`: step 1 runs every MLP dense (eager warm-up), step 2 sparse, step 3 is captured sparse; the
    refresh after step 3 predicts every layer above 1e-6, so step 4 finds a switch, drops the graph, warms up
    eagerly and captures the dense step again. Losses and weights follow the eager run's."""
    bank = str(request.getfixturevalue("tiny_bank_cuda"))
    exposure = {**EXPOSED, "source": "predicted", "predictors": bank, "compile_predictors": not compile_,
                "refresh_every": 3, "refresh_steps": 5, "dense_above": 1e-6}  # fmt: skip
    eager_losses, eager_params, _ = _run(False, exposure, steps=8, compile_=compile_)
    graph_losses, graph_params, _ = _run(True, exposure, steps=8, compile_=compile_)
    trainer = _LAST["trainer"]
    assert trainer.exposure.dense_switches == 2 and trainer._graph_switches == 2 and trainer._graph is not None
    # (from 0) step 2, sparse; again after the switch the refresh made at step 2. A compiled warm-up that recompiles
    # reaches the switch before its first capture: then the one capture is the dense step 3 (H200, b8b928c)
    captures = trainer.graph_captures
    assert captures == sorted(captures) and captures[0] >= 2 and 3 <= captures[-1] < 8, captures
    if not compile_:  # (a compiled warm-up that recompiles may reach the switch before its first capture)
        assert len(captures) == 2, captures
    assert trainer.describe()["graph_captures_at_steps"] == captures
    assert all(s.dense_mlp for s in trainer.exposure.layer_states)
    torch.testing.assert_close(torch.tensor(graph_losses), torch.tensor(eager_losses), atol=2e-3, rtol=2e-3)
    for name in eager_params:
        torch.testing.assert_close(graph_params[name], eager_params[name], atol=2e-3, rtol=2e-3, msg=name)


@pytest.mark.parametrize("compile_", [False, True], ids=["graph", "compile-graph"])
def test_graph_replay_with_the_fused_loss_trains_like_eager_steps(compile_):
    """`training_loss: fused-linear-ce` reads nothing on the host, so a CUDA graph captures it (its chunk program is
    compiled in the eager warm-up steps, not during the capture)."""
    def run(cuda_graph: bool):
        setup = tiny_setup(precision="fp16-amp", cuda_graph=cuda_graph, compile=compile_, loss="fused-linear-ce",
                           **NO_DROPOUT)  # fmt: skip
        trainer = Trainer(setup, "cuda", seed=0)
        losses = [float(trainer.step(Timer("cuda"))) for _ in range(6)]
        return losses, {n: p.detach().float().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}

    eager_losses, eager_params = run(False)
    graph_losses, graph_params = run(True)
    torch.testing.assert_close(torch.tensor(graph_losses), torch.tensor(eager_losses), atol=2e-3, rtol=2e-3)
    for name in eager_params:
        torch.testing.assert_close(graph_params[name], eager_params[name], atol=2e-3, rtol=2e-3, msg=name)
