"""Where a fine-tuning step's time goes: wall time per step against the GPU's busy time, and the top
host-side and device-side operators (torch.profiler), for dense and Long Exposure variants side by side.

A step whose wall time is well above its summed kernel time is bound by the host (Python and kernel
launches), and a sparse kernel cannot make it faster; this script tells the two cases apart.

Usage (GPU):
    LONGEXPOSURE_SHARED=/path/to/shared python3 benchmarks/profile_step.py --seq 1024 \
        --variants sdpa,le,le-compile,sdpa-compile --out profile.json

`e2e-*` variants profile the e2e_real setup instead: relu-base pretrained by the project (cached), neurons
reordered on 8 E2E batches, LoRA on the E2E train split, bf16, patterns predicted by predictors trained on 16
batches (cached, shared with the suite), refreshed every 50 steps. Their rows also profile the refresh on its
own (`refresh_*`): its wall time over a few refreshes in a row (the first one builds what later ones reuse)
and its kernels by category, so a refresh's cost can be split into its parts.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.profiler import ProfilerActivity, profile

from longexposure.measure import Timer, synchronize
from longexposure.suite.provenance import provenance
from longexposure.training import Trainer, TrainingSetup

REPLAY = {"source": "replay", "profile": "reference", "theta": 0.1, "attn_block": 64, "mlp_block": 64}
REORDERED = {**REPLAY, "reorder": True, "mlp_mass": 0.9}
VARIANTS = {
    "eager": {"attn": "eager"},
    "sdpa": {"attn": "sdpa"},
    "sdpa-compile": {"attn": "sdpa", "compile": True},
    "sdpa-graph": {"attn": "sdpa", "cuda_graph": True},
    "le": {"attn": "sdpa", "exposure": REPLAY},
    "le-graph": {"attn": "sdpa", "exposure": REPLAY, "cuda_graph": True},
    "le-compile": {"attn": "sdpa", "exposure": REPLAY, "compile": True},
    "le-mlp": {"attn": "sdpa", "exposure": {**REPLAY, "attention": False}},
    "le-attn": {"attn": "sdpa", "exposure": {**REPLAY, "mlp": False}},
    "sdpa-compile-graph": {"attn": "sdpa", "compile": True, "cuda_graph": True},
    "le-compile-graph": {"attn": "sdpa", "exposure": REPLAY, "compile": True, "cuda_graph": True},
    "le-reordered-graph": {"attn": "sdpa", "exposure": REORDERED, "cuda_graph": True},
    "le-reordered-compile-graph": {"attn": "sdpa", "exposure": REORDERED, "compile": True, "cuda_graph": True},
}
# the e2e_real setup (suites/e2e_real.yaml, paper preset): a real model with predicted patterns
PREDICTED = {"source": "predicted", "predictors": "auto", "mlp_block": 64, "attn_block": 64, "theta": 0.1, "tau": 0.95,
             "refresh_every": 50}  # fmt: skip
E2E = {
    "model": "relu-base", "weights": "pretrained", "dataset": "e2e", "data_split": "train", "precision": "bf16-amp",
    "lr": 1e-3, "method_options": {"dropout": 0.0}, "model_options": {"dropout": 0.0, "attention_dropout": 0.0},
}  # fmt: skip
E2E_VARIANTS = {
    "e2e-compile-graph": {"attn": "sdpa", "compile": True, "cuda_graph": True},
    "e2e-le-compile-graph": {"attn": "sdpa", "compile": True, "cuda_graph": True, "exposure": PREDICTED},
    "e2e-le-mlp-compile-graph": {
        "attn": "sdpa", "compile": True, "cuda_graph": True, "exposure": {**PREDICTED, "attention": False},
    },
    "e2e-le-mlp-theta0.3-compile-graph": {  # e2e_real's stricter exposer, level with dense by mean at 77ef17a
        "attn": "sdpa", "compile": True, "cuda_graph": True,
        "exposure": {**PREDICTED, "attention": False, "theta": 0.3},
    },
}  # fmt: skip
# kernel name -> category, first match wins (names as the profiler shows them on Hopper with torch 2.11)
CATEGORIES = (
    ("inductor (fused elementwise/reductions)", ("triton_poi", "triton_red", "triton_per", "triton_")),
    ("neuron-block MLP (ours)", ("_sdd", "_dsd", "_wgrad", "_colsum", "neuron", "_mlp")),
    ("block-sparse attention (ours)", ("_attn", "block_sparse", "_bsa")),
    ("dense attention (sdpa / flash)", ("flash", "fmha", "attention", "cudnn")),
    ("GEMM (cuBLAS / CUTLASS)", ("gemm", "sm90_xmma", "cutlass", "nvjet", "cublas", "sgemm", "hgemm")),
    ("optimizer", ("adam", "multi_tensor", "foreach", "_amp_")),
    ("copies / casts", ("copy", "cast", "Memcpy", "Memset", "fill")),
    ("layer norm", ("layer_norm", "layernorm")),
    ("elementwise (aten)", ("elementwise", "vectorized", "unrolled", "reduce_kernel", "index")),
)


def category(kernel: str) -> str:
    low = kernel.lower()
    for name, keys in CATEGORIES:
        if any(k.lower() in low for k in keys):
            return name
    return "other"



def _setup(name: str, args: argparse.Namespace) -> TrainingSetup:
    """The variant's setup; an e2e one with its weights and predictors made (or taken from the cache)."""
    if name not in E2E_VARIANTS:
        return TrainingSetup(
            model=args.model, method=args.method, batch=args.batch, seq_len=args.seq, precision="fp16-amp",
            **VARIANTS[name],
        )  # fmt: skip
    from longexposure.finetune import prepare_inputs

    setup = TrainingSetup(method=args.method, batch=args.batch, seq_len=args.seq, **E2E, **E2E_VARIANTS[name])
    return prepare_inputs(setup, reorder_batches=8, predictor_batches=16, predictor_steps=300, device=args.device,
                          seed=0)  # fmt: skip


def _by_category(kernels: list, steps: int) -> dict[str, float]:
    """GPU ms per step by kernel category, largest first."""
    out: dict[str, float] = {}
    for e in kernels:
        cat = category(e.key)
        out[cat] = round(out.get(cat, 0.0) + e.self_device_time_total / 1e3 / steps, 3)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def profile_refresh(trainer: Trainer, args: argparse.Namespace, repeats: int = 4) -> dict:
    """A predictor refresh on its own, as `Exposure.after_step` runs it on the last step's MLP inputs: wall ms of
    `repeats` refreshes in a row (synchronized each), then one more under the profiler (GPU busy, categories,
    the top host-side and device-side operators)."""
    from longexposure.predictors.refresh import refresh_layers

    exposure = trainer.exposure
    inputs = exposure.last_mlp_inputs
    walls = []
    for _ in range(repeats):
        synchronize(args.device)
        t = time.perf_counter()
        refresh_layers(exposure._refreshers, inputs)
        synchronize(args.device)
        walls.append(round((time.perf_counter() - t) * 1e3, 2))
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        refresh_layers(exposure._refreshers, inputs)
        synchronize(args.device)
    events = prof.key_averages()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    top_cpu = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[: args.top]
    top_gpu = sorted(kernels, key=lambda e: e.self_device_time_total, reverse=True)[: args.top]
    row = {
        "refresh_wall_ms": walls,
        "refresh_gpu_busy_ms": sum(e.self_device_time_total for e in kernels) / 1e3,
        "refresh_gpu_ms_by_category": _by_category(kernels, 1),
        "refresh_top_cpu": [(e.key, e.count, round(e.self_cpu_time_total / 1e3, 3)) for e in top_cpu],
        "refresh_top_gpu": [(e.key, e.count, round(e.self_device_time_total / 1e3, 3)) for e in top_gpu],
    }
    print(f"   refresh: wall ms {walls}, GPU busy {row['refresh_gpu_busy_ms']:.1f} ms; by category: "
          + ", ".join(f"{k} {v:.1f}" for k, v in row["refresh_gpu_ms_by_category"].items()))  # fmt: skip
    for key, count, ms in row["refresh_top_cpu"][:10]:
        print(f"   refresh cpu {ms:8.3f} ms x{count:5d} {key[:90]}")
    for key, count, ms in row["refresh_top_gpu"][:10]:  # kernel names say the dtype (e.g. bf16 vs fp32 GEMMs)
        print(f"   refresh gpu {ms:8.3f} ms x{count:5d} {key[:90]}")
    return row


def measure(name: str, args: argparse.Namespace) -> dict:
    setup = _setup(name, args)
    t0 = time.time()
    trainer = Trainer(setup, args.device)
    for _ in range(args.warmup):
        trainer.step(Timer(args.device))
    synchronize(args.device)
    warm_s = time.time() - t0
    walls = []
    for _ in range(args.steps):
        t1 = time.perf_counter()
        trainer.step(Timer(args.device))
        synchronize(args.device)
        walls.append((time.perf_counter() - t1) * 1e3)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            trainer.step(Timer(args.device))
        synchronize(args.device)
    if args.cprofile:
        import cProfile
        import io
        import pstats

        py = cProfile.Profile()
        py.enable()
        for _ in range(3):
            trainer.step(Timer(args.device))
        synchronize(args.device)
        py.disable()
        text = io.StringIO()
        pstats.Stats(py, stream=text).sort_stats("tottime").print_stats(args.top)
        print(text.getvalue()[-6000:], flush=True)
    events = prof.key_averages()
    # kernels only: operator-level events also carry the device time of the kernels they launched
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_ms = sum(e.self_device_time_total for e in kernels) / 1e3 / 2
    top_cpu = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[: args.top]
    top_gpu = sorted(kernels, key=lambda e: e.self_device_time_total, reverse=True)[: args.top]
    by_category = _by_category(kernels, 2)
    walls.sort()
    row = {
        "variant": name,
        "wall_ms_median": walls[len(walls) // 2],
        "wall_ms_min": walls[0],
        "gpu_busy_ms": gpu_ms,
        "warmup_s": warm_s,
        "launches_per_step": sum(e.count for e in events if e.key.startswith(("cudaLaunchKernel", "cuLaunchKernel")))
        / 2,
        "top_cpu": [(e.key, e.count // 2, round(e.self_cpu_time_total / 2e3, 3)) for e in top_cpu],
        "top_gpu": [(e.key, e.count // 2, round(e.self_device_time_total / 2e3, 3)) for e in top_gpu],
        "gpu_ms_by_category": by_category,
        "describe": trainer.describe(),
    }
    print(
        f"== {name}: wall {row['wall_ms_median']:.1f} ms (min {row['wall_ms_min']:.1f}), GPU busy "
        f"{gpu_ms:.1f} ms, warmup {warm_s:.0f} s",
        flush=True,
    )
    for key, count, ms in row["top_cpu"]:
        print(f"   cpu {ms:8.3f} ms x{count:5d} {key[:90]}")
    for key, count, ms in row["top_gpu"][:12]:
        print(f"   gpu {ms:8.3f} ms x{count:5d} {key[:90]}")
    print("   by category: " + ", ".join(f"{k} {v:.1f}" for k, v in by_category.items()))
    if trainer.exposure is not None and trainer.exposure.config.refresh_every:
        row.update(profile_refresh(trainer, args))
    del trainer
    torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="opt-1.3b")
    parser.add_argument("--method", default="lora")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--variants", default="sdpa,le")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--cprofile", action="store_true", help="also print a cProfile of 3 steps (host time)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = []
    for name in args.variants.split(","):
        if name not in VARIANTS and name not in E2E_VARIANTS:
            raise SystemExit(f"unknown variant {name!r}; valid: {sorted(VARIANTS) + sorted(E2E_VARIANTS)}")
        try:
            rows.append(measure(name, args))
        except Exception as exc:  # one failing variant is a recorded row, not a lost run
            print(f"== {name}: FAILED {type(exc).__name__}: {exc}", flush=True)
            rows.append({"variant": name, "error": f"{type(exc).__name__}: {exc}"})
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {
                    **provenance(args.device),
                    "args": vars(args),
                    "rows": rows,
                },
                f,
                indent=1,
                default=str,
            )


if __name__ == "__main__":
    main()
