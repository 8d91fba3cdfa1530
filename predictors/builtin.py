"""Built-in predictors (registry `predictor`), each built for one decoder layer of a model.

Every entry is a factory `(model, layer, config) -> nn.Module` whose `forward(x)` takes the operator's
input x (B, S, d) and returns the operator's format (see `lowrank.py`). `config.target` picks the MLP
or the attention side where an entry serves both.

    attn-lowrank   trained per-head rank-r W_Q_hat, W_K_hat on the block-pooled input   (attention)
    mlp-lowrank    trained per-token block (count, mass) model, summed over the batch     (mlp)
    svd            training-free rank-r SVD of fc1 / of W_Q W_K^T per head (SparseLoRA)   (both)
    oracle         the exposer's true pattern from the layer's real weights (recall 1)    (both)
    random         random blocks at the oracle's density (Fig. 11 baseline)               (both)
"""

from __future__ import annotations

from typing import Any

import torch
from longexposure.predictors.lowrank import (
    AttnLowRank,
    AttnOracle,
    AttnRandom,
    AttnSvd,
    MlpLowRank,
    MlpOracle,
    MlpRandom,
    MlpSvd,
    PredictorConfig,
    PredictorError,
)
from torch import nn

from longexposure.profiling import decoder_layers, layer_part, num_heads
from longexposure.registry import PREDICTORS


def _layer(model: nn.Module, layer: int) -> nn.Module:
    layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise PredictorError(f"layer {layer} out of range: the model has {len(layers)} decoder layers")
    return layers[layer]


def _need(config: PredictorConfig, name: str, targets: tuple[str, ...]) -> None:
    if config.target not in targets:
        raise PredictorError(f"predictor {name!r} predicts {' and '.join(targets)}, not {config.target!r}")


def _oracle(model: nn.Module, layer: int, config: PredictorConfig) -> nn.Module:
    lay = _layer(model, layer)
    if config.target == "mlp":
        return MlpOracle(layer_part(model, lay, "fc1"), layer_part(model, lay, "act"), config)
    return AttnOracle(layer_part(model, lay, "q"), layer_part(model, lay, "k"), num_heads(model), config)


@PREDICTORS.register(
    "attn-lowrank", targets=("attention",), trainable=True, help="per-head rank-r W_Q, W_K on pooled x"
)
def attn_lowrank(model: nn.Module, layer: int, config: PredictorConfig) -> AttnLowRank:
    _need(config, "attn-lowrank", ("attention",))
    q = layer_part(model, _layer(model, layer), "q")
    return AttnLowRank(q.in_features, num_heads(model), config).to(q.weight.device)


@PREDICTORS.register("mlp-lowrank", targets=("mlp",), trainable=True, help="per-token block count/mass, summed")
def mlp_lowrank(model: nn.Module, layer: int, config: PredictorConfig) -> MlpLowRank:
    _need(config, "mlp-lowrank", ("mlp",))
    fc1 = layer_part(model, _layer(model, layer), "fc1")
    return MlpLowRank(fc1.in_features, fc1.out_features, config).to(fc1.weight.device)


@PREDICTORS.register("svd", targets=("mlp", "attention"), trainable=False, help="training-free rank-r SVD")
def svd(model: nn.Module, layer: int, config: PredictorConfig) -> nn.Module:
    lay = _layer(model, layer)
    if config.target == "mlp":
        fc1 = layer_part(model, lay, "fc1")
        return MlpSvd(fc1.weight, fc1.bias, config)
    q, k = layer_part(model, lay, "q"), layer_part(model, lay, "k")
    return AttnSvd(q.weight, q.bias, k.weight, k.bias, num_heads(model), config)


@PREDICTORS.register("oracle", targets=("mlp", "attention"), trainable=False, help="the exposer's true pattern")
def oracle(model: nn.Module, layer: int, config: PredictorConfig) -> nn.Module:
    return _oracle(model, layer, config)


@PREDICTORS.register("random", targets=("mlp", "attention"), trainable=False, help="random blocks, oracle's density")
def random_blocks(model: nn.Module, layer: int, config: PredictorConfig) -> nn.Module:
    base = _oracle(model, layer, config)
    return MlpRandom(base, config) if config.target == "mlp" else AttnRandom(base, config)  # type: ignore[arg-type]


def build_predictor(
    name: str, model: nn.Module, layer: int, config: PredictorConfig | None = None, **options: Any
) -> nn.Module:
    """Look `name` up and build it for `layer`; `options` are PredictorConfig fields (e.g. target='attention').

    Unknown names raise the registry's error listing the valid ones; a target the predictor does not
    serve raises naming the targets it does.
    """
    entry = PREDICTORS.entry(name)
    config = config or PredictorConfig(**options)
    if config.target not in entry.meta["targets"]:
        raise PredictorError(f"predictor {name!r} predicts {entry.meta['targets']}, not {config.target!r}")
    with torch.no_grad():
        return entry.obj(model, layer, config)
