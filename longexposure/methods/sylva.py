"""Sylva (Mu et al., ICS '24) and its K-FAC pruner baseline as PEFT methods.

`sylva`: stage 1 (preprocessing, paper Alg. 1 lines 3-22) runs forward/backward passes over a few
calibration mini-batches; hooks feed every block linear layer's inputs and output gradients into its
K-FAC factors A and G in the hierarchical (r, kappa) approximation, updated online
(`sylva_kfac.HierarchicalFactor`). Then recursive block inversion, the importance of eqs. 19-20 from
the mean gradient, their outer product summed per b x b block, and the top (1 - sigma) blocks per
layer -> a block mask. Stage 2 replaces each layer by a `SylvaLinear` whose mask blocks train while
embedded in the frozen dense weight.

`kfac-pruner` (EigenDamage-style K-FAC pruner, the paper's baseline): the same pipeline with the
exact dense factors; the weights outside the mask are pruned (set to zero) and the masked ones train.
Its fine-tuning layer is the same embedded layer, so its fine-tuning cost equals Sylva's here (the
paper's K-pruner stores the pruned weights block-sparse; this one keeps the dense layout).

Vectors z fed to the factors: `reduce="sample"` (default) uses one vector per sequence (its mean over
tokens) as the paper's "per-sample input" rank-1 updates and the authors' code do; `reduce="token"`
uses every token.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from longexposure.methods.builtin import freeze
from longexposure.methods.pruning import is_conv1d, linear_targets, weight_view
from longexposure.methods.sylva_importance import (
    block_importance,
    importance_scores,
    random_block_mask,
    top_block_mask,
)
from longexposure.methods.sylva_kfac import make_factor
from longexposure.methods.sylva_layer import SylvaLinear, sylva_layers
from longexposure.registry import PEFT_METHODS

MASK_SOURCES = ("hierarchical", "exact", "random")
REDUCTIONS = ("sample", "token")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _reduce(t: torch.Tensor, how: str) -> torch.Tensor:
    t = t.detach().float()
    if how == "sample" and t.dim() >= 3:
        return t.mean(dim=-2).reshape(-1, t.shape[-1])
    return t.reshape(-1, t.shape[-1])


def collect_block_masks(
    model: nn.Module,
    batches: Iterator[dict[str, torch.Tensor]],
    n_batches: int,
    *,
    factor: str = "hierarchical",
    sparsity: float = 0.95,
    block: int = 64,
    rank: int = 32,
    levels: int = 4,
    reduce: str = "sample",
    damping: float = 0.01,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Stage 1: K-FAC factors over `n_batches` batches -> importance -> one block mask per layer.

    Returns ({module name: (ceil(out/b), ceil(in/b)) bool mask}, report with bytes and seconds).
    Parameter `requires_grad` flags and grads are restored/cleared afterwards.
    """
    if factor not in ("hierarchical", "exact"):
        raise ValueError(f"unknown K-FAC factor {factor!r}; valid: 'hierarchical', 'exact'")
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    if n_batches < 1:
        raise ValueError(f"need at least one preprocessing batch, got {n_batches}")
    targets = linear_targets(model)
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
        p.grad = None
    factors: dict[str, list] = {}
    hooks = []

    def hook(name: str):
        def fn(module, args, output):
            w = weight_view(module)
            if name not in factors:
                kw = dict(rank=rank, levels=levels, device=w.device)
                factors[name] = [make_factor(factor, w.shape[1], **kw), make_factor(factor, w.shape[0], **kw)]
            factors[name][0].update_(_reduce(args[0], reduce))
            if output.requires_grad:
                output.register_hook(lambda g: factors[name][1].update_(_reduce(g, reduce)))

        return fn

    for name, m in targets:
        m.weight.requires_grad_(True)
        hooks.append(m.register_forward_hook(hook(name)))
    started = time.perf_counter()
    try:
        for _ in range(n_batches):
            batch = next(batches)
            model(**batch).loss.backward()
    finally:
        for h in hooks:
            h.remove()
    if targets[0][1].weight.device.type == "cuda":
        torch.cuda.synchronize()
    accumulate_s = time.perf_counter() - started
    factor_bytes = sum(a.nbytes() + g.nbytes() for a, g in factors.values())
    started = time.perf_counter()
    masks: dict[str, torch.Tensor] = {}
    for name, m in targets:
        if name not in factors:
            raise RuntimeError(f"layer {name} saw no data during preprocessing")
        a, g = factors.pop(name)
        grad = weight_view(m).grad if not is_conv1d(m) else m.weight.grad.t()
        s_in, s_out = importance_scores(grad.float() / n_batches, a, g, damping)
        masks[name] = top_block_mask(block_importance(s_in, s_out, block), sparsity).cpu()
        m.weight.grad = None
        del a, g
    importance_s = time.perf_counter() - started
    for p, flag in flags.items():
        p.requires_grad_(flag)
        p.grad = None
    report = {
        "factor": factor,
        "rank": rank,
        "levels": levels,
        "reduce": reduce,
        "batches": n_batches,
        "factor_bytes": factor_bytes,
        "accumulate_s": accumulate_s,
        "inverse_importance_s": importance_s,
    }
    return masks, report


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def embed_sparse_(
    model: nn.Module,
    masks: dict[str, torch.Tensor],
    block: int,
    *,
    prune: bool = False,
    values_dtype: torch.dtype | None = None,
    backend: str = "auto",
) -> list[SylvaLinear]:
    """Replace every masked layer by a `SylvaLinear` (prune=True zeroes the entries outside its mask)."""
    layers = []
    for name, m in linear_targets(model):
        if name not in masks:
            continue
        w = weight_view(m).detach()
        w = w.contiguous() if not is_conv1d(m) else w.clone(memory_format=torch.contiguous_format)
        layer_mask = masks[name].to(w.device)
        if prune:
            from longexposure.ops.block_sddmm import block_mask_to_dense

            w.mul_(block_mask_to_dense(layer_mask, tuple(w.shape), block).to(w.dtype))
        bias = m.bias.detach() if m.bias is not None else None
        new = SylvaLinear(
            w,
            bias,
            layer_mask,
            block,
            values_dtype=values_dtype,
            backend=backend,
            source="conv1d" if is_conv1d(m) else "linear",
        )
        _set_module(model, name, new)
        del m
        layers.append(new)
    return layers


@torch.no_grad()
def unload_(model: nn.Module) -> nn.Module:
    """Replace every SylvaLinear by a plain nn.Linear (or Conv1D) holding its fine-tuned dense weight."""
    for name, m in list(model.named_modules()):
        if not isinstance(m, SylvaLinear):
            continue
        if m.values._version != m._synced_version:
            m.sync_()
        if m.source == "conv1d":
            from transformers.pytorch_utils import Conv1D

            new = Conv1D(m.out_features, m.in_features).to(m.weight.device, m.weight.dtype)
            new.weight.copy_(m.weight.t())
        else:
            new = nn.Linear(
                m.in_features, m.out_features, bias=m.bias is not None, device=m.weight.device, dtype=m.weight.dtype
            )
            new.weight.copy_(m.weight)
        if m.bias is not None:
            new.bias.copy_(m.bias)
        _set_module(model, name, new)
    return model


def _dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    if value not in _DTYPES:
        raise ValueError(f"values_dtype must be one of {sorted(_DTYPES)}, got {value!r}")
    return _DTYPES[value]


def _sparse_method(
    model: nn.Module,
    *,
    factor: str,
    prune: bool,
    sparsity: float,
    block: int,
    rank: int,
    levels: int,
    mask: str | None,
    preprocess_batches: int,
    preprocess_batch: int,
    preprocess_seq_len: int,
    dataset: str,
    data_path: str | None,
    reduce: str,
    damping: float,
    values_dtype: str | torch.dtype | None,
    backend: str,
    seed: int,
) -> tuple[nn.Module, dict[str, Any]]:
    from longexposure.data import load_batches
    from longexposure.models import family_of

    source = mask or factor
    if source not in MASK_SOURCES:
        raise ValueError(f"mask must be one of {MASK_SOURCES}, got {source!r}")
    device = next(model.parameters()).device
    report: dict[str, Any] = {"mask_source": source, "sparsity": sparsity, "block": block}
    if source == "random":
        gen = torch.Generator().manual_seed(seed)
        masks = {
            n: random_block_mask(tuple(weight_view(m).shape), block, sparsity, gen) for n, m in linear_targets(model)
        }
    else:
        batches = load_batches(
            dataset,
            batch=preprocess_batch,
            seq_len=preprocess_seq_len,
            vocab_size=model.config.vocab_size,
            path=data_path,
            seed=seed,
            device=device,
            family=family_of(model),
        )
        masks, pre = collect_block_masks(
            model,
            iter(batches),
            preprocess_batches,
            factor=source,
            sparsity=sparsity,
            block=block,
            rank=rank,
            levels=levels,
            reduce=reduce,
            damping=damping,
        )
        report.update(pre, data=batches.description)
    freeze(model)
    layers = embed_sparse_(model, masks, block, prune=prune, values_dtype=_dtype(values_dtype), backend=backend)
    report["layers"] = len(layers)
    report["trainable_blocks"] = sum(m.nnz_blocks for m in layers)
    return model, report


@PEFT_METHODS.register("sylva", help="Sylva: hierarchical K-FAC block mask, sparse weights embedded in dense W")
def sylva(
    model: nn.Module,
    sparsity: float = 0.95,
    block: int = 64,
    rank: int = 32,
    levels: int = 4,
    mask: str | None = None,
    preprocess_batches: int = 4,
    preprocess_batch: int = 4,
    preprocess_seq_len: int = 128,
    dataset: str = "synthetic",
    data_path: str | None = None,
    reduce: str = "sample",
    damping: float = 0.01,
    values_dtype: str | None = None,
    backend: str = "auto",
    seed: int = 0,
) -> tuple[nn.Module, dict[str, Any]]:
    """Sylva on every block linear projection. `mask`: hierarchical (default), exact or random."""
    return _sparse_method(**locals(), factor="hierarchical", prune=False)


@PEFT_METHODS.register(
    "kfac-pruner", help="K-FAC pruner baseline: exact K-FAC block mask, pruned, masked weights train"
)
def kfac_pruner(
    model: nn.Module,
    sparsity: float = 0.95,
    block: int = 64,
    rank: int = 32,
    levels: int = 4,
    mask: str | None = None,
    preprocess_batches: int = 4,
    preprocess_batch: int = 4,
    preprocess_seq_len: int = 128,
    dataset: str = "synthetic",
    data_path: str | None = None,
    reduce: str = "sample",
    damping: float = 0.01,
    values_dtype: str | None = None,
    backend: str = "auto",
    seed: int = 0,
) -> tuple[nn.Module, dict[str, Any]]:
    """The K-FAC pruner: exact factors (mask='exact' by default); weights outside the mask are zeroed."""
    return _sparse_method(**locals(), factor="exact", prune=True)


__all__ = ["collect_block_masks", "embed_sparse_", "kfac_pruner", "sylva", "sylva_layers", "unload_"]
