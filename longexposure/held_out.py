"""Quality of a fine-tuned model on batches it never trained on: loss, and how well its MLP patterns were chosen.

The last training step is no place to measure a predictor: with `refresh_every` it may be a refresh step,
where the predictor predicts exactly the batch it was just fitted to. Here the model runs as it trains (its
exposure's sparse forward, patterns predicted from these batches), in eval mode (no refresh), and per layer
the MLP input is caught on its way in, so the predicted block mask can be compared with the `threshold`
exposer's on the true activations: recall (exposer blocks the prediction kept) and density (blocks kept).
A dense model gets the exposer's density alone: how much block sparsity its activations would allow.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from longexposure.arch import decoder_layers, family


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


@torch.no_grad()
def held_out_metrics(
    model: nn.Module,
    batches: list[dict[str, torch.Tensor]],
    *,
    exposure: Any = None,
    autocast_dtype: torch.dtype | None = None,
    mlp_block: int = 64,
    theta: float = 0.1,
) -> dict[str, Any]:
    """Mean loss over `batches`; per-layer MLP exposer density and, for predicted MLP patterns, the
    prediction's density and recall against the exposer (means over batches, then over layers)."""
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
            amp = (
                torch.autocast(batch["input_ids"].device.type, dtype=autocast_dtype)
                if autocast_dtype is not None
                else contextlib.nullcontext()
            )
            with amp:
                losses.append(float(model(**batch, use_cache=False).loss))
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
    return out
