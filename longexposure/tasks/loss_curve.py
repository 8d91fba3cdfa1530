"""Task `loss-curve`: fine-tune a pretrained small ReLU model for N steps and record the loss of every
step (paper Fig. 11 left: does Long Exposure's sparsity change what fine-tuning learns?).

Every variant starts from the same checkpoint, data stream and seed, so the curves differ only by the
sparsity. `weights: pretrained` is the project's own pretrained checkpoint of the preset (made with
`longexposure pretrain` on first use, cached outside the repository); `exposure.predictors: auto`
trains the model's predictor bank on batches of the fine-tuning dataset drawn with another seed
(cached per checkpoint and options), as `longexposure train-predictors` would. `reorder_batches: N`
first permutes every MLP's neurons by activation mass on N such batches (`longexposure.reorder`; exact,
so dense variants train the same function) and saves that checkpoint once: every variant, and the
predictors, then use it, so block-wise MLP sparsity exists to be predicted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from longexposure.held_out import check_held_out, evaluate_held_out
from longexposure.measure import Stats, Timer, peak_memory_gib, reset_peak_memory
from longexposure.prepared import auto_predictors, pretrained_weights, reordered_weights
from longexposure.registry import TASKS
from longexposure.suite.context import RunContext
from longexposure.training import Trainer, TrainingSetup


@dataclass
class LossCurveCase(TrainingSetup):
    """A training setup plus the run length and how to make what it needs.

    Attributes:
        steps: fine-tuning steps recorded.
        pretrain_steps: steps for `weights: pretrained` when no checkpoint is cached (None: the recipe's).
        predictor_batches, predictor_steps: data and training steps for `predictors: auto`.
        reorder_batches: > 0: reorder the checkpoint's neurons by activation mass on this many batches first.
        held_out_batches: batches the fine-tuned model is evaluated on at the end (`longexposure.held_out`):
            the dataset's `held-out` split where it has one (e2e), else batches drawn with another seed.
        timing_warmup: first steps left out of the step-time statistics (they compile, capture graphs,
            autotune); every later step counts, predictor refreshes and graph recaptures included. A compiled
            step whose warm-up recompiles captures its CUDA graph later (`training.MAX_GRAPH_WARMUP`): the
            statistics then start after that first capture, and `timed_from_step` says where they did.
    """

    steps: int = 100
    pretrain_steps: int | None = None
    predictor_batches: int = 16
    predictor_steps: int = 300
    reorder_batches: int = 0
    held_out_batches: int = 4
    timing_warmup: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.steps < 2:
            raise ValueError(f"steps must be >= 2, got {self.steps}")
        if not 0 <= self.timing_warmup < self.steps:
            raise ValueError(f"need 0 <= timing_warmup < steps, got {self.timing_warmup}, {self.steps}")
        if self.reorder_batches < 0:
            raise ValueError(f"reorder_batches must be >= 0, got {self.reorder_batches}")
        check_held_out(self, self.held_out_batches)
        if self.reorder_batches and not self.weights:
            raise ValueError("reorder_batches needs weights (a checkpoint or 'pretrained') to reorder and save")


@TASKS.register("loss-curve", case=LossCurveCase, help="per-step fine-tuning loss of one variant (Fig. 11)")
def loss_curve(case: LossCurveCase, ctx: RunContext) -> dict[str, Any]:
    weights = case.weights
    if weights == "pretrained":
        weights = str(pretrained_weights(case.model, case.pretrain_steps))
    reorder_note = "none"
    if case.reorder_batches:
        path, reorder_note = reordered_weights(case, Path(weights), case.reorder_batches, ctx.device, ctx.seed)
        weights = str(path)
    exposure = dict(case.exposure) if case.exposure is not None else None
    if exposure is not None and exposure.get("predictors") == "auto":
        exposure["predictors"] = str(auto_predictors(
            case, Path(weights) if weights else None, case.predictor_batches, case.predictor_steps, ctx.device, ctx.seed
        ))
    setup = replace(case, weights=weights, exposure=exposure)
    trainer = Trainer(setup, ctx.device, seed=ctx.seed)
    reset_peak_memory(ctx.device)
    timer = Timer(ctx.device)
    losses, times = [], []
    for _ in tqdm(range(case.steps), desc=f"loss-curve {case.model}", unit="step", leave=False):
        losses.append(trainer.step(timer))
        times.append(timer.elapsed_ms())
    curve = [float(v) for v in losses]
    if not all(math.isfinite(v) for v in curve):
        raise FloatingPointError(f"the loss became non-finite: {curve[-5:]}")
    tail = max(1, case.steps // 10)
    start = timed_from(case.timing_warmup, trainer.graph_captures, case.steps)
    timed = times[start:]
    step_ms = Stats.of([t["total_ms"] for t in timed])
    metrics: dict[str, Any] = {
        "final_loss": sum(curve[-tail:]) / tail,
        "first_loss": curve[0],
        "loss_curve": curve,
        "total_ms": step_ms.to_dict(),
        "step_ms_mean": step_ms.mean,
        "timed_from_step": start,
        "slow_steps": _slow_steps(times, start, step_ms.p50),
    }
    if any("predict_ms" in t for t in timed):
        metrics["predict_ms"] = Stats.of([t.get("predict_ms", 0.0) for t in timed]).to_dict()
    if any("refresh_ms" in t for t in timed):  # predictor refreshes, after the step: amortised over every step
        metrics["refresh_ms_mean"] = Stats.of([t.get("refresh_ms", 0.0) for t in timed]).mean
        # each refresh on its own: the first of a process pays one-offs (about 120 ms more on the H200) that the
        # mean spreads over this run's length
        every = int((case.exposure or {}).get("refresh_every", 0))
        metrics["refresh_ms_each"] = [
            {"step": i, "ms": t.get("refresh_ms", 0.0)} for i, t in enumerate(times) if every and (i + 1) % every == 0
        ]
    peak = peak_memory_gib(ctx.device)
    if peak is not None:
        metrics["peak_mem_gib"] = peak
    metrics.update(_predictor_cost(case, trainer, metrics))
    if case.held_out_batches:
        metrics.update(evaluate_held_out(case, trainer, case.held_out_batches, ctx.seed))
    info = trainer.describe()
    # dynamic sources: the mean over every step of the prediction the step ran with (before any refresh)
    metrics["mlp_block_density"] = info.get("mlp_block_density_mean_over_steps", info.get("mlp_block_density"))
    metrics["attention_block_density"] = info.get("attention_block_density_of_causal")
    metrics["info"] = {**info, "neuron_reorder": reorder_note}
    return metrics


def timed_from(warmup: int, captures: list[int], steps: int) -> int:
    """The first timed step: after `warmup` steps and after the first CUDA-graph capture (a one-off, like
    compilation; later recaptures, e.g. a dense-fallback switch, are part of the method's cost and count)."""
    start = max(warmup, captures[0] + 1) if captures else warmup
    if start >= steps:
        raise ValueError(f"no step left to time: the first CUDA graph capture was at step {start - 1} of {steps}")
    return start


def _slow_steps(times: list[dict[str, float]], start: int, median: float, limit: int = 12) -> list[dict[str, Any]]:
    """The timed steps over twice the median, slowest first, with their phases: what a mean above the median
    paid for (a refresh, a graph recapture, a recompile) is then in the result, not guessed afterwards."""
    slow = [{"step": i, **t} for i, t in enumerate(times) if i >= start and t["total_ms"] > 2 * median]
    return sorted(slow, key=lambda t: -t["total_ms"])[:limit]


def _predictor_cost(case: LossCurveCase, trainer: Trainer, metrics: dict[str, Any]) -> dict[str, Any]:
    """Live MLP predictors with refresh: one step's predictor calls timed on the last step's MLP inputs
    (`longexposure.predictor_cost`; inside a graph step nothing else can time them) and, with the refresh's
    mean per step, `predictor_share`: the predictors' whole cost as a fraction of the mean step."""
    from longexposure.predictor_cost import mlp_predict_ms
    from longexposure.training import PRECISIONS

    exposure = trainer.exposure
    if exposure is None or exposure.sources.get("mlp") != "predicted" or not exposure.last_mlp_inputs:
        return {}
    out = mlp_predict_ms(exposure, exposure.last_mlp_inputs, autocast_dtype=PRECISIONS[case.precision])
    refresh = metrics.get("refresh_ms_mean", 0.0)
    out["predictor_share"] = (out["predict_graph_ms"] + refresh) / metrics["step_ms_mean"]
    return out
