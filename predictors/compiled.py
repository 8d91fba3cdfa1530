"""Predictor calls as torch.compile programs: the pattern of one layer in a few fused kernels.

A predictor's FLOPs are negligible; its cost is kernel count. Eagerly, a low-rank MLP predictor with its
threshold policy and fixed-capacity ids is ~35 small kernels, an attention predictor with its
long-exposure policy and layout tables ~60: at OPT-1.3B shapes (24 layers) that is ~2,300 kernels and
6.4 ms per step on an H100 even inside a CUDA graph. Inductor fuses the elementwise and reduction chains.
Dynamo lifts a module's parameters to graph inputs, so one compilation serves every layer's predictor of
the same class and shapes (no recompilation per layer).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

from longexposure.attention.layout import compact_rows


def mlp_ids(predictor: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """(ids padded to n_blocks, count (1,) int32) of the predicted active neuron blocks; needs fixed capacity."""
    ids, count = predictor(x)
    return ids, count.reshape(1).to(torch.int32)


def attention_tables(predictor: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The predicted mask as `BlockLayout` tables: (kv_counts, kv_indices, q_counts, q_indices)."""
    mask = predictor(x)
    kv_counts, kv_indices = compact_rows(mask)
    q_counts, q_indices = compact_rows(mask.transpose(-1, -2))
    return kv_counts, kv_indices, q_counts, q_indices


EAGER = {"mlp": mlp_ids, "attention": attention_tables}
# Dynamo traces through our two lru_cache'd constant builders (correct: they are pure) and says so once
warnings.filterwarnings(
    "ignore", message=r"Dynamo detected a call to a `functools.lru_cache`-wrapped function at '(lowrank|exposers)\.py"
)


@functools.cache
def compiled(target: str) -> Callable[..., tuple[Tensor, ...]]:
    """The compiled call for `target` (`mlp` or `attention`); static shapes, one program per sequence length."""
    if target not in EAGER:
        raise ValueError(f"no compiled predictor call for target {target!r}; valid: {sorted(EAGER)}")
    return torch.compile(EAGER[target], dynamic=False, fullgraph=True)
