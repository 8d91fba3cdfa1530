"""Task `attention-operator`: forward and backward time of one attention backend at one shape and block
sparsity (Fig. 12 left), plus the time to build a per-head layout from the pattern pool.

`build_case` holds the setup shared by this task and `benchmarks/bench_attention_operator.py`: seeded
inputs, the layout, the backend, and `fwd` / `bwd` / `check` / `build_layout` closures.

Block sparsity s is measured against the causal triangle: a layout of density 1 - s keeps that share
of the (B, H, NQ, NQ) causal blocks; the diagonal block of every row is always kept (every query sees
itself), so the realised density is max(1 - s, share of diagonal blocks); it is recorded. Dense
backends (`sdpa`, and `eager` unless `layout_mode='always'`) run the causal dense baseline: they do not
exploit block sparsity, and the row records that they ran without a layout.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from longexposure.attention.layout import BlockLayout
from longexposure.attention.pattern_pool import PatternPool
from longexposure.measure import time_fn
from longexposure.registry import ATTENTION_BACKENDS, TASKS
from longexposure.suite.context import RunContext
from longexposure.suite.provenance import device_name

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

#: the pool whose online combination the build-time metric measures (one atom set per head)
POOL_ATOMS = ("local-2", "local-4", "local-8", "global-1", "global-2", "dilated-4x2", "strided-4", "diagonal",
              "random-2-s0", "random-4-s1")


@dataclass
class AttentionOperatorCase:
    backend: str = field(default="triton", metadata={"help": "attention_backend name: eager, sdpa, flex, triton"})
    batch: int = field(default=4, metadata={"help": "B"})
    heads: int = field(default=32, metadata={"help": "H"})
    seq_len: int = field(default=1024, metadata={"help": "S (tokens)"})
    head_dim: int = field(default=64, metadata={"help": "D"})
    block: int = field(default=64, metadata={"help": "layout block (tokens), power of two >= 16"})
    block_sparsity: float = field(default=0.0, metadata={"help": "share of causal blocks dropped, in [0, 1)"})
    dtype: str = field(default="float16", metadata={"help": "float16, bfloat16 or float32"})
    layout_mode: str = field(
        default="auto", metadata={"help": "auto: sparse backends get the layout, dense ones run causal dense; always"}
    )
    backward: bool = field(default=True, metadata={"help": "also time the backward (dq, dk, dv)"})
    warmup: int = field(default=5, metadata={"help": "untimed calls before timing"})
    reps: int = field(default=20, metadata={"help": "timed calls"})

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype: {self.dtype!r} is not one of {sorted(_DTYPES)}")
        if not 0.0 <= self.block_sparsity < 1.0:
            raise ValueError(f"block_sparsity: {self.block_sparsity} is not in [0, 1)")
        if self.layout_mode not in ("auto", "always"):
            raise ValueError(f"layout_mode: {self.layout_mode!r} is not 'auto' or 'always'")
        if self.block < 16 or self.block & (self.block - 1):
            raise ValueError(f"block: {self.block} is not a power of two >= 16")


def random_causal_layout(
    batch: int, heads: int, n_blocks: int, block: int, sparsity: float, device: torch.device | str, seed: int = 0
) -> BlockLayout:
    """Per-(batch, head) random causal layout keeping round((1 - sparsity) * causal blocks), diagonal always kept."""
    gen = torch.Generator().manual_seed(seed)
    tri = torch.tril(torch.ones(n_blocks, n_blocks, dtype=torch.bool))
    diag = torch.eye(n_blocks, dtype=torch.bool)
    n_causal = n_blocks * (n_blocks + 1) // 2
    extra = max(0, round((1.0 - sparsity) * n_causal) - n_blocks)
    score = torch.rand(batch, heads, n_blocks, n_blocks, generator=gen).masked_fill(~(tri & ~diag), -1.0)
    flat = score.flatten(2)
    keep = torch.zeros_like(flat, dtype=torch.bool)
    if extra:
        keep.scatter_(-1, flat.topk(extra, dim=-1).indices, True)
    mask = keep.view_as(score) | diag
    return BlockLayout.from_dense(mask.to(device), block)


@dataclass
class BuiltCase:
    """Everything one case needs; `fwd()`, `bwd()` and `build_layout()` are what gets timed."""

    fwd: Callable[[], torch.Tensor]
    bwd: Callable[[], Any]
    fwd_bwd: Callable[[], Any]
    check: Callable[[], dict[str, float]]
    build_layout: Callable[[], BlockLayout]
    layout: BlockLayout | None
    info: dict[str, str]
    density: float
    backward: bool


def build_case(case: AttentionOperatorCase, device: torch.device | str, seed: int = 0) -> BuiltCase:
    """Seeded tensors, layout and backend closures (raises BackendUnavailable if the backend cannot run)."""
    from longexposure.attention_backends import BackendUnavailable, get_backend

    device = torch.device(device)
    dtype = _DTYPES[case.dtype]
    entry = ATTENTION_BACKENDS.entry(case.backend)
    backend = get_backend(case.backend)
    backward, bwd_note = case.backward, ""
    try:
        backend.check(device, dtype, backward)
    except BackendUnavailable as exc:
        if not backward:
            raise
        backend.check(device, dtype, False)  # forward-only backend (flex on CPU): time what it can run
        backward, bwd_note = False, f"not run: {exc}"
    gen = torch.Generator().manual_seed(seed)
    dev_gen = torch.Generator(device=device).manual_seed(seed)  # large inputs are drawn where they live
    shape = (case.batch, case.heads, case.seq_len, case.head_dim)
    q, k, v, do = (torch.randn(*shape, generator=dev_gen, device=device).to(dtype) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_(backward)
    n = -(-case.seq_len // case.block)
    sparse_layout = random_causal_layout(case.batch, case.heads, n, case.block, case.block_sparsity, device, seed)
    use_layout = case.layout_mode == "always" or entry.meta.get("sparse", False)
    layout = sparse_layout.with_transpose() if use_layout else None
    density = float(sparse_layout.density(causal=True)) if use_layout else 1.0

    pool = PatternPool.cached(n, case.block, POOL_ATOMS, True, str(device))
    pick = torch.rand(case.batch, case.heads, len(POOL_ATOMS), generator=gen) < 0.3
    pick[..., POOL_ATOMS.index("diagonal")] = True
    selection = pick.to(device)

    def fwd() -> torch.Tensor:
        return backend(q, k, v, layout, causal=True)

    state: dict[str, torch.Tensor] = {}

    def bwd() -> Any:
        if "o" not in state:
            state["o"] = fwd()
        return torch.autograd.grad(state["o"], (q, k, v), do, retain_graph=True)

    def fwd_bwd() -> Any:
        """A fresh forward and its backward, which a CUDA graph can capture: both run on the capturing
        stream, and the gradients are taken at views made inside (no leaf's AccumulateGrad involved)."""
        views = (q.view_as(q), k.view_as(k), v.view_as(v))
        o = backend(*views, layout, causal=True)
        return torch.autograd.grad(o, views, do) if backward else o

    def build_layout() -> BlockLayout:
        return pool.combine(selection)

    def check() -> dict[str, float]:
        """Relative errors ||got - ref|| / ||ref|| on fresh inputs for a (1, <=4)-head slice, vs an fp64
        reference, beside the same-precision torch reference's own errors (callers apply the 2x rule)."""
        from longexposure.ops.block_sparse_attention import reference_attention

        h = min(case.heads, 4)
        g = torch.Generator().manual_seed(seed + 1)
        xs = [torch.randn(1, h, case.seq_len, case.head_dim, generator=g).to(device, dtype) for _ in range(4)]
        lay = None if layout is None else layout.narrow(1, h)
        leaves = [t.clone().requires_grad_(backward) for t in xs[:3]]
        o = backend(*leaves, lay, causal=True)
        grads = torch.autograd.grad(o, leaves, xs[3]) if backward else ()
        hi = [t.double().requires_grad_(backward) for t in xs[:3]]
        hi_o = reference_attention(*hi, lay, causal=True)
        lo = [t.clone().requires_grad_(backward) for t in xs[:3]]
        lo_o = reference_attention(*lo, lay, causal=True)
        out = {"fwd_rel_err": _rel(o, hi_o), "fwd_ref_rel_err": _rel(lo_o, hi_o)}
        if backward:
            hi_g = torch.autograd.grad(hi_o, hi, xs[3].double())
            lo_g = torch.autograd.grad(lo_o, lo, xs[3])
            out["bwd_rel_err"] = max(_rel(a, b) for a, b in zip(grads, hi_g, strict=True))
            out["bwd_ref_rel_err"] = max(_rel(a, b) for a, b in zip(lo_g, hi_g, strict=True))
        out["finite"] = float(all(bool(torch.isfinite(t).all()) for t in (o, *grads)))
        return out

    info = {
        "backend_ran": f"{type(backend).__name__}({case.backend})",
        "device": device_name(device),
        "dtype": case.dtype,
        "layout": f"random causal, density {density:.3f}, block {case.block}" if use_layout else "none (causal dense)",
        "pool_atoms": ",".join(POOL_ATOMS),
    }
    if bwd_note:
        info["bwd"] = bwd_note
    return BuiltCase(fwd=fwd, bwd=bwd, fwd_bwd=fwd_bwd, check=check, build_layout=build_layout, layout=layout,
                     info=info, density=density, backward=backward)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return (a - b).norm().item() / max(b.norm().item(), 1e-30)


def attention_flops(case: AttentionOperatorCase, density: float) -> float:
    """Forward matmul FLOPs actually visited: 4 B H S^2 D / 2 (causal) scaled by the block density."""
    return 4.0 * case.batch * case.heads * case.seq_len**2 * case.head_dim * 0.5 * density


@TASKS.register(
    "attention-operator",
    case=AttentionOperatorCase,
    help="Fig. 12 (left): one attention backend's forward and backward time, and the layout build time",
)
def attention_operator(case: AttentionOperatorCase, ctx: RunContext) -> dict[str, Any]:
    """Check one backend on fresh inputs, then time forward, backward and the pool's layout build."""
    built = build_case(case, ctx.device, seed=ctx.seed)
    errors = built.check()
    fwd = time_fn(built.fwd, ctx.device, warmup=case.warmup, reps=case.reps)
    out: dict[str, Any] = {"fwd_ms": fwd.to_dict()}
    if built.backward:
        out["bwd_ms"] = time_fn(built.bwd, ctx.device, warmup=case.warmup, reps=case.reps).to_dict()
    out["layout_build_ms"] = time_fn(built.build_layout, ctx.device, warmup=case.warmup, reps=case.reps).to_dict()
    out["density"] = built.density
    flops = attention_flops(case, built.density)
    out["fwd_tflops"] = flops / (fwd.p50 * 1e-3) / 1e12 if fwd.p50 > 0 else math.nan
    out.update(errors)
    out["info"] = built.info
    return out
