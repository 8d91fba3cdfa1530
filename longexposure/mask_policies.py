"""Mask recipes: the named uniform attention masks (`dense`, `longformer`, `bigbird`), each defined once.

A recipe is a frozen dataclass: its fields (sizes in blocks: with block = 64 tokens, `window_blocks=4` is a
256-token window), their defaults and their checks. Both registries that name these masks build from it:

  - `mask_policy` (paper Fig. 9 left ablations): the recipe itself. `layout(batch, heads, seq_len, block)` returns
    a `BlockLayout` with the same pattern for every (batch, head), built from the pattern pool's atoms (so its
    tables come from the pool, built once per block count and device) and broadcast as stride-0 views. Any
    sparse attention backend (`eager`, `sdpa`, `flex`, `triton`) consumes it.
  - `exposer`: `exposers.LongformerAttention` etc. subclass the recipe and add the token block size, so an
    exposer and the policy of the same name share one set of defaults and one field naming.

`reference(n)` is the recipe's dense (n, n) causal boolean mask (`atom_mask`): the exposer returns it, and the
policy's layout is tested against it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from longexposure.attention.layout import BlockLayout
from longexposure.attention.pattern_pool import PatternPool
from longexposure.registry import MASK_POLICIES


@dataclass(frozen=True)
class AtomSet:
    """A union of atomic block patterns (causal; block units).

    window W: local-W, key blocks i-W < j <= i (W >= 1; the diagonal is always in).
    global_ G: global-G, key blocks j < G for every query.
    stride S: strided-S, key blocks with j % S == S - 1 (0: none).
    random R, seed: random-R-s<seed>, R random causal key blocks per query row (0: none).
    `names()` gives the atoms as the pattern pool (`longexposure.attention.pattern_pool`) spells them.
    """

    window: int = 1
    global_: int = 0
    stride: int = 0
    random: int = 0
    seed: int = 0

    def names(self) -> list[str]:
        out = [f"local-{self.window}"]
        if self.global_:
            out.append(f"global-{self.global_}")
        if self.stride:
            out.append(f"strided-{self.stride}")
        if self.random:
            out.append(f"random-{self.random}-s{self.seed}")
        return out


def atom_mask(spec: AtomSet, n: int, device: torch.device | str = "cpu") -> Tensor:
    """Boolean (n, n) causal block mask of an `AtomSet` (the reference the pool's atoms must match)."""
    i = torch.arange(n, device=device)[:, None]
    j = torch.arange(n, device=device)[None, :]
    allowed = j <= i
    m = (i - j < max(1, spec.window)) & allowed
    if spec.global_:
        m |= j < spec.global_
    if spec.stride:
        m |= j % spec.stride == spec.stride - 1
    if spec.random:
        gen = torch.Generator().manual_seed(spec.seed)
        keys = torch.rand(n, n, generator=gen).to(device).masked_fill(~allowed, 2.0)
        m |= keys.argsort(-1).argsort(-1) < spec.random
    return m & allowed


class UniformMask:
    """Base of the mask recipes: one union of atoms (`atom_set`; None: every causal block) for every (batch, head)."""

    def atom_set(self) -> AtomSet | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def atoms(self) -> tuple[str, ...]:
        """The pattern pool's names of the recipe's atoms."""
        spec = self.atom_set()
        return ("full",) if spec is None else tuple(spec.names())

    def reference(self, n: int, device: torch.device | str = "cpu") -> Tensor:
        """The dense (n, n) causal boolean block mask over n query x n key blocks."""
        spec = self.atom_set()
        return torch.ones(n, n, dtype=torch.bool, device=device).tril() if spec is None else atom_mask(spec, n, device)

    def layout(
        self, batch: int, heads: int, seq_len: int, block: int, *, causal: bool = True, device="cpu"
    ) -> BlockLayout:
        """The recipe's `BlockLayout` for (batch, heads) and seq_len tokens in blocks of `block` tokens."""
        n = -(-seq_len // block)
        atoms = self.atoms()
        return PatternPool.cached(n, block, atoms, causal, str(torch.device(device))).uniform(atoms, batch, heads)


@dataclass(frozen=True)
class DenseMask(UniformMask):
    """Every block (every causal block when causal): the layout of ordinary attention."""

    def atom_set(self) -> None:
        return None


@dataclass(frozen=True)
class LongformerMask(UniformMask):
    """Causal sliding window of `window_blocks` blocks plus the first `global_blocks` key blocks (Beltagy et al.)."""

    window_blocks: int = 4
    global_blocks: int = 1

    def __post_init__(self) -> None:
        if self.window_blocks < 1 or self.global_blocks < 0:
            raise ValueError(f"longformer needs window_blocks >= 1 and global_blocks >= 0, got {self}")

    def atom_set(self) -> AtomSet:
        return AtomSet(self.window_blocks, self.global_blocks)


@dataclass(frozen=True)
class BigBirdMask(UniformMask):
    """Window + global + `random_blocks` seeded random causal blocks per query row (Zaheer et al.).

    Defaults 3 / 1 / 2: the exposer's, which produced the published Fig. 9 rows (artifacts/fig9_*).
    """

    window_blocks: int = 3
    global_blocks: int = 1
    random_blocks: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.window_blocks < 1 or self.global_blocks < 0 or self.random_blocks < 0:
            raise ValueError(f"bigbird needs window_blocks >= 1, global_blocks >= 0, random_blocks >= 0, got {self}")

    def atom_set(self) -> AtomSet:
        return AtomSet(self.window_blocks, self.global_blocks, 0, self.random_blocks, self.seed)


MASK_POLICIES.register("dense", DenseMask, help="all (causal) blocks")
MASK_POLICIES.register("longformer", LongformerMask, help="sliding window + global blocks")
MASK_POLICIES.register("bigbird", BigBirdMask, help="sliding window + global + seeded random blocks")


def mask_layout(
    name: str, batch: int, heads: int, seq_len: int, block: int, *, causal: bool = True, device="cpu", **params
) -> BlockLayout:
    """The layout of the registered policy `name` built with `params` (e.g. window_blocks=4)."""
    return MASK_POLICIES.get(name)(**params).layout(batch, heads, seq_len, block, causal=causal, device=device)
