"""Task `mlp-operator`: forward and backward time of one MLP backend at one shape and density (Fig. 12 right).

`build_case` holds the setup shared by this task and `benchmarks/bench_mlp_operator.py`: seeded inputs
and weights, the active set, the prepared backend, and `fwd` / `bwd` / `check` closures. The forward
runs with autograd recording (as in training); the backward is `torch.autograd.grad` of one retained
forward, for exactly the tensors the case's `grads` mode makes trainable.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from longexposure.measure import time_fn
from longexposure.ops.neuron_block_mlp import LowRank, neuron_block_mlp_reference
from longexposure.registry import MLP_BACKENDS, TASKS
from longexposure.suite.context import RunContext
from longexposure.suite.provenance import device_name

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
GRAD_MODES = ("x", "bias", "lora", "all")


@dataclass
class MlpOperatorCase:
    backend: str = field(default="triton", metadata={"help": "mlp_backend name: dense, torch-gather, triton"})
    tokens: int = field(default=2048, metadata={"help": "batch * sequence length"})
    d_model: int = field(default=2048, metadata={"help": "model width (OPT-1.3B: 2048)"})
    ffn: int = field(default=8192, metadata={"help": "hidden width of the MLP (OPT-1.3B: 8192)"})
    density: float = field(default=0.5, metadata={"help": "fraction of neuron blocks active, in (0, 1]"})
    block_size: int = field(default=64, metadata={"help": "neurons per block: 16, 32, 64 or 128"})
    dtype: str = field(default="float16", metadata={"help": "float16, bfloat16 or float32"})
    grads: str = field(
        default="x",
        metadata={"help": "trainable tensors: x (frozen weights), bias (BitFit), lora (r=lora_rank on fc1/fc2), all"},
    )
    lora_rank: int = field(default=16, metadata={"help": "LoRA rank when grads == 'lora'"})
    capacity: str = field(
        default="all",
        metadata={"help": "triton ids: 'all' (every block, device-side count: no recompile) or 'exact'"},
    )
    warmup: int = field(default=5, metadata={"help": "untimed calls before timing"})
    reps: int = field(default=20, metadata={"help": "timed calls"})

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype: {self.dtype!r} is not one of {sorted(_DTYPES)}")
        if self.grads not in GRAD_MODES:
            raise ValueError(f"grads: {self.grads!r} is not one of {GRAD_MODES}")
        if self.capacity not in ("all", "exact"):
            raise ValueError(f"capacity: {self.capacity!r} is not 'all' or 'exact'")
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"density: {self.density} is not in (0, 1]")
        if self.ffn % self.block_size:
            raise ValueError(f"ffn: {self.ffn} is not a multiple of block_size={self.block_size}")


@dataclass
class BuiltCase:
    """Everything one case needs; `fwd()` and `bwd()` are what gets timed."""

    fwd: Callable[[], torch.Tensor]
    bwd: Callable[[], Any]
    step: Callable[[], Any]  # forward + backward, e.g. for one CUDA-graph capture of both
    check: Callable[[], dict[str, float]]
    info: dict[str, str]


def _active_set(num_blocks: int, density: float, gen: torch.Generator) -> torch.Tensor:
    n = max(1, min(num_blocks, round(density * num_blocks)))
    return torch.randperm(num_blocks, generator=gen)[:n].sort().values.to(torch.int32)


def build_case(case: MlpOperatorCase, device: torch.device | str, seed: int = 0) -> BuiltCase:
    """Seeded tensors, prepared backend and closures for one case (raises BackendUnavailable if it cannot run)."""
    device = torch.device(device)
    dtype = _DTYPES[case.dtype]
    gen = torch.Generator().manual_seed(seed)  # the active set
    dgen = torch.Generator(device=device).manual_seed(seed)  # tensors, drawn where they live
    rand = lambda *shape, scale=1.0: (torch.randn(*shape, generator=dgen, device=device) * scale).to(dtype)
    num_blocks = case.ffn // case.block_size
    backend = MLP_BACKENDS.get(case.backend)(block_size=case.block_size)
    backend.check(device, dtype)

    x = rand(case.tokens, case.d_model)
    w1, b1 = rand(case.ffn, case.d_model, scale=case.d_model**-0.5), rand(case.ffn, scale=0.1)
    w2, b2 = rand(case.d_model, case.ffn, scale=case.ffn**-0.5), rand(case.d_model, scale=0.1)
    fc1_lora = fc2_lora = None
    if case.grads == "lora":
        r = case.lora_rank
        fc1_lora = LowRank(rand(r, case.d_model, scale=case.d_model**-0.5), rand(case.ffn, r, scale=r**-0.5), 2.0)
        fc2_lora = LowRank(rand(r, case.ffn, scale=case.ffn**-0.5), rand(case.d_model, r, scale=r**-0.5), 2.0)
    trainable = [x]
    if case.grads == "bias":
        trainable += [b1, b2]
    elif case.grads == "lora":
        trainable += [fc1_lora.a, fc1_lora.b, fc2_lora.a, fc2_lora.b]
    elif case.grads == "all":
        trainable += [w1, b1, w2, b2]
    for t in trainable:
        t.requires_grad_(True)
    backend.prepare(w1, b1, w2, b2)

    ids = _active_set(num_blocks, case.density, gen).to(device)
    n_active = None
    if case.backend == "triton" and case.capacity == "all":  # fixed capacity, device-side count
        padded = torch.zeros(num_blocks, dtype=torch.int32, device=device)
        padded[: ids.numel()] = ids
        n_active = torch.tensor([ids.numel()], dtype=torch.int32, device=device)
        call_ids = padded
    else:
        call_ids = ids

    def fwd() -> torch.Tensor:
        return backend(x, call_ids, n_active, fc1_lora=fc1_lora, fc2_lora=fc2_lora)

    dy = rand(case.tokens, case.d_model)
    state: dict[str, torch.Tensor] = {}

    def bwd() -> Any:
        if "y" not in state:
            state["y"] = fwd()
        return torch.autograd.grad(state["y"], trainable, dy, retain_graph=True)

    def step() -> Any:
        return torch.autograd.grad(fwd(), trainable, dy)

    def check(hi_dtype: torch.dtype = torch.float64, hi_device: torch.device | str = "cpu") -> dict[str, float]:
        """Relative errors ||got - ref|| / ||ref|| of the output and the worst gradient vs a high-precision
        reference (fp64 on the CPU unless told), beside the same-precision torch reference's own errors
        (callers apply the 'at most 2x' rule)."""
        ref_ids = torch.arange(num_blocks, dtype=torch.int32) if case.backend == "dense" else ids.cpu()
        y = fwd()
        grads = torch.autograd.grad(y, trainable, dy)
        args = (case, ref_ids, x, (w1, b1, w2, b2), fc1_lora, fc2_lora, trainable, dy)
        hi_y, hi_g = _reference(*args, hi_dtype, torch.device(hi_device))
        lo_y, lo_g = _reference(*args, dtype, device)
        out = {"fwd_rel_err": _rel(y, hi_y), "fwd_ref_rel_err": _rel(lo_y, hi_y)}
        out["bwd_rel_err"] = max(_rel(g, h) for g, h in zip(grads, hi_g, strict=True))
        out["bwd_ref_rel_err"] = max(_rel(g, h) for g, h in zip(lo_g, hi_g, strict=True))
        out["finite"] = float(all(bool(torch.isfinite(t).all()) for t in (y, *grads)))
        return out

    info = {
        "backend_ran": type(backend).__name__ + f"({case.backend})",
        "device": device_name(device),
        "dtype": case.dtype,
        "n_active_blocks": str(ids.numel()),
        "num_blocks": str(num_blocks),
        "active_set": "all blocks (dense ignores it)" if case.backend == "dense"
        else ("capacity=all, device count" if n_active is not None else "exact ids"),
        "trainable": case.grads,
    }
    return BuiltCase(fwd=fwd, bwd=bwd, step=step, check=check, info=info)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().to(b.device).double(), b.detach().double()
    return (a - b).norm().item() / max(b.norm().item(), 1e-30)


def _reference(case, ids, x, weights, fc1_lora, fc2_lora, trainable, dy, cast, dev):
    """Output and gradients (for `trainable`) of the masked dense reference, in `cast` on `dev`."""
    copies = {id(t): t.detach().to(dev, cast).requires_grad_(t.requires_grad) for t in (x, *weights)}
    l1 = l2 = None
    if fc1_lora is not None:
        for t in (fc1_lora.a, fc1_lora.b, fc2_lora.a, fc2_lora.b):
            copies[id(t)] = t.detach().to(dev, cast).requires_grad_(True)
        l1 = LowRank(copies[id(fc1_lora.a)], copies[id(fc1_lora.b)], fc1_lora.scaling)
        l2 = LowRank(copies[id(fc2_lora.a)], copies[id(fc2_lora.b)], fc2_lora.scaling)
    w1, b1, w2, b2 = (copies[id(t)] for t in weights)
    out = neuron_block_mlp_reference(copies[id(x)], ids.to(dev), w1, b1, w2, b2, block_size=case.block_size,
                                     fc1_lora=l1, fc2_lora=l2)
    return out, torch.autograd.grad(out, [copies[id(t)] for t in trainable], dy.to(dev, cast))


@TASKS.register(
    "mlp-operator", case=MlpOperatorCase, help="Fig. 12 (right): one MLP backend's forward and backward time"
)
def mlp_operator(case: MlpOperatorCase, ctx: RunContext) -> dict[str, Any]:
    """Check one backend on fresh inputs, then time its forward and backward separately."""
    built = build_case(case, ctx.device, seed=ctx.seed)
    errors = built.check()
    fwd = time_fn(built.fwd, ctx.device, warmup=case.warmup, reps=case.reps)
    bwd = time_fn(built.bwd, ctx.device, warmup=case.warmup, reps=case.reps)
    flops = 2 * 2 * case.tokens * case.d_model * case.ffn * (1.0 if case.backend == "dense" else _density(built))
    return {
        "fwd_ms": fwd.to_dict(),
        "bwd_ms": bwd.to_dict(),
        "fwd_tflops": flops / (fwd.p50 * 1e-3) / 1e12 if fwd.p50 > 0 else math.nan,
        **errors,
        "info": built.info,
    }


def _density(built: BuiltCase) -> float:
    return int(built.info["n_active_blocks"]) / int(built.info["num_blocks"])
