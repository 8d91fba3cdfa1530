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
    """A training setup plus how many untimed (`warmup`) and timed (`steps`) steps to take, and on how many
    processes (`gpus`: the torchrun world size the case needs; `batch` is per process)."""

    warmup: int = 3
    steps: int = 10
    gpus: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.warmup < 0 or self.steps < 1 or self.gpus < 1:
            raise ValueError(f"need warmup >= 0, steps >= 1, gpus >= 1; got {self.warmup}, {self.steps}, {self.gpus}")


@TASKS.register("train-step", case=TrainStepCase, help="phase times and peak memory of one fine-tuning step")
def train_step(case: TrainStepCase, ctx: RunContext) -> dict[str, Any]:
    trainer = Trainer(case, ctx.device, seed=ctx.seed)
    world = trainer.dp.world_size if trainer.dp is not None else 1
    if case.gpus != world:
        raise ValueError(
            f"this case needs gpus={case.gpus} processes, the run has {world}: run it under "
            f"`torchrun --nproc_per_node {case.gpus} -m longexposure run ... --only gpus={case.gpus}`"
        )
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
    # throughput of the whole job (every rank's slice of the global batch), and per process
    metrics["tokens_per_s"] = case.batch * world * case.seq_len / (phases["total_ms"].p50 / 1e3)
    metrics["tokens_per_s_per_gpu"] = metrics["tokens_per_s"] / world
    metrics["info"] = trainer.describe()
    return metrics
