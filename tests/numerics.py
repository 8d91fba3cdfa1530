"""One numerics policy for every kernel test.

fp32 compares with fixed tolerances. fp16/bf16 follow the flash-attention rule: the kernel's error
against an fp32 (or fp64) reference may be at most `factor` times the error of the same computation
done by PyTorch in the same low precision, plus a small absolute floor. Failures say where and how much.
"""

from __future__ import annotations

import torch

TOLERANCES = {
    torch.float64: (1e-9, 1e-7),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def _where(diff: torch.Tensor) -> str:
    idx = int(diff.argmax())
    coords = tuple(int(c) for c in torch.unravel_index(torch.tensor(idx), diff.shape)) if diff.dim() else ()
    return f"max |diff| {diff.max().item():.3g} at {coords}"


def assert_close(actual: torch.Tensor, expected: torch.Tensor, name: str = "output") -> None:
    """Fixed per-dtype tolerance (by `actual`'s dtype); the message names the tensor and worst element."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    atol, rtol = TOLERANCES[actual.dtype]
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert torch.isfinite(a).all() == torch.isfinite(e).all(), f"{name}: non-finite values differ"
    diff = (a - e).abs()
    bad = diff > atol + rtol * e.abs()
    assert not bad.any(), (
        f"{name}: {int(bad.sum())}/{bad.numel()} elements off; {_where(diff)} (atol={atol}, rtol={rtol})"
    )


def assert_close_to_reference(
    actual: torch.Tensor,
    same_precision: torch.Tensor,
    high_precision: torch.Tensor,
    name: str = "output",
    factor: float = 2.0,
    floor: float | None = None,
) -> None:
    """Low-precision rule: |actual - hi| <= factor * |same_precision - hi| + floor (max norms)."""
    hi = high_precision.detach().double().cpu()
    err = (actual.detach().double().cpu() - hi).abs().max().item()
    ref_err = (same_precision.detach().double().cpu() - hi).abs().max().item()
    if floor is None:
        floor = TOLERANCES[actual.dtype][0] * max(1.0, hi.abs().max().item())
    assert err <= factor * ref_err + floor, (
        f"{name}: error {err:.3g} vs fp reference exceeds {factor} x same-precision torch error {ref_err:.3g} "
        f"+ {floor:.3g}; {_where((actual.detach().double().cpu() - hi).abs())}"
    )
