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
from dataclasses import dataclass, field
from typing import Any, ClassVar

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
from longexposure.ops.backend import check_backend_name
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
    model: nn.Module, batches: Iterator[dict[str, torch.Tensor]], config: SylvaConfig
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Stage 1: K-FAC factors (`config.mask_source`: hierarchical or exact) over `config.preprocess_batches`
    batches -> importance -> one block mask per layer keeping 1 - `config.sparsity` of its blocks.

    Returns ({module name: (ceil(out/b), ceil(in/b)) bool mask}, report with bytes and seconds).
    Parameter `requires_grad` flags and grads are restored/cleared afterwards.
    """
    factor, n_batches, reduce = config.mask_source, config.preprocess_batches, config.reduce
    if factor not in ("hierarchical", "exact"):
        raise ValueError(f"K-FAC masks come from 'hierarchical' or 'exact' factors, not mask {factor!r}")
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
                kw = dict(rank=config.rank, levels=config.levels, device=w.device)
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
        s_in, s_out = importance_scores(grad.float() / n_batches, a, g, config.damping)
        masks[name] = top_block_mask(block_importance(s_in, s_out, config.block), config.sparsity).cpu()
        m.weight.grad = None
        del a, g
    importance_s = time.perf_counter() - started
    for p, flag in flags.items():
        p.requires_grad_(flag)
        p.grad = None
    report = {
        "factor": factor,
        "rank": config.rank,
        "levels": config.levels,
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


@dataclass(frozen=True)
class SylvaConfig:
    """Sylva's options. `KfacPrunerConfig` has the same fields; what differs is the class (its factors and pruning).

    A field a suite's `method_options` or `apply_method(model, "sylva", **options)` does not know is an error
    naming the valid ones; values are checked here, before any preprocessing runs.
    """

    sparsity: float = field(default=0.95, metadata={"help": "sigma: fraction of each layer's weight blocks frozen"})
    block: int = field(default=64, metadata={"help": "b: the mask's block edge (b x b weight blocks)"})
    rank: int = field(default=32, metadata={"help": "r: rank of every off-diagonal block of a hierarchical factor"})
    levels: int = field(default=4, metadata={"help": "kappa: how many times a hierarchical factor is halved"})
    mask: str | None = field(
        default=None, metadata={"help": f"where the mask comes from, one of {MASK_SOURCES} (None: the method's factor)"}
    )
    preprocess_batches: int = field(default=4, metadata={"help": "calibration batches of stage 1"})
    preprocess_batch: int = field(default=4, metadata={"help": "sequences per calibration batch"})
    preprocess_seq_len: int = field(default=128, metadata={"help": "tokens per calibration sequence"})
    dataset: str = field(default="synthetic", metadata={"help": "registered dataset of the calibration batches"})
    data_path: str | None = field(default=None, metadata={"help": "the dataset's file or directory"})
    reduce: str = field(default="sample", metadata={"help": f"vectors fed to the factors, one of {REDUCTIONS}"})
    damping: float = field(default=0.01, metadata={"help": "lambda = damping x mean(diag F) added before inverting"})
    values_dtype: str | None = field(
        default=None, metadata={"help": f"dtype of the trainable blocks, one of {sorted(_DTYPES)} (None: W's)"}
    )
    backend: str = field(default="auto", metadata={"help": "Sylva's operators: auto, triton or torch"})
    seed: int = field(default=0, metadata={"help": "seeds the calibration data and a random mask"})

    factor: ClassVar[str] = "hierarchical"  # the K-FAC factors stage 1 accumulates (and the default mask source)
    prune: ClassVar[bool] = False  # zero the weights outside the mask

    def __post_init__(self) -> None:
        if self.mask is not None and self.mask not in MASK_SOURCES:
            raise ValueError(f"mask must be one of {MASK_SOURCES}, got {self.mask!r}")
        if self.reduce not in REDUCTIONS:
            raise ValueError(f"reduce must be one of {REDUCTIONS}, got {self.reduce!r}")
        if self.values_dtype is not None and self.values_dtype not in _DTYPES:
            raise ValueError(f"values_dtype must be one of {sorted(_DTYPES)}, got {self.values_dtype!r}")
        check_backend_name(self.backend, "Sylva")
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if min(self.block, self.rank, self.preprocess_batches, self.preprocess_batch) < 1 or self.levels < 0:
            raise ValueError(f"block, rank, preprocess_batches, preprocess_batch must be >= 1, levels >= 0: {self}")

    @property
    def mask_source(self) -> str:
        return self.mask or self.factor


@dataclass(frozen=True)
class KfacPrunerConfig(SylvaConfig):
    """The K-FAC pruner's options: Sylva's fields, with exact factors, and the weights outside the mask zeroed."""

    factor: ClassVar[str] = "exact"
    prune: ClassVar[bool] = True


def _sparse_method(model: nn.Module, c: SylvaConfig) -> tuple[nn.Module, dict[str, Any]]:
    """Stage 1 (a mask per layer: K-FAC importance or random), then stage 2 (`embed_sparse_`); the model, a report."""
    from longexposure.data import model_batches

    source = c.mask_source
    report: dict[str, Any] = {"mask_source": source, "sparsity": c.sparsity, "block": c.block}
    if source == "random":
        gen = torch.Generator().manual_seed(c.seed)
        masks = {
            n: random_block_mask(tuple(weight_view(m).shape), c.block, c.sparsity, gen)
            for n, m in linear_targets(model)
        }
    else:
        batches = model_batches(
            model, c.dataset, batch=c.preprocess_batch, seq_len=c.preprocess_seq_len, seed=c.seed, path=c.data_path
        )
        masks, pre = collect_block_masks(model, iter(batches), c)
        report.update(pre, data=batches.description)
    freeze(model)
    layers = embed_sparse_(
        model, masks, c.block, prune=c.prune, values_dtype=_DTYPES.get(c.values_dtype), backend=c.backend
    )
    report["layers"] = len(layers)
    report["trainable_blocks"] = sum(m.nnz_blocks for m in layers)
    return model, report


@PEFT_METHODS.register(
    "sylva", help="Sylva: hierarchical K-FAC block mask, sparse weights embedded in dense W", config=SylvaConfig
)
def sylva(model: nn.Module, config: SylvaConfig | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Sylva on every block linear projection; returns the model and its preprocessing report."""
    return _sparse_method(model, config or SylvaConfig())


@PEFT_METHODS.register(
    "kfac-pruner",
    help="K-FAC pruner baseline: exact K-FAC block mask, pruned, masked weights train",
    config=KfacPrunerConfig,
)
def kfac_pruner(model: nn.Module, config: KfacPrunerConfig | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """The K-FAC pruner: exact factors (mask='exact' by default); weights outside the mask are zeroed."""
    return _sparse_method(model, config or KfacPrunerConfig())


__all__ = [
    "KfacPrunerConfig",
    "SylvaConfig",
    "collect_block_masks",
    "embed_sparse_",
    "kfac_pruner",
    "sylva",
    "sylva_layers",
    "unload_",
]
