"""Do MLP predictors trained on the frozen model still match the exposer after LoRA has trained a while?

Fig. 11 on relu-small (H100) showed the predictors keeping 0.85 of the MLP blocks where the oracle kept
0.45. This separates the suspected cause, LoRA moving the activations away from what the predictors were
trained on, from a calibration error: predictors are fitted once on the frozen (reordered) model, then
dense LoRA fine-tunes it, and every `--every` steps the predictors and the `threshold` exposer are
evaluated on the same held-out batches of the *current* model: predicted vs exposer density and recall.
`--refresh-every N` refreshes the predictors on the training batch every N steps
(`predictors/refresh.py`, what `expose(..., refresh_every=N)` does inside the step).

    python benchmarks/predictor_drift.py --preset relu-micro --steps 60 --every 20
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from longexposure.predictors.fit import fit_predictors
from longexposure.predictors.offline import collect, evaluate_mlp
from longexposure.predictors.refresh import MlpRefresher, RefreshConfig
from tqdm import tqdm

from longexposure.data import load_batches
from longexposure.methods.builtin import apply_method
from longexposure.models import build_model
from longexposure.pretrain import checkpoint_for
from longexposure.profiling import capture, decoder_layers, layer_part
from longexposure.reorder import neuron_stats, reorder_mlp_


def evaluate(model: torch.nn.Module, bank, held_out: list[torch.Tensor], block: int) -> list[dict[str, float]]:
    """Per layer: the predictor's density / recall against the exposer on the current model's activations."""
    model.eval()
    data = collect(model, held_out, block_size=block, attention=False)
    model.train()
    rows = []
    for layer, d in enumerate(data):
        pred = bank["mlp", layer]
        r = evaluate_mlp(pred, d, pred.config, time_it=False)
        rows.append({"layer": layer, **{k: round(v, 4) for k, v in r.items()}})
    return rows


def refresh(model: torch.nn.Module, refreshers: list[MlpRefresher], ids: torch.Tensor) -> None:
    """Every layer's MLP predictor refreshed on this batch's MLP inputs."""
    model.eval()
    caps = capture(model, ids, attention=False)
    model.train()
    for layer, cap in enumerate(caps):
        refreshers[layer](cap.mlp_in)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="relu-micro")
    parser.add_argument("--weights", default=None, help="checkpoint (default: the preset's pretrained cache)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--block", type=int, default=32)
    parser.add_argument("--theta", type=float, default=0.1)
    parser.add_argument("--fit-batches", type=int, default=8)
    parser.add_argument("--eval-batches", type=int, default=2)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0, help="LoRA's initialisation and the predictors'")
    parser.add_argument(
        "--refresh-every", type=int, default=0, help="refresh the predictors on the training batch every N steps"
    )
    parser.add_argument("--refresh-steps", type=int, default=50)
    parser.add_argument("--data-path", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    weights = args.weights or str(checkpoint_for(args.preset))
    model = build_model(args.preset, weights=weights, attn_implementation="eager", device=device)
    stream = lambda seed: load_batches(  # noqa: E731
        "e2e", batch=args.batch, seq_len=args.seq_len, vocab_size=model.config.vocab_size,
        path=args.data_path, seed=seed, device=device, family="opt",
    )  # fmt: skip
    with torch.no_grad():
        model.eval()
        reorder_mlp_(model, neuron_stats(model, stream(2).input_ids(args.fit_batches)))
    held_out = stream(3).input_ids(args.eval_batches)
    with tempfile.TemporaryDirectory() as tmp:
        bank, _ = fit_predictors(
            model, stream(1).input_ids(args.fit_batches), tmp, attention=False, mlp_block=args.block,
            theta=args.theta, seed=args.seed,
        )  # fmt: skip
    model = apply_method(model, "lora")
    config = RefreshConfig(steps=args.refresh_steps)
    refreshers = [
        MlpRefresher(bank["mlp", i], layer_part(model, layer, "fc1"), config, seed=i)
        for i, layer in enumerate(decoder_layers(model))
    ]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    train = stream(0)
    curve = [{"step": 0, "layers": evaluate(model, bank, held_out, args.block)}]
    losses = []
    for step in tqdm(range(1, args.steps + 1), desc="lora", unit="step"):
        ids = train.input_ids(1)[0]
        if args.refresh_every and step % args.refresh_every == 0:  # as `expose(..., refresh_every=N)` does
            refresh(model, refreshers, ids)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % args.every == 0 or step == args.steps:
            curve.append({"step": step, "loss": losses[-1], "layers": evaluate(model, bank, held_out, args.block)})
    for point in curve:
        m = {k: sum(r[k] for r in point["layers"]) / len(point["layers"]) for k in point["layers"][0] if k != "layer"}
        print(
            f"step {point['step']:4d}  loss {point.get('loss', '-'):>6.6}  predicted density "
            f"{m['density']:.3f}  exposer {m['exposer_density']:.3f}  recall {m['recall']:.3f}  "
            f"mass kept {m['mass_kept']:.3f} (exposer {m['exposer_mass_kept']:.3f})"
        )
    if args.out:
        result = {
            "preset": args.preset, "weights": str(model.config.longexposure_weights), "device": str(device),
            "data": "e2e; reorder / fit / train / held-out streams with seeds 2 / 1 / 0 / 3",
            "args": vars(args), "curve": curve,
        }  # fmt: skip
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
