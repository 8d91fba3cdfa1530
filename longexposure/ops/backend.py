"""Which implementation of an operator runs: the Triton kernel or its pure-torch reference."""

from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "triton", "torch")


def resolve_backend(backend: str, device: torch.device, what: str = "operator") -> str:
    """`auto` -> `triton` on CUDA (or under TRITON_INTERPRET=1), else the pure-torch reference.

    An explicit `triton` that cannot run here is an error that says why; it never falls back.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown {what} backend {backend!r}; valid: {BACKENDS}")
    if backend == "torch":
        return "torch"
    can = device.type == "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1"
    if backend == "triton" and not can:
        raise RuntimeError(
            f"{what} backend 'triton' needs a CUDA device or TRITON_INTERPRET=1 (tensor is on {device})"
        )
    return "triton" if can else "torch"
