"""Quality of a fine-tuned model on batches it never trained on: loss, and how well its MLP patterns were chosen.

The last training step is no place to measure a predictor: with `refresh_every` it may be a refresh step,
where the predictor predicts exactly the batch it was just fitted to. Here the model runs as it trains (its
exposure's sparse forward, patterns predicted from these batches), in eval mode (no refresh), and per layer
the MLP input is caught on its way in, so the predicted block mask can be compared with the `threshold`
exposer's on the true activations: recall (exposer blocks the prediction kept) and density (blocks kept).
A dense model gets the exposer's density alone: how much block sparsity its activations would allow.

Whether the predictor chose *well* is a paired question: the same fine-tuned weights on the same batches with
other blocks kept (`mlp_pattern_swaps`). If as many random blocks per layer as the predictor kept give the same
loss as the predicted ones, the loss says nothing about the predictor, whatever a separately trained random
control shows.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from longexposure.arch import decoder_layers, family

MLP_SWAPS = ("predicted", "oracle", "random", "none", "all")


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


class SwappedMlpPattern(nn.Module):
    """One layer's MLP blocks for a held-out swap, in the exposure's (ids, count) form: its predictor's blocks
    (`predicted`), the exposer's on the true activations (`oracle`), as many random blocks as the predictor
    kept on this batch (`random`), no block (`none`: the MLP adds only its fc2 bias) or every block (`all`)."""

    def __init__(self, kind: str, predictor: nn.Module, fc1: nn.Linear, *, theta: float, seed: int = 0):
        super().__init__()
        from longexposure.predictors.lowrank import MlpOracle, MlpRandomLike, PredictorConfig

        if kind not in MLP_SWAPS:
            raise ValueError(f"unknown MLP swap {kind!r}; valid: {list(MLP_SWAPS)}")
        self.kind, self.n_blocks = kind, predictor.n_blocks
        self.blocks: nn.Module | None = None  # what picks the blocks (none / all: nothing)
        if kind == "predicted":
            self.blocks = predictor
        elif kind == "random":
            self.blocks = MlpRandomLike(predictor, seed=seed)
        elif kind == "oracle":  # the `threshold` exposer (a ReLU MLP: expose checked)
            config = PredictorConfig(block_size=predictor.config.block_size, theta=theta)
            self.blocks = MlpOracle(fc1, torch.relu, config)
        self.kept: list[int] = []  # blocks kept per call (what the swap ran with)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from longexposure.exposers import ids_with_count

        if self.blocks is None:
            mask = torch.full((self.n_blocks,), self.kind == "all", dtype=torch.bool, device=x.device)
        else:
            mask = self.blocks.block_mask(x)
        self.kept.append(int(mask.sum()))
        return ids_with_count(mask)


def _loss(model: nn.Module, batch: dict[str, torch.Tensor], autocast_dtype: torch.dtype | None) -> float:
    """The model's loss on one batch, under autocast to `autocast_dtype` (None: none), as the step ran it."""
    on = autocast_dtype is not None
    with torch.autocast(batch["input_ids"].device.type, dtype=autocast_dtype) if on else contextlib.nullcontext():
        return float(model(**batch, use_cache=False).loss)


@torch.no_grad()
def mlp_pattern_swaps(
    model: nn.Module,
    batches: list[dict[str, torch.Tensor]],
    exposure: Any,
    *,
    autocast_dtype: torch.dtype | None = None,
    theta: float = 0.1,
    random_draws: int = 3,
) -> dict[str, Any]:
    """Held-out loss of one fine-tuned model with each kind of MLP blocks in every layer (`MLP_SWAPS`; no dense
    fallback), on the same batches: `held_out_loss_mlp_<kind>`, the random one a mean over `random_draws`
    seeds (each draw's mean in `held_out_loss_mlp_random_draws`), the density each ran with (mean over layers
    and per layer: `held_out_mlp_density_<kind>`; random's count is the prediction's on the input the layer sees
    in that run, which after layer 0 differs from the predicted run's), and `held_out_random_swap_ratio` =
    random / predicted loss."""
    states = exposure.layer_states
    out: dict[str, Any] = {}
    was_training = model.training
    model.eval()
    try:
        for kind in MLP_SWAPS:
            draws, kept = [], {s.index: [] for s in states}
            for seed in range(random_draws if kind == "random" else 1):
                swaps = [
                    SwappedMlpPattern(kind, s.predictors["mlp"], s.mlp["base1"], theta=theta, seed=1000 * seed + i)
                    for i, s in enumerate(states)
                ]
                with exposure.mlp_patterns_from(swaps):
                    draws.append(_mean([_loss(model, b, autocast_dtype) for b in batches]))
                for s, sw in zip(states, swaps, strict=True):
                    kept[s.index] += [k / sw.n_blocks for k in sw.kept]
            per_layer = {str(i): _mean(values) for i, values in kept.items()}
            out[f"held_out_loss_mlp_{kind}"] = _mean(draws)
            out[f"held_out_mlp_density_{kind}"] = _mean(list(per_layer.values()))
            out[f"held_out_mlp_density_{kind}_per_layer"] = per_layer
            if kind == "random":
                out["held_out_loss_mlp_random_draws"] = draws
    finally:
        model.train(was_training)
    out["held_out_random_swap_ratio"] = out["held_out_loss_mlp_random"] / out["held_out_loss_mlp_predicted"]
    return out


@torch.no_grad()
def held_out_metrics(
    model: nn.Module,
    batches: list[dict[str, torch.Tensor]],
    *,
    exposure: Any = None,
    autocast_dtype: torch.dtype | None = None,
    mlp_block: int = 64,
    theta: float = 0.1,
    swaps: bool = True,
) -> dict[str, Any]:
    """Mean loss over `batches`; per-layer MLP exposer density and, for predicted MLP patterns, the
    prediction's density and recall against the exposer (means over batches, then over layers) and, with
    `swaps`, the same weights' loss with other blocks kept (`mlp_pattern_swaps`)."""
    from longexposure.predictors.lowrank import PredictorConfig
    from longexposure.predictors.offline import evaluate_mlp, mlp_truth
    from longexposure.predictors.refresh import layer_data
    from longexposure.reorder import profile_density_at_mass

    predicted = exposure is not None and exposure.sources.get("mlp") == "predicted"
    relu = family(model).mlp  # the ReLU MLP the exposer reads (None: the family has none)
    fc1_name = relu.fc1 if relu is not None else None
    layers = decoder_layers(model) if fc1_name else []
    inputs: dict[int, torch.Tensor] = {}
    index = {id(getattr(layer, fc1_name)): i for i, layer in enumerate(layers)}

    # outside Dynamo: in a compiled layer, a traced hook guards on the dict it fills and recompiled every
    # layer (the H200 e2e_real run of dcdef7a); a graph break per layer costs nothing in an evaluation
    @torch.compiler.disable
    def catch(module: nn.Module, args: tuple) -> None:
        inputs[index[id(module)]] = args[0]

    hooks = [getattr(layer, fc1_name).register_forward_pre_hook(catch) for layer in layers]
    exposer_config = PredictorConfig(block_size=mlp_block, theta=theta)
    rows: dict[int, list[dict[str, float]]] = {i: [] for i in range(len(layers))}
    losses = []
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            inputs.clear()
            losses.append(_loss(model, batch, autocast_dtype))
            for i, layer in enumerate(layers):
                fc1 = getattr(layer, fc1_name)
                base = getattr(fc1, "base_layer", fc1)
                x = inputs[i]
                pred = exposure.predictors["mlp"][i] if predicted else None
                data = layer_data(x if x.dim() == 3 else x[None], base, mlp_block)
                if pred is not None:
                    stats = evaluate_mlp(pred, data, pred.config, time_it=False)
                else:
                    truth, _ = mlp_truth(data, 0, exposer_config.exposer())
                    stats = {"exposer_density": truth.float().mean().item()}
                block_mass = data.mlp_mass[0].float().sum((0, 1)).double().cpu().numpy()  # (blocks,) this batch
                stats["d90"] = profile_density_at_mass(block_mass, 1, 0.9)
                rows[i].append(stats)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    per_layer = {i: {k: _mean([r[k] for r in rs]) for k in rs[0]} for i, rs in rows.items() if rs}
    out: dict[str, Any] = {"held_out_loss": _mean(losses), "held_out_batches": len(batches)}
    for key, name in (
        ("exposer_density", "held_out_exposer_mlp_density"),
        ("density", "held_out_predicted_mlp_density"),
        ("recall", "held_out_predicted_mlp_recall"),
        ("d90", "held_out_mlp_d90"),
    ):
        values = [row[key] for row in per_layer.values() if key in row]
        if values:
            out[name] = _mean(values)
            out[name + "_per_layer"] = {str(i): row[key] for i, row in per_layer.items()}
    if predicted and swaps and layers:
        out.update(mlp_pattern_swaps(model, batches, exposure, autocast_dtype=autocast_dtype, theta=theta))
    return out


def held_out_split(dataset: str) -> str | None:
    """The split of `dataset` that fine-tuning never reads (registered as `held_out_split`), or None."""
    from longexposure.registry import DATASETS

    return DATASETS.entry(dataset).meta.get("held_out_split")


def check_held_out(setup: Any, n: int) -> None:
    """Refuse, before any step, a held-out evaluation that would not be held out: on a dataset with a held-out
    split (E2E, corpus) fine-tuning must train on its `train` split, so the held-out split is never trained on."""
    if n < 0:
        raise ValueError(f"held_out_batches must be >= 0, got {n}")
    held = held_out_split(setup.dataset) if n else None
    if held and setup.data_split != "train":
        raise ValueError(
            f"{setup.dataset} fine-tuning with held_out_batches needs data_split: train (got {setup.data_split!r}), "
            f"so that its {held!r} split is never trained on"
        )


def evaluate_held_out(setup: Any, trainer: Any, n: int, seed: int) -> dict[str, Any]:
    """`held_out_metrics` of `trainer`'s fine-tuned model (as it trained: its exposure, its precision) on `n`
    batches it never trained on: the dataset's held-out split where it has one (E2E, corpus; `check_held_out`),
    else batches drawn with another seed. `held_out_data` says which."""
    from longexposure.data import load_batches
    from longexposure.models import family_of
    from longexposure.training import PRECISIONS

    check_held_out(setup, n)
    split = held_out_split(setup.dataset)
    stream = load_batches(
        setup.dataset,
        batch=setup.batch,
        seq_len=setup.seq_len,
        vocab_size=trainer.model.config.vocab_size,
        path=setup.data_path,
        seed=seed + 3,
        device=trainer.device,
        family=family_of(trainer.model),
        **({"split": split} if split else {}),
    )
    batches = [next(stream) for _ in range(n)]
    exposure = setup.exposure or {}
    out = held_out_metrics(
        trainer.model,
        batches,
        exposure=trainer.exposure,
        autocast_dtype=PRECISIONS[setup.precision],
        mlp_block=int(exposure.get("mlp_block", 64)),
        theta=float(exposure.get("theta", 0.1)),
    )
    out["held_out_data"] = stream.description + ("" if split else f" (seed {seed + 3}: unseen batches)")
    return out
