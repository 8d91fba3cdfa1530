"""Task `evaluate`: fine-tune one variant, then measure its accuracy with lm-eval (the paper's Table IV).

The fine-tuning is `longexposure finetune`'s (same `prepare_inputs`: pretrained / reordered weights, predictors
trained on the run's data; same `Trainer` step), so a dense-LoRA, a Long Exposure and a random-mask variant
differ only by the sparsity they trained under. The trained adapter is saved and evaluated as
`longexposure evaluate --adapter` would: loaded into a fresh base model and merged, so every variant is
evaluated as the dense fine-tuned model (what a user deploys), never with its training-time masks. The E2E
tasks read the training file's held-out meaning representations only (the `train` split trains), so no
evaluated MR was trained on.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from longexposure.registry import TASKS
from longexposure.suite.context import RunContext
from longexposure.training import TrainingSetup

# `weights: pretrained` is resolved by the task (as for loss-curve); the suite checker must not look for that file.


@dataclass
class EvaluateCase(TrainingSetup):
    """A training setup, its run length, and what to evaluate the result on.

    Attributes:
        steps: fine-tuning steps (0: evaluate the base model as it is).
        predictor_batches, predictor_steps, reorder_batches: as in `longexposure finetune`.
        eval_tasks: lm-eval task names (see `longexposure evaluate --help`).
        eval_data: task -> local JSON/JSONL; the E2E tasks default to the fine-tuning file (`data_path`).
        eval_limit: at most this many documents per task (None: all).
        eval_batch_size: sequences per forward while evaluating.
        max_gen_toks: tokens generated per E2E prompt (None: the task's 64).
    """

    steps: int = 100
    predictor_batches: int = 16
    predictor_steps: int = 300
    reorder_batches: int = 0
    eval_tasks: list[str] = field(default_factory=lambda: ["e2e_nlg", "e2e_ppl"])
    eval_data: dict[str, str] = field(default_factory=dict)
    eval_limit: int | None = None
    eval_batch_size: int = 8
    max_gen_toks: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.steps < 0 or self.reorder_batches < 0:
            raise ValueError(f"steps and reorder_batches must be >= 0, got {self.steps}, {self.reorder_batches}")
        if self.reorder_batches and not self.weights:
            raise ValueError("reorder_batches needs weights (a checkpoint or 'pretrained') to reorder and save")
        e2e_eval = [t for t in self.eval_tasks if t.startswith("e2e_") and t not in self.eval_data]
        if self.steps and self.dataset == "e2e" and e2e_eval and self.data_split != "train":
            raise ValueError(
                f"fine-tuning on e2e and evaluating {e2e_eval} on the same file needs data_split: train, so that "
                f"the held-out meaning representations they read are never trained on (got {self.data_split!r})"
            )


@TASKS.register("evaluate", case=EvaluateCase, help="fine-tune one variant, then lm-eval accuracy (Table IV)")
def evaluate(case: EvaluateCase, ctx: RunContext) -> dict[str, Any]:
    from longexposure.evaluate import EvalConfig, evaluate_model, load_model, load_tokenizer, require_eval_dependencies
    from longexposure.finetune import prepare_inputs, save_trained
    from longexposure.measure import Timer
    from longexposure.training import Trainer

    require_eval_dependencies()  # before any training: a missing extra fails at once
    data = dict(case.eval_data)
    if case.data_path is not None:  # the E2E tasks read the file the run trains on (its held-out split)
        for task in case.eval_tasks:
            if task.startswith("e2e_") and case.dataset == "e2e":
                data.setdefault(task, case.data_path)
    config = EvalConfig(
        tasks=list(case.eval_tasks),
        data=data,
        limit=case.eval_limit,
        batch_size=case.eval_batch_size,
        max_gen_toks=case.max_gen_toks,
    )
    base = TrainingSetup(**{f: getattr(case, f) for f in TrainingSetup.__dataclass_fields__})
    setup = prepare_inputs(base, case.reorder_batches, case.predictor_batches, case.predictor_steps, str(ctx.device),
                           ctx.seed)  # fmt: skip
    metrics: dict[str, Any] = {}
    info: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="longexposure-table4-") as tmp:
        adapter = None
        if case.steps:
            import torch

            # build_model seeds only a random init; with loaded weights the adapter's init (LoRA A) would draw from
            # whatever the process ran before: seed it, so every variant starts from the same adapter
            torch.manual_seed(ctx.seed)
            trainer = Trainer(setup, ctx.device, seed=ctx.seed)
            timer = Timer(ctx.device)
            losses = [trainer.step(timer) for _ in tqdm(range(case.steps), desc="fine-tune", unit="step", leave=False)]
            curve = [float(v) for v in losses]
            if not all(math.isfinite(v) for v in curve):
                raise FloatingPointError(f"the loss became non-finite: {curve[-5:]}")
            tail = max(1, case.steps // 10)
            metrics["final_loss"] = sum(curve[-tail:]) / tail
            info = trainer.describe()
            if trainer.exposure is not None:  # save the adapter from the plain modules
                from longexposure.expose import unexpose

                unexpose(trainer.model)
            adapter = save_trained(trainer.model, Path(tmp))
            del trainer
        model, what = load_model(setup.model, setup.weights, str(adapter) if adapter else None, ctx.device)
        tokenizer = load_tokenizer(None, setup.model, setup.weights)
        result = evaluate_model(model, tokenizer, config, Path(tmp) / "eval", seed=ctx.seed)
    metrics.update(result["metrics"])
    metrics.update({f"{k}_stderr": v for k, v in result["stderr"].items()})
    metrics["info"] = {
        **{k: str(v) for k, v in info.items() if k in ("weights", "data", "sparsity_source")},
        "evaluated_model": what + " (dense: evaluated without the training-time sparsity)",
        "eval_data": "; ".join(dict.fromkeys(result["data"].values())),
        "eval_docs": ", ".join(f"{t} {n}" for t, n in result["n_docs"].items()),
    }
    if not case.steps:
        metrics["info"].setdefault("weights", str(setup.weights))
    return metrics
