"""Uniform attention mask policies for ablations (paper Fig. 9 left): `dense`, `longformer`, `bigbird`.

A policy is a small strategy object; `layout(batch, heads, seq_len, block)` returns a `BlockLayout`
with the same pattern for every (batch, head), built from the pattern pool's atoms (so its tables
come from the pool, built once per block count and device) and broadcast as stride-0 views. Any
sparse attention backend (`eager`, `sdpa`, `flex`, `triton`) consumes it.

Sizes are in blocks: with block = 64 tokens, `longformer(window_blocks=4)` is a 256-token window.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longexposure.attention.layout import BlockLayout
from longexposure.attention.pattern_pool import PatternPool
from longexposure.registry import MASK_POLICIES


def _uniform(
    atoms: tuple[str, ...], batch: int, heads: int, seq_len: int, block: int, causal: bool, device
) -> BlockLayout:
    n = -(-seq_len // block)
    pool = PatternPool.cached(n, block, atoms, causal, str(torch.device(device)))
    return pool.uniform(atoms, batch, heads)


@dataclass(frozen=True)
class DensePolicy:
    """Every block (every causal block when causal): the layout of ordinary attention."""

    def atoms(self) -> tuple[str, ...]:
        return ("full",)

    def layout(
        self, batch: int, heads: int, seq_len: int, block: int, *, causal: bool = True, device="cpu"
    ) -> BlockLayout:
        return _uniform(self.atoms(), batch, heads, seq_len, block, causal, device)


@dataclass(frozen=True)
class LongformerPolicy:
    """Sliding window of `window_blocks` blocks plus `global_blocks` global blocks (Beltagy et al.)."""

    window_blocks: int = 4
    global_blocks: int = 1

    def __post_init__(self) -> None:
        if self.window_blocks < 1 or self.global_blocks < 0:
            raise ValueError(f"longformer needs window_blocks >= 1 and global_blocks >= 0, got {self}")

    def atoms(self) -> tuple[str, ...]:
        return (f"local-{self.window_blocks}",) + ((f"global-{self.global_blocks}",) if self.global_blocks else ())

    def layout(
        self, batch: int, heads: int, seq_len: int, block: int, *, causal: bool = True, device="cpu"
    ) -> BlockLayout:
        return _uniform(self.atoms(), batch, heads, seq_len, block, causal, device)


@dataclass(frozen=True)
class BigBirdPolicy:
    """Window + global + `random_blocks` seeded random blocks per query row (Zaheer et al.)."""

    window_blocks: int = 3
    global_blocks: int = 2
    random_blocks: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.window_blocks < 1 or self.global_blocks < 0 or self.random_blocks < 0:
            raise ValueError(f"bigbird needs window_blocks >= 1, global_blocks >= 0, random_blocks >= 0, got {self}")

    def atoms(self) -> tuple[str, ...]:
        out = [f"local-{self.window_blocks}"]
        if self.global_blocks:
            out.append(f"global-{self.global_blocks}")
        if self.random_blocks:
            out.append(f"random-{self.random_blocks}-s{self.seed}")
        return tuple(out)

    def layout(
        self, batch: int, heads: int, seq_len: int, block: int, *, causal: bool = True, device="cpu"
    ) -> BlockLayout:
        return _uniform(self.atoms(), batch, heads, seq_len, block, causal, device)


MASK_POLICIES.register("dense", DensePolicy, help="all (causal) blocks")
MASK_POLICIES.register("longformer", LongformerPolicy, help="sliding window + global blocks")
MASK_POLICIES.register("bigbird", BigBirdPolicy, help="sliding window + global + seeded random blocks")


def mask_layout(
    name: str, batch: int, heads: int, seq_len: int, block: int, *, causal: bool = True, device="cpu", **params
) -> BlockLayout:
    """The layout of the registered policy `name` built with `params` (e.g. window_blocks=4)."""
    return MASK_POLICIES.get(name)(**params).layout(batch, heads, seq_len, block, causal=causal, device=device)
