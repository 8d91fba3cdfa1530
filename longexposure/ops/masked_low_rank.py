"""Pure-torch reference for SP-LoRA's masked merge and its fused backward (`kernels/masked_low_rank.py`).

Written as the paper's Alg. 1-2 lines (mask from the weight, in-place addmm, multiply by the mask), so
it is obviously right and runs anywhere; the kernels must match it.
"""

from __future__ import annotations

import torch


def masked_low_rank_add_reference_(
    weight: torch.Tensor, up: torch.Tensor, down: torch.Tensor, scale: float
) -> torch.Tensor:
    """weight <- (weight != 0) o (weight + scale up @ down), in place."""
    mask = weight != 0
    return weight.addmm_(up.to(weight.dtype), down.to(weight.dtype), alpha=scale).mul_(mask)


def masked_adapter_grads_restore_reference_(
    grad: torch.Tensor,
    weight: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    scale: float,
    restore: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(s (G o M) down^T, s up^T (G o M)) with M = [weight != 0]; `restore` undoes the merge in place.

    Products in fp32 (fp64 for fp64 weights) on the masked gradient and the adapters in the weight's dtype.
    """
    mask = weight != 0
    acc = torch.promote_types(weight.dtype, torch.float32)
    gm = (grad * mask).to(acc)
    d_up = (gm @ down.to(weight.dtype).to(acc).t()) * scale
    d_down = (up.to(weight.dtype).to(acc).t() @ gm) * scale
    if restore:
        weight.addmm_(up.to(weight.dtype), down.to(weight.dtype), alpha=-scale).mul_(mask)
    return d_up, d_down
