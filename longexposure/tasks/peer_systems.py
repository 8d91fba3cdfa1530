"""Tasks for the peer systems Sylva (ICS '24) and SP-LoRA, one per reproduced table/figure.

  - `sylva-layer`      Sylva Fig. 5: one linear layer's forward+backward and optimizer-step latency.
  - `sylva-memory`     Sylva Table 2: peak GPU memory of fine-tuning at the paper's r / sigma pairs.
  - `sylva-preprocess` Sylva Sec. 5.6: preprocessing peak memory and time, hierarchical vs exact K-FAC.
  - `splora-step`      SP-LoRA Fig. 1: step time and peak memory of LoRA, SP-LoRA and SPP variants.

Out-of-memory errors propagate: the runner turns them into `OOM` cells.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from longexposure.data import model_batches
from longexposure.measure import (
    Timer,
    gpu_time_ms,
    peak_memory_gib,
    reset_peak_memory,
    synchronize,
    time_fn,
    time_phases,
)
from longexposure.registry import TASKS
from longexposure.suite.context import RunContext

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# precision -> (dtype of frozen weights, autocast dtype or None); trainable parameters are fp32 under amp.
PRECISIONS = {
    "fp32": (torch.float32, None),
    "bf16-amp": (torch.bfloat16, torch.bfloat16),
    "fp16-amp": (torch.float16, torch.float16),
}
LAYER_METHODS = ("full", "lora", "sylva", "kfac-pruner")
MEMORY_METHODS = ("full", "lora", "sylva", "kfac-pruner")
# Sylva Table 2: (LoRA rank r, sparsity sigma) pairs per model; the paper's three columns.
PAPER_SETTINGS: dict[str, list[tuple[int, float]]] = {
    "gpt2-large": [(32, 0.95), (128, 0.80), (512, 0.50)],
    "llama-3b": [(96, 0.95), (192, 0.90), (384, 0.80)],
    "llama-7b": [(64, 0.98), (128, 0.95), (256, 0.90)],
}
TINY_SETTINGS = [(4, 0.95), (8, 0.90), (16, 0.80)]


def _check(name: str, value: Any, valid) -> None:
    if value not in valid:
        raise ValueError(f"{name} {value!r} is not one of {sorted(valid)}")


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _upcast_trainable(model: nn.Module) -> None:
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()


def _adamw(params, lr: float, device: torch.device):
    return torch.optim.AdamW(params, lr=lr, fused=device.type == "cuda")


# ----------------------------------------------------------------------------------------------- Fig. 5


@dataclass
class SylvaLayerCase:
    """One square linear layer (dim x dim, no bias) fine-tuned by one method."""

    method: str = "sylva"
    dim: int = 4096
    seq_len: int = 2048
    batch: int = 1
    sparsity: float = 0.95
    block: int = 64
    lora_rank: int = 0  # 0: the rank with Sylva's trainable-parameter count at this sparsity
    dtype: str = "bf16"
    backend: str = "auto"
    warmup: int = 3
    reps: int = 20

    def __post_init__(self) -> None:
        _check("method", self.method, LAYER_METHODS)
        _check("dtype", self.dtype, DTYPES)


def matched_lora_rank(out_f: int, in_f: int, sparsity: float, block: int) -> int:
    """LoRA rank with about as many trainable parameters as Sylva's mask at `sparsity`."""
    import math

    from longexposure.methods.sylva_importance import keep_count

    n_blocks = math.ceil(out_f / block) * math.ceil(in_f / block)
    return max(1, round(keep_count(n_blocks, sparsity) * block * block / (out_f + in_f)))


def build_layer(case: SylvaLayerCase, device: torch.device, seed: int = 0):
    """(layer, optimizer, info) for one method on a dim x dim layer."""
    from longexposure.methods.sylva_importance import random_block_mask
    from longexposure.methods.sylva_layer import SylvaAdamW, SylvaLinear
    from longexposure.ops.block_sddmm import block_mask_to_dense

    dtype = DTYPES[case.dtype]
    torch.manual_seed(seed)
    base = nn.Linear(case.dim, case.dim, bias=False, device=device, dtype=dtype)
    info: dict[str, Any] = {"dtype": case.dtype}
    if case.method == "full":
        return base, _adamw(base.parameters(), 1e-4, device), {**info, "impl": "torch nn.Linear, all trainable"}
    if case.method == "lora":
        from peft import LoraConfig
        from peft.tuners.lora import Linear as LoraLinear

        r = case.lora_rank or matched_lora_rank(case.dim, case.dim, case.sparsity, case.block)
        base.weight.requires_grad_(False)
        layer = LoraLinear(base, "default", config=LoraConfig(r=r, lora_alpha=2 * r), r=r, lora_alpha=2 * r)
        layer = layer.to(device=device, dtype=dtype)
        layer.base_layer.weight.requires_grad_(False)
        params = [p for p in layer.parameters() if p.requires_grad]
        return layer, _adamw(params, 1e-4, device), {**info, "impl": "peft.tuners.lora.Linear", "lora_rank": r}
    gen = torch.Generator().manual_seed(seed)
    mask = random_block_mask((case.dim, case.dim), case.block, case.sparsity, gen).to(device)
    w = base.weight.detach()
    if case.method == "kfac-pruner":
        w = w * block_mask_to_dense(mask, tuple(w.shape), case.block).to(w.dtype)
    layer = SylvaLinear(w, None, mask, case.block, backend=case.backend)
    opt = SylvaAdamW([layer], lr=1e-4, backend=case.backend)
    info.update(
        impl="SylvaLinear (embedded; dense fwd/dX, block SDDMM dW) + SylvaAdamW (fused scatter-add)",
        mask="random block mask at the case's sparsity (latency does not depend on which blocks)",
        backend_ran=opt.backend_ran,
        trainable_blocks=layer.nnz_blocks,
    )
    if case.method == "kfac-pruner":
        info["note"] = "pruned weights kept in the dense layout: same kernels as sylva (paper's K-pruner is sparse)"
    return layer, opt, info


@TASKS.register("sylva-layer", case=SylvaLayerCase, help="Sylva Fig. 5: one layer's fwd+bwd and optimizer latency")
def sylva_layer(case: SylvaLayerCase, ctx: RunContext) -> dict[str, Any]:
    device = ctx.device
    layer, opt, info = build_layer(case, device, ctx.seed)
    gen = torch.Generator(device=device).manual_seed(ctx.seed)
    dtype = DTYPES[case.dtype]
    x = torch.randn(case.batch, case.seq_len, case.dim, device=device, dtype=dtype, generator=gen).requires_grad_()
    dy = torch.randn(case.batch, case.seq_len, case.dim, device=device, dtype=dtype, generator=gen)

    def fwd_bwd() -> None:
        layer(x).backward(dy)
        x.grad = None

    reset_peak_memory(device)
    fwd_bwd()
    opt.step()
    peak = peak_memory_gib(device)
    fb = time_fn(fwd_bwd, device, warmup=case.warmup, reps=case.reps)
    step = time_fn(opt.step, device, warmup=case.warmup, reps=case.reps)
    trainable = sum(p.numel() for p in layer.parameters() if p.requires_grad)
    metrics: dict[str, Any] = {
        "fwd_bwd_ms": fb.to_dict(),
        "opt_ms": step.to_dict(),
        "total_ms": fb.p50 + step.p50,
        "trainable_params": float(trainable),
    }
    if device.type == "cuda":  # a single layer's eager time is mostly host launches; this is the GPU's
        (fb_gpu, fb_host_bound), (opt_gpu, opt_host_bound) = gpu_time_ms(fwd_bwd), gpu_time_ms(opt.step)
        metrics.update(fwd_bwd_gpu_ms=fb_gpu, opt_gpu_ms=opt_gpu, total_gpu_ms=fb_gpu + opt_gpu)
        # True: the host could not queue the calls ahead of the GPU, so that GPU time still has gaps in it
        metrics.update(fwd_bwd_gpu_host_bound=fb_host_bound, opt_gpu_host_bound=opt_host_bound)
    if peak is not None:
        metrics["peak_mem_gib"] = peak
    metrics["info"] = {
        **info,
        "weights": "random-init",
        "data": "random activations",
        "sparsity_source": "random block mask" if case.method in ("sylva", "kfac-pruner") else "none (dense)",
    }
    return metrics


# ----------------------------------------------------------------------------------------------- Table 2


@dataclass
class SylvaMemoryCase:
    """One model x method x (r, sigma) fine-tuning cell; `setting` indexes the paper's pairs for the model."""

    model: str = "llama-tiny"
    method: str = "sylva"
    setting: int = 0
    lora_rank: int = 0  # > 0 overrides the setting's r
    sparsity: float = -1.0  # >= 0 overrides the setting's sigma
    block: int = 64
    mask: str = "random"  # random | hierarchical | exact (memory does not depend on which blocks)
    batch: int = 2
    seq_len: int = 512
    precision: str = "bf16-amp"
    steps: int = 3

    def __post_init__(self) -> None:
        _check("method", self.method, MEMORY_METHODS)
        _check("precision", self.precision, PRECISIONS)
        _check("mask", self.mask, ("random", "hierarchical", "exact"))
        if not 0 <= self.setting < 3:
            raise ValueError(f"setting must be 0, 1 or 2 (the paper's three r/sigma columns), got {self.setting}")

    def pair(self) -> tuple[int, float]:
        r, s = PAPER_SETTINGS.get(self.model, TINY_SETTINGS)[self.setting]
        return (self.lora_rank or r), (self.sparsity if self.sparsity >= 0 else s)


def _target_names(model: nn.Module) -> list[str]:
    from longexposure.arch import family

    return sorted({t.rsplit(".", 1)[-1] for t in family(model).projections})


def _prepare_memory_model(case: SylvaMemoryCase, device: torch.device, seed: int):
    from longexposure.methods.builtin import apply_method, apply_method_reporting
    from longexposure.methods.sylva_layer import SylvaAdamW, sylva_layers
    from longexposure.models import build_model

    low, _ = PRECISIONS[case.precision]
    r, sigma = case.pair()
    model = build_model(case.model, device=device, dtype=low, seed=seed)
    info: dict[str, Any] = {}
    if case.method == "full":
        model = apply_method(model, "full")
    elif case.method == "lora":
        model = apply_method(model, "lora", r=r, alpha=2 * r, target_modules=_target_names(model))
    else:
        model, info = apply_method_reporting(
            model,
            case.method,
            sparsity=sigma,
            block=case.block,
            mask=case.mask,
            values_dtype="fp32" if low != torch.float32 else None,
            seed=seed,
            preprocess_batches=2,
            preprocess_batch=2,
            preprocess_seq_len=min(case.seq_len, 128),
        )
    _upcast_trainable(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if case.method in ("sylva", "kfac-pruner"):
        opt = SylvaAdamW(sylva_layers(model), lr=1e-4)
    else:
        opt = _adamw(trainable, 1e-4, device)
    return model, opt, sum(p.numel() for p in trainable), (r, sigma), info


@TASKS.register("sylva-memory", case=SylvaMemoryCase, help="Sylva Table 2: peak fine-tuning memory at r / sigma")
def sylva_memory(case: SylvaMemoryCase, ctx: RunContext) -> dict[str, Any]:

    device = ctx.device
    model, opt, n_trainable, (r, sigma), info = _prepare_memory_model(case, device, ctx.seed)
    _, amp = PRECISIONS[case.precision]
    batches = model_batches(model, batch=case.batch, seq_len=case.seq_len, seed=ctx.seed)
    reset_peak_memory(device)
    times = []
    for _ in range(case.steps):
        batch = next(batches)
        timer = Timer(device)
        with timer.region("step"):
            with _autocast(device, amp):
                loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        times.append(timer.elapsed_ms()["step"])
    from longexposure.measure import Stats

    metrics: dict[str, Any] = {
        "step_ms": Stats.of(times[1:] or times).to_dict(),
        "trainable_params": float(n_trainable),
        "final_loss": float(loss),
    }
    peak = peak_memory_gib(device)
    if peak is not None:
        metrics["peak_mem_gib"] = peak
    metrics["info"] = {
        "r_sigma": f"{r}/{round(sigma * 100)}",
        "weights": "random-init",
        "data": batches.description,
        "precision": case.precision,
        "sparsity_source": f"{info.get('mask_source', 'none')} block mask" if info else "none (dense)",
        "optimizer": type(opt).__name__,
    }
    return metrics


# ----------------------------------------------------------------------------------------------- Sec. 5.6


@dataclass
class SylvaPreprocessCase:
    """Sylva's preprocessing (factors, inversion, importance, masks) with one kind of K-FAC factor."""

    model: str = "llama-tiny"
    factor: str = "hierarchical"  # hierarchical (Sylva) | exact (K-FAC pruner)
    rank: int = 32
    levels: int = 4
    batches: int = 4
    batch: int = 4
    seq_len: int = 128
    sparsity: float = 0.95
    block: int = 64
    reduce: str = "sample"
    dtype: str = "bf16"
    damping: float = 0.01

    def __post_init__(self) -> None:
        _check("factor", self.factor, ("hierarchical", "exact"))
        _check("dtype", self.dtype, DTYPES)
        _check("reduce", self.reduce, ("sample", "token"))


@TASKS.register(
    "sylva-preprocess", case=SylvaPreprocessCase, help="Sylva preprocessing memory/time: hierarchical vs exact"
)
def sylva_preprocess(case: SylvaPreprocessCase, ctx: RunContext) -> dict[str, Any]:
    from longexposure.methods.sylva import SylvaConfig, collect_block_masks
    from longexposure.models import build_model

    shared = {f: getattr(case, f) for f in ("rank", "levels", "sparsity", "block", "reduce", "damping")}
    config = SylvaConfig(mask=case.factor, preprocess_batches=case.batches, **shared)
    device = ctx.device
    model = build_model(case.model, device=device, dtype=DTYPES[case.dtype], seed=ctx.seed)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    batches = model_batches(model, batch=case.batch, seq_len=case.seq_len, seed=ctx.seed)
    reset_peak_memory(device)
    synchronize(device)
    started = time.perf_counter()
    masks, report = collect_block_masks(model, iter(batches), config)
    synchronize(device)
    total = time.perf_counter() - started
    kept = sum(int(m.sum()) for m in masks.values())
    blocks = sum(m.numel() for m in masks.values())
    metrics: dict[str, Any] = {
        "preprocess_s": total,
        "accumulate_s": report["accumulate_s"],
        "inverse_importance_s": report["inverse_importance_s"],
        "factor_gib": report["factor_bytes"] / 2**30,
        "model_gib": model_bytes / 2**30,
        "kept_block_fraction": kept / max(blocks, 1),
    }
    peak = peak_memory_gib(device)
    if peak is not None:
        metrics["peak_mem_gib"] = peak
    metrics["info"] = {
        "factor": case.factor,
        "r_kappa": f"{case.rank}/{case.levels}" if case.factor == "hierarchical" else "exact",
        "weights": "random-init",
        "data": batches.description,
        "sparsity_source": f"{case.factor} K-FAC importance (eqs. 19-20), top {100 * (1 - case.sparsity):.0f}% blocks",
        "reduce": case.reduce,
    }
    return metrics


# ----------------------------------------------------------------------------------------------- SP-LoRA Fig. 1


SPLORA_METHODS = ("lora", "lora-wgrad", "sp-lora", "sp-lora-gc", "sp-lora-no", "spp-gc", "spp-no")
# `lora-wgrad` is a yardstick, not a method: LoRA that also computes (and drops) every adapted weight's dense
# gradient dY^T X. SP-LoRA's adapter gradients need that (out, in) product under the mask, so this row is
# the time SP-LoRA cannot go below with dense GEMMs; its peak memory includes those gradients.


@dataclass
class SpLoraStepCase:
    """One training step of a pruned model with LoRA, SP-LoRA or SPP on every block linear projection."""

    model: str = "llama-tiny"
    method: str = "sp-lora"
    rank: int = 16
    prune: str = "wanda"
    sparsity: str = "2:4"
    batch: int = 1
    seq_len: int = 2048
    precision: str = "bf16-amp"
    warmup: int = 2
    steps: int = 5
    backend: str = "auto"  # sp-lora's weight-sized passes: fused triton kernels or torch ops (auto: triton on a GPU)

    def __post_init__(self) -> None:
        _check("method", self.method, SPLORA_METHODS)
        _check("backend", self.backend, ("auto", "triton", "torch"))
        _check("precision", self.precision, PRECISIONS)
        _check("prune", self.prune, ("magnitude", "wanda"))


@TASKS.register("splora-step", case=SpLoraStepCase, help="SP-LoRA Fig. 1: step time and peak memory")
def splora_step(case: SpLoraStepCase, ctx: RunContext) -> dict[str, Any]:
    from longexposure.methods.builtin import apply_method
    from longexposure.methods.pruning import prune_
    from longexposure.methods.sp_lora import _calibration
    from longexposure.models import build_model

    device = ctx.device
    low, amp = PRECISIONS[case.precision]
    model = build_model(case.model, device=device, dtype=low, seed=ctx.seed)
    calib = None
    if case.prune == "wanda":
        calib, _ = _calibration(model, 4, min(case.seq_len, 128), ctx.seed)
    prune_info = prune_(model, case.prune, case.sparsity, calib)
    if case.method in ("lora", "lora-wgrad"):
        model = apply_method(model, "lora", r=case.rank, alpha=2 * case.rank, target_modules=_target_names(model))
    else:
        extra = {"backend": case.backend} if case.method == "sp-lora" else {}
        model = apply_method(model, case.method, rank=case.rank, alpha=2 * case.rank, **extra)
    _upcast_trainable(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if case.method == "lora-wgrad":
        from peft.tuners.lora import LoraLayer

        for m in model.modules():
            if isinstance(m, LoraLayer):
                m.get_base_layer().weight.requires_grad_(True)  # gradient computed, never stepped
    opt = _adamw(trainable, 1e-4, device)
    batches = model_batches(model, batch=case.batch, seq_len=case.seq_len, seed=ctx.seed)
    losses: list[torch.Tensor] = []

    def step(timer: Timer) -> None:
        batch = next(batches)
        with timer.region("total_ms"):
            with timer.region("forward_ms"), _autocast(device, amp):
                loss = model(**batch).loss
            with timer.region("backward_ms"):
                loss.backward()
            with timer.region("optimizer_ms"):
                opt.step()
                model.zero_grad(set_to_none=True)  # also drops lora-wgrad's dense gradients
        losses.append(loss.detach())

    reset_peak_memory(device)
    phases = time_phases(step, device, warmup=case.warmup, reps=case.steps)
    metrics: dict[str, Any] = {name: s.to_dict() for name, s in phases.items()}
    metrics["final_loss"] = float(losses[-1])
    metrics["trainable_params"] = float(sum(p.numel() for p in trainable))
    peak = peak_memory_gib(device)
    if peak is not None:
        metrics["peak_mem_gib"] = peak
    metrics["info"] = {
        "weights": "random-init",
        "data": batches.description,
        "precision": case.precision,
        "sparsity_source": f"{case.prune} {case.sparsity} pruning (zero fraction {prune_info['zero_fraction']:.3f})",
        "targets": ",".join(_target_names(model)),
    }
    ran = {getattr(m, "backend_ran", None) for m in model.modules() if getattr(m, "variant", None) == "sp-lora"}
    if ran:
        metrics["info"]["merge_backend"] = ",".join(sorted(str(r) for r in ran))  # fused triton kernels or torch ops
    if case.method == "lora-wgrad":
        metrics["info"]["note"] = "yardstick: LoRA + every adapted weight's dense gradient (dropped); not a method"
    return metrics
