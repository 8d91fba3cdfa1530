"""`longexposure train-predictors`: train a model's predictor bank on its fine-tuning data and save it.

The bank is what `expose(..., source="predicted", predictors=DIR)` loads. Steps: run the frozen model on
`batches` batches of the dataset, collect each layer's operator inputs and exposer targets, train
mlp-lowrank / attn-lowrank per layer with noise augmentation and the recall-weighted loss, calibrate
them on held-back batches, save (`predictors.json` + `predictors.pt`, with what data and weights it saw).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from longexposure.predictors.training import PredictorBank, collect, train_bank
from tqdm import tqdm

from longexposure.data import load_batches
from longexposure.models import build_model, family_of


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
        "seconds": round(time.perf_counter() - started, 1),
    }
    bank.save(out, model, report=report)
    return bank, report


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="relu-micro", help="preset name, or a local checkpoint dir / hub id")
    parser.add_argument("--weights", default=None, help="checkpoint to load into a preset's architecture")
    parser.add_argument("--dataset", default="e2e", help="dataset name (see `longexposure list dataset`)")
    parser.add_argument("--data-path", default=None, help="file or directory of the dataset")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batches", type=int, default=16, help="batches to collect (a fifth calibrates)")
    parser.add_argument("--no-mlp", action="store_true", help="attention predictors only (GeLU/SwiGLU models)")
    parser.add_argument("--no-attention", action="store_true", help="MLP predictors only")
    parser.add_argument("--mlp-block", type=int, default=64)
    parser.add_argument("--attn-block", type=int, default=64)
    parser.add_argument("--theta", type=float, default=0.1, help="threshold policy: keep blocks >= theta x peak")
    parser.add_argument("--tau", type=float, default=0.95, help="attention mass each query block keeps")
    parser.add_argument("--steps", type=int, default=300, help="training steps per layer and target")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="directory for predictors.json / predictors.pt")


def main(args: argparse.Namespace) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = build_model(args.model, weights=args.weights, attn_implementation="eager", device=device, seed=args.seed)
    model.requires_grad_(False)
    stream = load_batches(
        args.dataset,
        batch=args.batch,
        seq_len=args.seq_len,
        vocab_size=model.config.vocab_size,
        path=args.data_path,
        seed=args.seed,
        device=device,
        family=family_of(model),
    )
    batches = [next(stream)["input_ids"] for _ in range(args.batches)]
    _, report = fit_predictors(
        model,
        batches,
        args.out,
        mlp=not args.no_mlp,
        attention=not args.no_attention,
        mlp_block=args.mlp_block,
        attn_block=args.attn_block,
        theta=args.theta,
        tau=args.tau,
        steps=args.steps,
        data_description=stream.description,
    )
    summary = {k: report[k] for k in ("weights", "data", "batches", "batch_shape", "seconds")}
    print(json.dumps({"saved": str(args.out), **summary}, indent=1))
    return 0
