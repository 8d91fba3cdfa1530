"""GPU benchmark of the neuron-block MLP operator (paper Fig. 12 right): dense vs torch-gather vs triton.

Goal: forward and backward time against density at OPT-1.3B dims, and the issue-3 targets. Hardware: one
CUDA GPU (reported numbers: H100). Launch:

    PYTHONUNBUFFERED=1 python benchmarks/bench_mlp_operator.py --out artifacts/fig12_mlp/<device>.json
    python benchmarks/bench_mlp_operator.py --report artifacts/fig12_mlp/<device>.json   # table + plot

Every case is first checked on fresh random inputs (output and gradients against an fp32 reference on
the GPU, beside the same-precision torch reference's error), then timed with `triton.testing.do_bench`
(median, L2 flushed between calls), which includes host launch overhead wherever it exceeds the GPU
time, and as GPU time alone (`measure.gpu_time_ms`: the calls are queued behind a GPU sleep, then timed back to
back with CUDA events). Setup is shared with the `mlp-operator` task
(`longexposure.tasks.mlp_operator.build_case`).

Throughput: every time has its TFLOP/s beside it, counting the useful matmul FLOPs of the active blocks
(`useful_flops`; A = active blocks * block_size neurons, T tokens, d = d_model, r = LoRA rank; bias, ReLU and
masks are not counted):
  forward   fc1 and fc2, 2*T*d*A each: 4*T*d*A; LoRA adds its four rank-r products, 4*T*r*(d + A).
  backward  the input gradient (dZ = dy W2[:, act], dx = dZ W1[act]): 4*T*d*A; grads='all' adds the weight
            gradients (dW1 = dZ^T x, dW2 = dy^T h): another 4*T*d*A; LoRA adds twice its forward products
            (each has an input and a weight gradient), 8*T*r*(d + A).
Every backend is credited the same work (dense rows are at density 1, where A = ffn), so TFLOP/s rank
backends as ms do. Each input-gradient row (grads='x', the paper's frozen weights) has an all-gradients
twin (grads='all', weights' gradients too) at the same tokens and density.

Targets (issue 3), per tokens, direction and density d, with triton at a fixed capacity (all blocks) and
a device-side count:
  T1 triton <= 1.15 * d * dense + 20 us;  T2 dense / triton >= 5 at d = 0.1;
  T3 triton <= 1.10 * dense at d = 1.0;   T4 triton <= 1.10 * torch-gather.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from longexposure.measure import cuda_kernels, gpu_time_ms
from longexposure.tasks.mlp_operator import MlpOperatorCase, build_case

DENSITIES = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]
TOKENS = [4 * 512, 4 * 1024]


def matrix(quick: bool) -> list[MlpOperatorCase]:
    """The benchmark grid: input gradients only (the paper's frozen weights) and every gradient at each tokens and
    density, LoRA at three densities, and exact ids instead of the fixed capacity."""
    cases = []
    dens = [1.0, 0.5, 0.1] if quick else DENSITIES
    for grads in ("x", "all"):
        for tokens in TOKENS[:1] if quick else TOKENS:
            for density in dens:
                for backend in ("dense", "torch-gather", "triton"):
                    if backend == "dense" and density != 1.0:
                        continue  # dense ignores the active set: one measurement per shape
                    cases.append(MlpOperatorCase(backend=backend, tokens=tokens, density=density, grads=grads))
    for density in (1.0, 0.5, 0.1):
        for backend in ("dense", "torch-gather", "triton"):
            if backend == "dense" and density != 1.0:
                continue
            cases.append(MlpOperatorCase(backend=backend, tokens=2048, density=density, grads="lora"))
    for density in (1.0, 0.5, 0.1):  # the cost of the fixed capacity: exact ids instead
        cases.append(MlpOperatorCase(backend="triton", tokens=2048, density=density, grads="x", capacity="exact"))
    return cases


def useful_flops(row: dict) -> dict[str, float]:
    """{'fwd': ..., 'bwd': ...}: matmul FLOPs of the active blocks for a row's case (see the module docstring)."""
    c = row["case"]
    t, d, r = c["tokens"], c["d_model"], c["lora_rank"]
    a = int(row["info"]["n_active_blocks"]) * c["block_size"]
    fwd, bwd = 4 * t * d * a, 4 * t * d * a
    if c["grads"] == "all":
        bwd += 4 * t * d * a
    if c["grads"] == "lora":
        fwd += 4 * t * r * (d + a)
        bwd += 8 * t * r * (d + a)
    return {"fwd": fwd, "bwd": bwd}


TIMES = ("fwd_ms", "bwd_ms", "fwd_gpu_ms", "bwd_gpu_ms")


def tflops(row: dict, key: str) -> float | None:
    """TFLOP/s of the time `row[key]` (one of TIMES), or None where it was not measured."""
    ms = row.get(key)
    if not ms or ms <= 0 or math.isnan(ms):
        return None
    return useful_flops(row)[key[:3]] / (ms * 1e-3) / 1e12


def run_case(case: MlpOperatorCase, queued: bool) -> dict:
    import triton.testing

    row = {"case": asdict(case)}
    built = build_case(case, "cuda", seed=0)
    row["info"] = built.info
    errors = built.check(hi_dtype=torch.float32, hi_device="cuda")
    row.update(errors)
    row["correct"] = bool(errors["finite"]) and errors["fwd_rel_err"] <= 2 * errors["fwd_ref_rel_err"] + 1e-3 and (
        errors["bwd_rel_err"] <= 2 * errors["bwd_ref_rel_err"] + 1e-3)
    bench = lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    row["fwd_ms"] = bench(built.fwd)
    row["bwd_ms"] = bench(built.bwd)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):  # host time per forward call (the GPU queue absorbs it unless the GPU is faster)
        built.fwd()
    row["fwd_host_us"] = (time.perf_counter() - start) / 20 * 1e6
    torch.cuda.synchronize()
    if queued:  # GPU time without host launch gaps (see gpu_time_ms)
        row["fwd_gpu_ms"], row["fwd_host_bound"] = gpu_time_ms(built.fwd)
        row["bwd_gpu_ms"], row["bwd_host_bound"] = gpu_time_ms(built.bwd)
    row.update({key.replace("_ms", "_tflops"): tflops(row, key) for key in TIMES if key in row})
    return row


def _key(r):
    c = r["case"]
    return c["tokens"], c["grads"], c["capacity"], c["backend"], c["density"]


PHASES = {"gpu": ("fwd_gpu_ms", "bwd_gpu_ms"), "eager": ("fwd_ms", "bwd_ms")}


def evaluate(rows: list[dict]) -> list[dict]:
    """Target checks per (timing, tokens, grads, direction, density) for the fixed-capacity triton rows.

    `eager` is do_bench over Python calls (host launch overhead included where it exceeds the GPU
    time); `gpu` is the same calls queued behind a GPU sleep (GPU time only, see gpu_time_ms).
    """
    by = {}
    for r in rows:
        if "fwd_ms" in r:
            c = r["case"]
            by[(c["tokens"], c["grads"], c["backend"], c["capacity"] if c["backend"] == "triton" else "-",
                c["density"])] = r
    out = []
    for timing, phases in PHASES.items():
        for (tokens, grads, backend, capacity, d), r in sorted(by.items()):
            if backend != "triton" or capacity != "all":
                continue
            dense = by.get((tokens, grads, "dense", "-", 1.0))
            gather = by.get((tokens, grads, "torch-gather", "-", d))
            for phase in phases:
                t = r.get(phase)
                if t is None:
                    continue
                row = {"timing": timing, "tokens": tokens, "grads": grads, "density": d, "phase": phase[:3],
                       "triton_ms": t}
                if dense and dense.get(phase) is not None:
                    dt = dense[phase]
                    row["dense_ms"] = dt
                    row["T1_bound_ms"] = 1.15 * d * dt + 0.020
                    row["T1"] = t <= row["T1_bound_ms"]
                    row["speedup_vs_dense"] = dt / t
                    if math.isclose(d, 0.1):
                        row["T2"] = dt / t >= 5.0
                    if math.isclose(d, 1.0):
                        row["T3"] = t <= 1.10 * dt
                if gather and gather.get(phase) is not None:
                    row["gather_ms"] = gather[phase]
                    row["T4"] = t <= 1.10 * gather[phase]
                    row["vs_gather"] = t / gather[phase]
                out.append(row)
    return out


def table(rows: list[dict]) -> str:
    """One line per timed case; TF: TFLOP/s of the time to its left (`useful_flops`)."""
    lines = [f"{'tokens':>6} {'grads':>5} {'backend':>13} {'cap':>5} {'dens':>5} {'fwd_ms':>8} {'TF':>5} "
             f"{'bwd_ms':>8} {'TF':>5} {'fwd_gpu':>7} {'TF':>5} {'bwd_gpu':>7} {'TF':>5} {'host_us':>7} "
             f"{'fwd_err':>8} {'bwd_err':>8} ok"]
    fmt = lambda v, f: "-" if v is None else format(v, f)
    for r in sorted((r for r in rows if "fwd_ms" in r), key=_key):
        c = r["case"]
        cap = c["capacity"][:5] if c["backend"] == "triton" else "-"
        times = " ".join(f"{fmt(r.get(k), '.4f'):>{8 if k in ('fwd_ms', 'bwd_ms') else 7}} "
                         f"{fmt(tflops(r, k), '.1f'):>5}" for k in TIMES)
        lines.append(f"{c['tokens']:>6} {c['grads']:>5} {c['backend']:>13} {cap:>5} {c['density']:>5.2f} {times} "
                     f"{r.get('fwd_host_us', float('nan')):>7.1f} "
                     f"{r['fwd_rel_err']:>8.1e} {r['bwd_rel_err']:>8.1e} {'y' if r['correct'] else 'NO'}")
    for r in rows:
        if "error" in r:
            lines.append(f"ERROR {r['case']}: {r['error']}")
        if r.get("fwd_host_bound") or r.get("bwd_host_bound"):
            lines.append(f"note: host-bound queued timing for {r['case']}")
    return "\n".join(lines)


def targets_table(checks: list[dict]) -> str:
    lines = [f"{'timing':>6} {'tokens':>6} {'grads':>5} {'ph':>3} {'dens':>5} {'triton':>8} {'dense':>8} "
             f"{'T1bound':>8} {'xdense':>6} {'gather':>8} {'t/gath':>6}  targets"]
    fmt = lambda v, f: "-" if v is None else format(v, f)
    for c in checks:
        flags = " ".join(f"{k}={'ok' if c[k] else 'MISS'}" for k in ("T1", "T2", "T3", "T4") if k in c)
        lines.append(f"{c['timing']:>6} {c['tokens']:>6} {c['grads']:>5} {c['phase']:>3} {c['density']:>5.2f} "
                     f"{c['triton_ms']:>8.4f} {fmt(c.get('dense_ms'), '8.4f'):>8} "
                     f"{fmt(c.get('T1_bound_ms'), '8.4f'):>8} {fmt(c.get('speedup_vs_dense'), '6.2f'):>6} "
                     f"{fmt(c.get('gather_ms'), '8.4f'):>8} {fmt(c.get('vs_gather'), '6.2f'):>6}  {flags}")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens = sorted({r["case"]["tokens"] for r in rows if "fwd_ms" in r and r["case"]["grads"] == "x"})
    panels = [("fwd_gpu_ms", "fwd, GPU time"), ("bwd_gpu_ms", "bwd, GPU time"), ("fwd_ms", "fwd, eager do_bench"),
              ("bwd_ms", "bwd, eager do_bench")]
    fig, axes = plt.subplots(len(tokens), len(panels), figsize=(4.2 * len(panels), 3.6 * len(tokens)), squeeze=False)
    for i, t in enumerate(tokens):
        for j, (phase, label) in enumerate(panels):
            ax = axes[i][j]
            for backend in ("dense", "torch-gather", "triton"):
                pts = sorted((1 - r["case"]["density"], r[phase]) for r in rows if r.get(phase) is not None
                             and r["case"]["tokens"] == t and r["case"]["grads"] == "x"
                             and r["case"]["backend"] == backend and r["case"]["capacity"] == "all")
                if backend == "dense" and pts:
                    ax.axhline(pts[0][1], color="k", ls="--", label="dense")
                elif pts:
                    ax.plot(*zip(*pts, strict=True), marker="o", label=backend)
            ax.set_title(f"tokens={t}, {label}", fontsize=9)
            ax.set_xlabel("sparsity (1 - density)")
            ax.set_ylabel("ms")
            ax.legend(fontsize=8)
    fig.suptitle("Neuron-block MLP, fp16, d_model=2048, ffn=8192, block 64 (frozen weights: grads for x)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


DIAGNOSE_MODES = {  # name: (LONGEXPOSURE_TMA, LONGEXPOSURE_PERSISTENT), None = unset (the defaults)
    "pointer": ("0", "0"), "tma": ("1", "0"), "tma persistent": ("1", "1"), "defaults": (None, None)}


def diagnose(spaces: tuple[str, ...] = ("library", "small"), densities: tuple[float, ...] = (1.0, 0.62, 0.1),
             scattered: bool = False, tokens: int = 2048, epilogues: bool = False,
             modes: tuple[str, ...] = ("pointer", "tma")) -> dict:
    """Per-kernel CUDA-graph times (and TFLOP/s) against the matching torch matmul, with pointer loads and with
    tensor descriptors (LONGEXPOSURE_TMA=1), at densities 1.0 / 0.62 / 0.1 (the first blocks: consecutive ids, as a
    reordered layer's), and where the host time goes. Mode "tma persistent" adds LONGEXPOSURE_PERSISTENT=1 to the
    descriptors (timed here until run 8, within 1% of one program per tile at density 1.0; again since sdd stores its
    tiles through a descriptor, which lets a persistent program start its next tile while the store drains).

    Each density has its own capacity (ids of exactly its blocks), so each is tuned at its own count, once with the
    library's tile space and once with the space before 256-wide sdd / wgrad tiles (`large_tiles=False`); the
    config each kernel chose is printed beside its time. `scattered` takes each density's blocks at random (sorted,
    seed 0), as a layer in the paper's neuron order has them: sdd's tiles then gather their weight rows through
    pointers, and the cuBLAS rows multiply the same blocks gathered beforehand. `tokens`: fig7's step has 4096.
    `epilogues` adds fc1 with less of its epilogue (no ReLU bits; no bias or ReLU either): what each part costs.
    `modes` names the switch settings timed (`DIAGNOSE_MODES`; "defaults" leaves both unset: Hopper's defaults)."""
    import cProfile
    import io
    import pstats

    import triton.testing
    from longexposure.kernels import neuron_block_mlp as k

    dev, dt = "cuda", torch.float16
    t_, d, ffn, blk = tokens, 2048, 8192, 64
    out: dict = {"setup": {"tokens": t_, "d": d, "ffn": ffn, "block": blk,
                           "ids": "sorted random blocks (seed 0)" if scattered else "the first blocks"}}
    g = lambda f: triton.testing.do_bench_cudagraph(f, rep=40, return_mode="median")
    x = torch.randn(t_, d, device=dev, dtype=dt)
    w1 = torch.randn(ffn, d, device=dev, dtype=dt) * d**-0.5
    w2n = torch.randn(ffn, d, device=dev, dtype=dt) * ffn**-0.5  # fc2.weight^T, neuron-major
    b1, b2 = torch.zeros(ffn, device=dev, dtype=dt), torch.zeros(d, device=dev, dtype=dt)
    tuned = (k._sdd_kernel, k._dsd_kernel, k._wgrad_kernel)
    library_space = {kern: kern.configs for kern in tuned}

    def kernel_times(density: float) -> dict[str, float]:  # one density; every lambda is timed at once
        n = int(ffn // blk * density)
        if scattered:
            pick = torch.randperm(ffn // blk, generator=torch.Generator().manual_seed(0))[:n].sort().values
            ids = pick.to(device=dev, dtype=torch.int32)
        else:
            ids = torch.arange(n, device=dev, dtype=torch.int32)
        cnt = torch.tensor([n], device=dev, dtype=torch.int32)
        h = torch.empty(t_, n * blk, device=dev, dtype=dt)
        bits = k.relu_bits(t_, n * blk, dev)
        k._launch_sdd(x, w1, ids, cnt, blk, bias=b1, mask=bits, out=h)
        o = torch.empty(t_, d, device=dev, dtype=dt)
        gw = torch.zeros(ffn, d, device=dev, dtype=dt)
        rows = (ids.long()[:, None] * blk + torch.arange(blk, device=dev)).flatten()
        hc, w1c, w2c = h.contiguous(), w1[rows].contiguous(), w2n[rows].contiguous()
        parts = {
            "sdd fc1 (bias+relu)": g(lambda: k._launch_sdd(x, w1, ids, cnt, blk, bias=b1, out=h)),
            "sdd fc1 (no epilogue)": g(lambda: k._launch_sdd(x, w1, ids, cnt, blk, epilogue=0, out=h)),
        } if epilogues else {}
        return parts | {
            "sdd fc1 (bias+relu+bits)": g(lambda: k._launch_sdd(x, w1, ids, cnt, blk, bias=b1, mask=bits, out=h)),
            "mm x@W1c^T": g(lambda: torch.mm(x, w1c.t())),
            "dsd fc2 (bias)": g(lambda: k._launch_dsd(h, w2n, ids, cnt, blk, bias=b2, out=o)),
            "mm hc@W2c": g(lambda: torch.mm(hc, w2c)),
            "sdd dZ (bits)": g(lambda: k._launch_sdd(o, w2n, ids, cnt, blk, mask=bits, epilogue=2, out=h)),
            # the gradient as the backward makes it: every row written, the inactive blocks' zeroed in the kernel;
            # and as before 2026-12-06, a zero fill, then the products
            "wgrad dW1 = dZ^T x, other rows zeroed": g(lambda: k._launch_wgrad(h, x, ids, cnt, blk, out=gw)),
            "zeros_like(W1) + wgrad products": g(lambda: k._launch_wgrad(h, x, ids, cnt, blk, zero_rest=False,
                                                                         out=torch.zeros_like(w1))),
            "mm hc^T@x": g(lambda: torch.mm(hc.t(), x)),
            "zeros_like(W1)": g(lambda: torch.zeros_like(w1)),
        }

    def chosen() -> dict[str, str]:  # the config each kernel's autotuner settled on last
        return {name: str(kern.best_config) for name, kern in zip(("sdd", "dsd", "wgrad"), tuned, strict=True)
                if getattr(kern, "best_config", None) is not None}

    before = {name: os.environ.get(name) for name in ("LONGEXPOSURE_TMA", "LONGEXPOSURE_PERSISTENT")}
    modes = {"" if mode == "pointer" else f" {mode}": DIAGNOSE_MODES[mode] for mode in modes}
    for space in spaces:  # the library's tile space, then the one without 256-wide sdd / wgrad tiles
        for kern in tuned:
            kern.configs = library_space[kern] if space == "library" or kern is k._dsd_kernel else \
                k._autotune_configs(large_tiles=False)
            kern.cache.clear()
        k._CHOSEN.clear()
        for density in densities:
            n_cols = int(ffn // blk * density) * blk
            flop = 2.0 * t_ * d * n_cols  # every product here has this many
            for suffix, switches in modes.items():  # pointer loads, then descriptors (switches read per launch)
                for name, value in zip(("LONGEXPOSURE_TMA", "LONGEXPOSURE_PERSISTENT"), switches, strict=True):
                    if value is None:
                        os.environ.pop(name, None)
                    else:
                        os.environ[name] = value
                label = f"{space} tiles, density {density}{' scattered' if scattered else ''}{suffix}"
                out[label] = kernel_times(density)
                out[label + " TFLOP/s"] = {
                    name: round(flop / ms / 1e9, 1) for name, ms in out[label].items() if not name.startswith("zeros")
                }
                out[label + " configs"] = chosen()
                print(label, json.dumps(out[label]))
                print(label, "TFLOP/s", json.dumps(out[label + " TFLOP/s"]))
                print(label, "configs", json.dumps(out[label + " configs"]))
    for kern in tuned:
        kern.configs = library_space[kern]
        kern.cache.clear()
    k._CHOSEN.clear()
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    built = build_case(MlpOperatorCase(backend="triton", density=0.1), "cuda")
    for _ in range(5):
        built.fwd()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(200):
        built.fwd()
    prof.disable()
    torch.cuda.synchronize()
    buf = io.StringIO()
    # cumulative order: a custom op's backend_impl is re-entered through the dispatcher, and cProfile books its
    # callee's whole time as its own "tottime" too (375 us a call on the H100, torch 2.11: the forward itself)
    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(30)
    out["host_profile_200_fwd"] = buf.getvalue()[-8000:]
    print(out["host_profile_200_fwd"])
    return out


def profile_kernels(cases: list[MlpOperatorCase], calls: int = 5) -> dict:
    """Where each case's forward and backward spend their GPU time: torch.profiler's kernel list (name, calls and
    microseconds per call of `fwd` / `bwd`), after warm-up calls (autotuning included). What the queued timings do
    not say: which kernels (fills, casts, copies) besides the matmuls a call launches, and how long each takes."""
    out = {}
    for case in cases:
        built = build_case(case, "cuda", seed=0)
        label = f"{case.backend} grads={case.grads} density={case.density} capacity={case.capacity}"
        for phase, fn in (("fwd", built.fwd), ("bwd", built.bwd)):
            kernels = cuda_kernels(fn, calls)
            total = sum(us for _, _, us in kernels)
            out[f"{label} {phase}"] = {"us_per_call": round(total, 1),
                                        "kernels": [[name[:90], n, round(us, 2)] for name, n, us in kernels]}
            print(f"{label} {phase}: {total:.1f} us of kernels a call")
            for name, n, us in kernels:
                print(f"    {us:8.2f} us  x{n:<4g} {name[:90]}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, help="JSON file to write (rows, target checks, meta)")
    ap.add_argument("--quick", action="store_true", help="densities 1.0/0.5/0.1 and 2048 tokens only")
    ap.add_argument("--no-queued", action="store_true", help="skip the GPU-only (queued) timings")
    ap.add_argument("--report", type=Path, help="re-print tables and draw the plot from an existing JSON")
    ap.add_argument("--diagnose", type=Path, help="per-kernel times and a host profile, written to this JSON")
    ap.add_argument("--diagnose-spaces", nargs="+", default=["library", "small"], choices=["library", "small"],
                    help="--diagnose: tile spaces (library: with 256-wide sdd / wgrad tiles; small: without)")
    ap.add_argument("--diagnose-densities", type=float, nargs="+", default=[1.0, 0.62, 0.1])
    ap.add_argument("--diagnose-persistent", action="store_true",
                    help="--diagnose: also descriptors with LONGEXPOSURE_PERSISTENT=1")
    ap.add_argument("--diagnose-scattered", action="store_true",
                    help="--diagnose: each density's blocks at random (the paper's neuron order), not the first ones")
    ap.add_argument("--diagnose-tokens", type=int, default=2048, help="--diagnose: tokens (fig7's step: 4096)")
    ap.add_argument("--diagnose-modes", nargs="+", default=["pointer", "tma"], choices=list(DIAGNOSE_MODES),
                    help="--diagnose: switch settings timed (defaults: both switches unset)")
    ap.add_argument("--diagnose-epilogues", action="store_true",
                    help="--diagnose: also fc1 without its ReLU bits, and without any epilogue")
    ap.add_argument("--profile", type=Path,
                    help="per-kernel GPU time (torch.profiler) of the quick grid's triton and torch-gather cases at "
                         "densities 1.0 and 0.1, written to this JSON")
    args = ap.parse_args(argv)

    if args.report:
        data = json.loads(args.report.read_text())
        text = (f"# {data['meta'].get('device', '?')}: {args.report.name}\n\n"
                f"Generated by `python benchmarks/bench_mlp_operator.py --report {args.report}`.\n\n"
                f"```\n{table(data['rows'])}\n```\n\n```\n{targets_table(data['targets'])}\n```\n")
        args.report.with_suffix(".md").write_text(text)
        print(text)
        plot(data["rows"], args.report.with_suffix(".png"))
        print(f"plot: {args.report.with_suffix('.png')}")
        return 0
    if not torch.cuda.is_available():
        print("bench_mlp_operator: needs a CUDA device", file=sys.stderr)
        return 2

    if args.profile:
        cases = [c for c in matrix(quick=True) if c.density in (1.0, 0.1) and c.capacity == "all"]
        args.profile.parent.mkdir(parents=True, exist_ok=True)
        args.profile.write_text(json.dumps(profile_kernels(cases), indent=1))
        if not (args.out or args.diagnose):
            return 0
    if args.diagnose:
        modes = tuple(dict.fromkeys([*args.diagnose_modes, *(["tma persistent"] if args.diagnose_persistent else [])]))
        args.diagnose.write_text(json.dumps(diagnose(tuple(args.diagnose_spaces), tuple(args.diagnose_densities),
                                                     args.diagnose_scattered, args.diagnose_tokens,
                                                     args.diagnose_epilogues, modes), indent=1))
        if not args.out:
            return 0
    from longexposure.suite.provenance import provenance

    meta = {**provenance(), "dtype": "float16", "d_model": 2048, "ffn": 8192, "block_size": 64,
            "timer": "triton.testing.do_bench median (warmup 25 ms, rep 100 ms)"}
    rows = []
    t0 = time.time()
    for case in matrix(args.quick):
        try:
            rows.append(run_case(case, queued=not args.no_queued))
        except Exception as exc:  # keep going: one bad case must not lose the rest
            rows.append({"case": asdict(case), "error": f"{type(exc).__name__}: {exc}"[:500]})
        if args.out:  # rewritten after every case, so a run cut short keeps what it measured
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"meta": meta, "rows": rows, "targets": evaluate(rows)}, indent=1))
        r = rows[-1]
        print(f"[{time.time() - t0:6.1f}s] {r['case']['backend']:>12} T={case.tokens} d={case.density} "
              f"grads={case.grads} cap={case.capacity}: "
              + (f"fwd {r['fwd_ms']:.4f} bwd {r['bwd_ms']:.4f} ok={r['correct']}" if "fwd_ms" in r else r["error"]))
    checks = evaluate(rows)
    meta["seconds"] = time.time() - t0
    from longexposure.kernels import neuron_block_mlp as kernels

    meta["autotuned"] = {
        name: {str(k): str(v) for k, v in getattr(kernels, name).cache.items()}
        for name in ("_sdd_kernel", "_dsd_kernel", "_wgrad_kernel", "_wgrad_skinny_kernel")
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "rows": rows, "targets": checks}, indent=1))
    print(table(rows))
    print(targets_table(checks))
    return 0 if all(r.get("correct") for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
