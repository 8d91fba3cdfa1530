"""Post-training pruning front-ends for the sparsity-preserving methods, chosen by name.

`prune_(model, "magnitude" | "wanda", sparsity)` zeroes weights of every linear projection inside the
transformer blocks (`arch.Family.projections`, per architecture; embeddings and the LM head are untouched):

  - `magnitude`: score |W|, lowest scores pruned per layer (unstructured) or per group (N:M).
  - `wanda` (Sun et al., 2024): score |W_ij| * ||X_j||_2 with X the layer's calibration inputs;
    lowest scores pruned per output row (the paper's comparison group) or per N:M group.

`sparsity` is a ratio in [0, 1) (unstructured) or an `"N:M"` string such as `"2:4"` (keep N of every M
consecutive input weights of a row). GPT-2's Conv1D weights (in, out) are scored in (out, in) layout.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

import torch
from torch import nn

from longexposure.arch import family

PRUNERS = ("magnitude", "wanda")


def is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"


def linear_targets(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every block linear projection; an error if none match the family's table."""
    suffixes = family(model).projections  # every linear projection inside a transformer block
    found = [
        (n, m) for n, m in model.named_modules() if n.endswith(suffixes) and (isinstance(m, nn.Linear) or is_conv1d(m))
    ]
    if not found:
        raise ValueError(f"no linear projections matching {suffixes} in {type(model).__name__}")
    return found


def weight_view(module: nn.Module) -> torch.Tensor:
    """The weight in (out, in) layout (a transposed view for Conv1D)."""
    return module.weight.t() if is_conv1d(module) else module.weight


def parse_sparsity(sparsity: float | str) -> tuple[float, tuple[int, int] | None]:
    """A ratio in [0, 1), or "N:M" -> (ratio, (N, M))."""
    if isinstance(sparsity, str):
        match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", sparsity)
        if not match:
            try:
                sparsity = float(sparsity)
            except ValueError:
                raise ValueError(f"sparsity must be a ratio or 'N:M' like '2:4', got {sparsity!r}") from None
        else:
            n, m = int(match.group(1)), int(match.group(2))
            if not 0 < n < m:
                raise ValueError(f"N:M sparsity needs 0 < N < M, got {sparsity!r}")
            return 1 - n / m, (n, m)
    if not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"sparsity ratio must be in [0, 1), got {sparsity}")
    return float(sparsity), None


def prune_mask(scores: torch.Tensor, sparsity: float | str, per_row: bool) -> torch.Tensor:
    """Keep-mask (out, in) from scores: N:M groups along the input dimension, or a ratio per row/layer."""
    ratio, nm = parse_sparsity(sparsity)
    out_f, in_f = scores.shape
    if nm is not None:
        n, m = nm
        if in_f % m:
            raise ValueError(f"N:M sparsity {n}:{m} needs in_features divisible by {m}, got {in_f}")
        groups = scores.reshape(out_f, in_f // m, m)
        keep = torch.zeros_like(groups, dtype=torch.bool)
        keep.scatter_(2, groups.topk(n, dim=2).indices, True)
        return keep.view(out_f, in_f)
    flat = scores.reshape(out_f, in_f) if per_row else scores.reshape(1, -1)
    n_prune = int(ratio * flat.shape[1])
    keep = torch.ones_like(flat, dtype=torch.bool)
    if n_prune:
        keep.scatter_(1, flat.topk(n_prune, dim=1, largest=False).indices, False)
    return keep.view(out_f, in_f)


@torch.no_grad()
def input_norms(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], modules) -> dict[str, torch.Tensor]:
    """||X_j||_2 over every calibration token, for each target module's input features."""
    sq: dict[str, torch.Tensor] = {}
    hooks = []

    def hook(name: str) -> Callable:
        def fn(_mod, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            sq[name] = sq.get(name, 0) + (x * x).sum(0)

        return fn

    for name, m in modules:
        hooks.append(m.register_forward_pre_hook(hook(name)))
    try:
        for batch in batches:
            model(input_ids=batch["input_ids"])
    finally:
        for h in hooks:
            h.remove()
    return {n: v.sqrt() for n, v in sq.items()}


@torch.no_grad()
def prune_(
    model: nn.Module,
    method: str = "magnitude",
    sparsity: float | str = 0.5,
    calibration: Iterable[dict[str, torch.Tensor]] | None = None,
) -> dict[str, object]:
    """Zero the pruned weights of every block linear projection in place; returns a summary.

    Args:
        method: `magnitude` or `wanda` (needs `calibration`, an iterable of {input_ids} batches).
        sparsity: ratio in [0, 1) or "N:M".
    """
    if method not in PRUNERS:
        raise ValueError(f"unknown pruning method {method!r}; valid: {PRUNERS}")
    targets = linear_targets(model)
    norms = None
    if method == "wanda":
        if calibration is None:
            raise ValueError("wanda needs calibration inputs (batches of input_ids) for the input norms")
        norms = input_norms(model, calibration, targets)
    zeros = total = 0
    for name, m in targets:
        w = weight_view(m)
        scores = w.detach().abs().float()
        if norms is not None:
            scores = scores * norms[name].to(scores.device)[None, :]
        keep = prune_mask(scores, sparsity, per_row=(method == "wanda"))
        w.mul_(keep.to(w.dtype))
        zeros += int((w == 0).sum())
        total += w.numel()
    return {"pruner": method, "sparsity": str(sparsity), "layers": len(targets), "zero_fraction": zeros / max(total, 1)}


def nm_pattern_ok(weight: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    """True iff every group of M consecutive input weights of each row has at most N non-zeros."""
    out_f, in_f = weight.shape
    return bool(((weight.reshape(out_f, in_f // m, m) != 0).sum(-1) <= n).all())
