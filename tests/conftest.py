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
