"""Atomic block patterns, the offline pattern pool, and the online per-(batch, head) combination.

Paper Sec. VI-A / Fig. 6: sparse attention patterns are unions of a few atomic patterns. Offline, for
one number of sequence blocks N, the pool computes every atom's lookup table once: per query block
the sorted list of key blocks, and per key block the sorted list of query blocks (the transpose the
backward needs). Online, each (batch, head) names a set of atoms (a (B, H, A) boolean selection, as
an exposer/predictor produces it); the layout of the whole (batch, head) grid is built by
concatenating the selected atoms' precomputed rows and removing duplicates. There is no dense-mask
-> CSR conversion on this path and no host sync, and the shapes are fixed by (B, H, N), so a new
selection never recompiles anything downstream.

Two implementations of `combine`, equal by test:
    `triton` (default on CUDA): one kernel launch for the whole grid, one program per (batch*head,
        row); each program reads the selected atoms' rows and merges them (dedup by membership over
        the row's N slots, compaction by prefix sum), for query rows and transposed key rows alike.
    `torch` (default on CPU): gathers the selected rows into one (BH, rows, A*W) candidate tensor,
        sorts, drops neighbours that repeat, sorts again (fixed shapes, no sync).

The result is one flat table over the whole grid: (B, H, N) counts and (B, H, N, N) indices, which
the attention kernels read through one flat work axis over every (block row, batch, head), heaviest
rows first, so work is balanced by blocks and not by heads.

Atoms (block units; i = query block, j = key block; with `causal`, only j <= i):
    full              every (causal) block
    local-W           causal window: 0 <= i - j < W  (non-causal: |i - j| < W)
    global-G          the first G key blocks for every query (non-causal: also the first G query rows)
    dilated-WxD       W blocks at dilation D: i - j in {0, D, ..., (W-1) D}
    strided-S         "summary" columns j = S-1 (mod S) (Sparse Transformer fixed pattern)
    diagonal          j == i
    random-R-sX       R random blocks per query row, seeded by X (BigBird); fixed once the pool is built
Each atom's `dense(n, causal)` is its boolean reference; tests check combinations against the OR of
those.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from longexposure.attention.layout import BlockLayout, LayoutError, compact_rows

_ATOM_RE = re.compile(
    r"^(?:(?P<full>full)|(?P<diag>diagonal)|local-(?P<lw>\d+)|global-(?P<g>\d+)|dilated-(?P<dw>\d+)x(?P<dd>\d+)"
    r"|strided-(?P<s>\d+)|random-(?P<r>\d+)-s(?P<seed>\d+))$"
)


@dataclass(frozen=True)
class Atom:
    """One atomic block pattern; `name` round-trips through `Atom.parse`."""

    kind: str
    a: int = 0
    b: int = 0

    @property
    def name(self) -> str:
        return {
            "full": "full",
            "diagonal": "diagonal",
            "local": f"local-{self.a}",
            "global": f"global-{self.a}",
            "dilated": f"dilated-{self.a}x{self.b}",
            "strided": f"strided-{self.a}",
            "random": f"random-{self.a}-s{self.b}",
        }[self.kind]

    def __str__(self) -> str:
        return self.name

    @classmethod
    def parse(cls, spec: Atom | str) -> Atom:
        if isinstance(spec, Atom):
            return spec
        m = _ATOM_RE.match(spec)
        if not m:
            raise ValueError(
                f"unknown atom {spec!r}; atoms are full, diagonal, local-W, global-G, dilated-WxD, strided-S, "
                f"random-R-sSEED (W, G, D, S, R positive integers)"
            )
        g = m.groupdict()
        if g["full"]:
            atom = cls("full")
        elif g["diag"]:
            atom = cls("diagonal")
        elif g["lw"]:
            atom = cls("local", int(g["lw"]))
        elif g["g"]:
            atom = cls("global", int(g["g"]))
        elif g["dw"]:
            atom = cls("dilated", int(g["dw"]), int(g["dd"]))
        elif g["s"]:
            atom = cls("strided", int(g["s"]))
        else:
            atom = cls("random", int(g["r"]), int(g["seed"]))
        sized = atom.kind in ("local", "global", "dilated", "strided")
        if (sized and atom.a < 1) or (atom.kind == "dilated" and atom.b < 1):
            raise ValueError(f"atom {spec!r} needs positive sizes")
        return atom

    def dense(self, n: int, *, causal: bool = True) -> Tensor:
        """Boolean (n, n) reference mask of this atom over n query x n key blocks (CPU)."""
        i = torch.arange(n)[:, None]
        j = torch.arange(n)[None, :]
        allowed = j <= i if causal else torch.ones(n, n, dtype=torch.bool)
        dist = (i - j) if causal else (i - j).abs()
        if self.kind == "full":
            m = allowed
        elif self.kind == "diagonal":
            m = i == j
        elif self.kind == "local":
            m = (dist >= 0) & (dist < self.a)
        elif self.kind == "global":
            m = j < self.a
            if not causal:
                m = m | (i < self.a)
        elif self.kind == "dilated":
            m = (dist >= 0) & (dist % self.b == 0) & (dist < self.a * self.b)
        elif self.kind == "strided":
            m = j % self.a == self.a - 1
        elif self.kind == "random":
            gen = torch.Generator().manual_seed(self.b)
            keys = torch.rand(n, n, generator=gen).masked_fill(~allowed, 2.0)
            ranks = keys.argsort(-1).argsort(-1)  # rank of each allowed block among its row
            m = ranks < self.a
        else:  # pragma: no cover - parse() admits only the kinds above
            raise ValueError(self.kind)
        return m & allowed


def atoms(*specs: Atom | str) -> tuple[Atom, ...]:
    return tuple(Atom.parse(s) for s in specs)


class PatternPool:
    """Precomputed per-atom lookup tables for N blocks, and their online combination.

    Args:
        n_blocks: N, query blocks = key blocks (self-attention).
        block: tokens per block.
        atoms: the atoms in the pool (names or `Atom`s); their order defines the selection's last axis.
        causal: whether the atoms are restricted to j <= i.
        device: where the tables live (the combination runs there).
    """

    def __init__(
        self,
        n_blocks: int,
        block: int,
        atoms: Sequence[Atom | str],
        *,
        causal: bool = True,
        device: torch.device | str = "cpu",
    ):
        if n_blocks < 1:
            raise ValueError(f"n_blocks must be >= 1, got {n_blocks}")
        self.atoms = tuple(Atom.parse(a) for a in atoms)
        if not self.atoms:
            raise ValueError("a pattern pool needs at least one atom")
        names = [a.name for a in self.atoms]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate atoms in pool: {names}")
        self.n_blocks, self.block, self.causal = n_blocks, block, causal
        self.device = torch.device(device)
        self._index = {name: k for k, name in enumerate(names)}
        # offline: dense reference -> per-atom tables (rows, then transposed rows)
        self._dense = torch.stack([a.dense(n_blocks, causal=causal) for a in self.atoms])  # (A, N, N) CPU
        row_c, row_i = compact_rows(self._dense)
        col_c, col_i = compact_rows(self._dense.transpose(-1, -2))
        # checked once here, on the host (atoms as heads): every combination is a union of these rows,
        # so `combine` vouches for its layouts and a step never checks (nor syncs) again
        BlockLayout(block, row_c[None], row_i[None], col_c[None], col_i[None], check=False).validate(
            causal=causal, canonical=True
        )
        counts = torch.cat([row_c, col_c], dim=1)  # (A, 2N)
        width = max(16, _next_pow2(int(counts.max())))
        entries = torch.cat([row_i, col_i], dim=1)[..., : min(width, n_blocks)]  # (A, 2N, <=W)
        table = torch.full((len(self.atoms), 2 * n_blocks, width), n_blocks, dtype=torch.int32)
        table[..., : entries.shape[-1]] = entries
        slot = torch.arange(width)
        table = torch.where(slot < counts[..., None], table, n_blocks)  # sentinel N past each count
        self.table = table.to(self.device).contiguous()
        self.table_counts = counts.to(self.device).contiguous()
        self.device = self.table.device  # "cuda" -> "cuda:0", so device checks compare like with like
        self.width = width

    # --------------------------------------------------------------------------------- construction
    @classmethod
    @functools.lru_cache(maxsize=64)
    def cached(
        cls, n_blocks: int, block: int, atoms: tuple[str, ...], causal: bool = True, device: str = "cpu"
    ) -> PatternPool:
        """One pool per (N, block, atoms, causal, device), built on first use."""
        return cls(n_blocks, block, atoms, causal=causal, device=device)

    @property
    def names(self) -> list[str]:
        return [a.name for a in self.atoms]

    def __repr__(self) -> str:
        return f"PatternPool(N={self.n_blocks}, block={self.block}, causal={self.causal}, atoms={self.names})"

    def index(self, name: Atom | str) -> int:
        key = Atom.parse(name).name
        if key not in self._index:
            raise KeyError(f"atom {key!r} is not in this pool; the pool holds {self.names}")
        return self._index[key]

    def selection(self, per_head: Sequence[Sequence[Sequence[str]]] | Sequence[Sequence[str]]) -> Tensor:
        """Host-side convenience: atom names per (batch, head) -> (B, H, A) bool on the pool's device.

        `per_head` is [batch][head][names] or, for batch 1, [head][names].
        """
        rows = list(per_head)
        if rows and rows[0] and isinstance(rows[0][0], str):
            rows = [rows]  # [head][names] -> batch 1
        sel = torch.zeros(len(rows), len(rows[0]) if rows else 0, len(self.atoms), dtype=torch.bool)
        for b, heads in enumerate(rows):
            if len(heads) != sel.shape[1]:
                raise ValueError(f"batch {b} has {len(heads)} heads, batch 0 has {sel.shape[1]}")
            for h, names in enumerate(heads):
                for name in names:
                    sel[b, h, self.index(name)] = True
        return sel.to(self.device)

    # -------------------------------------------------------------------------------------- online
    def combine(self, selection: Tensor, *, impl: str | None = None) -> BlockLayout:
        """The layout (with its transpose) whose (b, h) pattern is the union of the selected atoms.

        Args:
            selection: (B, H, A) bool on the pool's device.
            impl: `triton` or `torch`; default `triton` on CUDA, `torch` elsewhere.
        """
        if selection.dim() != 3 or selection.shape[-1] != len(self.atoms):
            raise ValueError(f"selection must be (B, H, {len(self.atoms)}) bool, got {tuple(selection.shape)}")
        if selection.dtype != torch.bool:
            raise ValueError(f"selection must be bool, got {selection.dtype}")
        if selection.device != self.device:
            raise ValueError(f"selection is on {selection.device}, the pool on {self.device}")
        impl = impl or ("triton" if self.device.type == "cuda" else "torch")
        bsz, heads, _ = selection.shape
        n = self.n_blocks
        flat = selection.reshape(bsz * heads, -1).contiguous()
        if impl == "triton":
            from longexposure.kernels.block_sparse_attention import layout_union

            counts, indices = layout_union(flat, self.table, self.table_counts, n)
        elif impl == "torch":
            counts, indices = self._combine_torch(flat)
        else:
            raise ValueError(f"impl must be 'triton' or 'torch', got {impl!r}")
        counts = counts.view(bsz, heads, 2 * n)
        indices = indices.view(bsz, heads, 2 * n, n)
        # valid by construction: sorted, repeat-free unions of the rows checked in __init__
        return BlockLayout(
            self.block, counts[..., :n], indices[:, :, :n], counts[..., n:], indices[:, :, n:], check=False
        )

    def _combine_torch(self, flat: Tensor) -> tuple[Tensor, Tensor]:
        n, bh = self.n_blocks, flat.shape[0]
        rows = 2 * n
        cand = torch.where(flat[:, :, None, None], self.table[None], n)  # (BH, A, 2N, W)
        cand = cand.permute(0, 2, 1, 3).reshape(bh, rows, -1)
        if cand.shape[-1] < n:
            cand = torch.nn.functional.pad(cand, (0, n - cand.shape[-1]), value=n)
        ordered = cand.sort(dim=-1).values
        repeat = ordered[..., 1:] == ordered[..., :-1]
        ordered = torch.cat([ordered[..., :1], torch.where(repeat, n, ordered[..., 1:])], dim=-1)
        ordered = ordered.sort(dim=-1).values[..., :n]
        valid = ordered < n
        return valid.sum(-1, dtype=torch.int32), torch.where(valid, ordered, 0).to(torch.int32)

    def uniform(self, names: Sequence[str], batch: int = 1, heads: int = 1) -> BlockLayout:
        """The same union of atoms for every (batch, head): a (1, 1) layout expanded as views."""
        sel = torch.zeros(1, 1, len(self.atoms), dtype=torch.bool)
        for name in names:
            sel[0, 0, self.index(name)] = True
        return self.combine(sel.to(self.device)).expand(batch, heads)

    # ----------------------------------------------------------------------------------- reference
    def dense_union(self, selection: Tensor) -> Tensor:
        """Reference: OR of the selected atoms' dense masks, (B, H, N, N) bool on CPU."""
        sel = selection.cpu()
        return (sel[..., :, None, None] & self._dense[None, None]).any(dim=2)


def _next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (x - 1).bit_length()


__all__ = ["Atom", "LayoutError", "PatternPool", "atoms"]
