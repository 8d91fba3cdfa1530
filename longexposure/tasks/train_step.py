"""Task `train-step`: time fine-tuning steps of a model + PEFT method, phase by phase (Table I, Fig. 10).

Phases come from `training.Trainer.step`: forward (incl. loss), backward, optimizer step, and the
whole step; plus peak GPU memory. The step is the same one `longexposure finetune` takes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from longexposure.measure import peak_memory_gib, reset_peak_memory, time_phases
from longexposure.registry import TASKS
from longexposure.suite.context import RunContext
from longexposure.training import Trainer, TrainingSetup


@dataclass
class TrainStepCase(TrainingSetup):
    """A training setup plus how many untimed (`warmup`) and timed (`steps`) steps to take."""

    warmup: int = 3
    steps: int = 10

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.warmup < 0 or self.steps < 1:
            raise ValueError(f"need warmup >= 0 and steps >= 1, got {self.warmup}, {self.steps}")


@TASKS.register("train-step", case=TrainStepCase, help="phase times and peak memory of one fine-tuning step")
def train_step(case: TrainStepCase, ctx: RunContext) -> dict[str, Any]:
    trainer = Trainer(case, ctx.device, seed=ctx.seed)
    losses = []
    reset_peak_memory(ctx.device)
    phases = time_phases(lambda timer: losses.append(trainer.step(timer)), ctx.device, case.warmup, case.steps)
    final_loss = float(losses[-1])
    if not math.isfinite(final_loss):
        raise FloatingPointError(f"loss became {final_loss} during the measured steps")
    metrics: dict[str, Any] = {name: stats.to_dict() for name, stats in phases.items()}
    peak = peak_memory_gib(ctx.device)
    if peak is not None:
        metrics["peak_mem_gib"] = peak
    metrics["final_loss"] = final_loss
    metrics["info"] = trainer.describe()
    return metrics
