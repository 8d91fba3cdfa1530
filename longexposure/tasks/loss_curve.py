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

import hashlib
import json
import math
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from longexposure.measure import Stats, Timer
from longexposure.registry import TASKS
from longexposure.suite.context import RunContext
from longexposure.training import Trainer, TrainingSetup

PREDICTOR_OPTIONS = ("mlp_block", "attn_block", "theta", "tau")


@dataclass
class LossCurveCase(TrainingSetup):
    """A training setup plus the run length and how to make what it needs.

    Attributes:
        steps: fine-tuning steps recorded.
        pretrain_steps: steps for `weights: pretrained` when no checkpoint is cached (None: the recipe's).
        predictor_batches, predictor_steps: data and training steps for `predictors: auto`.
        reorder_batches: > 0: reorder the checkpoint's neurons by activation mass on this many batches first.
    """

    steps: int = 100
    pretrain_steps: int | None = None
    predictor_batches: int = 16
    predictor_steps: int = 300
    reorder_batches: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.steps < 2:
            raise ValueError(f"steps must be >= 2, got {self.steps}")
        if self.reorder_batches < 0:
            raise ValueError(f"reorder_batches must be >= 0, got {self.reorder_batches}")
        if self.reorder_batches and not self.weights:
            raise ValueError("reorder_batches needs weights (a checkpoint or 'pretrained') to reorder and save")


def pretrained_weights(preset: str, steps: int | None) -> Path:
    """The cached pretrained checkpoint of `preset`, pretraining it first when there is none."""
    from longexposure.pretrain import cache_dir, pretrain

    path = cache_dir() / preset
    if not (path / "config.json").exists():
        tqdm.write(f"no pretrained {preset} at {path}: pretraining it now (cached for later runs)")
        pretrain(preset, out=path, steps=steps, log=tqdm.write)
    return path


def _digest(key: dict[str, Any]) -> str:
    """A short stable name for a cache entry made from `key` (a JSON-able description of its inputs)."""
    return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def _batches(case: LossCurveCase, model: torch.nn.Module, n: int, device: torch.device, seed: int) -> tuple[list, str]:
    """`n` batches of the case's dataset drawn with `seed`, and their description."""
    from longexposure.data import load_batches
    from longexposure.models import family_of

    stream = load_batches(
        case.dataset,
        batch=case.batch,
        seq_len=case.seq_len,
        vocab_size=model.config.vocab_size,
        path=case.data_path,
        seed=seed,
        device=device,
        family=family_of(model),
    )
    return stream.input_ids(n), f"{stream.description} (seed {seed})"


def reordered_weights(case: LossCurveCase, weights: Path, device: torch.device, seed: int) -> tuple[Path, str]:
    """`weights` with every MLP's neurons reordered by activation mass on `case.reorder_batches` batches of
    the case's data (seed + 2: neither the fine-tuning nor the predictors' batches); cached. Returns the
    checkpoint and a note saying what the permutation was computed on."""
    from longexposure.models import build_model
    from longexposure.pretrain import cache_dir
    from longexposure.reorder import neuron_stats, reorder_mlp_

    key = {
        "weights": str(weights),
        "mtime": (weights / "config.json").stat().st_mtime,
        "dataset": case.dataset,
        "data_path": case.data_path,
        "batch": case.batch,
        "seq_len": case.seq_len,
        "batches": case.reorder_batches,
        "seed": seed + 2,
    }
    out = cache_dir() / "reordered" / f"{case.model}-{_digest(key)}"
    note_file = out / "longexposure_reorder.txt"
    if note_file.exists():
        return out, note_file.read_text()
    model = build_model(case.model, weights=str(weights), attn_implementation="eager", device=device).eval()
    ids, description = _batches(case, model, case.reorder_batches, device, seed + 2)
    reorder_mlp_(model, neuron_stats(model, ids))
    note = f"MLP neurons of {weights} reordered by activation mass on {len(ids)} batches of {description}"
    model.save_pretrained(out)
    if (weights / "pretrain.json").is_file():  # how the source was pretrained travels with its reordering
        shutil.copyfile(weights / "pretrain.json", out / "pretrain.json")
    note_file.write_text(note)  # last: a checkpoint without it is incomplete and is rebuilt
    return out, note


def auto_predictors(case: LossCurveCase, weights: Path | None, device: torch.device, seed: int) -> Path:
    """Train (or reuse) the predictor bank of `weights` (None: the preset's random init, seeded) for this
    case's data and exposure options."""
    from longexposure.predictors.fit import fit_predictors_for
    from longexposure.pretrain import cache_dir

    exposure = case.exposure or {}
    opts = {k: exposure[k] for k in PREDICTOR_OPTIONS if k in exposure}
    key = {
        "weights": str(weights) if weights else f"random-init seed {seed}",
        "mtime": (weights / "config.json").stat().st_mtime if weights else None,
        "dataset": case.dataset,
        "data_path": case.data_path,
        "batch": case.batch,
        "seq_len": case.seq_len,
        "batches": case.predictor_batches,
        "steps": case.predictor_steps,
        "mlp": bool(exposure.get("mlp", True)),
        "attention": bool(exposure.get("attention", True)),
        **opts,
    }
    out = cache_dir() / "predictors" / f"{case.model}-{_digest(key)}"
    if (out / "predictors.json").exists():
        return out
    fit_predictors_for(
        case.model,
        str(weights) if weights else None,
        out,
        dataset=case.dataset,
        data_path=case.data_path,
        batch=case.batch,
        seq_len=case.seq_len,
        batches=case.predictor_batches,
        device=device,
        seed=seed,  # the Trainer's model (a random init is seeded the same way)
        data_seed=seed + 1,  # not the fine-tuning stream's batches
        mlp=key["mlp"],
        attention=key["attention"],
        mlp_block=opts.get("mlp_block", 64),
        attn_block=opts.get("attn_block", 64),
        theta=opts.get("theta", 0.1),
        tau=opts.get("tau", 0.95),
        steps=case.predictor_steps,
    )
    return out


@TASKS.register("loss-curve", case=LossCurveCase, help="per-step fine-tuning loss of one variant (Fig. 11)")
def loss_curve(case: LossCurveCase, ctx: RunContext) -> dict[str, Any]:
    weights = case.weights
    if weights == "pretrained":
        weights = str(pretrained_weights(case.model, case.pretrain_steps))
    reorder_note = "none"
    if case.reorder_batches:
        path, reorder_note = reordered_weights(case, Path(weights), ctx.device, ctx.seed)
        weights = str(path)
    exposure = dict(case.exposure) if case.exposure is not None else None
    if exposure is not None and exposure.get("predictors") == "auto":
        exposure["predictors"] = str(auto_predictors(case, Path(weights) if weights else None, ctx.device, ctx.seed))
    setup = replace(case, weights=weights, exposure=exposure)
    trainer = Trainer(setup, ctx.device, seed=ctx.seed)
    timer = Timer(ctx.device)
    losses, times = [], []
    for _ in tqdm(range(case.steps), desc=f"loss-curve {case.model}", unit="step", leave=False):
        losses.append(trainer.step(timer))
        times.append(timer.elapsed_ms())
    curve = [float(v) for v in losses]
    if not all(math.isfinite(v) for v in curve):
        raise FloatingPointError(f"the loss became non-finite: {curve[-5:]}")
    tail = max(1, case.steps // 10)
    metrics: dict[str, Any] = {
        "final_loss": sum(curve[-tail:]) / tail,
        "first_loss": curve[0],
        "loss_curve": curve,
        "total_ms": Stats.of([t["total_ms"] for t in times[1:]]).to_dict(),
    }
    if "predict_ms" in times[-1]:
        metrics["predict_ms"] = Stats.of([t.get("predict_ms", 0.0) for t in times[1:]]).to_dict()
    info = trainer.describe()
    metrics["mlp_block_density"] = info.get("mlp_block_density")  # of the last step (dynamic sources)
    metrics["attention_block_density"] = info.get("attention_block_density_of_causal")
    metrics["info"] = {**info, "neuron_reorder": reorder_note}
    return metrics
