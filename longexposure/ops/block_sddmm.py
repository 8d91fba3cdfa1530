"""Pure-torch references for Sylva's block-sparse weight gradient and its fused optimizer update.

A block mask over a weight of shape (out, in) with block size `b` is a list of `nnz` blocks
(`rows[i]`, `cols[i]`) in units of `b`; block `i` covers
`weight[rows[i]*b : rows[i]*b + b, cols[i]*b : cols[i]*b + b]`, clipped at the matrix edge (the last
block row/column may be ragged). Compact tensors hold one (b, b) tile per block, zero outside the edge.

Everything here is dense math on the full matrix followed by a gather/scatter, so it is obviously
right and runs anywhere; `kernels/block_sddmm.py` must match it. Optimized code never imports it
except to fall back *explicitly* (backend="torch").
"""

from __future__ import annotations

import math

import torch


def check_blocks(rows: torch.Tensor, cols: torch.Tensor, shape: tuple[int, int], block: int) -> None:
    """Validate block coordinates against a weight shape; errors name the argument."""
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    if rows.dim() != 1 or cols.dim() != 1 or rows.shape != cols.shape:
        raise ValueError(f"rows and cols must be 1-D of one length, got {tuple(rows.shape)} and {tuple(cols.shape)}")
    n_br, n_bc = math.ceil(shape[0] / block), math.ceil(shape[1] / block)
    if rows.numel():
        if int(rows.min()) < 0 or int(rows.max()) >= n_br:
            raise ValueError(f"rows must lie in [0, {n_br}) for {shape[0]} rows at block {block}")
        if int(cols.min()) < 0 or int(cols.max()) >= n_bc:
            raise ValueError(f"cols must lie in [0, {n_bc}) for {shape[1]} columns at block {block}")


def _padded(dense: torch.Tensor, block: int) -> torch.Tensor:
    r, c = dense.shape
    pr, pc = math.ceil(r / block) * block, math.ceil(c / block) * block
    if (pr, pc) == (r, c):
        return dense
    out = dense.new_zeros(pr, pc)
    out[:r, :c] = dense
    return out


def dense_to_blocks(dense: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, block: int) -> torch.Tensor:
    """Gather the mask blocks of a (out, in) matrix into a compact (nnz, b, b) tensor (zero past the edge)."""
    check_blocks(rows, cols, tuple(dense.shape), block)
    p = _padded(dense, block)
    tiles = p.view(p.shape[0] // block, block, p.shape[1] // block, block).permute(0, 2, 1, 3)
    return tiles[rows.long(), cols.long()].contiguous()


def blocks_to_dense(
    values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, shape: tuple[int, int], block: int
) -> torch.Tensor:
    """Scatter compact blocks into a zero (out, in) matrix (the inverse of `dense_to_blocks`)."""
    check_blocks(rows, cols, shape, block)
    pr, pc = math.ceil(shape[0] / block), math.ceil(shape[1] / block)
    tiles = values.new_zeros(pr, pc, block, block)
    tiles[rows.long(), cols.long()] = values
    return tiles.permute(0, 2, 1, 3).reshape(pr * block, pc * block)[: shape[0], : shape[1]]


def block_mask_to_dense(mask: torch.Tensor, shape: tuple[int, int], block: int) -> torch.Tensor:
    """Element mask (out, in) of a block mask (ceil(out/b), ceil(in/b))."""
    return mask.repeat_interleave(block, 0).repeat_interleave(block, 1)[: shape[0], : shape[1]]


def block_sddmm_reference(
    dy: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, block: int
) -> torch.Tensor:
    """Weight-gradient blocks: `(dy^T x)` restricted to the mask blocks, in fp32 math.

    Args:
        dy: (tokens, out) output gradient.
        x: (tokens, in) layer input.
        rows, cols: (nnz,) block coordinates.
    Returns:
        (nnz, b, b) in dy's dtype.
    """
    full = dy.float().t() @ x.float()
    return dense_to_blocks(full, rows, cols, block).to(dy.dtype)


def block_adamw_reference(
    weight: torch.Tensor,
    values: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    block: int,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    adam: bool = True,
) -> None:
    """One AdamW (or plain SGD) step on the compact trainable blocks, scatter-added into `weight`.

    Updates `values`, `exp_avg`, `exp_avg_sq` (fp32, (nnz, b, b)) and the mask blocks of `weight`
    in place; every entry outside the mask blocks is left untouched. The dense weight receives
    `values_new` cast to its dtype (identical to adding the update when both hold the same values).
    """
    g = grad.float()
    v = values.float()
    if adam:
        exp_avg.mul_(beta1).add_(g, alpha=1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        c1, c2 = 1 - beta1**step, 1 - beta2**step
        upd = -lr * (exp_avg / c1) / ((exp_avg_sq / c2).sqrt() + eps) - lr * weight_decay * v
    else:
        upd = -lr * g
    new = v + upd
    edge = dense_to_blocks(torch.ones_like(weight, dtype=torch.bool), rows, cols, block)
    new = torch.where(edge, new, torch.zeros_like(new))
    values.copy_(new.to(values.dtype))
    dense_new = blocks_to_dense(new.to(weight.dtype), rows, cols, tuple(weight.shape), block)
    inside = block_mask_to_dense(_mask_of(rows, cols, weight.shape, block), tuple(weight.shape), block)
    weight.copy_(torch.where(inside, dense_new, weight))


def _mask_of(rows: torch.Tensor, cols: torch.Tensor, shape, block: int) -> torch.Tensor:
    mask = torch.zeros(math.ceil(shape[0] / block), math.ceil(shape[1] / block), dtype=torch.bool, device=rows.device)
    mask[rows.long(), cols.long()] = True
    return mask
