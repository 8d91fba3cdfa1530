"""Sylva's block-sparse weight gradient (SDDMM) and its fused scatter-add optimizer step.

The trainable sparse weights live *inside* the dense weight W (out, in); a block mask of `nnz` blocks
of `BLOCK x BLOCK` (block coordinates `rows`, `cols`, row-major) says which entries train.

  - `_sddmm_kernel`: dW blocks = (dY^T X) restricted to the mask blocks, stored compactly as
    (nnz, BLOCK, BLOCK). One program per (block, token split); each streams the BLOCK columns of dY
    and of X it needs over the tokens and accumulates in fp32. With SPLIT > 1 the token range is cut
    into SPLIT chunks that add into an fp32 buffer atomically (more programs when nnz is small).
  - `_block_update_kernel`: one launch for every mask block of every layer: AdamW (or SGD) on the
    compact gradient and fp32 moments, then the update is scatter-added into the dense weights (and
    the compact copy). Layers are reached through address tables (int64 data pointers), so one
    launch serves any number of weight tensors; entries outside the mask blocks are never written.

Then the launchers (validation naming the argument, allocation, grids) and
`EmbeddedSparseLinearFunction` (forward and dX are plain dense GEMMs; dW goes through the SDDMM).
The pure-torch reference is `longexposure.ops.block_sddmm`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from longexposure.backends import BackendUnavailable, interpreting, why_triton_cannot_run

INTERPRET = interpreting()
BLOCK_SIZES = (16, 32, 64, 128)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@triton.jit
def _sddmm_kernel(
    dy_ptr,  # (T, N) output gradient
    x_ptr,  # (T, K) layer input
    out_ptr,  # (nnz, BLOCK, BLOCK) compact weight-gradient blocks (fp32 when SPLIT > 1)
    rows_ptr,  # (nnz,) int32 block row of each mask block
    cols_ptr,  # (nnz,) int32 block column of each mask block
    T,
    N,
    K,
    T_PER_SPLIT,
    stride_dt,
    stride_dn,
    stride_xt,
    stride_xk,
    BLOCK: tl.constexpr,
    BT: tl.constexpr,
    SPLIT: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,  # the interpreter's bf16 dot is wrong (triton 3.9); exact bf16 -> fp32 is the same math
):
    i = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1)
    r = tl.load(rows_ptr + i).to(tl.int64)
    c = tl.load(cols_ptr + i).to(tl.int64)
    offs_b = tl.arange(0, BLOCK)
    offs_n = r * BLOCK + offs_b
    offs_k = c * BLOCK + offs_b
    mask_n = offs_n < N
    mask_k = offs_k < K
    t_start = s * T_PER_SPLIT
    t_end = tl.minimum(T, t_start + T_PER_SPLIT)
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for t in range(t_start, t_end, BT):
        offs_t = (t + tl.arange(0, BT)).to(tl.int64)
        mask_t = offs_t < t_end
        dy = tl.load(
            dy_ptr + offs_t[:, None] * stride_dt + offs_n[None, :] * stride_dn,
            mask=mask_t[:, None] & mask_n[None, :],
            other=0.0,
        )
        x = tl.load(
            x_ptr + offs_t[:, None] * stride_xt + offs_k[None, :] * stride_xk,
            mask=mask_t[:, None] & mask_k[None, :],
            other=0.0,
        )
        if UPCAST:
            dy, x = dy.to(tl.float32), x.to(tl.float32)
        acc = tl.dot(tl.trans(dy), x, acc, input_precision=PRECISION)
    out = out_ptr + i * BLOCK * BLOCK + offs_b[:, None] * BLOCK + offs_b[None, :]
    if SPLIT == 1:
        tl.store(out, acc.to(out_ptr.dtype.element_ty))
    else:
        tl.atomic_add(out, acc)


@triton.jit
def _block_update_kernel(
    layer_ptr,  # (nnz_total,) int32 layer of each block
    row_ptr,  # (nnz_total,) int32 block row within its layer
    col_ptr,  # (nnz_total,) int32 block column within its layer
    local_ptr,  # (nnz_total,) int32 index of the block in its layer's compact tensors
    w_tab,  # (L,) int64 address of each layer's dense weight (out, in), contiguous
    v_tab,  # (L,) int64 address of each layer's compact values (nnz_l, BLOCK, BLOCK)
    g_tab,  # (L,) int64 address of each layer's compact gradient (nnz_l, BLOCK, BLOCK)
    nrow_tab,  # (L,) int32 out features
    ncol_tab,  # (L,) int32 in features (the dense row stride)
    m_ptr,  # (nnz_total, BLOCK, BLOCK) fp32 first moment
    v2_ptr,  # (nnz_total, BLOCK, BLOCK) fp32 second moment
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    bias_c1,
    bias_c2,
    W_DTYPE: tl.constexpr,
    V_DTYPE: tl.constexpr,
    G_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
    ADAM: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    layer = tl.load(layer_ptr + i)
    r = tl.load(row_ptr + i).to(tl.int64)
    c = tl.load(col_ptr + i).to(tl.int64)
    j = tl.load(local_ptr + i).to(tl.int64)
    w_base = tl.load(w_tab + layer).to(tl.pointer_type(W_DTYPE))
    v_base = tl.load(v_tab + layer).to(tl.pointer_type(V_DTYPE))
    g_base = tl.load(g_tab + layer).to(tl.pointer_type(G_DTYPE))
    n_rows = tl.load(nrow_tab + layer).to(tl.int64)
    n_cols = tl.load(ncol_tab + layer).to(tl.int64)

    offs_b = tl.arange(0, BLOCK)
    tile = offs_b[:, None] * BLOCK + offs_b[None, :]
    rows = r * BLOCK + offs_b
    cols = c * BLOCK + offs_b
    inside = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)

    g = tl.load(g_base + j * BLOCK * BLOCK + tile).to(tl.float32)
    val = tl.load(v_base + j * BLOCK * BLOCK + tile).to(tl.float32)
    if ADAM:
        m = tl.load(m_ptr + i * BLOCK * BLOCK + tile)
        v2 = tl.load(v2_ptr + i * BLOCK * BLOCK + tile)
        m = beta1 * m + (1.0 - beta1) * g
        v2 = beta2 * v2 + (1.0 - beta2) * g * g
        tl.store(m_ptr + i * BLOCK * BLOCK + tile, m)
        tl.store(v2_ptr + i * BLOCK * BLOCK + tile, v2)
        upd = -lr * (m / bias_c1) / (tl.sqrt(v2 / bias_c2) + eps) - lr * weight_decay * val
    else:
        upd = -lr * g
    new = tl.where(inside, val + upd, 0.0)
    tl.store(v_base + j * BLOCK * BLOCK + tile, new.to(V_DTYPE))
    tl.store(w_base + rows[:, None] * n_cols + cols[None, :], new.to(W_DTYPE), mask=inside)


# ----------------------------------------------------------------------------------------------- launchers


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def _check_block(block: int) -> None:
    if block not in BLOCK_SIZES:
        raise ValueError(f"block must be one of {BLOCK_SIZES} (tl.dot needs >= 16), got {block}")


def _check_index(name: str, t: torch.Tensor, n: int | None, device: torch.device) -> None:
    if t.dtype != torch.int32 or t.dim() != 1 or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous 1-D int32 tensor, got {t.dtype} of shape {tuple(t.shape)}")
    if n is not None and t.numel() != n:
        raise ValueError(f"{name} has {t.numel()} entries, expected {n}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")


def _runnable(device: torch.device) -> None:
    if device.type != "cuda" and not INTERPRET:
        raise BackendUnavailable(
            f"the Triton block-sparse kernels cannot run here: {why_triton_cannot_run(device, INTERPRET)} "
            f"(got {device}); use backend='torch' for the pure-torch reference"
        )


def block_sddmm(
    dy: torch.Tensor,
    x: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    block: int,
    *,
    split: int | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Compact weight-gradient blocks `(dy^T x)[mask blocks]` as (nnz, block, block).

    Args:
        dy: (tokens, out) output gradient.
        x: (tokens, in) input, same dtype and device as dy.
        rows, cols: (nnz,) int32 block coordinates.
        split: token splits per block (None: enough programs to fill the GPU).
        out_dtype: dtype of the result (default dy's); accumulation is fp32 regardless.
    """
    if dy.dim() != 2 or x.dim() != 2:
        raise ValueError(f"dy and x must be 2-D (tokens, features), got {tuple(dy.shape)} and {tuple(x.shape)}")
    if dy.shape[0] != x.shape[0]:
        raise ValueError(f"dy has {dy.shape[0]} tokens but x has {x.shape[0]}")
    if dy.dtype not in DTYPES or x.dtype != dy.dtype:
        raise ValueError(f"dy and x must share a dtype in {DTYPES}, got {dy.dtype} and {x.dtype}")
    if x.device != dy.device:
        raise ValueError(f"x is on {x.device} but dy on {dy.device}")
    _check_block(block)
    _check_index("rows", rows, None, dy.device)
    _check_index("cols", cols, rows.numel(), dy.device)
    _runnable(dy.device)
    nnz = rows.numel()
    T, N = dy.shape
    K = x.shape[1]
    out_dtype = out_dtype or dy.dtype
    if nnz == 0 or T == 0:
        return torch.zeros(nnz, block, block, device=dy.device, dtype=out_dtype)
    bt = 16 if INTERPRET else (32 if block >= 128 else 64)
    if split is None:
        split = 1 if INTERPRET else max(1, min(math.ceil(2 * _sm_count(dy.device) / nnz), T // (4 * bt)))
    split = max(1, min(split, math.ceil(T / bt)))
    t_per = math.ceil(math.ceil(T / split) / bt) * bt
    split = math.ceil(T / t_per)
    out = (
        torch.empty(nnz, block, block, device=dy.device, dtype=out_dtype)
        if split == 1
        else torch.zeros(nnz, block, block, device=dy.device, dtype=torch.float32)
    )
    precision = "ieee" if dy.dtype == torch.float32 else "tf32"
    _sddmm_kernel[(nnz, split)](
        dy, x, out, rows, cols, T, N, K, t_per,
        dy.stride(0), dy.stride(1), x.stride(0), x.stride(1),
        BLOCK=block, BT=bt, SPLIT=split, PRECISION=precision, UPCAST=INTERPRET and dy.dtype == torch.bfloat16,
        num_warps=8 if block >= 128 else 4, num_stages=3,
    )  # fmt: skip
    return out if out.dtype == out_dtype else out.to(out_dtype)


@dataclass
class BlockUpdatePlan:
    """Per-block metadata of a set of layers, built once (device int32 arrays and shape tables).

    `blocks_per_layer` is the host copy of each layer's block count, so a step validates shapes
    without reading the device; `_tables` caches the device pointer tables of the layers' tensors.
    """

    block: int
    layer: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    local: torch.Tensor
    n_rows: torch.Tensor
    n_cols: torch.Tensor
    nnz: int
    blocks_per_layer: tuple[int, ...] = ()
    _tables: dict[tuple[int, ...], torch.Tensor] = field(default_factory=dict, repr=False, compare=False)

    def pointer_table(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """The tensors' addresses as a device int64 table, with no host sync on the step's path.

        Keyed by the addresses themselves (so a hit is always right); weights and compact values never
        move, and the allocator hands gradients the same addresses step after step. A miss copies
        from pinned memory without blocking.
        """
        key = tuple(t.data_ptr() for t in tensors)
        table = self._tables.get(key)
        if table is None:
            if len(self._tables) >= 32:  # addresses that keep changing: do not grow without bound
                self._tables.clear()
            host = torch.tensor(key, dtype=torch.int64)
            device = self.layer.device
            pinned = device.type == "cuda"
            table = (host.pin_memory() if pinned else host).to(device, non_blocking=pinned)
            self._tables[key] = table
        return table


def make_block_update_plan(
    shapes: list[tuple[int, int]], rows: list[torch.Tensor], cols: list[torch.Tensor], block: int
) -> BlockUpdatePlan:
    """Concatenate the block lists of several layers (weight shapes `shapes`) into one launch plan."""
    _check_block(block)
    if not (len(shapes) == len(rows) == len(cols)) or not shapes:
        raise ValueError(
            f"shapes, rows and cols must be non-empty and of one length, got {len(shapes)}, {len(rows)}, {len(cols)}"
        )
    device = rows[0].device
    layer = torch.cat([torch.full((r.numel(),), i, dtype=torch.int32, device=device) for i, r in enumerate(rows)])
    local = torch.cat([torch.arange(r.numel(), dtype=torch.int32, device=device) for r in rows])
    row = torch.cat([r.to(torch.int32) for r in rows])
    col = torch.cat([c.to(torch.int32) for c in cols])
    n_rows = torch.tensor([s[0] for s in shapes], dtype=torch.int32, device=device)
    n_cols = torch.tensor([s[1] for s in shapes], dtype=torch.int32, device=device)
    counts = tuple(int(r.numel()) for r in rows)
    return BlockUpdatePlan(block, layer, row, col, local, n_rows, n_cols, sum(counts), counts)


def block_update_(
    plan: BlockUpdatePlan,
    weights: list[torch.Tensor],
    values: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    step: int = 1,
    adam: bool = True,
) -> None:
    """One fused AdamW/SGD step over every mask block of every layer in `plan` (a single launch).

    `values[l]`/`grads[l]` are layer l's compact (nnz_l, b, b) trainable weights and their gradient;
    `exp_avg`/`exp_avg_sq` are fp32 (nnz_total, b, b). Mask blocks of `weights[l]` receive the new
    values; every other entry of the dense weights is left untouched.
    """
    n = plan.n_rows.numel()
    if not (len(weights) == len(values) == len(grads) == n):
        raise ValueError(
            f"weights, values and grads must each list {n} layers, got {len(weights)}, {len(values)}, {len(grads)}"
        )
    b = plan.block
    device = plan.layer.device
    _runnable(device)
    for name, ts in (("weights", weights), ("values", values), ("grads", grads)):
        if len({t.dtype for t in ts}) != 1 or ts[0].dtype not in DTYPES:
            raise ValueError(f"{name} must share one dtype in {DTYPES}, got {sorted({str(t.dtype) for t in ts})}")
        for t in ts:
            if t.device != device or not t.is_contiguous():
                raise ValueError(f"{name} must be contiguous tensors on {device}, got one on {t.device}")
    for w, v, g, rows_l in zip(weights, values, grads, plan.blocks_per_layer, strict=True):
        if v.shape != (rows_l, b, b) or g.shape != v.shape:
            raise ValueError(
                f"values and grads of a layer must be ({rows_l}, {b}, {b}), got {tuple(v.shape)} and {tuple(g.shape)}"
            )
        if w.dim() != 2:
            raise ValueError(f"weights must be 2-D (out, in), got {tuple(w.shape)}")
    for name, t in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if t.dtype != torch.float32 or t.shape != (plan.nnz, b, b) or t.device != device:
            raise ValueError(
                f"{name} must be fp32 ({plan.nnz}, {b}, {b}) on {device}, got {t.dtype} {tuple(t.shape)} on {t.device}"
            )
    if plan.nnz == 0:
        return
    _block_update_kernel[(plan.nnz,)](
        plan.layer, plan.row, plan.col, plan.local,
        plan.pointer_table(weights), plan.pointer_table(values), plan.pointer_table(grads), plan.n_rows, plan.n_cols,
        exp_avg, exp_avg_sq,
        float(lr), float(beta1), float(beta2), float(eps), float(weight_decay),
        float(1 - beta1**step), float(1 - beta2**step),
        W_DTYPE=_TL[weights[0].dtype], V_DTYPE=_TL[values[0].dtype], G_DTYPE=_TL[grads[0].dtype],
        BLOCK=b, ADAM=adam, num_warps=8 if b >= 128 else 4,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------- autograd


class EmbeddedSparseLinearFunction(torch.autograd.Function):
    """y = x W^T where the trainable entries of W are the mask blocks, held compactly in `values`.

    `values` is the autograd leaf of the sparse trainable weights; its content already sits in W
    (embedded), so the forward is one dense GEMM. Backward: dX = dY W (dense GEMM) and
    d(values) = block SDDMM of dY^T X over the mask blocks. W itself receives no gradient.
    """

    @staticmethod
    def forward(ctx, x, weight, values, rows, cols, block):  # noqa: D102
        ctx.block = block
        ctx.x_dtype = x.dtype
        x = x.to(weight.dtype)
        ctx.save_for_backward(x, weight, rows, cols)
        ctx.values_dtype = values.dtype
        return x @ weight.t()

    @staticmethod
    def backward(ctx, dy):  # noqa: D102
        x, weight, rows, cols = ctx.saved_tensors
        dy = dy.to(weight.dtype)
        dx = (dy @ weight).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        dvalues = None
        if ctx.needs_input_grad[2]:
            dvalues = block_sddmm(
                dy.reshape(-1, dy.shape[-1]),
                x.reshape(-1, x.shape[-1]),
                rows,
                cols,
                ctx.block,
                out_dtype=ctx.values_dtype,
            )
        return dx, None, dvalues, None, None, None
