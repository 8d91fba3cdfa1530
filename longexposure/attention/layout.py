"""`BlockLayout`: which key blocks each query block attends to, per (batch, head).

The format is block-CSR with a fixed row capacity (the layout FlexAttention's `BlockMask` uses), so a
new mask has the same tensor shapes as the last one and nothing recompiles:

    kv_counts[b, h, i]        number of key blocks query block i attends to          (B, H, NQ)   int32
    kv_indices[b, h, i, :c]   those key blocks, strictly increasing; entries >= c are 0 (B, H, NQ, NK) int32
    q_counts, q_indices       the transpose (query blocks per key block), needed by the backward's
                              dK/dV pass; optional, built on the device without a host sync

Block (i, j) covers queries [i*block, (i+1)*block) and keys [j*block, (j+1)*block). A size-1 batch
or head dimension broadcasts (uniform policies use (1, 1, NQ, NK)). Causality and padding are not
part of the layout: the operator masks causally inside diagonal blocks and masks padded tokens.

Construction checks shapes, dtypes and devices (metadata only, no sync), and the values (range,
order, transpose consistency: `validate()`) where that costs no device sync: host tensors always,
device tensors when asked (`check=True`, or LONGEXPOSURE_CHECK_INDICES=1), never while torch.compile
traces. The builders here (`from_dense`, the pattern pool, and views of a checked layout) produce valid
layouts by construction and vouch for them (`check=False`), so a pattern is checked once, where it
is built, and a training step never waits for the device. A malformed layout is a `LayoutError` (a
ValueError). An unchecked device layout that is malformed gives wrong numbers, never a crash: the
kernels clamp counts and indices into the grid and `to_dense` drops out-of-range entries.
"""

from __future__ import annotations

import os
from dataclasses import InitVar, dataclass, field

import torch
from torch import Tensor


class LayoutError(ValueError):
    """Malformed layout metadata; the message names the tensor, the entry and the rule broken."""


def _check_block(block: int) -> None:
    if not isinstance(block, int) or block < 16 or block & (block - 1):
        raise LayoutError(f"block must be a power of two >= 16 (tensor-core tile), got {block!r}")


def compact_rows(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Dense boolean rows (..., N) -> (counts (...,), indices (..., N)) in canonical form, no sync.

    Canonical: the set columns in increasing order, then zeros. Used offline (pool construction,
    policies, tests); the online path builds layouts from the pool's tables instead.
    """
    n = mask.shape[-1]
    ar = torch.arange(n, device=mask.device)
    keyed = torch.where(mask, ar, ar + n)
    ordered = torch.sort(keyed, dim=-1).values
    indices = torch.where(ordered < n, ordered, 0).to(torch.int32).contiguous()
    return mask.sum(-1, dtype=torch.int32).contiguous(), indices


@dataclass(frozen=True, eq=False)
class BlockLayout:
    """Per-(batch, head) block-sparse attention layout (see the module docstring for the format).

    Args:
        block: tokens per block (power of two >= 16), the same for queries and keys.
        kv_counts: (B, H, NQ) int32.
        kv_indices: (B, H, NQ, NK) int32.
        q_counts: (B, H, NK) int32 or None.
        q_indices: (B, H, NK, NQ) int32 or None.
        check: validate the values now (True; a host sync for device tensors), or vouch for them
            (False: the caller built them valid); None: validate host tensors, and device tensors
            with LONGEXPOSURE_CHECK_INDICES=1.

    Attributes:
        checked: the values were validated or vouched for.
    """

    block: int
    kv_counts: Tensor
    kv_indices: Tensor
    q_counts: Tensor | None = None
    q_indices: Tensor | None = None
    check: InitVar[bool | None] = None
    checked: bool = field(default=False, init=False, repr=False)

    def __post_init__(self, check: bool | None) -> None:
        self._check_metadata()
        if check is None:
            if torch.compiler.is_compiling() or not _checks_values(self.device):
                return  # unchecked: device tensors (reading them is a sync) or traced ones
            check = True
        if check:
            check_inputs(self)
        object.__setattr__(self, "checked", True)

    def _check_metadata(self) -> None:
        _check_block(self.block)
        for name in ("kv_counts", "kv_indices", "q_counts", "q_indices"):
            t = getattr(self, name)
            if t is None:
                continue
            if not isinstance(t, Tensor):
                raise LayoutError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dtype != torch.int32:
                raise LayoutError(f"{name} must be int32, got {t.dtype}")
            if t.device != self.kv_counts.device:
                raise LayoutError(f"{name} is on {t.device} but kv_counts is on {self.kv_counts.device}")
        if self.kv_counts.dim() != 3:
            raise LayoutError(f"kv_counts must be (B, H, NQ), got shape {tuple(self.kv_counts.shape)}")
        b, h, nq = self.kv_counts.shape
        if self.kv_indices.dim() != 4 or tuple(self.kv_indices.shape[:3]) != (b, h, nq):
            raise LayoutError(
                f"kv_indices must be (B, H, NQ, NK) = ({b}, {h}, {nq}, NK) to match kv_counts, "
                f"got {tuple(self.kv_indices.shape)}"
            )
        if self.kv_indices.stride(-1) != 1:
            raise LayoutError("kv_indices must be contiguous in its last dimension")
        if (self.q_counts is None) != (self.q_indices is None):
            raise LayoutError("q_counts and q_indices must be given together or both omitted")
        if self.q_counts is not None:
            nk = self.kv_indices.shape[-1]
            if tuple(self.q_counts.shape) != (b, h, nk):
                raise LayoutError(f"q_counts must be (B, H, NK) = ({b}, {h}, {nk}), got {tuple(self.q_counts.shape)}")
            if tuple(self.q_indices.shape) != (b, h, nk, nq):  # type: ignore[union-attr]
                raise LayoutError(
                    f"q_indices must be (B, H, NK, NQ) = ({b}, {h}, {nk}, {nq}), got {tuple(self.q_indices.shape)}"  # type: ignore[union-attr]
                )
            if self.q_indices.stride(-1) != 1:  # type: ignore[union-attr]
                raise LayoutError("q_indices must be contiguous in its last dimension")

    def _derived(self, *tables: Tensor | None) -> BlockLayout:
        """A layout over tables derived from this one's (views, moves, its transpose): checked iff this is."""
        return BlockLayout(self.block, *tables, check=False if self.checked else None)  # type: ignore[arg-type]

    # ----------------------------------------------------------------------------------- shape facts
    @property
    def batch(self) -> int:
        return self.kv_counts.shape[0]

    @property
    def heads(self) -> int:
        return self.kv_counts.shape[1]

    @property
    def n_q_blocks(self) -> int:
        return self.kv_counts.shape[2]

    @property
    def n_k_blocks(self) -> int:
        return self.kv_indices.shape[3]

    @property
    def device(self) -> torch.device:
        return self.kv_counts.device

    @property
    def has_transpose(self) -> bool:
        return self.q_counts is not None

    def __repr__(self) -> str:
        return (
            f"BlockLayout(block={self.block}, B={self.batch}, H={self.heads}, NQ={self.n_q_blocks}, "
            f"NK={self.n_k_blocks}, transpose={self.has_transpose}, device={self.device})"
        )

    def check_compatible(self, batch: int, heads: int, q_len: int, k_len: int) -> None:
        """Raise a LayoutError unless this layout fits attention of these sizes (metadata only)."""
        nq, nk = -(-q_len // self.block), -(-k_len // self.block)
        if (self.n_q_blocks, self.n_k_blocks) != (nq, nk):
            raise LayoutError(
                f"layout has {self.n_q_blocks}x{self.n_k_blocks} blocks of {self.block}, but q_len={q_len}, "
                f"k_len={k_len} need {nq}x{nk}"
            )
        if self.batch not in (1, batch):
            raise LayoutError(f"layout batch {self.batch} is neither 1 nor the input batch {batch}")
        if self.heads not in (1, heads):
            raise LayoutError(f"layout heads {self.heads} is neither 1 nor the input heads {heads}")

    # ---------------------------------------------------------------------------------- conversions
    @classmethod
    def from_dense(cls, mask: Tensor, block: int, *, transpose: bool = True) -> BlockLayout:
        """From a boolean block mask (B, H, NQ, NK) (or (NQ, NK)); device-side, no host sync."""
        if mask.dtype != torch.bool:
            raise LayoutError(f"mask must be bool, got {mask.dtype}")
        if mask.dim() == 2:
            mask = mask[None, None]
        if mask.dim() != 4:
            raise LayoutError(f"mask must be (B, H, NQ, NK) or (NQ, NK), got shape {tuple(mask.shape)}")
        kv_counts, kv_indices = compact_rows(mask)
        q_counts = q_indices = None
        if transpose:
            q_counts, q_indices = compact_rows(mask.transpose(-1, -2))
        return cls(block, kv_counts, kv_indices, q_counts, q_indices, check=False)  # canonical by construction

    def to_dense(self) -> Tensor:
        """Boolean block mask (B, H, NQ, NK) from kv_counts/kv_indices; device-side, no host sync."""
        nk = self.n_k_blocks
        pos = torch.arange(nk, device=self.device)
        idx = self.kv_indices.long()
        valid = (pos < self.kv_counts[..., None]) & (idx >= 0) & (idx < nk)  # out-of-range: unchecked layouts
        dense = torch.zeros(*self.kv_counts.shape, nk + 1, dtype=torch.bool, device=self.device)
        # invalid slots scatter into the spare last column, which is dropped
        dense.scatter_(-1, torch.where(valid, idx, nk), True)
        return dense[..., :nk]

    def with_transpose(self) -> BlockLayout:
        """This layout with q_counts/q_indices filled in (device-side, no host sync)."""
        if self.has_transpose:
            return self
        q_counts, q_indices = compact_rows(self.to_dense().transpose(-1, -2))
        return self._derived(self.kv_counts, self.kv_indices, q_counts, q_indices)

    def expand(self, batch: int, heads: int) -> BlockLayout:
        """Broadcast a (1 or B, 1 or H) layout to (batch, heads) as views (stride 0, no copy)."""

        def ex(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.expand(batch, heads, *t.shape[2:])

        return self._derived(ex(self.kv_counts), ex(self.kv_indices), ex(self.q_counts), ex(self.q_indices))

    def narrow(self, batch: int, heads: int) -> BlockLayout:
        """The layout of the first `batch` batch rows and `heads` heads (broadcast dims stay size 1)."""

        def nr(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[: min(batch, t.shape[0]), : min(heads, t.shape[1])]

        return self._derived(nr(self.kv_counts), nr(self.kv_indices), nr(self.q_counts), nr(self.q_indices))

    def to(self, device: torch.device | str) -> BlockLayout:
        def mv(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device)

        return self._derived(mv(self.kv_counts), mv(self.kv_indices), mv(self.q_counts), mv(self.q_indices))

    def nnz(self) -> Tensor:
        """Total listed blocks over the (broadcast-free) grid, as a 0-d tensor (no sync)."""
        return self.kv_counts.sum()

    def density(self, causal: bool = True) -> Tensor:
        """Listed blocks over the blocks a dense (causal) layout would list; 0-d float tensor."""
        nq, nk = self.n_q_blocks, self.n_k_blocks
        full = sum(min(i + 1, nk) for i in range(nq)) if causal else nq * nk
        return self.kv_counts.sum(dtype=torch.float64) / (full * self.batch * self.heads)

    def token_mask(
        self, q_len: int, k_len: int | None = None, *, causal: bool, seq_lens: Tensor | None = None
    ) -> Tensor:
        """Token-level boolean mask (B, H, q_len, k_len) this layout stands for (reference / sdpa use).

        Keys at or beyond seq_lens[b] are masked, and so are queries there (their rows are all-False).
        Causal alignment is top-left (query i sees keys <= i), as in training without a KV cache.
        """
        k_len = q_len if k_len is None else k_len
        dense = self.to_dense()
        m = dense.repeat_interleave(self.block, dim=-2)[..., :q_len, :]
        m = m.repeat_interleave(self.block, dim=-1)[..., :k_len]
        qi = torch.arange(q_len, device=self.device)[:, None]
        ki = torch.arange(k_len, device=self.device)[None, :]
        if causal:
            m = m & (ki <= qi)
        if seq_lens is not None:
            lens = seq_lens.to(self.device).long().view(-1, 1, 1, 1)
            m = m & (ki < lens) & (qi < lens)
        return m

    # ----------------------------------------------------------------------------------- validation
    def validate(self, causal: bool = False, canonical: bool = False) -> BlockLayout:
        """Check the values; raise a LayoutError naming the first bad entry. Synchronizes.

        Args:
            causal: also reject blocks above the diagonal (query block i listing key block j > i).
            canonical: also require padding entries (past a row's count) to be 0, the form every
                builder here produces, so equal layouts compare equal tensor by tensor.
        """
        _validate_rows("kv", self.kv_counts, self.kv_indices, self.n_k_blocks, canonical)
        if self.has_transpose:
            _validate_rows("q", self.q_counts, self.q_indices, self.n_q_blocks, canonical)  # type: ignore[arg-type]
            dense = self.to_dense()
            qt = BlockLayout(self.block, self.q_counts, self.q_indices, check=False).to_dense().transpose(-1, -2)  # type: ignore[arg-type]
            bad = (dense != qt).nonzero()
            if len(bad):
                b, h, i, j = (int(x) for x in bad[0])
                which = "kv lists it, q does not" if bool(dense[b, h, i, j]) else "q lists it, kv does not"
                raise LayoutError(
                    f"q_counts/q_indices are not the transpose of kv_counts/kv_indices: block (b={b}, h={h}, "
                    f"q={i}, k={j}): {which} ({int(bad.shape[0])} mismatches)"
                )
        if causal:
            dense = self.to_dense()
            qi = torch.arange(self.n_q_blocks, device=self.device)[:, None]
            kj = torch.arange(self.n_k_blocks, device=self.device)[None, :]
            bad = (dense & (kj > qi)).nonzero()
            if len(bad):
                b, h, i, j = (int(x) for x in bad[0])
                raise LayoutError(
                    f"causal layout lists key block {j} for query block {i} at (b={b}, h={h}): "
                    f"above the diagonal ({int(bad.shape[0])} such blocks)"
                )
        object.__setattr__(self, "checked", True)
        return self


def _checks_values(device: torch.device) -> bool:
    """Whether a new layout's values are validated by default: host tensors (no device to wait for), or
    anywhere with LONGEXPOSURE_CHECK_INDICES=1 (a sync per construction on a GPU)."""
    return device.type == "cpu" or os.environ.get("LONGEXPOSURE_CHECK_INDICES") == "1"


def check_inputs(layout: BlockLayout) -> None:
    """The value check a layout gets where it is built: `validate()` (range, order, no repeats, the
    transpose). Reads the values on the host, so it runs on device tensors only when asked; under
    this name tests/test_no_host_sync.py accepts its host reads, as for the MLP operator's CPU check."""
    layout.validate()


def _validate_rows(prefix: str, counts: Tensor, indices: Tensor, n_cols: int, canonical: bool) -> None:
    c_name, i_name = f"{prefix}_counts", f"{prefix}_indices"
    bad = ((counts < 0) | (counts > n_cols)).nonzero()
    if len(bad):
        b, h, i = (int(x) for x in bad[0])
        raise LayoutError(f"{c_name}[{b}, {h}, {i}] = {int(counts[b, h, i])} is outside [0, {n_cols}]")
    pos = torch.arange(indices.shape[-1], device=indices.device)
    valid = pos < counts[..., None]
    bad = (valid & ((indices < 0) | (indices >= n_cols))).nonzero()
    if len(bad):
        b, h, i, j = (int(x) for x in bad[0])
        raise LayoutError(f"{i_name}[{b}, {h}, {i}, {j}] = {int(indices[b, h, i, j])} is outside [0, {n_cols})")
    rising = indices[..., 1:] > indices[..., :-1]
    bad = (valid[..., 1:] & ~rising).nonzero()
    if len(bad):
        b, h, i, j = (int(x) for x in bad[0])
        raise LayoutError(
            f"{i_name}[{b}, {h}, {i}, :] is not strictly increasing at position {j + 1} "
            f"({int(indices[b, h, i, j])} then {int(indices[b, h, i, j + 1])})"
        )
    bad = (~valid & (indices != 0)).nonzero() if canonical else bad[:0]
    if len(bad):
        b, h, i, j = (int(x) for x in bad[0])
        raise LayoutError(
            f"{i_name}[{b}, {h}, {i}, {j}] = {int(indices[b, h, i, j])} lies past the row's count "
            f"{int(counts[b, h, i])}; padding entries must be 0"
        )
