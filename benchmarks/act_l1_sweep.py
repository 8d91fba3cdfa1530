"""Does an activation-L1 penalty in pretraining concentrate the small ReLU model's MLP activations?

Pretrains a preset once per `--act-l1` x `--act-group-l1` value (same recipe and seed otherwise), reorders its
neurons by activation mass on E2E profile batches, and reports per layer the block density that holds 90% of the
activation mass on other E2E batches (each batch reduced on its own), with the held-out pretraining loss
and per-token sparsity. The issue-5 target is <= 0.25 at block 64 on relu-small.

    python benchmarks/act_l1_sweep.py --preset relu-micro --steps 400 --batch 8 --seq-len 128 --act-l1 0 1 5
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from longexposure.data import load_batches
from longexposure.models import build_model
from longexposure.pretrain import pretrain
from longexposure.profiling import capture_mlp
from longexposure.reorder import neuron_stats, profile_density_at_mass, reorder_mlp_
from longexposure.suite.provenance import provenance


def held_out_density(model: torch.nn.Module, measure: list[torch.Tensor], block: int) -> list[float]:
    """Per layer, the mean over `measure` batches of the block density holding 90% of that batch's mass."""
    per_batch = [
        [profile_density_at_mass(a.flatten(0, 1).sum(0).double().cpu().numpy(), block) for a in capture_mlp(model, ids)]
        for ids in measure
    ]
    return [float(np.mean(col)) for col in zip(*per_batch, strict=True)]


def pick(rows: list[dict], max_loss_ratio: float, block: str = "64") -> dict:
    """The row with the lowest mean d90 among those whose held-out loss is within `max_loss_ratio` of the
    unpenalised-group row's (act_group_l1 0, which must be there)."""
    base = [r for r in rows if not r["act_group_l1"]]
    if not base:
        raise SystemExit("--pick needs a row with act_group_l1 0 to compare against")
    limit = base[0]["held_out_loss"] * max_loss_ratio
    fits = [r for r in rows if r["held_out_loss"] <= limit]
    return min(fits, key=lambda r: float(np.mean(r["d90_reordered_held_out"][block])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--pick",
        default=None,
        metavar="JSON",
        help="only print the act_group_l1 of the best row of an earlier --out (see pick())",
    )
    parser.add_argument("--max-loss-ratio", type=float, default=1.03, help="for --pick")
    parser.add_argument("--preset", default="relu-micro")
    parser.add_argument("--act-l1", type=float, nargs="+", default=[0.0, 1.0])
    parser.add_argument(
        "--act-group-l1", type=float, nargs="+", default=[0.0], help="group-lasso values (each crossed with --act-l1)"
    )
    parser.add_argument("--steps", type=int, default=None, help="pretraining steps (default: the recipe's)")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None, help="pretraining seed (default: the recipe's)")
    parser.add_argument("--blocks", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--data-path", default=None, help="E2E directory (default: the shared copy)")
    parser.add_argument("--out", default=None, help="JSON file for the results")
    parser.add_argument("--keep", default=None, help="keep the checkpoints here (DIR/l1-VALUE) instead of a temp dir")
    args = parser.parse_args()
    if args.pick:
        print(pick(json.loads(Path(args.pick).read_text())["rows"], args.max_loss_ratio)["act_group_l1"])
        return
    given = {"steps": args.steps, "batch": args.batch, "seq_len": args.seq_len, "seed": args.seed}
    overrides = {k: v for k, v in given.items() if v is not None}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep) if args.keep else Path(tmp)
        for l1, group in [(a, g) for a in args.act_l1 for g in args.act_group_l1]:
            log: list[str] = []
            name = f"l1-{l1}" + (f"-group-{group}" if group else "")
            ckpt = pretrain(args.preset, out=root / name, act_l1=l1, act_group_l1=group, log=log.append, **overrides)
            record = json.loads((ckpt / "pretrain.json").read_text())
            model = build_model(args.preset, weights=str(ckpt), attn_implementation="eager", device=device).eval()
            seq = record["recipe"]["seq_len"]
            data = load_batches(
                "e2e",
                batch=4,
                seq_len=seq,
                vocab_size=model.config.vocab_size,
                path=args.data_path,
                seed=0,
                device=device,
                family="opt",
            )
            profile = data.input_ids(4)
            measure = data.input_ids(3)
            with torch.no_grad():
                reorder_mlp_(model, neuron_stats(model, profile))
                d90 = {str(b): held_out_density(model, measure, b) for b in args.blocks}
            row = {
                "act_l1": l1,
                "act_group_l1": group,
                "checkpoint": str(ckpt) if args.keep else "discarded",
                "held_out_loss": record["held_out_loss"],
                "seconds": record["seconds"],
                "per_token_sparsity": [r["per_token_sparsity"] for r in record["mlp_sparsity_held_out"]],
                "d90_reordered_held_out": d90,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {
        "preset": args.preset,
        **provenance(device),
        "overrides": overrides,
        "data": "e2e: 4 profile + 3 measured batches of 4 x seq_len",
        "rows": rows,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
