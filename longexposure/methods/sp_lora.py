"""SP-LoRA (sparsity-preserved LoRA) and SPP as PEFT methods for pruned models.

For a pruned weight W~ (out, in) with mask M = [W~ != 0], SP-LoRA trains
    W~(t) = W~ + M o (s * up @ down),    up: (out, r) zero-initialised, down: (r, in)
(paper eq. 1; the paper's A is `up`, its B is `down`, s = alpha / r). Variants (paper Sec. 4.2, App. B):

  - `sp-lora`: the memory-optimised autograd function (Alg. 1-2). Forward merges the adapter into
    W~'s own storage in place (`addmm_` then `mul_(M)`) and keeps only X for backward; backward
    recomputes M from the merged weight, computes dX, dW = (dY^T X) o M, d(up), d(down), and
    restores W~ in place (`addmm_(-up, down).mul_(M)`). Only one layer's merged weight exists at a time.
  - `sp-lora-gc`: the merged weight recomputed under gradient checkpointing (Listing 4).
  - `sp-lora-no`: plain autograd (Listing 3): every layer's merged weight and mask stay alive.
  - `spp-no` / `spp-gc`: SPP (Lu et al., 2024) as the appendix implements it (Listings 1-2):
    y = x W~^T + x (W~ o repeat_interleave(A, in/r, dim=1) o repeat_interleave(B, out, dim=0))^T
    with A: (out, r), B: (1, in) — zero entries of W~ stay zero by construction.

`sp-lora`'s in-place restore is exact up to the weight dtype's rounding of (W + d) - d, as in the
paper; pruned entries are exactly zero at every step and after `merge_` (multiplied by M).
Pruning front-ends (`prune=`, `sparsity=`) are in `methods.pruning`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from longexposure.methods.builtin import freeze
from longexposure.methods.pruning import PRUNERS, is_conv1d, linear_targets, parse_sparsity, prune_, weight_view
from longexposure.ops.backend import check_backend_name, resolve_backend
from longexposure.ops.masked_low_rank import (
    masked_adapter_grads_restore_reference_,
    masked_low_rank_add_reference_,
)
from longexposure.registry import PEFT_METHODS

VARIANTS = ("sp-lora", "sp-lora-gc", "sp-lora-no", "spp-gc", "spp-no")


def _merge_ops(backend: str):
    """(merge_, grads_restore_) of the backend: fused Triton kernels or the torch lines of Alg. 1-2."""
    if backend == "triton":
        from longexposure.kernels.masked_low_rank import masked_adapter_grads_restore_, masked_low_rank_add_

        return masked_low_rank_add_, masked_adapter_grads_restore_
    return masked_low_rank_add_reference_, masked_adapter_grads_restore_reference_


class SparseLoRAFunction(torch.autograd.Function):
    """Memory-optimised SP-LoRA (Alg. 1-2): merge in place in forward, recompute M and restore in backward.

    `weight` is modified in place between forward and backward; the owning module marks itself
    merged so a second forward before backward is refused instead of merging twice. The weight-sized
    passes (merge; mask, adapter gradients, restore) go through `owner.backend_ran`'s implementation.
    """

    @staticmethod
    def forward(ctx, x, weight, up, down, scaling, owner):  # noqa: D102
        merge_, _ = _merge_ops(owner.backend_ran)
        merge_(weight, up, down, scaling)  # Alg. 1 lines 1-2
        ctx.scaling, ctx.owner, ctx.x_dtype = scaling, owner, x.dtype
        ctx.weight = weight  # not save_for_backward: it is restored in place in backward
        x = x.to(weight.dtype)
        ctx.save_for_backward(x, up, down)  # line 3
        return F.linear(x, weight)  # line 4

    @staticmethod
    def backward(ctx, dy):  # noqa: D102
        x, up, down = ctx.saved_tensors
        weight, s = ctx.weight, ctx.scaling
        _, grads_restore_ = _merge_ops(ctx.owner.backend_ran)
        dy = dy.to(weight.dtype)
        dx = (dy @ weight).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None  # Alg. 2 line 2
        x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
        dw = dy2.t() @ x2  # line 3 (the mask is applied inside grads_restore_, from the merged weight: line 1)
        d_up, d_down = grads_restore_(dw, weight, up, down, s, restore=True)  # lines 3-6
        del dw
        ctx.owner.merged = False
        return dx, None, d_up.to(up.dtype), d_down.to(down.dtype), None, None


def _sp_lora_weight(weight: torch.Tensor, up: torch.Tensor, down: torch.Tensor, scaling: float) -> torch.Tensor:
    mask = weight != 0
    return weight + mask * (up.to(weight.dtype) @ down.to(weight.dtype)) * scaling


def _spp_adapter_weight(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """W o repeat_interleave(A, in/r, dim=1) o repeat_interleave(B, out, dim=0) (App. B, Listing 1)."""
    n, m = weight.shape
    r = a.shape[1]
    if m % r == 0:
        a_rep = torch.repeat_interleave(a.to(weight.dtype), m // r, dim=1)
    else:  # column j uses A[:, floor(j r / m)], the same grouping when r does not divide in
        a_rep = a.to(weight.dtype)[:, (torch.arange(m, device=a.device) * r) // m]
    b_rep = torch.repeat_interleave(b.to(weight.dtype), n, dim=0)
    return weight * a_rep * b_rep


class SparseLoRALinear(nn.Module):
    """A pruned linear layer (nn.Linear layout) with an SP-LoRA or SPP adapter.

    Args:
        weight: (out, in) pruned weight W~ (zeros are the pruned entries); frozen.
        bias: (out,) or None; frozen.
        variant: one of `VARIANTS`.
        rank: r; alpha: LoRA scale numerator (s = alpha / r, SP-LoRA only).
        backend: `sp-lora`'s weight-sized passes: `triton` (fused kernels), `torch` (Alg. 1-2 as torch
            ops) or `auto` (triton where it runs and supports the weight's dtype; `backend_ran` says which).
    """

    def __init__(
        self,
        weight,
        bias,
        variant: str,
        rank: int = 16,
        alpha: float = 32.0,
        source: str = "linear",
        backend: str = "auto",
    ):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown SP-LoRA variant {variant!r}; valid: {VARIANTS}")
        check_backend_name(backend, "SP-LoRA")
        self.backend, self.backend_ran = backend, None
        out_f, in_f = weight.shape
        self.in_features, self.out_features = in_f, out_f
        self.variant, self.rank, self.source, self.merged = variant, rank, source, False
        self.weight = nn.Parameter(weight.detach().contiguous(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        dev, dt = weight.device, weight.dtype
        if variant.startswith("sp-lora"):
            self.scaling = alpha / rank
            self.lora_down = nn.Parameter(torch.empty(rank, in_f, device=dev, dtype=dt))
            nn.init.kaiming_uniform_(self.lora_down, a=math.sqrt(5))
            self.lora_up = nn.Parameter(torch.zeros(out_f, rank, device=dev, dtype=dt))
        else:
            self.spp_a = nn.Parameter(torch.empty(out_f, rank, device=dev, dtype=dt))
            nn.init.kaiming_uniform_(self.spp_a, a=math.sqrt(5))
            self.spp_b = nn.Parameter(torch.zeros(1, in_f, device=dev, dtype=dt))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.variant
        w = self.weight
        if v == "sp-lora":
            training = torch.is_grad_enabled() and (self.lora_up.requires_grad or self.lora_down.requires_grad)
            if not training:
                y = F.linear(x.to(w.dtype), _sp_lora_weight(w, self.lora_up, self.lora_down, self.scaling))
            else:
                if self.merged:
                    raise RuntimeError(
                        "sp-lora: forward called again before backward; the in-place merged weight would be merged "
                        "twice (run backward after each training forward, or call restore_() after a failed step)"
                    )
                self.merged = True
                self.backend_ran = self._resolve_backend()
                y = SparseLoRAFunction.apply(x, w, self.lora_up, self.lora_down, self.scaling, self)
        elif v == "sp-lora-no":
            y = F.linear(x.to(w.dtype), _sp_lora_weight(w, self.lora_up, self.lora_down, self.scaling))
        elif v == "sp-lora-gc":
            w_new = checkpoint(_sp_lora_weight, w, self.lora_up, self.lora_down, self.scaling, use_reentrant=False)
            y = F.linear(x.to(w.dtype), w_new)
        else:
            x = x.to(w.dtype)
            y1 = F.linear(x, w)
            if v == "spp-no":
                y2 = F.linear(x, _spp_adapter_weight(w, self.spp_a, self.spp_b))
            else:
                y2 = checkpoint(
                    lambda x_, w_, a_, b_: F.linear(x_, _spp_adapter_weight(w_, a_, b_)),
                    x,
                    w,
                    self.spp_a,
                    self.spp_b,
                    use_reentrant=False,
                )
            y = y1 + y2
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _resolve_backend(self) -> str:
        from longexposure.kernels.masked_low_rank import DTYPES

        ran = resolve_backend(self.backend, self.weight.device, "SP-LoRA")
        if ran == "triton" and self.weight.dtype not in DTYPES:
            if self.backend == "triton":
                raise ValueError(f"SP-LoRA backend 'triton' supports weights in {DTYPES}, not {self.weight.dtype}")
            ran = "torch"
        return ran

    @torch.no_grad()
    def restore_(self) -> None:
        """Undo an in-place merge whose backward never ran (sp-lora only)."""
        if self.merged:
            merge_, _ = _merge_ops(self.backend_ran)
            merge_(self.weight, self.lora_up, self.lora_down, -self.scaling)
            self.merged = False

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """The fine-tuned weight: W~ + M o (s up down) (SP-LoRA) or W~ o (1 + A_rep B_rep) (SPP)."""
        self.restore_()
        if self.variant.startswith("sp-lora"):
            return _sp_lora_weight(self.weight, self.lora_up, self.lora_down, self.scaling)
        return self.weight + _spp_adapter_weight(self.weight, self.spp_a, self.spp_b)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, variant={self.variant}, r={self.rank}"


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


@torch.no_grad()
def merge_(model: nn.Module) -> nn.Module:
    """Merge every adapter into its weight and put plain nn.Linear / Conv1D layers back."""
    for name, m in list(model.named_modules()):
        if not isinstance(m, SparseLoRALinear):
            continue
        w = m.merged_weight()
        if m.source == "conv1d":
            from transformers.pytorch_utils import Conv1D

            new = Conv1D(m.out_features, m.in_features).to(w.device, w.dtype)
            new.weight.copy_(w.t())
        else:
            new = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device=w.device, dtype=w.dtype)
            new.weight.copy_(w)
        if m.bias is not None:
            new.bias.copy_(m.bias)
        _set_module(model, name, new)
    return model


def _calibration(model: nn.Module, samples: int, seq_len: int, seed: int):
    """`samples` synthetic calibration sequences (batches of one) for Wanda, and their description."""
    from longexposure.data import model_batches

    batches = model_batches(model, batch=1, seq_len=seq_len, seed=seed)
    return [next(batches) for _ in range(samples)], batches.description


@dataclass(frozen=True)
class SpLoraConfig:
    """SP-LoRA's and SPP's options (every variant takes the same; the registry name picks the variant)."""

    rank: int = field(default=16, metadata={"help": "r: adapter rank"})
    alpha: float = field(default=32.0, metadata={"help": "LoRA scale numerator: s = alpha / r (SP-LoRA only)"})
    prune: str | None = field(default=None, metadata={"help": f"prune first with one of {PRUNERS} (None: as is)"})
    sparsity: float | str = field(default="2:4", metadata={"help": "what `prune` removes: a ratio in [0, 1) or 'N:M'"})
    calibration_samples: int = field(default=4, metadata={"help": "wanda: synthetic calibration sequences"})
    calibration_seq_len: int = field(default=128, metadata={"help": "wanda: tokens per calibration sequence"})
    seed: int = field(default=0, metadata={"help": "seeds the calibration sequences"})
    backend: str = field(default="auto", metadata={"help": "sp-lora's weight-sized passes: auto, triton or torch"})

    def __post_init__(self) -> None:
        if self.prune is not None and self.prune not in PRUNERS:
            raise ValueError(f"unknown pruning method {self.prune!r}; valid: {PRUNERS} (or None)")
        parse_sparsity(self.sparsity)
        check_backend_name(self.backend, "SP-LoRA")
        if min(self.rank, self.calibration_samples, self.calibration_seq_len) < 1:
            raise ValueError(f"rank, calibration_samples and calibration_seq_len must be >= 1: {self}")


def apply_sp_lora(
    model: nn.Module, variant: str, config: SpLoraConfig | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """Prune (optional) then wrap every block linear projection with a `variant` adapter; only adapters train.

    `config.backend` picks `sp-lora`'s fused Triton kernels or the torch reference (see `SparseLoRALinear`).
    """
    c = config or SpLoraConfig()
    info: dict[str, Any] = {"variant": variant, "rank": c.rank, "backend": c.backend}
    if c.prune is not None:
        calib = None
        if c.prune == "wanda":
            calib, desc = _calibration(model, c.calibration_samples, c.calibration_seq_len, c.seed)
            info["calibration"] = desc
        info.update(prune_(model, c.prune, c.sparsity, calib))
    freeze(model)
    for name, m in linear_targets(model):
        w = weight_view(m).detach()
        w = w.contiguous() if not is_conv1d(m) else w.clone(memory_format=torch.contiguous_format)
        bias = m.bias.detach() if m.bias is not None else None
        source = "conv1d" if is_conv1d(m) else "linear"
        _set_module(model, name, SparseLoRALinear(w, bias, variant, c.rank, c.alpha, source, c.backend))
    return model, info


def _register(variant: str, help_text: str) -> None:
    def method(model: nn.Module, config: SpLoraConfig | None = None) -> tuple[nn.Module, dict[str, Any]]:
        return apply_sp_lora(model, variant, config)

    method.__name__ = variant.replace("-", "_")
    method.__doc__ = f"{help_text}. Options: `SpLoraConfig`."
    PEFT_METHODS.register(variant, method, help=help_text, config=SpLoraConfig)


_register("sp-lora", "SP-LoRA, memory-optimised autograd (in-place merge, mask recomputed, restore in backward)")
_register("sp-lora-gc", "SP-LoRA with the merged weight under gradient checkpointing")
_register("sp-lora-no", "SP-LoRA, plain autograd (no memory optimisation)")
_register("spp-gc", "SPP (W o A B-hat adapter), adapter branch under gradient checkpointing")
_register("spp-no", "SPP (W o A B-hat adapter), plain autograd")
