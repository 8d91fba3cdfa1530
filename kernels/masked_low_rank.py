"""SP-LoRA's weight-sized passes, fused: the in-place masked merge, and backward's mask, adapter gradients and restore.

SP-LoRA trains W~(t) = W~ + M o (s up down) with M = [W~ != 0] (up: (out, r), down: (r, in)). Its
memory-optimised algorithm (paper Alg. 1-2) written with torch ops walks every weight-sized tensor
several times per layer: forward builds M, adds the product in place, multiplies by M; backward builds
M again, masks the dense gradient G = dY^T X, multiplies it by `down` and by `up`, then undoes the merge
the same way. At LLaMA-7B shapes those passes cost about as much as the GEMMs. Here:

  - `_merge_kernel`: W <- where(W != 0, W + s up down, 0) in place, one read and one write of W; with
    -s it is backward's restore. The rank-r product of a tile is formed on the fly (no (out, in) buffer).
  - `_grad_restore_kernel`: per (BM, BN) tile, Gm = where(W != 0, G, 0); writes that tile's share of
    d_up = Gm down^T (one (BM, r) slice per column tile) and of d_down = up^T Gm (one (r, BN) slice per
    row tile) to fp32 partial buffers the launcher sums in a fixed order (deterministic, no atomics);
    and, in the same pass, restores W <- where(W != 0, W - s up down, 0). One read of G, one read and
    write of W.

The mask is read from the weight itself, as in the paper (an entry whose merged value rounds to exactly
zero drops out of M, in the paper's algorithm and here alike). The product uses up and down in the
weight's dtype with fp32 accumulation, the same operands as the torch path, so merge and restore cancel
up to the weight dtype's rounding of (W + d) - d. The pure-torch reference is
`longexposure.ops.masked_low_rank`. No autotuning: both kernels write their input in place.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from longexposure.backends import BackendUnavailable, interpreting, why_triton_cannot_run

INTERPRET = interpreting()
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _low_rank_tile(
    up_ptr, down_ptr, offs_m, offs_n, mask_m, mask_n, R,
    stride_um, stride_ur, stride_dr, stride_dn,
    BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """(BM, BN) fp32 tile of up @ down, reduced over the rank in BR-wide chunks (padded with zeros)."""
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for r in range(0, R, BR):
        offs_r = r + tl.arange(0, BR)
        mask_r = offs_r < R
        u = tl.load(up_ptr + offs_m[:, None] * stride_um + offs_r[None, :] * stride_ur,
                    mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        d = tl.load(down_ptr + offs_r[:, None] * stride_dr + offs_n[None, :] * stride_dn,
                    mask=mask_r[:, None] & mask_n[None, :], other=0.0)
        if UPCAST:
            u, d = u.to(tl.float32), d.to(tl.float32)
        acc = tl.dot(u, d, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _merge_kernel(
    w_ptr, up_ptr, down_ptr, M, N, R, scale,
    stride_wm, stride_wn, stride_um, stride_ur, stride_dr, stride_dn,
    BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    offs_m = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    offs_n = tl.program_id(1).to(tl.int64) * BN + tl.arange(0, BN)
    mask_m, mask_n = offs_m < M, offs_n < N
    delta = _low_rank_tile(up_ptr, down_ptr, offs_m, offs_n, mask_m, mask_n, R,
                           stride_um, stride_ur, stride_dr, stride_dn, BM, BN, BR, PRECISION, UPCAST)
    w_ptrs = w_ptr + offs_m[:, None] * stride_wm + offs_n[None, :] * stride_wn
    mask = mask_m[:, None] & mask_n[None, :]
    w = tl.load(w_ptrs, mask=mask, other=0.0)
    wf = w.to(tl.float32)  # compared as fp32: -0.0 is a pruned entry too (the interpreter compares bf16 bits)
    out = tl.where(wf != 0, wf + scale * delta, 0.0)
    tl.store(w_ptrs, out.to(w.dtype), mask=mask)


@triton.jit
def _grad_restore_kernel(
    g_ptr, w_ptr, up_ptr, down_ptr, pu_ptr, pd_ptr, M, N, R, scale,
    stride_gm, stride_gn, stride_wm, stride_wn, stride_um, stride_ur, stride_dr, stride_dn,
    stride_pu_t, stride_pu_m, stride_pd_t, stride_pd_r,
    BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    RESTORE: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m.to(tl.int64) * BM + tl.arange(0, BM)
    offs_n = pid_n.to(tl.int64) * BN + tl.arange(0, BN)
    mask_m, mask_n = offs_m < M, offs_n < N
    mask = mask_m[:, None] & mask_n[None, :]
    w_ptrs = w_ptr + offs_m[:, None] * stride_wm + offs_n[None, :] * stride_wn
    w = tl.load(w_ptrs, mask=mask, other=0.0)
    keep = w.to(tl.float32) != 0  # -0.0 counts as pruned
    g = tl.load(g_ptr + offs_m[:, None] * stride_gm + offs_n[None, :] * stride_gn, mask=mask, other=0.0)
    gm = tl.where(keep, g, 0.0).to(g.dtype)
    if UPCAST:
        gm = gm.to(tl.float32)
    delta = tl.zeros((BM, BN), dtype=tl.float32)
    for r in range(0, R, BR):
        offs_r = r + tl.arange(0, BR)
        mask_r = offs_r < R
        u = tl.load(up_ptr + offs_m[:, None] * stride_um + offs_r[None, :] * stride_ur,
                    mask=mask_m[:, None] & mask_r[None, :], other=0.0)  # (BM, BR)
        u_t = tl.load(up_ptr + offs_r[:, None] * stride_ur + offs_m[None, :] * stride_um,
                      mask=mask_r[:, None] & mask_m[None, :], other=0.0)  # (BR, BM)
        d = tl.load(down_ptr + offs_r[:, None] * stride_dr + offs_n[None, :] * stride_dn,
                    mask=mask_r[:, None] & mask_n[None, :], other=0.0)  # (BR, BN)
        d_t = tl.load(down_ptr + offs_n[:, None] * stride_dn + offs_r[None, :] * stride_dr,
                      mask=mask_n[:, None] & mask_r[None, :], other=0.0)  # (BN, BR)
        if UPCAST:
            u, u_t, d, d_t = u.to(tl.float32), u_t.to(tl.float32), d.to(tl.float32), d_t.to(tl.float32)
        part_up = tl.dot(gm, d_t, input_precision=PRECISION)  # (BM, BR): this column tile's share of Gm down^T
        tl.store(pu_ptr + pid_n * stride_pu_t + offs_m[:, None] * stride_pu_m + offs_r[None, :], part_up,
                 mask=mask_m[:, None] & mask_r[None, :])
        part_down = tl.dot(u_t, gm, input_precision=PRECISION)  # (BR, BN): this row tile's share of up^T Gm
        tl.store(pd_ptr + pid_m * stride_pd_t + offs_r[:, None] * stride_pd_r + offs_n[None, :], part_down,
                 mask=mask_r[:, None] & mask_n[None, :])
        if RESTORE:
            delta = tl.dot(u, d, delta, input_precision=PRECISION)
    if RESTORE:
        out = tl.where(keep, w.to(tl.float32) - scale * delta, 0.0)
        tl.store(w_ptrs, out.to(w.dtype), mask=mask)


# ----------------------------------------------------------------------------------------------- launchers


def _tiles(weight: torch.Tensor, grads: bool = False) -> tuple[int, int, int, int]:
    """(BM, BN, warps, stages): small tiles in the interpreter, bandwidth-sized ones on a GPU (square ones for
    the gradient kernel, whose fp32 partials take 4 r (1/BM + 1/BN) bytes per weight entry)."""
    if INTERPRET:
        return 16, 32, 4, 1
    return (128, 128, 8, 2) if grads else (64, 128, 4, 2)


def _check(weight: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> None:
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
    if weight.dtype not in DTYPES:
        raise ValueError(f"weight dtype {weight.dtype} is not one of {DTYPES}")
    out_f, in_f = weight.shape
    if up.dim() != 2 or up.shape[0] != out_f:
        raise ValueError(f"up must be (out={out_f}, r), got {tuple(up.shape)}")
    if down.dim() != 2 or down.shape != (up.shape[1], in_f):
        raise ValueError(f"down must be (r={up.shape[1]}, in={in_f}), got {tuple(down.shape)}")
    for name, t in (("up", up), ("down", down)):
        if t.device != weight.device:
            raise ValueError(f"{name} is on {t.device} but weight on {weight.device}")
    if weight.device.type != "cuda" and not INTERPRET:
        raise BackendUnavailable(
            f"the masked low-rank kernels cannot run here: {why_triton_cannot_run(weight.device, INTERPRET)} "
            f"(weight is on {weight.device}); use longexposure.ops.masked_low_rank for the torch reference"
        )


def _meta(weight: torch.Tensor) -> dict:
    return {
        "BR": 16,
        "PRECISION": "ieee" if weight.dtype == torch.float32 else "tf32",
        "UPCAST": INTERPRET and weight.dtype != torch.float32,  # the interpreter's low-precision dot is unreliable
    }


def masked_low_rank_add_(weight: torch.Tensor, up: torch.Tensor, down: torch.Tensor, scale: float) -> torch.Tensor:
    """In place: weight <- where(weight != 0, weight + scale * up @ down, 0); returns weight.

    up and down are used in the weight's dtype (cast here; they are small), accumulation is fp32.
    """
    _check(weight, up, down)
    out_f, in_f = weight.shape
    if weight.numel() == 0:
        return weight
    up, down = up.to(weight.dtype), down.to(weight.dtype)
    bm, bn, warps, stages = _tiles(weight)
    grid = (triton.cdiv(out_f, bm), triton.cdiv(in_f, bn))
    _merge_kernel[grid](
        weight, up, down, out_f, in_f, up.shape[1], float(scale),
        weight.stride(0), weight.stride(1), up.stride(0), up.stride(1), down.stride(0), down.stride(1),
        BM=bm, BN=bn, **_meta(weight), num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return weight


def masked_adapter_grads_restore_(
    grad: torch.Tensor,
    weight: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    scale: float,
    restore: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(d_up, d_down) = (s (G o M) down^T, s up^T (G o M)) in fp32, M = [weight != 0]; with `restore`,
    also weight <- where(M, weight - s up @ down, 0) in place (undoing `masked_low_rank_add_`).

    grad: the dense weight gradient G = dY^T X, (out, in), in the weight's dtype (read once).
    """
    _check(weight, up, down)
    if grad.shape != weight.shape or grad.device != weight.device:
        raise ValueError(f"grad must match weight: {tuple(grad.shape)} on {grad.device} vs "
                         f"{tuple(weight.shape)} on {weight.device}")  # fmt: skip
    if grad.dtype != weight.dtype:
        raise ValueError(f"grad dtype {grad.dtype} must be the weight's ({weight.dtype})")
    out_f, in_f = weight.shape
    rank = up.shape[1]
    up_w, down_w = up.to(weight.dtype), down.to(weight.dtype)
    bm, bn, warps, stages = _tiles(weight, grads=True)
    grid = (triton.cdiv(out_f, bm), triton.cdiv(in_f, bn))
    if weight.numel() == 0 or rank == 0:
        z_up = torch.zeros(out_f, rank, device=weight.device, dtype=torch.float32)
        z_down = torch.zeros(rank, in_f, device=weight.device, dtype=torch.float32)
        return z_up, z_down
    part_up = torch.empty(grid[1], out_f, rank, device=weight.device, dtype=torch.float32)
    part_down = torch.empty(grid[0], rank, in_f, device=weight.device, dtype=torch.float32)
    meta = _meta(weight)
    _grad_restore_kernel[grid](
        grad, weight, up_w, down_w, part_up, part_down, out_f, in_f, rank, float(scale),
        grad.stride(0), grad.stride(1), weight.stride(0), weight.stride(1),
        up_w.stride(0), up_w.stride(1), down_w.stride(0), down_w.stride(1),
        part_up.stride(0), part_up.stride(1), part_down.stride(0), part_down.stride(1),
        BM=bm, BN=bn, RESTORE=restore, **meta, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return part_up.sum(0).mul_(scale), part_down.sum(0).mul_(scale)
