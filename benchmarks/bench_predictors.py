"""Exposer and predictor measurements: quality on a pretrained ReLU model, and cost at OPT-1.3B shapes.

    quality  On a checkpoint (default: the pretrained relu-small cache) and E2E batches: neuron
             reordering's effect on the `threshold` policy (with the permutation computed on profile
             batches and measured on held-out ones), the theta that keeps >= 90% of activation mass,
             then mlp-lowrank / attn-lowrank trained on train batches and evaluated on held-out
             batches beside svd / oracle / random: recall, precision, density, mass kept, ms per call.
    cost     One LoRA fine-tuning step of OPT-1.3B (random init, fp16-amp, bs 4, seq 1024, sdpa) vs.
             all 24 layers' mlp-lowrank + attn-lowrank calls on (4, 1024, 2048) fp16 inputs, both
             timed with CUDA events (longexposure.measure).

Launch (GPU):
    python benchmarks/bench_predictors.py quality --weights ~/.cache/longexposure/relu-small --out q.json
    python benchmarks/bench_predictors.py cost --out cost.json [--fixed-capacity] [--in-step] [--graph] [--compile]
Each prints a table and writes one JSON with the device, versions, weights, data and every number.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from longexposure.predictors.builtin import build_predictor
from longexposure.predictors.offline import PredictorBank, collect, evaluate_attention, evaluate_mlp, train_bank

from longexposure.data import load_batches
from longexposure.exposers import ThresholdMlp, block_stats
from longexposure.measure import time_fn, time_phases
from longexposure.models import build_model
from longexposure.profiling import capture_mlp, density_at_mass, per_token_vs_sequence
from longexposure.reorder import neuron_stats, reorder_mlp_
from longexposure.suite.provenance import provenance


def _log(*args: Any) -> None:
    print(*args, flush=True)


# ============================================================================================ quality
@torch.no_grad()
def mlp_policy_table(model: torch.nn.Module, ids: list[torch.Tensor], block: int, thetas: list[float]) -> dict:
    """Per layer, over the batches (each reduced on its own): Fig. 4 sparsity, density@90% mass, theta sweep."""
    per_batch = [capture_mlp(model, x) for x in ids]
    layers = []
    for li in range(len(per_batch[0])):
        acts = [pb[li] for pb in per_batch]
        fig4 = {k: sum(per_token_vs_sequence(a)[k] for a in acts) / len(acts) for k in per_token_vs_sequence(acts[0])}
        d90 = sum(density_at_mass(block_stats(a, block)[1], 0.9) for a in acts) / len(acts)
        sweep = []
        for alpha, theta in [(0.5, t) for t in thetas] + [(0.0, t) for t in thetas]:
            pol = ThresholdMlp(block_size=block, theta=theta, alpha=alpha)
            dens, kept = [], []
            for a in acts:
                mask = pol.block_mask(a)
                mass = block_stats(a, block)[1]
                dens.append(mask.float().mean().item())
                kept.append(float(mass[mask].sum() / mass.sum()))
            sweep.append(
                {"alpha": alpha, "theta": theta, "density": sum(dens) / len(dens), "mass_kept": sum(kept) / len(kept)}
            )
        layers.append({"layer": li, **fig4, "density_at_90_mass": d90, "threshold": sweep})
    return {"layers": layers}


def pick_theta(table: dict, mass: float = 0.9) -> float:
    """The largest theta whose mass kept is >= `mass` in every layer."""
    thetas = [s["theta"] for s in table["layers"][0]["threshold"] if s["alpha"] == 0.5]
    ok = [t for i, t in enumerate(thetas) if all(lay["threshold"][i]["mass_kept"] >= mass for lay in table["layers"])]
    return max(ok) if ok else min(thetas)


def quality(args: argparse.Namespace) -> dict[str, Any]:
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    weights = args.weights
    if weights is None:
        from longexposure.pretrain import checkpoint_for

        weights = str(checkpoint_for(args.model))
    model = build_model(args.model, weights=weights, device=dev, attn_implementation="eager").eval()
    for p in model.parameters():
        p.requires_grad_(False)
    data = load_batches(
        "e2e",
        batch=args.batch,
        seq_len=args.seq_len,
        vocab_size=model.config.vocab_size,
        path=args.data,
        seed=args.seed,
        device=dev,
        family="opt",
    )
    take = data.input_ids
    profile_ids, train_ids, eval_ids = take(args.profile_batches), take(args.train_batches), take(args.eval_batches)
    result: dict[str, Any] = {
        **provenance(dev),
        "weights": weights,
        "data": data.description,
        "split": f"profile {len(profile_ids)} / train {len(train_ids)} / held-out {len(eval_ids)} batches of "
        f"{args.batch}x{args.seq_len}, disjoint",
        "mlp_block": args.mlp_block,
        "attn_block": args.attn_block,
    }
    thetas = [0.02, 0.04, 0.06, 0.08, 0.1, 0.12, 0.15, 0.2, 0.3]
    t0 = time.perf_counter()
    result["mlp_original_order"] = mlp_policy_table(model, eval_ids, args.mlp_block, thetas)
    perms = reorder_mlp_(model, neuron_stats(model, profile_ids))
    result["mlp_reordered_heldout"] = mlp_policy_table(model, eval_ids, args.mlp_block, thetas)
    result["mlp_reordered_insample"] = mlp_policy_table(model, profile_ids[: len(eval_ids)], args.mlp_block, thetas)
    theta = args.theta if args.theta is not None else pick_theta(result["mlp_reordered_heldout"])
    result["theta"] = theta
    result["perm_layers"] = len(perms)
    _log(f"profiling done in {time.perf_counter() - t0:.0f}s; theta for >= 90% mass: {theta}")

    t0 = time.perf_counter()
    mlp_cfg = {"block_size": args.mlp_block, "theta": theta, "rank": args.mlp_rank}
    attn_cfg = {"attn_block": args.attn_block, "tau": args.tau, "rank": args.attn_rank}
    train_data = collect(model, train_ids, block_size=args.mlp_block, attn_block=args.attn_block)
    eval_data = collect(model, eval_ids, block_size=args.mlp_block, attn_block=args.attn_block)
    bank, info = train_bank(
        model,
        train_data,
        mlp_config=mlp_cfg,
        attn_config=attn_cfg,
        steps=args.steps,
        noise=args.noise,
        recall_target=args.recall_target,
        mass_target=args.mass_target,
        log=_log,
    )
    result["training"] = info
    result["train_s"] = round(time.perf_counter() - t0, 1)
    rows = []
    for target, trained in (("mlp", "mlp-lowrank"), ("attention", "attn-lowrank")):
        for name in (trained, "svd", "oracle", "random"):
            for li in range(len(train_data)):
                if name == trained:
                    pred = bank[target, li]
                else:
                    opts = dict(mlp_cfg if target == "mlp" else attn_cfg)
                    if name == "svd":
                        opts["rank"] = args.svd_rank
                    pred = build_predictor(name, model, li, target=target, **opts)
                ev = evaluate_mlp if target == "mlp" else evaluate_attention
                rows.append({"target": target, "predictor": name, "layer": li, **ev(pred, eval_data[li], pred.config)})
    result["predictors_heldout"] = rows
    if args.save:
        bank.save(args.save, model, report={"theta": theta})
        again = PredictorBank.load(args.save, model)
        x = eval_data[0].mlp_x[0]
        result["save_load_identical"] = bool(torch.equal(again["mlp", 0](x), bank["mlp", 0](x)))
    return result


def print_quality(res: dict[str, Any]) -> None:
    _log(f"\n== quality on {res['device']}; weights {res['weights']}; {res['data']}; {res['split']}")
    for key in ("mlp_original_order", "mlp_reordered_heldout", "mlp_reordered_insample"):
        _log(f"-- {key}: layer  per-token / per-seq / per-batch sparsity | density@90%mass | theta={res['theta']}")
        for lay in res[key]["layers"]:
            th = (
                next(s for s in lay["threshold"] if s["theta"] == res["theta"])
                if any(s["theta"] == res["theta"] for s in lay["threshold"])
                else lay["threshold"][0]
            )
            _log(
                f"   L{lay['layer']}: {lay['per_token_sparsity']:.3f} / {lay['per_sequence_sparsity']:.3f} / "
                f"{lay['per_batch_sparsity']:.3f} | {lay['density_at_90_mass']:.3f} | "
                f"density {th['density']:.3f} mass {th['mass_kept']:.3f}"
            )
    _log("-- predictors on held-out batches (mean over layers)")
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in res["predictors_heldout"]:
        groups.setdefault((r["target"], r["predictor"]), []).append(r)
    for (target, name), rs in groups.items():
        mean = lambda k, rs=rs: sum(r[k] for r in rs) / len(rs)  # noqa: E731
        _log(
            f"   {target:9s} {name:12s} recall {mean('recall'):.3f} precision {mean('precision'):.3f} "
            f"density {mean('density'):.3f} (exposer {mean('exposer_density'):.3f}) mass kept {mean('mass_kept'):.3f} "
            f"(exposer {mean('exposer_mass_kept'):.3f}) {mean('ms_per_call'):.2f} ms/call"
        )


# =============================================================================================== cost
def cost(args: argparse.Namespace) -> dict[str, Any]:
    from longexposure.training import Trainer, TrainingSetup

    dev = torch.device(args.device or "cuda")
    setup = TrainingSetup(
        model=args.model,
        method="lora",
        batch=args.batch,
        seq_len=args.seq_len,
        dataset="synthetic",
        precision="fp16-amp",
        attn="sdpa",
        cuda_graph=args.graph,
    )
    trainer = Trainer(setup, dev, seed=0)
    phases = time_phases(lambda timer: trainer.step(timer), dev, warmup=3, reps=10)
    step_ms = phases["total_ms"].p50 if "total_ms" in phases else sum(s.p50 for s in phases.values())
    _log(f"[cost] training step {step_ms:.1f} ms")
    model = trainer.model
    layers = model.config.num_hidden_layers
    d = model.config.hidden_size
    mlp = [
        build_predictor(
            "mlp-lowrank",
            model,
            i,
            target="mlp",
            block_size=64,
            rank=args.mlp_rank,
            fixed_capacity=args.fixed_capacity,
        ).half()
        for i in range(layers)
    ]
    attn = [
        build_predictor("attn-lowrank", model, i, target="attention", attn_block=64, rank=args.attn_rank).half()
        for i in range(layers)
    ]
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(args.batch, args.seq_len, d, generator=gen, device=dev, dtype=torch.float16)

    from longexposure.predictors.compiled import EAGER, compiled

    # the calls the exposed model makes: MLP ids with their count, attention masks as layout tables
    # (without --fixed-capacity, the MLP predictors' exact-length ids, with nonzero()'s host sync)
    call = {t: compiled(t) if args.compile else EAGER[t] for t in EAGER}
    if not args.fixed_capacity:
        call["mlp"] = lambda predictor, inp: predictor(inp)

    @torch.no_grad()
    def all_predictors() -> None:
        for i in range(layers):
            call["attention"](attn[i], x)
            call["mlp"](mlp[i], x)

    @torch.no_grad()
    def mlp_only() -> None:
        for i in range(layers):
            call["mlp"](mlp[i], x)

    @torch.no_grad()
    def attn_only() -> None:
        for i in range(layers):
            call["attention"](attn[i], x)

    def timed(fn) -> dict[str, float]:  # noqa: ANN001
        if not args.graph:
            return time_fn(fn, dev, warmup=3, reps=10).to_dict()
        import triton.testing as tt

        return {"p50": tt.do_bench_cudagraph(fn, rep=100, return_mode="median")}

    t0 = time.perf_counter()
    pred = timed(all_predictors)
    took = time.perf_counter() - t0
    _log(f"[cost] predictors {pred['p50']:.2f} ms standalone (first calls and timing: {took:.0f} s)")
    # In situ: the same step with every predictor called from hooks on its operator's input (q_proj's
    # and fc1's), so its launches overlap the step's GPU work as they would in the patched model.
    in_step = in_step_phases = None
    if args.in_step:
        from longexposure.profiling import decoder_layers, layer_part

        handles = []
        b, s = args.batch, args.seq_len

        def hook_for(pred_module):  # noqa: ANN202
            @torch.no_grad()
            def hook(mod, inputs):  # noqa: ANN001, ANN202
                call[pred_module.target](pred_module, inputs[0].reshape(b, s, -1))

            return hook

        if args.graph:  # the first trainer's graph was captured without the hooks: capture a fresh one
            del trainer
            trainer = Trainer(setup, dev, seed=0)
            model = trainer.model
        for i, lay in enumerate(decoder_layers(model)):
            handles.append(layer_part(model, lay, "q", base=False).register_forward_pre_hook(hook_for(attn[i])))
            handles.append(layer_part(model, lay, "fc1", base=False).register_forward_pre_hook(hook_for(mlp[i])))
        try:
            in_step_phases = time_phases(lambda timer: trainer.step(timer), dev, warmup=3, reps=10)
        finally:
            for h in handles:
                h.remove()
        in_step = in_step_phases["total_ms"].p50
    res = {
        **provenance(dev),
        "shape": f"{args.model} (random init), LoRA, fp16-amp, sdpa, bs {args.batch}, seq {args.seq_len}",
        "step_phases_ms": {k: v.to_dict() for k, v in phases.items()},
        "step_ms": step_ms,
        "cuda_graph": args.graph,
        "compiled_predictors": args.compile,
        "predictors_ms": pred,
        "mlp_predictors_ms": timed(mlp_only),
        "attn_predictors_ms": timed(attn_only),
        "ranks": {"mlp": args.mlp_rank, "attn": args.attn_rank},
        "fixed_capacity": args.fixed_capacity,
        "fraction_of_step": pred["p50"] / step_ms,
        "note": "standalone: predictors back to back on one shared random input per layer (cost does not depend "
        "on the values); ids include nonzero()'s host sync unless fixed_capacity",
    }
    if in_step is not None:
        res["step_with_predictors_phases_ms"] = {k: v.to_dict() for k, v in in_step_phases.items()}
        res["in_step_overhead_fraction"] = (in_step - step_ms) / step_ms
    how = (", CUDA graphs" if args.graph else "") + (", compiled predictors" if args.compile else "")
    _log(f"\n== cost on {res['device']}: {res['shape']}{how}")
    _log(
        f"   training step {step_ms:.1f} ms; {layers} layers of predictors {pred['p50']:.2f} ms standalone "
        f"(mlp {res['mlp_predictors_ms']['p50']:.2f}, attention {res['attn_predictors_ms']['p50']:.2f}) "
        f"= {100 * res['fraction_of_step']:.2f}% of a step"
    )
    if in_step is not None:
        _log(f"   step with predictors in hooks {in_step:.1f} ms: +{100 * res['in_step_overhead_fraction']:.2f}%")
    return res


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("quality")
    q.add_argument("--model", default="relu-small")
    q.add_argument("--weights", default=None, help="checkpoint (default: the pretrained cache of --model)")
    q.add_argument("--data", default=None, help="E2E folder (default: shared/data/e2e)")
    q.add_argument("--batch", type=int, default=4)
    q.add_argument("--seq-len", type=int, default=1024)
    q.add_argument("--profile-batches", type=int, default=8)
    q.add_argument("--train-batches", type=int, default=24)
    q.add_argument("--eval-batches", type=int, default=8)
    q.add_argument("--mlp-block", type=int, default=64)
    q.add_argument("--attn-block", type=int, default=64)
    q.add_argument("--theta", type=float, default=None, help="threshold theta (default: largest keeping >= 90%)")
    q.add_argument("--tau", type=float, default=0.95)
    q.add_argument("--mlp-rank", type=int, default=256)
    q.add_argument("--attn-rank", type=int, default=16)
    q.add_argument("--svd-rank", type=int, default=64)
    q.add_argument("--steps", type=int, default=600)
    q.add_argument("--noise", type=float, default=0.05)
    q.add_argument("--recall-target", type=float, default=0.97)
    q.add_argument("--mass-target", type=float, default=0.95)
    q.add_argument("--save", default=None, help="save the trained predictors here and check that loading reproduces")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--device", default=None)
    q.add_argument("--out", default=None, help="JSON result file")
    c = sub.add_parser("cost")
    c.add_argument("--model", default="opt-1.3b")
    c.add_argument("--batch", type=int, default=4)
    c.add_argument("--seq-len", type=int, default=1024)
    c.add_argument("--mlp-rank", type=int, default=256)
    c.add_argument("--attn-rank", type=int, default=16)
    c.add_argument("--fixed-capacity", action="store_true", help="MLP ids as (ids, count) without a host sync")
    c.add_argument("--in-step", action="store_true", help="also time the step with predictors called from hooks")
    c.add_argument("--graph", action="store_true", help="time CUDA-graph replays (step and predictors), no launch cost")
    c.add_argument("--compile", action="store_true", help="predictor calls through torch.compile (compile_predictors)")
    c.add_argument("--device", default=None)
    c.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.cmd == "cost" and args.compile and not args.fixed_capacity:
        parser.error("--compile times the exposed model's calls, which take fixed-capacity ids: add --fixed-capacity")
    if args.cmd == "quality" and args.data is None:
        from longexposure.paths import shared_dir

        shared = shared_dir()
        if shared is None:
            raise SystemExit("no shared/ folder: pass --data (the E2E folder)")
        args.data = str(shared / "data" / "e2e")
    res = quality(args) if args.cmd == "quality" else cost(args)
    if args.cmd == "quality":
        print_quality(res)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
