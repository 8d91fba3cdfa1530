"""Where exposure patterns come from: the `sparsity_source` registry kind (`longexposure list sparsity_source`).

One entry per source, each saying whether its pattern is computed every step (`dynamic`: a predictor per layer
runs in the forward) and what `ExposureConfig` must be given for it (`requires`). `expose.py` reads both from
here; every report names the source a pattern came from.
"""

from __future__ import annotations

from dataclasses import dataclass

from longexposure.registry import SPARSITY_SOURCES


@dataclass(frozen=True)
class SparsitySource:
    """A sparsity source: `dynamic` patterns are computed every step; `requires` names ExposureConfig fields."""

    name: str
    dynamic: bool
    requires: tuple[str, ...] = ()
    host_side: bool = False  # draws its pattern on the host: no CUDA graph, no torch.compile of the predictor


for _source, _help in (
    (SparsitySource("all-active", dynamic=False), "every block: the exposed model computes the dense model"),
    (
        SparsitySource("replay", dynamic=False, requires=("profile",)),
        "per-layer patterns from a recorded profile (not this model's activations; reports say so)",
    ),
    (
        SparsitySource("predicted", dynamic=True, requires=("predictors",)),
        "live predictors (a saved PredictorBank) run on each layer's input every step",
    ),
    (SparsitySource("oracle", dynamic=True), "the exposer's true pattern from the frozen weights every step"),
    (
        SparsitySource("random", dynamic=True, host_side=True),
        "random blocks at the oracle's density every step (the control)",
    ),
    (
        SparsitySource("random-as-predicted", dynamic=True, requires=("predictors",), host_side=True),
        "MLP: random blocks, as many per layer and step as the live predictors keep (the control at their density)",
    ),
):
    SPARSITY_SOURCES.register(_source.name, _source, help=_help)
