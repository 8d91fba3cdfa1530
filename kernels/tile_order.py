"""The grouped (L2-friendly) order in which a flat grid of programs walks a 2-D grid of tiles."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def grouped_tile(pid, num_m, num_n, group_m):
    """Program `pid`'s (m, n) over a num_m x num_n grid, walked in groups of `group_m` rows: inside a group, every
    row at one n before the next n, so the programs in flight share a few rows' operands in L2 (the MLP's GEMM
    tiles: rows of the token dimension; attention: heads, whose K / V every block row of the head reads). The last
    group may be short; num_n may be data-dependent and group_m a runtime value or a constexpr."""
    in_group = group_m * num_n
    first_m = (pid // in_group) * group_m
    rows = tl.minimum(num_m - first_m, group_m)
    return first_m + (pid % in_group) % rows, (pid % in_group) // rows
