"""GPU benchmark of the block-sparse attention operator (paper Fig. 12 left): sdpa vs flex vs triton.

Goal: forward and backward time against block sparsity at B=4, H=32, D=64 (`--head-dims`: more), S in {1024, 2048}
(fp16), the layout-build time of the pattern pool, and the issue-4 targets. Hardware: one CUDA GPU (reported: H100).
Launch:

    PYTHONUNBUFFERED=1 python benchmarks/bench_attention_operator.py --out artifacts/fig12_attention/<device>.json

Order: (1) correctness on fresh random inputs: triton (and flex) output and dq/dk/dv against an fp64
reference on the GPU, beside the same-precision torch reference's error (the 2x rule), over dtypes,
head dims 64/80/128, blocks 64/128, odd lengths, padding, non-causal; (2) torch.compile (inductor) of the
op over three different layouts: same values as eager, and the recompile count; (3) timings: every cell
timed as a replayed CUDA graph (device time; `triton.testing.do_bench_cudagraph`, median) and as plain
eager calls (`triton.testing.do_bench`, median, L2 flushed), which adds the host launch overhead; the
setup is the `attention-operator` task's `build_case`; (4) the pool's online combination for 32 heads at
S=1024 (N=16 blocks of 64), eager and graph-replayed. The backward's graph time is (forward + backward)
minus forward, both graph-replayed: autograd runs a backward on its forward's stream, so the two are
captured together; `bwd_ms_eager` times `torch.autograd.grad` alone.

Throughput: every time has its TFLOP/s beside it, counting the useful matmul FLOPs of the kept causal blocks
(`attention_flops`): forward 4 B H S^2 D / 2 (QK^T and PV over the causal triangle) times the layout's density
against that triangle (dense sdpa: density 1); backward 2.5 x forward (its five S^2 D products, recomputing QK^T
once, as FlashAttention counts; the kernels' second recompute for dQ is not credited). Masking inside the
diagonal blocks is not subtracted.

Triton variants (`--triton-variants`, issue 21's opt-in switches, read per launch): `default`; `dq-atomic`
(LONGEXPOSURE_BSA_DQ=atomic: dQ added by the dK/dV kernel, FlashAttention-2's structure, no dQ pass); `tma`
(LONGEXPOSURE_BSA_TMA=1: the inner loops read their blocks through tensor descriptors); `dq-atomic+tma`; `pair`
(LONGEXPOSURE_BSA_PAIR=1: two layout blocks per program, 128-row query / key tiles at block 64). Each
runs in correctness, compile and timing alike, its rows labelled `triton (<variant>)`, all timed against the
same sdpa row; the summary gives each variant's backward and forward time over the default's.

Targets (issue 4), from the graph-replayed medians, fp16, D=64, block 64:
  T1 triton <= 1.10 x sdpa (causal dense) at block sparsity 0;   T2 sdpa / triton >= 3.5 at sparsity 0.8;
  T3 time linear in density (R^2 of a least-squares line);        T4 pool combination <= 50 us.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from unittest import mock

import torch

SPARSITIES = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]


TRITON_VARIANTS = {
    "default": {},
    "dq-atomic": {"LONGEXPOSURE_BSA_DQ": "atomic"},
    "dq-bulk": {"LONGEXPOSURE_BSA_DQ": "bulk"},
    "tma": {"LONGEXPOSURE_BSA_TMA": "1"},
    "dq-atomic+tma": {"LONGEXPOSURE_BSA_DQ": "atomic", "LONGEXPOSURE_BSA_TMA": "1"},
    "pair": {"LONGEXPOSURE_BSA_PAIR": "1"},
}


def switches(env: dict[str, str]):
    """The kernels' switches set as `env` says inside, the others off (they are read per launch)."""
    off = {"LONGEXPOSURE_BSA_DQ": "pass", "LONGEXPOSURE_BSA_TMA": "0", "LONGEXPOSURE_BSA_PAIR": "0"}
    return mock.patch.dict(os.environ, {**off, **env})


def variants(backend: str, names: list[str]) -> list[tuple[str, dict[str, str] | None]]:
    """(row label, switches) per run of a backend: the triton backend once per variant, others once (as set)."""
    if backend != "triton":
        return [(backend, None)]
    return [(f"triton ({n})", TRITON_VARIANTS[n]) for n in names]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return (a - b).norm().item() / max(b.norm().item(), 1e-30)


def _maxerr(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().double() - b.detach().double()).abs().max().item()


# ----------------------------------------------------------------------------------------- correctness


def correctness(device: torch.device, quick: bool = False, names: tuple[str, ...] = ("default",)) -> list[dict]:
    from longexposure.attention.layout import BlockLayout
    from longexposure.attention_backends import get_backend
    from longexposure.ops.block_sparse_attention import reference_attention
    from longexposure.tasks.attention_operator import random_causal_layout

    cases = [  # dtype, D, block, S, causal, ragged, sparsity, backends
        ("float16", 64, 64, 1024, True, False, 0.5, ("triton", "flex")),
        ("bfloat16", 64, 64, 1000, True, True, 0.3, ("triton", "flex")),
        ("float16", 64, 64, 512, True, False, 0.0, ("triton",)),
        ("float16", 80, 64, 512, True, False, 0.0, ("triton",)),
        ("bfloat16", 128, 128, 1024, True, False, 0.6, ("triton", "flex")),
        ("float16", 128, 64, 777, False, True, 0.5, ("triton",)),
        ("float16", 64, 128, 2048, True, False, 0.0, ("triton",)),
        ("bfloat16", 80, 128, 1100, True, True, 0.4, ("triton",)),
        ("float32", 64, 64, 256, True, True, 0.5, ("triton",)),
    ]
    if quick:  # one case per dtype / head dim / block / padding mode
        cases = [cases[i] for i in (1, 3, 5, 7)]
    rows = []
    for i, (dt_name, d, block, s, causal, ragged, sp, backends) in enumerate(cases):
        dt = getattr(torch, dt_name)
        gen = torch.Generator(device=device).manual_seed(100 + i)
        bsz, heads = 2, 4
        n = -(-s // block)
        if causal:
            layout = random_causal_layout(bsz, heads, n, block, sp, device, seed=i)
        else:
            m = torch.rand(bsz, heads, n, n, generator=gen, device=device) < (1 - sp)
            layout = BlockLayout.from_dense(m, block)
        layout = layout.with_transpose()
        lens = None
        if ragged:
            lens = torch.tensor([s, max(1, s // 2 + 13)], dtype=torch.int32, device=device)
        x = [torch.randn(bsz, heads, s, d, generator=gen, device=device) for _ in range(4)]
        hi = [t.double().requires_grad_() for t in x[:3]]
        hi_o = reference_attention(*hi, layout, causal=causal, seq_lens=lens)
        hi_g = torch.autograd.grad(hi_o, hi, x[3].double())
        lo = [t.to(dt).requires_grad_() for t in x[:3]]
        lo_o = reference_attention(*lo, layout, causal=causal, seq_lens=lens)
        lo_g = torch.autograd.grad(lo_o, lo, x[3].to(dt))
        for backend, name, env in ((b, *v) for b in backends for v in variants(b, list(names))):
            row = {"backend": name, "dtype": dt_name, "head_dim": d, "block": block, "seq_len": s, "causal": causal,
                   "ragged": ragged, "sparsity": sp}
            try:
                leaves = [t.to(dt).requires_grad_() for t in x[:3]]
                with switches(env or {}):
                    o = get_backend(backend)(*leaves, layout, causal=causal, seq_lens=lens)
                    g = torch.autograd.grad(o, leaves, x[3].to(dt))
                ok = True
                for label, got, same, want in zip(("out", "dq", "dk", "dv"), (o, *g), (lo_o, *lo_g), (hi_o, *hi_g),
                                                  strict=True):
                    err, ref_err = _maxerr(got, want), _maxerr(same, want)
                    floor = {"float32": 1e-4, "float16": 2e-3, "bfloat16": 1.6e-2}[dt_name] * max(
                        1.0, want.abs().max().item())
                    row[f"{label}_rel"] = _rel(got, want)
                    row[f"{label}_ref_rel"] = _rel(same, want)
                    passed = err <= 2 * ref_err + floor and bool(torch.isfinite(got).all())
                    ok &= passed
                    if not passed:
                        row[f"{label}_fail"] = f"max err {err:.3g} > 2 x {ref_err:.3g} + {floor:.3g}"
                row["pass"] = ok
            except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
                row["pass"] = False
                row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            print("check", json.dumps(row), flush=True)
            rows.append(row)
    return rows


def compile_check(device: torch.device, names: tuple[str, ...] = ("default",)) -> dict:
    """torch.compile (inductor) of fwd+bwd over three layouts, per triton variant: values vs eager, frames."""
    return {name: _compile_check(device, name) for name in names}


def _compile_check(device: torch.device, name: str) -> dict:
    from torch._dynamo.testing import CompileCounterWithBackend

    from longexposure.attention.layout import BlockLayout
    from longexposure.ops.block_sparse_attention import block_sparse_attention
    from longexposure.tasks.attention_operator import random_causal_layout

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")

    @torch.compile(backend=counter, fullgraph=True)
    def step(q, k, v, kc, ki, qc, qi):
        return block_sparse_attention(q, k, v, BlockLayout(64, kc, ki, qc, qi))

    out = {"frames": None, "max_rel_vs_eager": None}
    try:
        errs = []
        with switches(TRITON_VARIANTS[name]):  # the compiled backward is traced at its first call: inside too
            for i, sp in enumerate((0.0, 0.5, 0.8)):
                gen = torch.Generator(device=device).manual_seed(7 + i)
                q, k, v, do = (torch.randn(2, 4, 512, 64, generator=gen, device=device, dtype=torch.float16)
                               for _ in range(4))
                for t in (q, k, v):
                    t.requires_grad_()
                lay = random_causal_layout(2, 4, 8, 64, sp, device, seed=i).with_transpose()
                o = step(q, k, v, lay.kv_counts, lay.kv_indices, lay.q_counts, lay.q_indices)
                g = torch.autograd.grad(o, (q, k, v), do)  # AOTAutograd's compiled backward
                oe = block_sparse_attention(q, k, v, lay)
                ge = torch.autograd.grad(oe, (q, k, v), do)
                errs += [_rel(o, oe)] + [_rel(a, b) for a, b in zip(g, ge, strict=True)]
        out = {"frames": counter.frame_count, "max_rel_vs_eager": max(errs)}
    except Exception as exc:  # noqa: BLE001
        out["error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
    torch._dynamo.reset()
    print("compile", json.dumps({"variant": name, **out}), flush=True)
    return out


# --------------------------------------------------------------------------------------------- timing

BWD_FLOPS_PER_FWD = 2.5  # see the module docstring


def add_tflops(row: dict, fwd_flops: float) -> None:
    """`{phase}_tflops_{mode}` beside every `{phase}_ms_{mode}` of a timing row (useful FLOPs, docstring)."""
    for phase, flops in (("fwd", fwd_flops), ("bwd", BWD_FLOPS_PER_FWD * fwd_flops)):
        for mode in ("graph", "eager"):
            ms = row.get(f"{phase}_ms_{mode}")
            if ms is not None and ms > 0 and not math.isnan(ms):
                row[f"{phase}_tflops_{mode}"] = flops / (ms * 1e-3) / 1e12


def _time(fn, graph: bool) -> tuple[float, str]:
    import triton.testing as tt

    if graph:
        try:
            with torch.cuda.stream(torch.cuda.Stream()):
                return tt.do_bench_cudagraph(fn, rep=60, return_mode="median"), "cudagraph"
        except Exception as exc:  # noqa: BLE001 - not capturable: say so in the row
            return math.nan, f"graph failed: {type(exc).__name__}"
    return tt.do_bench(fn, warmup=10, rep=60, return_mode="median"), "eager"


def timings(device: torch.device, seqs: list[int], sparsities: list[float], backends: list[str], blocks: list[int],
            dtype: str, rows: list[dict], on_row=lambda: None,  # noqa: ANN001
            names: tuple[str, ...] = ("default",), head_dims: tuple[int, ...] = (64,)) -> list[dict]:
    """Appends one row per case to `rows` and calls `on_row()` after each (a cut-off run keeps its rows). Rows
    are labelled by `variants` (the triton backend once per variant)."""
    from longexposure.tasks.attention_operator import AttentionOperatorCase

    cells = [(d, s, backend, label, env, block, sp)
             for d in head_dims for s in seqs for backend in backends for label, env in variants(backend, list(names))
             for block in (blocks if backend == "triton" else blocks[:1])
             for sp in (sparsities if backend != "sdpa" else [0.0])]
    for d, s, backend, label, env, block, sp in cells:
        case = AttentionOperatorCase(backend=backend, seq_len=s, block=block, block_sparsity=sp, dtype=dtype,
                                     head_dim=d)
        row = {"backend": label, "seq_len": s, "block": block, "block_sparsity": sp, "dtype": dtype,
               "batch": case.batch, "heads": case.heads, "head_dim": case.head_dim, "switches": env}
        with switches(env or {}):  # read per launch: graph captures record the variant's kernels
            _time_cell(case, device, row)
        print("time", json.dumps(row), flush=True)
        rows.append(row)
        on_row()
        torch.cuda.empty_cache()
    return rows


def _time_cell(case, device: torch.device, row: dict) -> None:  # noqa: ANN001
    """Fills one timing row (an exception is recorded in the row: a failing backend is a cell, not a crash)."""
    from longexposure.tasks.attention_operator import attention_flops, build_case

    try:
        t0 = time.perf_counter()
        built = build_case(case, device, seed=0)
        row["density"] = built.density
        built.fwd()
        built.bwd()  # compiles/autotunes both directions
        torch.cuda.synchronize()
        row["first_call_s"] = time.perf_counter() - t0
        for phase, fn in (("fwd", built.fwd), ("fwdbwd", built.fwd_bwd), ("bwd", built.bwd)):
            for graph in {"fwd": (True, False), "fwdbwd": (True,), "bwd": (False,)}[phase]:
                ms, mode = _time(fn, graph)
                row[f"{phase}_ms_{'graph' if graph else 'eager'}"] = ms
                if mode.startswith("graph failed"):
                    row[f"{phase}_graph_note"] = mode
        # autograd runs a backward on its forward's stream, so a graph captures fwd+bwd together
        row["bwd_ms_graph"] = row["fwdbwd_ms_graph"] - row["fwd_ms_graph"]
        add_tflops(row, attention_flops(case, built.density))
        row["backend_ran"] = built.info["backend_ran"]
    except Exception as exc:  # noqa: BLE001 - a failing backend is a recorded cell
        row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"


def layout_build(device: torch.device) -> list[dict]:
    from longexposure.attention.pattern_pool import PatternPool
    from longexposure.measure import time_fn
    from longexposure.tasks.attention_operator import POOL_ATOMS

    rows = []
    for bsz in (1, 4):
        n, block, heads = 16, 64, 32
        t0 = time.perf_counter()
        pool = PatternPool(n, block, POOL_ATOMS, device=device)
        torch.cuda.synchronize()
        build_offline_ms = (time.perf_counter() - t0) * 1e3
        gen = torch.Generator().manual_seed(bsz)
        sel = (torch.rand(bsz, heads, len(POOL_ATOMS), generator=gen) < 0.3).to(device)
        ref = pool.dense_union(sel)
        row = {"batch": bsz, "heads": heads, "n_blocks": n, "block": block, "atoms": len(POOL_ATOMS),
               "offline_pool_ms": build_offline_ms}
        for impl in ("triton", "torch"):
            lay = pool.combine(sel, impl=impl)
            row[f"{impl}_correct"] = bool(torch.equal(lay.to_dense().cpu(), ref))
            lay.validate(causal=True, canonical=True)
            build = lambda impl=impl, pool=pool, sel=sel: pool.combine(sel, impl=impl)  # noqa: E731
            row[f"{impl}_eager_us"] = time_fn(build, device, warmup=20, reps=200).p50 * 1e3
            row[f"{impl}_graph_us"] = _time(build, True)[0] * 1e3
            t0 = time.perf_counter()
            for _ in range(100):
                pool.combine(sel, impl=impl)
            torch.cuda.synchronize()
            row[f"{impl}_host_loop_us"] = (time.perf_counter() - t0) * 1e4
        print("layout", json.dumps(row), flush=True)
        rows.append(row)
    return rows


# -------------------------------------------------------------------------------------------- summary


def _fit(xs: list[float], ys: list[float]) -> dict:
    n = len(xs)
    if n < 3:
        return {}
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    slope = sxy / sxx if sxx else math.nan
    icept = my - slope * mx
    ss_res = sum((y - (icept + slope * x)) ** 2 for x, y in zip(xs, ys, strict=True))
    ss_tot = sum((y - my) ** 2 for y in ys)
    return {"slope_ms_per_density": slope, "intercept_ms": icept, "r2": 1 - ss_res / ss_tot if ss_tot else math.nan}


def _shape(r: dict) -> str:
    """A row's sequence length (and head dim where it is not the paper's 64): the summary's key prefix."""
    d = r.get("head_dim", 64)
    return f"S={r['seq_len']}" + (f" D={d}" if d != 64 else "")


def summarize(rows: list[dict], layout_rows: list[dict]) -> dict:
    out: dict = {}
    for shape in sorted({_shape(r) for r in rows}):
        sdpa = next((r for r in rows if r["backend"] == "sdpa" and _shape(r) == shape and "error" not in r), None)
        if sdpa is None:
            continue
        for r in rows:
            if _shape(r) != shape or r["backend"] == "sdpa" or "error" in r:
                continue
            for phase in ("fwd", "bwd"):
                for mode in ("graph", "eager"):
                    key = f"{phase}_ms_{mode}"
                    if r.get(key) and sdpa.get(key) and not math.isnan(r[key]):
                        r[f"{phase}_speedup_vs_sdpa_{mode}"] = sdpa[key] / r[key]
        for backend in sorted({r["backend"] for r in rows} - {"sdpa"}):
            for block in sorted({r["block"] for r in rows if r["backend"] == backend}):
                sel = [r for r in rows if r["backend"] == backend and r["block"] == block and _shape(r) == shape
                       and "error" not in r]
                for phase in ("fwd", "bwd"):
                    pts = [(r["density"], r[f"{phase}_ms_graph"]) for r in sel
                           if not math.isnan(r.get(f"{phase}_ms_graph", math.nan))]
                    fit = _fit([p[0] for p in pts], [p[1] for p in pts])
                    at = {r["block_sparsity"]: r.get(f"{phase}_speedup_vs_sdpa_graph") for r in sel}
                    out[f"{shape} {backend} block={block} {phase}"] = {
                        "speedup_vs_sdpa_at_0": at.get(0.0), "at_0.5": at.get(0.5), "at_0.8": at.get(0.8),
                        "at_0.9": at.get(0.9),
                        **{f"linear_{k}": v for k, v in fit.items()},
                    }
    # the A/B of the switches: the default variant's time / the variant's, same cell (> 1: the variant is faster)
    by_cell = {(_shape(r), r["block"], r["block_sparsity"], r["backend"]): r for r in rows
               if r["backend"].startswith("triton (") and "error" not in r}
    for (shape, block, sp, label), r in sorted(by_cell.items(), key=lambda kv: tuple(map(str, kv[0]))):
        default = by_cell.get((shape, block, sp, "triton (default)"))
        if default is None or r is default:
            continue
        for phase in ("fwd", "bwd"):
            ab = out.setdefault(f"{shape} block={block} {phase}, default / {label} (graph)", {})
            ab[sp] = default[f"{phase}_ms_graph"] / r[f"{phase}_ms_graph"]
    if layout_rows:
        out["layout_build_us"] = {f"B={r['batch']} H={r['heads']}": {k: r[k] for k in r if k.endswith("us")}
                                  for r in layout_rows}
    return out


def table(rows: list[dict]) -> str:
    times = [(p, m) for m in ("graph", "eager") for p in ("fwd", "bwd")]
    head = ["S", "D", "backend", "block", "sparsity", "density"]
    head += [h for p, m in times for h in (f"{p} ms ({m})", "TFLOP/s")] + ["fwd x sdpa", "bwd x sdpa"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    f = lambda v, p=3: "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{p}f}"  # noqa: E731
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['seq_len']} | {r.get('head_dim', 64)} | {r['backend']} | {r['block']} | "
                         f"{r['block_sparsity']} | error: {r['error'][:80]} " + "|" * (len(head) - 5))
            continue
        cells = [r["seq_len"], r.get("head_dim", 64), r["backend"], r["block"], r["block_sparsity"],
                 f(r.get("density"), 2)]
        for p, m in times:
            cells += [f(r.get(f"{p}_ms_{m}")), f(r.get(f"{p}_tflops_{m}"), 1)]
        cells += [f(r.get("fwd_speedup_vs_sdpa_graph"), 2), f(r.get("bwd_speedup_vs_sdpa_graph"), 2)]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def autotuned_configs() -> dict[str, dict[str, str]]:
    """What each attention autotuner picked, per tuning key (the key's values, then the argument dtypes): a row's
    time is only as good as its pick, and picks made from cold-L2 timings can differ from run to run."""
    from longexposure.kernels import block_sparse_attention as K

    tuners = {name: getattr(K, name) for name in ("_bsa_fwd_kernel", "_bsa_bwd_dkdv_kernel", "_bsa_bwd_dq_kernel")}
    return {name: {str(key): str(cfg) for key, cfg in getattr(t, "cache", {}).items()} for name, t in tuners.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="JSON file to write (a .md table is written beside it)")
    ap.add_argument("--seq", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--sparsities", type=float, nargs="+", default=SPARSITIES)
    ap.add_argument("--backends", nargs="+", default=["sdpa", "flex", "triton"])
    ap.add_argument("--blocks", type=int, nargs="+", default=[64, 128], help="layout blocks (flex uses the first)")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--head-dims", type=int, nargs="+", default=[64], help="timed head dims (each against its sdpa)")
    ap.add_argument("--skip", nargs="*", default=[], help="sections to skip: correctness compile timing layout")
    ap.add_argument("--quick-check", action="store_true", help="4 correctness cases instead of 9")
    ap.add_argument("--triton-variants", nargs="+", default=list(TRITON_VARIANTS), choices=list(TRITON_VARIANTS),
                    help="the triton backend's switches (module docstring): one row per variant, side by side")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_attention_operator needs a CUDA GPU")
    from longexposure.suite.provenance import provenance
    device = torch.device("cuda")
    meta = {**provenance(device), "args": vars(args)}
    print("meta", json.dumps(meta), flush=True)
    res: dict = {"meta": meta}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save = lambda: out.write_text(json.dumps(res, indent=1, default=str) + "\n")  # noqa: E731 - after each section
    if "correctness" not in args.skip:
        res["correctness"] = correctness(device, quick=args.quick_check, names=tuple(args.triton_variants))
        save()
    if "compile" not in args.skip:
        res["compile"] = compile_check(device, tuple(args.triton_variants))
        save()
    if "layout" not in args.skip:
        res["layout_build"] = layout_build(device)
        save()
    if "timing" not in args.skip:
        res["timings"] = []
        timings(device, args.seq, args.sparsities, args.backends, args.blocks, args.dtype, res["timings"], save,
                names=tuple(args.triton_variants), head_dims=tuple(args.head_dims))
    res["autotuned"] = autotuned_configs()
    res["summary"] = summarize(res.get("timings", []), res.get("layout_build", []))
    save()
    md = table(res.get("timings", []))
    out.with_suffix(".md").write_text(f"# {meta['device']}, torch {meta['torch']}, triton {meta['triton']}\n\n{md}\n")
    print(md)
    print(json.dumps(res["summary"], indent=1, default=str))
    bad = [r for r in res.get("correctness", []) if not r["pass"]]
    print(f"correctness: {len(res.get('correctness', [])) - len(bad)} passed, {len(bad)} failed")


if __name__ == "__main__":
    main()
