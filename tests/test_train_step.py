import pytest
import torch

from longexposure.suite.context import RunContext
from longexposure.tasks.train_step import TrainStepCase, train_step
from longexposure.training import prepare_model


def ctx(tmp_path):
    return RunContext(device=torch.device("cpu"), preset="cpu-tiny", out_dir=tmp_path)


@pytest.mark.parametrize("model", ["opt-tiny", "gpt2-tiny"])
def test_train_step_reports_every_phase_and_the_sources(tmp_path, model):
    case = TrainStepCase(model=model, method="lora", batch=2, seq_len=32, precision="fp32", warmup=1, steps=3)
    metrics = train_step(case, ctx(tmp_path))
    info = metrics.pop("info")
    for phase in ("forward_ms", "backward_ms", "optimizer_ms", "total_ms"):
        stats = metrics[phase]
        assert stats["n"] == 3 and 0 < stats["min"] <= stats["p50"] <= stats["max"]
    parts = sum(metrics[p]["p50"] for p in ("forward_ms", "backward_ms", "optimizer_ms"))
    assert parts <= metrics["total_ms"]["max"] * 1.5
    assert info["weights"] == "random-init" and info["data"].startswith("synthetic")
    assert 0 < info["trainable_params"] < info["total_params"]


def test_mixed_precision_keeps_trainable_fp32_and_frozen_low():
    case = TrainStepCase(model="opt-tiny", method="lora", precision="bf16-amp")
    model, _ = prepare_model(case, torch.device("cpu"))
    dtypes = {p.requires_grad: p.dtype for p in model.parameters()}
    assert dtypes == {True: torch.float32, False: torch.bfloat16}


def test_bad_case_values():
    with pytest.raises(ValueError, match="precision"):
        TrainStepCase(precision="fp8")
    with pytest.raises(ValueError, match="steps"):
        TrainStepCase(steps=0)


def test_cuda_graph_needs_cuda_and_composes_with_compile():
    TrainStepCase(cuda_graph=True, compile=True)  # the strongest dense baseline: compiled layers in a graph
    with pytest.raises(ValueError, match="cannot replay the `random`"):
        TrainStepCase(cuda_graph=True, exposure={"source": "oracle", "mlp_source": "random"})
    TrainStepCase(cuda_graph=True, exposure={"source": "oracle"})  # sync-free sources are fine
    from longexposure.training import Trainer

    with pytest.raises(ValueError, match="needs a CUDA device"):
        Trainer(TrainStepCase(model="opt-tiny", cuda_graph=True, precision="fp32"), "cpu")
