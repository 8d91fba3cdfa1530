"""Which implementation of a Sylva / SP-LoRA operator runs: the Triton kernel or its pure-torch reference."""

from __future__ import annotations

import torch

from longexposure.backends import BackendUnavailable, why_triton_cannot_run

BACKENDS = ("auto", "triton", "torch")


def check_backend_name(backend: str, what: str = "operator") -> None:
    """A ValueError naming every valid choice when `backend` is not one of `BACKENDS`."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown {what} backend {backend!r}; valid: {BACKENDS}")


def resolve_backend(backend: str, device: torch.device, what: str = "operator") -> str:
    """`auto` -> `triton` where the Triton kernels can run (`longexposure.backends.why_triton_cannot_run`: CUDA,
    or a CPU under TRITON_INTERPRET=1), else the pure-torch reference.

    An explicit `triton` that cannot run here raises `BackendUnavailable` saying why; it never falls back.
    """
    check_backend_name(backend, what)
    if backend == "torch":
        return "torch"
    why = why_triton_cannot_run(device)
    if backend == "triton" and why:
        raise BackendUnavailable(f"{what} backend 'triton' cannot run here: {why} (tensor is on {device})")
    return "torch" if why else "triton"
