"""`longexposure finetune`: fine-tune a model with a PEFT method, showing loss and ms/step as it goes.

Writes to `--out`: `losses.jsonl` (step, loss, ms), `summary.json` (phase-time stats, final loss,
what weights/data/sparsity it used) and the trained parameters: a peft adapter directory, or the
method's trainable tensors (`trainable.safetensors`) for methods peft does not implement; with live
predictors (`--expose source=predicted predictors=DIR`), a copy of the predictor bank in `predictors/`.

    longexposure finetune --model relu-micro --weights ~/.cache/longexposure/relu-micro --dataset e2e \
        --expose source=predicted --expose predictors=BANK --expose mlp_block=32 --expose attn_block=16

On a GPU add `--cuda-graph` (the step is captured once and replayed) and `--expose compile_predictors=true`
(each layer's predictor call becomes a few fused kernels instead of ~35-60 small ones).
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import sys
from dataclasses import asdict, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch and the trainer are imported when a run starts: `finetune --help` stays fast
    import torch

    from longexposure.training import TrainingSetup

DENSE_GAP = 1.02  # held-out loss run dense over as trained above which `finetune` says the adapter needs its sparsity
PRECISION_CHOICES = ("auto", "fp32", "fp16-amp", "bf16-amp")  # auto + `training.PRECISIONS` (a test keeps them equal)


def _parse_options(pairs: list[str], flag: str = "--method-option") -> dict[str, Any]:
    """`key=value` pairs; values parsed as YAML scalars (so r=8 is an int)."""
    import yaml

    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag} expects key=value, got {pair!r}")
        options[key] = yaml.safe_load(value)
    return options


def save_trained(model: torch.nn.Module, out: Path, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Save what the method trained: a peft adapter dir, or the trainable tensors as safetensors. `state_dict`:
    the whole tensors when the model's own are shards (FSDP)."""
    if hasattr(model, "peft_config"):
        model.save_pretrained(out / "adapter", state_dict=state_dict)
        return out / "adapter"
    from safetensors.torch import save_file

    values = dict(model.named_parameters()) if state_dict is None else state_dict
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    tensors = {n: values[n].detach().contiguous().cpu() for n in trained}
    save_file(tensors, str(out / "trainable.safetensors"))
    return out / "trainable.safetensors"


def warmup_steps(setup: TrainingSetup, steps: int) -> int:
    """Steps left out of the ms/step statistics: the first one (allocations, autotuning, lazy compiles) and,
    with a CUDA graph, its eager warm-up and capture steps. None when the run is no longer than that."""
    from longexposure.training import GRAPH_WARMUP

    n = GRAPH_WARMUP + 1 if setup.cuda_graph else 1
    return n if steps > n else 0


def finetune(
    setup: TrainingSetup,
    steps: int,
    out: Path | None,
    device: str | None = None,
    seed: int = 0,
    log_every: int = 10,
    held_out_batches: int = 0,
) -> dict[str, Any]:
    """Train for `steps` steps; returns the summary (also written to `out` when given).

    ms/step statistics are per step, over every step after `warmup_steps`; the device is synchronised once per
    log interval, not per step. Progress: a tqdm bar on a terminal; otherwise (CI, logs, a pipe) one line on
    stderr every `log_every` steps, since tqdm shows nothing there. `held_out_batches`: afterwards, the model on
    that many batches it never trained on (`held_out.evaluate_held_out`): its loss as it trained and, with
    predicted MLP patterns, with every MLP block (`held_out_loss_mlp_all`: the model merged and run dense).
    """
    import torch
    from tqdm import tqdm

    from longexposure import distributed
    from longexposure.held_out import check_held_out, evaluate_held_out
    from longexposure.measure import Stats, Timer
    from longexposure.training import Trainer

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if log_every < 1:
        raise ValueError(f"log_every must be >= 1, got {log_every}")
    check_held_out(setup, held_out_batches)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    trainer = Trainer(setup, dev, seed=seed)
    warmup = warmup_steps(setup, steps)
    losses: list[dict[str, float]] = []
    pending: list[tuple[torch.Tensor, Timer]] = []
    times: dict[str, list[float]] = {}
    main_rank = trainer.dp is None or trainer.dp.is_main  # under torchrun, rank 0 logs and writes
    log_lines = main_rank and not sys.stderr.isatty()
    bar = tqdm(range(1, steps + 1), desc="finetune", unit="step", disable=None if main_rank else True)
    for step in bar:
        timer = Timer(dev)  # one per step: per-step times, read back once per log interval
        pending.append((trainer.step(timer), timer))
        if step % log_every == 0 or step == steps:
            first = step - len(pending) + 1
            interval_ms = []
            for i, (loss, step_timer) in enumerate(pending):
                step_ms = step_timer.elapsed_ms()  # the first call synchronises the device
                interval_ms.append(step_ms["total_ms"])
                if first + i > warmup:
                    for name, ms in step_ms.items():
                        times.setdefault(name, []).append(ms)
                losses.append({"step": first + i, "loss": float(loss), "ms": step_ms["total_ms"]})
            pending.clear()
            loss_now, ms_now = losses[-1]["loss"], Stats.of(interval_ms).p50
            bar.set_postfix(loss=f"{loss_now:.4f}", ms_per_step=f"{ms_now:.1f}")
            if log_lines:
                print(f"finetune: step {step}/{steps}, loss {loss_now:.4f}, {ms_now:.1f} ms/step", file=sys.stderr)
                sys.stderr.flush()
            if not math.isfinite(loss_now):
                raise FloatingPointError(f"loss became {loss_now} at step {step}")
    summary = {
        "setup": asdict(setup),
        "steps": steps,
        "warmup_steps": warmup,
        "device": str(dev),
        "final_loss": losses[-1]["loss"],
        "ms_per_step": {k: Stats.of(v).to_dict() for k, v in times.items()},
        "info": trainer.describe(),
    }
    if held_out_batches:  # on every rank: a data-parallel model's forward may take part in collectives
        summary["held_out"] = evaluate_held_out(setup, trainer, held_out_batches, seed)
    # under FSDP every rank takes part in gathering the whole tensors; rank 0 writes them
    whole = distributed.full_state_dict(trainer.model, trainer.dp, setup.data_parallel) if out is not None else None
    if out is not None and main_rank:
        out.mkdir(parents=True, exist_ok=True)
        (out / "losses.jsonl").write_text("".join(json.dumps(r) + "\n" for r in losses))
        summary["saved"] = str(save_trained(trainer.model, out, whole))
        bank = (setup.exposure or {}).get("predictors")
        if bank and trainer.exposure is not None and trainer.exposure.dynamic:
            import shutil

            shutil.copytree(bank, out / "predictors", dirs_exist_ok=True)
            summary["saved_predictors"] = str(out / "predictors")
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    summary["losses"] = losses
    return summary


def prepare_inputs(
    setup: TrainingSetup, reorder_batches: int, predictor_batches: int, predictor_steps: int, device: str | None,
    seed: int,
) -> TrainingSetup:  # fmt: skip
    """Make what the setup names but does not have yet (`longexposure.prepared`, cached): `weights: pretrained`
    pretrains the preset; `reorder_batches` reorders the checkpoint's neurons (before any predictor is trained);
    `predictors: auto` trains the (reordered) checkpoint's predictors on the run's data."""
    from dataclasses import replace

    import torch

    from longexposure.prepared import auto_predictors, pretrained_weights, reordered_weights

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    weights = setup.weights
    if weights == "pretrained":
        weights = str(pretrained_weights(setup.model, None))
    if reorder_batches:
        path, note = reordered_weights(setup, Path(weights), reorder_batches, dev, seed)
        print(f"finetune: {note}", file=sys.stderr)
        weights = str(path)
    exposure = dict(setup.exposure) if setup.exposure else None
    if exposure is not None and exposure.get("predictors") == "auto":
        bank = auto_predictors(
            replace(setup, weights=weights), Path(weights) if weights else None, predictor_batches, predictor_steps,
            dev, seed,
        )  # fmt: skip
        exposure["predictors"] = str(bank)
    return replace(setup, weights=weights, exposure=exposure)


def check_exposure_keys(options: dict[str, Any]) -> None:
    """Unknown `--expose` keys fail before the model is built, naming the keys that exist."""
    from longexposure.expose import ExposureConfig

    valid = [f.name for f in fields(ExposureConfig)]
    for key in options:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"--expose: unknown key {key!r}{hint}; valid keys: {', '.join(valid)}")


def configure(parser: argparse.ArgumentParser) -> None:
    """The `finetune` options; needs no torch, so `longexposure finetune --help` is quick."""
    parser.add_argument("--model", default="opt-tiny", help="preset name, or a local checkpoint dir / hub id")
    parser.add_argument(
        "--weights",
        default=None,
        help="checkpoint to load into a preset's architecture; `pretrained`: the project's own pretrained "
        "checkpoint of the preset (`longexposure pretrain`, cached)",
    )
    parser.add_argument("--method", default="lora", help="PEFT method (see `longexposure list peft_method`)")
    parser.add_argument(
        "--method-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="method keyword argument, repeatable (e.g. r=16)",
    )
    parser.add_argument("--dataset", default="synthetic", help="dataset name (see `longexposure list dataset`)")
    parser.add_argument("--data-path", default=None, help="file or directory of the dataset")
    parser.add_argument(
        "--data-split", default=None,
        help="the dataset's split (e2e, corpus: train / held-out); none: the dataset's default",
    )  # fmt: skip
    parser.add_argument(
        "--reorder-batches",
        type=int,
        default=0,
        help="permute each MLP's neurons by activation mass on this many batches first (exact; needs --weights; "
        "the reordered checkpoint is cached and predictors are trained on it)",
    )
    parser.add_argument(
        "--predictor-batches", type=int, default=16, help="with --expose predictors=auto: batches to train them on"
    )
    parser.add_argument(
        "--predictor-steps", type=int, default=300, help="with --expose predictors=auto: their training steps"
    )
    parser.add_argument("--batch", type=int, default=4, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps")
    parser.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    parser.add_argument(
        "--precision", default="auto", choices=PRECISION_CHOICES, help="auto: fp16-amp on a GPU, fp32 on a CPU"
    )
    parser.add_argument("--attn", default="sdpa", help="attention implementation")
    parser.add_argument(
        "--expose",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Long Exposure option, repeatable (ExposureConfig fields: source=replay|predicted|oracle|random, "
        "predictors=DIR, profile=reference, mlp_block=64, ...); none: the dense model",
    )
    parser.add_argument("--cuda-graph", action="store_true", help="replay forward + backward as one CUDA graph")
    parser.add_argument("--compile", action="store_true", help="compile each decoder layer and the loss (Inductor)")
    parser.add_argument(
        "--loss", default="model",
        help="training_loss: model (the model's own) or fused-linear-ce (no logits tensor); `longexposure list "
        "training_loss`",
    )  # fmt: skip
    parser.add_argument(
        "--data-parallel", default="ddp",
        help="under torchrun: ddp (whole model per rank) or fsdp (parameters sharded); `longexposure list "
        "data_parallel`",
    )  # fmt: skip
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights' initialisation and the data")
    parser.add_argument(
        "--log-every", type=int, default=10, help="steps between loss/time read-backs (and log lines when not a tty)"
    )
    parser.add_argument(
        "--held-out-batches", type=int, default=0,
        help="afterwards, evaluate on this many batches never trained on (e2e, corpus: need --data-split train): the "
        "loss as trained and, with predicted MLP patterns, with every MLP block (the model run dense)",
    )  # fmt: skip
    parser.add_argument("--out", default=None, help="directory for losses, summary and trained parameters")


def main(args: argparse.Namespace) -> int:
    import torch

    from longexposure.training import TrainingSetup

    exposure = _parse_options(args.expose, flag="--expose") or None
    if exposure:
        check_exposure_keys(exposure)
    precision = args.precision
    if precision == "auto":
        precision = "fp16-amp" if (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) != "cpu" else "fp32"
    if args.reorder_batches < 0 or min(args.predictor_batches, args.predictor_steps) < 1:
        raise ValueError("--reorder-batches must be >= 0, --predictor-batches and --predictor-steps >= 1")
    if args.reorder_batches and not args.weights:
        raise ValueError("--reorder-batches needs --weights (a checkpoint, or `pretrained`) to reorder")
    setup = TrainingSetup(
        model=args.model,
        weights=args.weights,
        method=args.method,
        method_options=_parse_options(args.method_option),
        attn=args.attn,
        batch=args.batch,
        seq_len=args.seq_len,
        dataset=args.dataset,
        data_path=args.data_path,
        data_split=args.data_split,
        precision=precision,
        lr=args.lr,
        exposure=exposure,
        cuda_graph=args.cuda_graph,
        compile=args.compile,
        loss=args.loss,
        data_parallel=args.data_parallel,
    )
    from longexposure import distributed

    dp, _ = distributed.join(torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu")))
    prepare = lambda: prepare_inputs(setup, args.reorder_batches, args.predictor_batches,  # noqa: E731
                                     args.predictor_steps, args.device, args.seed)  # fmt: skip
    if dp is None:
        setup = prepare()
    else:  # under torchrun: rank 0 makes what is cached (checkpoints, predictors), then the others reuse it
        import torch.distributed as dist

        made = prepare() if dp.is_main else None
        dist.barrier()
        setup = made if made is not None else prepare()
    summary = finetune(
        setup,
        args.steps,
        Path(args.out) if args.out else None,
        device=args.device,
        seed=args.seed,
        log_every=args.log_every,
        held_out_batches=args.held_out_batches,
    )
    if dp is not None and not dp.is_main:
        return 0
    total = summary["ms_per_step"]["total_ms"]
    print(
        f"final loss {summary['final_loss']:.4f}; {total['p50']:.1f} ms/step (median of {total['n']} steps after "
        f"{summary['warmup_steps']} warm-up); weights: {summary['info']['weights']}; "
        f"data: {summary['info']['data']}; sparsity: {summary['info']['sparsity_source']}"
    )
    if "held_out" in summary:
        print(held_out_line(summary["held_out"]))
    if "saved" in summary:
        print(f"saved {summary['saved']}")
    return 0


def held_out_line(held: dict[str, Any]) -> str:
    """The held-out result in words; with predicted MLP patterns, whether the model can also run dense."""
    line = f"held-out loss {held['held_out_loss']:.4f} ({held['held_out_batches']} batches: {held['held_out_data']})"
    dense = held.get("held_out_loss_mlp_all")
    if dense is None:
        return line
    line += (
        f"; with every MLP block {dense:.4f}, with as many random blocks as predicted "
        f"{held['held_out_loss_mlp_random']:.4f} (predicted {held['held_out_loss_mlp_predicted']:.4f})"
    )
    if dense > DENSE_GAP * held["held_out_loss"]:
        line += (
            f". This adapter depends on its sparsity: run dense (merged) its loss is "
            f"{dense / held['held_out_loss']:.3f}x; serve it with its predictors, or fine-tune with a lower theta "
            "for a model you will run dense"
        )
    return line
