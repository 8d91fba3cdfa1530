"""Shared test setup: Triton runs in its interpreter when no GPU is present; hypothesis profiles."""

import os

import torch

if not torch.cuda.is_available():
    # Must be set before any @triton.jit function is defined (at import of longexposure.kernels).
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci", max_examples=12, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("local", max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared")
# Dropout off in the model and the method: two runs of the same steps then compare exactly.
NO_DROPOUT = {"method_options": {"dropout": 0.0}, "model_options": {"dropout": 0.0, "attention_dropout": 0.0}}


def tiny_setup(case_type=None, **over):
    """A training setup a CPU runs in seconds: opt-tiny with LoRA, batch 2 x 64 tokens, fp32, sdpa. `over` replaces
    fields; `case_type` is a `TrainingSetup` subclass (a task's case) to build instead."""
    from longexposure.training import TrainingSetup

    base = {"model": "opt-tiny", "method": "lora", "batch": 2, "seq_len": 64, "precision": "fp32", "attn": "sdpa"}
    return (case_type or TrainingSetup)(**{**base, **over})


import pytest  # noqa: E402


def _tiny_bank(out, device: str):
    from longexposure.predictors.fit import fit_predictors

    from longexposure.models import build_model

    model = build_model("opt-tiny", attn_implementation="eager", seed=0, device=device)
    model.requires_grad_(False)
    batches = [torch.randint(0, 1000, (2, 64), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    fit_predictors(model, [b.to(device) for b in batches], out, mlp_block=32, attn_block=16, steps=5)
    return out


@pytest.fixture(scope="session")
def tiny_bank(tmp_path_factory):
    """A saved predictor bank for random-init opt-tiny (mlp_block 32, attn_block 16), briefly trained."""
    return _tiny_bank(tmp_path_factory.mktemp("tiny_bank"), "cpu")


@pytest.fixture(scope="session")
def tiny_bank_cuda(tmp_path_factory):
    """The same for opt-tiny initialised on the GPU (a seeded init there gives other weights: another bank)."""
    return _tiny_bank(tmp_path_factory.mktemp("tiny_bank_cuda"), "cuda")
