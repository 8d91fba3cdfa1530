"""Cost of one MLP predictor refresh over every layer: the per-layer path it was vs. `refresh_layers`.

    before       what `Exposure.after_step` ran until now, layer by layer: an fp32 fc1 product, an evaluation
                 per slack of the grid with several `.item()` per unit, `train_mlp` (a host read per logged
                 loss and scale); a copy of that code lives here as the baseline.
    per-layer    today's `MlpRefresher(x)` called for each layer in turn (the code below, one layer at a
                 time: one host read per layer).
    grouped      `refresh_layers`: every layer at once, the predictors trained together (stacked parameters;
                 on CUDA replayed from a captured graph, bf16 matmuls for bf16 inputs), one host read.
    grouped-kept the same with `keep`: the captured training step is kept between refreshes and replayed
                 (no eager warm-up steps and no capture after the first refresh).

Random weights (fc1 with a negative bias, so blocks go quiet), random inputs, random-init mlp-lowrank
predictors; each variant first runs `buffer` refreshes, so its training pool is at its full size. With
`--phases`, the grouped refresh is split into its parts (each synchronized); with `--profile`, one grouped-kept
refresh per step count runs under the profiler (GPU busy vs wall, the top device kernels and host calls: where a
refresh's time goes). On CUDA, `host syncs` counts synchronizing calls with `torch.cuda.set_sync_debug_mode`.

    python benchmarks/bench_refresh.py   # CUDA if present, bf16: 8 layers, d 2048, ffn 8192, 4096 tokens
    python benchmarks/bench_refresh.py --layers 4 --d 256 --ffn 1024 --tokens 512   # CPU-sized
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from longexposure.predictors.lowrank import MlpLowRank, PredictorConfig
from longexposure.predictors.offline import LayerData, _calibrate, mlp_block_stats, mlp_truth, train_mlp
from longexposure.predictors.refresh import (
    REFRESH_SLACKS,
    MlpRefresher,
    RefreshConfig,
    _calibrate_group,
    layer_data,
    refresh_layers,
)
from tabulate import tabulate

from longexposure.measure import Stats, time_fn
from longexposure.suite.provenance import device_name, provenance


# ============================================================================== the refresh as it was
def _before_layer_data(x: torch.Tensor, fc1: torch.nn.Linear, block: int) -> LayerData:
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        x2 = x.detach().reshape(-1, x.shape[-1]).float()
        bias = None if fc1.bias is None else fc1.bias.float()
        frac, mass = mlp_block_stats(F.relu(F.linear(x2, fc1.weight.float(), bias)), block)
        return LayerData(mlp_x=x2[None, None], mlp_frac=frac[None, None], mlp_mass=mass[None, None])


@torch.no_grad()
def _before_evaluate(pred: MlpLowRank, data: LayerData) -> dict[str, float]:
    policy = pred.config.exposer()
    rows = []
    for u in range(data.units()):
        truth, mass = mlp_truth(data, u, policy)
        got = pred.block_mask(data.mlp_x[u])
        hit = (got & truth).sum().item()
        rows.append(
            {
                "recall": hit / max(1, truth.sum().item()),
                "precision": hit / max(1, got.sum().item()),
                "density": got.float().mean().item(),
                "exposer_density": truth.float().mean().item(),
                "mass_kept": float(mass[got].sum() / mass.sum().clamp_min(1e-12)),
                "exposer_mass_kept": float(mass[truth].sum() / mass.sum().clamp_min(1e-12)),
            }
        )
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}


def _before_refresh(r: MlpRefresher, x: torch.Tensor) -> dict[str, float]:
    data = _before_layer_data(x, r.fc1, r.pred.config.block_size)
    before = _before_evaluate(r.pred, data)
    slack = _calibrate(r.pred, "slack", REFRESH_SLACKS, lambda: _before_evaluate(r.pred, data)["recall"], 0.97)
    after = _before_evaluate(r.pred, data)
    tokens = data.mlp_x.shape[2]
    if tokens > r.config.keep_tokens:  # drawn on the host, then copied over (which waits for the device)
        gen = r.__dict__.setdefault("host_gen", torch.Generator().manual_seed(r.seed))
        pick = torch.randperm(tokens, generator=gen)[: r.config.keep_tokens].to(x.device)
        data = LayerData(**{k: getattr(data, k).index_select(2, pick) for k in ("mlp_x", "mlp_frac", "mlp_mass")})
    r.recent.append(data)
    with torch.enable_grad():
        r.pred.requires_grad_(True)
        train_mlp(r.pred, r._pool(), steps=r.config.steps, lr=r.config.lr, seed=r.count)
        r.pred.requires_grad_(False).eval()
    r.count += 1
    return {"recall_before": before["recall"], "recall_after": after["recall"], "slack": slack}


# ============================================================================================ setup
def build(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, steps: int) -> dict[int, MlpRefresher]:
    gen = torch.Generator().manual_seed(0)
    config = RefreshConfig(steps=steps)
    refreshers = {}
    for layer in range(args.layers):
        fc1 = torch.nn.Linear(args.d, args.ffn)
        with torch.no_grad():
            fc1.weight.copy_(torch.randn(fc1.weight.shape, generator=gen) / args.d**0.5)
            fc1.bias.copy_(torch.randn(args.ffn, generator=gen) * 0.5 - 1.0)
        pc = PredictorConfig(block_size=args.block, rank=args.rank, theta=0.1, fixed_capacity=True)
        torch.manual_seed(layer)
        pred = MlpLowRank(args.d, args.ffn, pc).to(device).eval().requires_grad_(False)
        refreshers[layer] = MlpRefresher(pred, fc1.to(device, dtype).requires_grad_(False), config, seed=layer)
    return refreshers


def inputs(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, seed: int) -> dict[int, torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(seed)
    return {i: torch.randn(args.tokens, args.d, generator=gen, device=device).to(dtype) for i in range(args.layers)}


def host_syncs(fn: Any, device: torch.device) -> int | None:
    """Synchronizing CUDA calls in one `fn()` (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("called a synchronizing CUDA operation" in str(w.message) for w in seen)


def run_variant(name: str, args, device, dtype, steps: int) -> dict[str, Any]:
    refreshers = build(args, device, dtype, steps)
    feeds = [inputs(args, device, dtype, seed) for seed in range(4)]
    calls = iter(range(10**9))

    def one() -> None:
        xs = feeds[next(calls) % len(feeds)]
        if name == "before":
            for layer, x in xs.items():
                _before_refresh(refreshers[layer], x)
        elif name == "per-layer":
            for layer, x in xs.items():
                refreshers[layer](x)
        else:
            refresh_layers(refreshers, xs, keep=kept if name == "grouped-kept" else None)

    kept: dict = {}
    stats = time_fn(one, device, warmup=RefreshConfig().buffer, reps=args.reps)
    return {"variant": name, "steps": steps, **_ms(stats), "host_syncs": host_syncs(one, device)}


def phases(args, device, dtype, steps: int) -> dict[str, Stats]:
    """The grouped refresh's parts, each synchronized: fc1 + block stats, calibration, training (on CUDA eager
    and captured, with fp32 and input-dtype matmuls; a refresh of bf16 / fp16 inputs captures and uses theirs)."""
    from longexposure.predictors.offline import train_mlp_group

    refreshers = build(args, device, dtype, steps)
    xs = inputs(args, device, dtype, 0)
    for _ in range(RefreshConfig().buffer):
        refresh_layers(refreshers, xs)
    data = {i: layer_data(x, refreshers[i].fc1, args.block) for i, x in xs.items()}
    rs = list(refreshers.values())
    pools = [r._pool() for r in rs]
    preds = [r.pred for r in rs]
    out = {
        "layer_data": time_fn(lambda: [layer_data(xs[i], r.fc1, args.block) for i, r in refreshers.items()], device),
        "calibrate": time_fn(lambda: _calibrate_group(rs, [data[i] for i in refreshers]).tolist(), device),
    }
    cuda, low_inputs = device.type == "cuda", dtype != torch.float32
    for graph in (False, True) if cuda else (False,):
        for low in (None, dtype) if cuda and low_inputs else (None,):
            name = f"train ({'graph' if graph else 'eager'}, {str(low or torch.float32)[6:]} matmuls)"
            run = lambda g=graph, m=low: train_mlp_group(  # noqa: E731
                preds, pools, steps=steps, lr=1e-3, seeds=0, matmul_dtype=m, graph=g
            ).tolist()
            out[name] = time_fn(run, device, reps=args.reps)
            if graph:
                kept: dict = {}
                run = lambda m=low, k=kept: train_mlp_group(  # noqa: E731
                    preds, pools, steps=steps, lr=1e-3, seeds=0, matmul_dtype=m, graph=True, keep=k
                ).tolist()
                out[name.replace("graph", "graph kept")] = time_fn(run, device, reps=args.reps)
    return out


def profiled(args, device, dtype, steps: int, top: int = 15) -> dict[str, Any]:
    """One grouped-kept refresh (after `buffer` of them: full pool, graph captured) under the profiler: wall ms,
    GPU busy ms (the sum of kernel times), launches, and the top kernels and host calls by self time."""
    from torch.profiler import ProfilerActivity, profile

    refreshers, kept = build(args, device, dtype, steps), {}
    feeds = [inputs(args, device, dtype, seed) for seed in range(2)]
    for i in range(RefreshConfig().buffer + 1):
        refresh_layers(refreshers, feeds[i % 2], keep=kept)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda *_: None
    sync(device)
    with profile(activities=activities) as prof:
        started = time.perf_counter()
        refresh_layers(refreshers, feeds[0], keep=kept)
        sync(device)
        wall = (time.perf_counter() - started) * 1e3
    events = prof.key_averages()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    by = lambda rows, key: sorted(rows, key=key, reverse=True)[:top]  # noqa: E731
    return {
        "steps": steps,
        "wall_ms": round(wall, 2),
        "gpu_busy_ms": round(sum(e.self_device_time_total for e in kernels) / 1e3, 3),
        "launches": sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaGraphLaunch")),
        "top_gpu": [(e.key[:100], e.count, round(e.self_device_time_total / 1e3, 3))
                    for e in by(kernels, lambda e: e.self_device_time_total)],  # fmt: skip
        "top_cpu": [(e.key[:100], e.count, round(e.self_cpu_time_total / 1e3, 3))
                    for e in by(events, lambda e: e.self_cpu_time_total)],  # fmt: skip
    }


def _ms(stats: Stats) -> dict[str, float]:
    return {"ms_p50": round(stats.p50, 2), "ms_p20": round(stats.p20, 2), "ms_p80": round(stats.p80, 2)}


def main() -> None:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--dtype", default="bf16" if cuda else "fp32", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--d", type=int, default=2048)
    parser.add_argument("--ffn", type=int, default=8192)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per batch (B * S)")
    parser.add_argument("--steps", type=int, nargs="+", default=[50, 20], help="optimizer steps per refresh")
    parser.add_argument("--variants", nargs="+", default=["before", "per-layer", "grouped", "grouped-kept"])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1: steadier on a shared CPU)")
    parser.add_argument("--phases", action="store_true", help="also time the grouped refresh's parts")
    parser.add_argument("--profile", action="store_true", help="also profile one grouped-kept refresh per step count")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    torch.set_grad_enabled(False)  # as after a training step's backward: the refresh enables what it needs
    rows = [run_variant(v, args, device, dtype, s) for s in args.steps for v in args.variants]
    shape = f"{args.layers} layers, d {args.d}, ffn {args.ffn}, block {args.block}, rank {args.rank}"
    where = device_name(device)
    print(f"one refresh of all layers: {shape}, {args.tokens} tokens, {args.dtype} inputs")
    print(f"{where}, torch {torch.__version__}")
    print(tabulate(rows, headers="keys", tablefmt="github"))
    extra = {}
    if args.phases:
        for s in args.steps:
            parts = phases(args, device, dtype, s)
            extra[f"phases_steps_{s}"] = {k: v.to_dict() for k, v in parts.items()}
            print(f"\ngrouped, {s} steps, by part (each synchronized):")
            print(tabulate([{"part": k, **_ms(v)} for k, v in parts.items()], headers="keys", tablefmt="github"))
    if args.profile:
        for s in args.steps:
            prof = extra[f"profile_steps_{s}"] = profiled(args, device, dtype, s)
            print(f"\ngrouped-kept, {s} steps, profiled: wall {prof['wall_ms']} ms, GPU busy {prof['gpu_busy_ms']} ms, "
                  f"{prof['launches']} launches")  # fmt: skip
            for side in ("top_gpu", "top_cpu"):
                for key, count, ms in prof[side]:
                    print(f"   {side[4:]} {ms:8.3f} ms x{count:5d} {key}")
    if args.out:
        meta = {**provenance(device), "args": vars(args)}
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows, **extra}, indent=2) + "\n")


if __name__ == "__main__":
    main()
