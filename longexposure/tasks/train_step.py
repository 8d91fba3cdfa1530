"""Task `train-step`: time one fine-tuning step of a model + PEFT method, phase by phase (Table I, Fig. 10).

Phases are timed with the shared harness: forward (incl. loss), backward, optimizer step (incl.
loss-scaler update and zeroing grads) and the whole step; plus peak GPU memory. Mixed precision as
the paper and users run it: `fp16-amp` keeps trainable parameters in fp32 and frozen ones in fp16,
under fp16 autocast with a gradient scaler.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch

from longexposure.data import load_batches
from longexposure.measure import Timer, peak_memory_gib, reset_peak_memory, time_phases
from longexposure.methods.builtin import apply_method
from longexposure.models import build_model, family_of
from longexposure.registry import TASKS
from longexposure.suite.context import RunContext

PRECISIONS = {"fp32": None, "fp16-amp": torch.float16, "bf16-amp": torch.bfloat16}


@dataclass
class TrainStepCase:
    """One model x method x shape x attention-implementation cell."""

    model: str = "opt-tiny"
    weights: str | None = None
    method: str = "lora"
    method_options: dict[str, Any] = field(default_factory=dict)
    attn: str = "sdpa"
    batch: int = 4
    seq_len: int = 512
    dataset: str = "synthetic"
    data_path: str | None = None
    precision: str = "fp16-amp"
    lr: float = 1e-4
    warmup: int = 3
    steps: int = 10

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r} is not one of {sorted(PRECISIONS)}")
        if self.warmup < 0 or self.steps < 1:
            raise ValueError(f"need warmup >= 0 and steps >= 1, got {self.warmup}, {self.steps}")


def prepare_model(case: TrainStepCase, device: torch.device) -> torch.nn.Module:
    """Build the model, apply the method, and place parameters in their training dtypes."""
    model = build_model(case.model, weights=case.weights, attn_implementation=case.attn, device=device)
    model = apply_method(model, case.method, **case.method_options)
    low = PRECISIONS[case.precision]
    if low is not None:
        for p in model.parameters():
            if not p.requires_grad:
                p.data = p.data.to(low)
    return model


def _autocast(case: TrainStepCase, device: torch.device):
    low = PRECISIONS[case.precision]
    if low is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=low)


@TASKS.register("train-step", case=TrainStepCase, help="phase times and peak memory of one fine-tuning step")
def train_step(case: TrainStepCase, ctx: RunContext) -> dict[str, Any]:
    device = ctx.device
    model = prepare_model(case, device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    n_total = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(trainable, lr=case.lr)
    use_scaler = case.precision == "fp16-amp" and device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    batches = load_batches(
        case.dataset,
        batch=case.batch,
        seq_len=case.seq_len,
        vocab_size=model.config.vocab_size,
        path=case.data_path,
        seed=ctx.seed,
        device=device,
        family=family_of(model),
    )
    losses: list[float] = []

    def step(timer: Timer) -> None:
        batch = next(batches)
        with timer.region("total_ms"):
            with timer.region("forward_ms"), _autocast(case, device):
                loss = model(**batch).loss
            with timer.region("backward_ms"):
                scaler.scale(loss).backward()
            with timer.region("optimizer_ms"):
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    reset_peak_memory(device)
    phases = time_phases(step, device, warmup=case.warmup, reps=case.steps)
    final_loss = float(losses[-1])
    if not torch.isfinite(torch.tensor(final_loss)):
        raise FloatingPointError(f"loss became {final_loss} during the measured steps")
    metrics: dict[str, Any] = {name: stats.to_dict() for name, stats in phases.items()}
    peak = peak_memory_gib(device)
    if peak is not None:
        metrics["peak_mem_gib"] = peak
    metrics["final_loss"] = final_loss
    metrics["info"] = {
        "weights": model.config.longexposure_weights,
        "data": batches.description,
        "sparsity_source": "none (dense)",
        "attn_implementation": model.config._attn_implementation,
        "trainable_params": n_trainable,
        "total_params": n_total,
        "precision": case.precision,
    }
    return metrics
