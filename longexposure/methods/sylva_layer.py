"""Sylva's fine-tuning layer: sparse trainable weights embedded in the single dense weight (paper Sec. 4.4).

`SylvaLinear` keeps one dense weight W (out, in) (frozen, never given a gradient) and the trainable
sparse weights as a compact `values` parameter (nnz, b, b) holding W's mask blocks. Forward and dX are
plain dense GEMMs on W (eqs. 21-22); dW is computed only for the mask blocks by the block SDDMM (eq. 16)
into `values.grad`, stored compactly.

`SylvaAdamW` is the paper's optimizer step: one fused launch updates every mask block of every layer
(AdamW on fp32 moments) and scatter-adds the update into the dense weights; entries outside the
mask are never written. Any other torch optimizer also works: it updates `values`, and the layer
copies changed values into W's mask blocks before its next forward (detected by the version counter).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from longexposure.ops.backend import check_backend_name, resolve_backend
from longexposure.ops.block_sddmm import (
    block_adamw_reference,
    block_mask_to_dense,
    block_sddmm_reference,
    blocks_to_dense,
    dense_to_blocks,
)


class _EmbeddedSparseLinearTorch(torch.autograd.Function):
    """Reference twin of `kernels.block_sddmm.EmbeddedSparseLinearFunction` (dense dW, then gathered)."""

    @staticmethod
    def forward(ctx, x, weight, values, rows, cols, block):  # noqa: D102
        ctx.block, ctx.x_dtype, ctx.values_dtype = block, x.dtype, values.dtype
        x = x.to(weight.dtype)
        ctx.save_for_backward(x, weight, rows, cols)
        return x @ weight.t()

    @staticmethod
    def backward(ctx, dy):  # noqa: D102
        x, weight, rows, cols = ctx.saved_tensors
        dy = dy.to(weight.dtype)
        dx = (dy @ weight).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        dv = None
        if ctx.needs_input_grad[2]:
            dv = block_sddmm_reference(
                dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1]), rows, cols, ctx.block
            ).to(ctx.values_dtype)
        return dx, None, dv, None, None, None


class SylvaLinear(nn.Module):
    """A linear layer whose mask blocks train while embedded in the frozen dense weight.

    Args:
        weight: (out, in) dense weight (nn.Linear layout).
        bias: (out,) or None; frozen.
        mask: (ceil(out/b), ceil(in/b)) bool block mask of trainable blocks.
        block: block size b (16, 32, 64 or 128 for the Triton kernel).
        values_dtype: dtype of the trainable compact copy (e.g. fp32 master weights); default W's.
        backend: `auto`, `triton` or `torch` (see `resolve_backend`).
        source: `linear` or `conv1d` (GPT-2), restored by `unload_`.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        mask: torch.Tensor,
        block: int,
        *,
        values_dtype: torch.dtype | None = None,
        backend: str = "auto",
        source: str = "linear",
    ):
        super().__init__()
        out_f, in_f = weight.shape
        expect = (math.ceil(out_f / block), math.ceil(in_f / block))
        if tuple(mask.shape) != expect:
            raise ValueError(
                f"mask shape {tuple(mask.shape)} does not fit weight {tuple(weight.shape)} at block "
                f"{block}: expected {expect}"
            )
        check_backend_name(backend, "Sylva")
        self.in_features, self.out_features, self.block = in_f, out_f, block
        self.backend, self.source, self.backend_ran = backend, source, None
        self.weight = nn.Parameter(weight.detach().contiguous(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        rows, cols = mask.to(weight.device).nonzero(as_tuple=True)
        self.register_buffer("block_rows", rows.to(torch.int32).contiguous())
        self.register_buffer("block_cols", cols.to(torch.int32).contiguous())
        values = dense_to_blocks(self.weight.data, self.block_rows, self.block_cols, block)
        self.values = nn.Parameter(values.to(values_dtype or weight.dtype))
        self._synced_version = self.values._version

    @property
    def nnz_blocks(self) -> int:
        return self.block_rows.numel()

    def block_mask(self) -> torch.Tensor:
        m = torch.zeros(
            math.ceil(self.out_features / self.block),
            math.ceil(self.in_features / self.block),
            dtype=torch.bool,
            device=self.block_rows.device,
        )
        m[self.block_rows.long(), self.block_cols.long()] = True
        return m

    def trainable_mask(self) -> torch.Tensor:
        """Element mask (out, in) of the entries that train."""
        return block_mask_to_dense(self.block_mask(), (self.out_features, self.in_features), self.block)

    @torch.no_grad()
    def sync_(self) -> None:
        """Copy `values` into W's mask blocks (needed only after a generic optimizer changed `values`)."""
        w = self.weight
        dense = blocks_to_dense(self.values.to(w.dtype), self.block_rows, self.block_cols, tuple(w.shape), self.block)
        w.copy_(torch.where(self.trainable_mask(), dense, w))
        self._synced_version = self.values._version

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.values._version != self._synced_version:
            self.sync_()
        self.backend_ran = resolve_backend(self.backend, self.weight.device, "Sylva")
        if self.backend_ran == "triton":
            from longexposure.kernels.block_sddmm import EmbeddedSparseLinearFunction as Fn
        else:
            Fn = _EmbeddedSparseLinearTorch
        y = Fn.apply(x, self.weight, self.values, self.block_rows, self.block_cols, self.block)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        total = math.ceil(self.out_features / self.block) * math.ceil(self.in_features / self.block)
        return (
            f"in={self.in_features}, out={self.out_features}, block={self.block}, "
            f"blocks={self.nnz_blocks}/{total}, backend={self.backend}"
        )


def sylva_layers(model: nn.Module) -> list[SylvaLinear]:
    return [m for m in model.modules() if isinstance(m, SylvaLinear)]


class SylvaAdamW(torch.optim.Optimizer):
    """AdamW (or SGD with `adam=False`) over Sylva layers' compact weights, fused into one launch.

    Moments are fp32 compact tensors (nnz_total, b, b). Each step launches one kernel per group of
    layers sharing (block, dtypes, device) — one in practice — that updates every mask block of every
    layer and writes it into the dense weights. `backend="torch"` runs the reference per layer.
    """

    def __init__(
        self,
        layers: Iterable[SylvaLinear],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        adam: bool = True,
        backend: str = "auto",
    ):
        self.layers = list(layers)
        if not self.layers:
            raise ValueError("SylvaAdamW needs at least one SylvaLinear layer")
        super().__init__([m.values for m in self.layers], dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.adam, self.backend, self.step_count = adam, backend, 0
        groups: dict[tuple, list[SylvaLinear]] = {}
        for m in self.layers:
            key = (m.block, m.weight.dtype, m.values.dtype, m.weight.device)
            groups.setdefault(key, []).append(m)
        self._groups = []
        for (block, _, _, device), mods in groups.items():
            from longexposure.kernels.block_sddmm import make_block_update_plan

            plan = make_block_update_plan(
                [tuple(m.weight.shape) for m in mods], [m.block_rows for m in mods], [m.block_cols for m in mods], block
            )
            moments = [torch.zeros(plan.nnz, block, block, device=device) for _ in range(2 if adam else 0)]
            self._groups.append((mods, plan, moments))
        self.backend_ran = resolve_backend(backend, self.layers[0].weight.device, "Sylva")

    def zero_grad(self, set_to_none: bool = False) -> None:
        """Zeroes the gradients in place by default: they then keep their addresses, so the fused
        launch's pointer table is built once instead of copied to the device every step."""
        super().zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102
        loss = closure() if closure is not None else None
        self.step_count += 1
        hp = self.param_groups[0]
        beta1, beta2 = hp["betas"]
        for mods, plan, moments in self._groups:
            grads = [m.values.grad if m.values.grad is not None else torch.zeros_like(m.values) for m in mods]
            m1, m2 = moments if self.adam else (torch.empty(0), torch.empty(0))
            kw = dict(
                lr=hp["lr"],
                beta1=beta1,
                beta2=beta2,
                eps=hp["eps"],
                weight_decay=hp["weight_decay"],
                step=self.step_count,
            )
            if self.backend_ran == "triton":
                from longexposure.kernels.block_sddmm import block_update_

                if not self.adam:
                    m1 = m2 = torch.zeros(plan.nnz, plan.block, plan.block, device=plan.layer.device)
                block_update_(
                    plan, [m.weight for m in mods], [m.values for m in mods], grads, m1, m2, adam=self.adam, **kw
                )
            else:
                start = 0
                for m, g in zip(mods, grads, strict=True):
                    n = m.nnz_blocks
                    s1 = m1[start : start + n] if self.adam else torch.zeros_like(g, dtype=torch.float32)
                    s2 = m2[start : start + n] if self.adam else torch.zeros_like(g, dtype=torch.float32)
                    # The reference writes through .copy_ (bumping versions); keep the layers in sync.
                    block_adamw_reference(
                        m.weight.data,
                        m.values.data,
                        g,
                        s1,
                        s2,
                        m.block_rows,
                        m.block_cols,
                        m.block,
                        adam=self.adam,
                        **kw,
                    )
                    start += n
            for m in mods:
                m._synced_version = m.values._version
        return loss
