"""Neuron reordering: permute each MLP's neurons by profiled activation frequency/mass, once.

A ReLU MLP y = fc2(relu(fc1(x))) is unchanged when its hidden neurons are permuted consistently:
fc1's weight rows, fc1's bias and fc2's weight columns (and, on a LoRA-wrapped model, fc1's lora_B
rows and fc2's lora_A columns). Sorting the neurons by how often / how strongly they fire puts the
hot ones in the first blocks, so a block-wise policy keeps most of the activation mass in few blocks.
This goes beyond the paper (which filters blocks of the original order); it is exact, applied once at
patch time, and `reorder_mlp_` returns the permutations so profiles and predictors can follow them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

from longexposure.profiling import capture_mlp, decoder_layers, layer_part

KEYS = ("mass", "count")


@torch.no_grad()
def neuron_stats(model: torch.nn.Module, batches: Iterable[Tensor]) -> list[tuple[Tensor, Tensor]]:
    """Per layer, per neuron over every token of `batches` (each (B, S) ids): (count, mass) float64 (ffn,)."""
    totals: list[tuple[Tensor, Tensor]] | None = None
    for ids in batches:
        acts = capture_mlp(model, ids)
        stats = [((a > 0).flatten(0, 1).sum(0).double(), a.flatten(0, 1).sum(0).double()) for a in acts]
        totals = stats if totals is None else [(c + c2, m + m2) for (c, m), (c2, m2) in zip(totals, stats, strict=True)]
    if totals is None:
        raise ValueError("neuron_stats needs at least one batch")
    return [(c.cpu(), m.cpu()) for c, m in totals]


def neuron_order(count: Tensor, mass: Tensor, key: str = "mass") -> Tensor:
    """Permutation (ffn,) int64 putting neurons in decreasing `key` order (ties: the other key, then index)."""
    if key not in KEYS:
        raise ValueError(f"key must be one of {KEYS}, got {key!r}")
    primary, secondary = (mass, count) if key == "mass" else (count, mass)
    # lexicographic: stable sort by the secondary key, then by the primary
    order = torch.sort(secondary.double(), descending=True, stable=True).indices
    return order[torch.sort(primary.double()[order], descending=True, stable=True).indices]


def _permute_rows_(param: Tensor, perm: Tensor) -> None:
    param.data.copy_(param.data[perm.to(param.device)])


def _permute_cols_(param: Tensor, perm: Tensor) -> None:
    param.data.copy_(param.data[:, perm.to(param.device)])


@torch.no_grad()
def permute_layer_(model: torch.nn.Module, layer: torch.nn.Module, perm: Tensor) -> None:
    """Permute one layer's hidden neurons in place: fc1 rows and bias, fc2 columns (and LoRA factors)."""
    fc1_mod = layer.fc1
    fc2_mod = layer.fc2
    fc1, fc2 = layer_part(model, layer, "fc1"), layer_part(model, layer, "fc2")
    ffn = fc1.weight.shape[0]
    if perm.shape != (ffn,) or not torch.equal(torch.sort(perm.cpu()).values, torch.arange(ffn)):
        raise ValueError(f"perm must be a permutation of range({ffn}), got shape {tuple(perm.shape)}")
    _permute_rows_(fc1.weight, perm)
    if fc1.bias is not None:
        _permute_rows_(fc1.bias, perm)
    _permute_cols_(fc2.weight, perm)
    for name, lora in getattr(fc1_mod, "lora_B", {}).items():  # fc1 LoRA: B's rows are fc1 outputs
        _permute_rows_(lora.weight, perm)
        del name
    for name, lora in getattr(fc2_mod, "lora_A", {}).items():  # fc2 LoRA: A's columns are fc2 inputs
        _permute_cols_(lora.weight, perm)
        del name


def reorder_mlp_(
    model: torch.nn.Module,
    stats: Sequence[tuple[Tensor, Tensor]] | None = None,
    *,
    perms: Sequence[Tensor] | None = None,
    key: str = "mass",
) -> list[Tensor]:
    """Reorder every layer's neurons in place, from profiled `stats` or given `perms`; returns the perms.

    Function-preserving: the model's outputs are unchanged (up to float summation order).
    """
    layers = decoder_layers(model)
    if perms is None:
        if stats is None:
            raise ValueError("pass stats (from neuron_stats) or perms")
        perms = [neuron_order(c, m, key) for c, m in stats]
    if len(perms) != len(layers):
        raise ValueError(f"{len(perms)} permutations for {len(layers)} layers")
    for layer, perm in zip(layers, perms, strict=True):
        permute_layer_(model, layer, perm)
    cfg = getattr(getattr(model, "get_base_model", lambda: model)(), "config", None)
    if cfg is not None:
        cfg.longexposure_neuron_order = key
    return list(perms)


# ------------------------------------------------------------------- profile arrays (the OPT-1.3B reference)
def profile_density_at_mass(
    profile: np.ndarray, block: int, target: float = 0.9, perm: np.ndarray | None = None
) -> float:
    """Fraction of neuron blocks (sorted by block mass) needed to hold `target` of one layer's mass.

    Args:
        profile: (ffn,) non-negative per-neuron activation mass (or frequency).
        block: neurons per block (must divide ffn).
        perm: optional neuron order applied first.
    """
    p = np.asarray(profile, dtype=np.float64)
    if perm is not None:
        p = p[perm]
    if p.size % block:
        raise ValueError(f"ffn {p.size} is not divisible by block {block}")
    blocks = np.sort(np.clip(p, 0, None).reshape(-1, block).sum(1))[::-1]
    cum = np.cumsum(blocks) / max(blocks.sum(), 1e-30)
    return (int((cum < target - 1e-12).sum()) + 1) / blocks.size


def profile_order(profile: np.ndarray) -> np.ndarray:
    """Neuron order of one layer's profile, hottest first."""
    return np.argsort(-np.asarray(profile, dtype=np.float64), kind="stable")
