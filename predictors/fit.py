"""Train a model's predictor bank on its fine-tuning data and save it (`longexposure train-predictors`).

The bank is what `expose(..., source="predicted", predictors=DIR)` loads. Steps: run the frozen model on
`batches` batches of the dataset, collect each layer's operator inputs and exposer targets, train
mlp-lowrank / attn-lowrank per layer with noise augmentation and the recall-weighted loss, calibrate
them on held-back batches, save (`predictors.pt`, then `predictors.json` with what data it saw and the
weights id it is valid for: `PredictorBank.load` refuses it on other weights).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from longexposure.predictors.offline import PredictorBank, collect, train_bank
from tqdm import tqdm


def fit_predictors(
    model: torch.nn.Module,
    batches: list[torch.Tensor],
    out: str | Path,
    *,
    mlp: bool = True,
    attention: bool = True,
    mlp_block: int = 64,
    attn_block: int = 64,
    theta: float = 0.1,
    tau: float = 0.95,
    mlp_rank: int = 128,
    attn_rank: int = 16,
    steps: int = 300,
    noise: float = 0.05,
    recall_target: float = 0.97,
    mass_target: float = 0.95,
    seed: int = 0,
    data_description: str = "",
) -> tuple[PredictorBank, dict[str, Any]]:
    """Collect, train, calibrate and save one predictor per (layer, target); returns (bank, report)."""
    if len(batches) < 2:
        raise ValueError(f"need at least 2 batches (train + calibration), got {len(batches)}")
    was_training = model.training
    model.eval()
    started = time.perf_counter()
    data = collect(model, batches, block_size=mlp_block, attn_block=attn_block, mlp=mlp, attention=attention)
    bar = tqdm(total=len(data), desc="train predictors", unit="layer")
    bank, info = train_bank(
        model,
        data,
        mlp=mlp,
        attention=attention,
        mlp_config={"block_size": mlp_block, "theta": theta, "rank": mlp_rank},
        attn_config={"attn_block": attn_block, "tau": tau, "rank": attn_rank},
        steps=steps,
        noise=noise,
        recall_target=recall_target,
        mass_target=mass_target,
        seed=seed,
        log=lambda _msg: bar.update(1),
    )
    bar.close()
    model.train(was_training)
    report = {
        **info,
        "data": data_description,
        "batches": len(batches),
        "batch_shape": list(batches[0].shape),
        "weights": str(getattr(model.config, "longexposure_weights", "unknown")),
        "theta": theta,
        "tau": tau,
        "seed": seed,
        "seconds": round(time.perf_counter() - started, 1),
    }
    bank.save(out, model, report=report)
    return bank, report


def fit_predictors_for(
    model_name: str,
    weights: str | None,
    out: str | Path,
    *,
    dataset: str,
    data_path: str | None,
    batch: int,
    seq_len: int,
    batches: int,
    device: torch.device | str,
    seed: int = 0,
    data_seed: int | None = None,
    data_split: str | None = None,
    **options: Any,
) -> tuple[PredictorBank, dict[str, Any]]:
    """Build the frozen model (preset or checkpoint; `seed` for a random init), draw `batches` batches of
    `dataset` (seeded with `data_seed`, default `seed`; its `data_split` when given, e.g. e2e `train`, never the
    held-out one) and `fit_predictors` on them (`options` are its keyword arguments)."""
    data_seed = seed if data_seed is None else data_seed
    from longexposure.data import model_batches
    from longexposure.models import build_model

    model = build_model(model_name, weights=weights, attn_implementation="eager", device=device, seed=seed)
    model.requires_grad_(False)
    stream = model_batches(
        model, dataset, batch=batch, seq_len=seq_len, seed=data_seed, path=data_path, split=data_split
    )
    ids = stream.input_ids(batches)
    options.setdefault("seed", seed)
    return fit_predictors(model, ids, out, data_description=f"{stream.description} (seed {data_seed})", **options)
