"""`longexposure train-predictors`: the command-line front of `longexposure.predictors.fit.fit_predictors`.

    longexposure train-predictors --model relu-micro --weights ~/.cache/longexposure/relu-micro \
        --dataset e2e --seq-len 256 --mlp-block 32 --attn-block 16 --out BANK
"""

from __future__ import annotations

import argparse
import json


def configure(parser: argparse.ArgumentParser) -> None:
    """The options; torch is imported only when a run starts, so `train-predictors --help` is quick."""
    parser.add_argument("--model", default="relu-micro", help="preset name, or a local checkpoint dir / hub id")
    parser.add_argument("--weights", default=None, help="checkpoint to load into a preset's architecture")
    parser.add_argument("--dataset", default="e2e", help="dataset name (see `longexposure list dataset`)")
    parser.add_argument("--data-path", default=None, help="file or directory of the dataset")
    parser.add_argument("--batch", type=int, default=4, help="sequences per batch")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--batches", type=int, default=16, help="batches to collect (a fifth calibrates)")
    parser.add_argument("--no-mlp", action="store_true", help="attention predictors only (GeLU/SwiGLU models)")
    parser.add_argument("--no-attention", action="store_true", help="MLP predictors only")
    parser.add_argument("--mlp-block", type=int, default=64, help="neurons per MLP block")
    parser.add_argument("--attn-block", type=int, default=64, help="tokens per attention block")
    parser.add_argument("--theta", type=float, default=0.1, help="threshold policy: keep blocks >= theta x peak")
    parser.add_argument("--tau", type=float, default=0.95, help="attention mass each query block keeps")
    parser.add_argument("--steps", type=int, default=300, help="training steps per layer and target")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and the predictors' initialisation")
    parser.add_argument("--out", required=True, help="directory for predictors.json / predictors.pt")


def main(args: argparse.Namespace) -> int:
    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    from longexposure.predictors.fit import fit_predictors_for

    _, report = fit_predictors_for(
        args.model,
        args.weights,
        args.out,
        dataset=args.dataset,
        data_path=args.data_path,
        batch=args.batch,
        seq_len=args.seq_len,
        batches=args.batches,
        device=device,
        seed=args.seed,
        mlp=not args.no_mlp,
        attention=not args.no_attention,
        mlp_block=args.mlp_block,
        attn_block=args.attn_block,
        theta=args.theta,
        tau=args.tau,
        steps=args.steps,
    )
    summary = {k: report[k] for k in ("weights", "data", "batches", "batch_shape", "seconds")}
    print(json.dumps({"saved": str(args.out), **summary}, indent=1))
    return 0
