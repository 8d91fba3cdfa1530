"""Block-sparse flash attention over a per-(batch, head) `BlockLayout`, forward and backward.

Math (per batch b, head h; s = softmax scale, M = layout block mask expanded to tokens, & causal,
& key padding):
    P = softmax(s * Q K^T masked by M)      O = P V      lse_i = log sum_j exp(s q_i.k_j)
    dV = P^T dO    dP = dO V^T    dS = P * (dP - rowsum(dO * O))    dQ = s dS K    dK = s dS^T Q

Kernels (flash style: online softmax, no materialised score matrix, fp32 accumulation):
    _bsa_fwd_kernel          one program per (query block, batch*head); visits only the key blocks
                             listed in kv_indices; writes O and the row log-sum-exp (log2 domain).
    _bsa_bwd_dq_kernel       one program per (query block, batch*head); visits kv_indices again. It runs
                             first and computes delta = rowsum(dO * O) from the rows it loads anyway, for
                             dK/dV too: no separate delta launch, dO read once less.
    _bsa_bwd_dkdv_kernel     one program per (key block, batch*head); visits the query blocks of the
                             transposed layout (q_indices).
    _bsa_bwd_delta_kernel    delta alone (and the accumulator zeroed), for LONGEXPOSURE_BSA_DQ=atomic (read
                             per launch), where there is no dQ pass: the dK/dV kernel also adds each tile's
                             dQ share into an fp32 buffer with atomics (FlashAttention-2's five products per
                             block instead of seven; the dQ sum's order then varies run to run, so
                             deterministic mode keeps the pass). LONGEXPOSURE_BSA_DQ=bulk adds each tile's
                             share with one bulk tensor reduce-add (TMA, Hopper) instead of per-element atomics,
                             as FlashAttention-3 accumulates dQ.
    _layout_union_kernel     the pattern pool's online combination: per (batch*head, row), the union
                             of the selected atoms' precomputed block lists.

Work order: the grid is one flat axis over every (block row, batch, head), in groups of heads sized to
L2 (`head_group`); inside a group the heaviest rows go first (for causal layouts the last query blocks, or
the first key blocks in dK/dV), so the GPU's block scheduler balances by blocks, not by heads, while the
programs in flight share a few heads' K / V in L2. Each row (or column) is one loop over its list, its trip count
the row's count alone; a tile decides by its block index whether it needs the element mask (the causal diagonal,
blocks crossing the padded length): a uniform branch, and the other tiles carry no mask arithmetic (dK/dV builds its
mask in (queries, keys) order and transposes it: built in (keys, queries) order the compiler turned it into selects
that every tile ran; offline SASS, docs/notes).

Padding: tokens at or beyond seq_lens[b] are masked as keys; their query rows get O = 0, lse = +inf
and zero gradients. A row with no visible key (e.g. an empty layout row) also gets O = 0. A row that
sees a NaN score gets NaN, as in dense attention.

Layout values (ranges, order, no repeats) are checked where a layout is built (`BlockLayout`), not
here: reading them is a host sync. The kernels clamp counts and block indices into the grid, so a
layout that skipped the check can give wrong numbers but never reads outside q, k, v or the tables.

With LONGEXPOSURE_BSA_PAIR=1 (opt-in, read per launch or per trace; `query_pair`) a forward or dQ program takes two
query blocks as one 2 * BLOCK-row tile: the prefix both rows list alike runs unmasked, the rest of the union of their
lists is merged in order with each block masked out of the half whose row does not list it. A dK/dV program likewise
takes two key blocks over the union of their columns (the suffix both list alike, past the diagonals, unmasked).

With LONGEXPOSURE_BSA_TMA=1 (opt-in, read per launch or per trace) the inner loops read the blocks they stream
(K and V in the forward and dQ, Q and dO in dK/dV) through (B, H, S, D) tensor descriptors, strided heads
included, where `kernels/descriptors.py` allows; pointer loads otherwise.

Grid positions are computed in 32 bits and widened to int64 before pointer math (tile offsets inside a block stay
32-bit). A block of 64 or 128 tokens may be visited as two half-height tiles (`SPLIT`, autotuned). Autotune spaces
come from `autotune_configs`; LONGEXPOSURE_AUTOTUNE=0 (and the Triton interpreter) collapse them to one config.
Eager calls launch the kernels directly; under torch.compile tracing they go through `wrap_triton`.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl
from longexposure.kernels import descriptors
from longexposure.kernels.tile_order import grouped_tile
from torch.library import wrap_triton

from longexposure.backends import interpreting

# ------------------------------------------------------------------------------------------- config


# A register cap for 4-warp, 64-row tiles at head_dim 64: the one-loop forward holds 140 registers a thread, so 3
# programs share an SM's 64K registers where 4 fit under 128 (ptxas for sm_90a spills nothing at the cap). H100, same
# process: forward 64.7 vs 69.5 us at D 64, S 1024 (sdpa 59.8), 212.9 vs 225.1 at S 2048 (2026-12-06).
MAXNREG = 128


def autotune_configs(kind: str) -> list[triton.Config]:
    """Autotune space of one kernel kind (`fwd`, `dq`, `dkdv`); one config when autotuning is off."""
    if os.environ.get("LONGEXPOSURE_AUTOTUNE", "1") == "0" or interpreting():
        return [triton.Config({"SPLIT": 1}, num_warps=4, num_stages=2)]  # fits 227 KB smem up to D=128, block 128
    if kind == "fwd":
        # (SPLIT, warps, stages, register cap); 2 stages at 4 warps: 243 vs 281 us at D 64, S 2048 on the H100
        space = [(1, 4, 2, None), (1, 4, 3, None), (1, 8, 3, None), (1, 4, 4, None), (2, 8, 3, None),
                 (2, 4, 3, None), (1, 4, 2, MAXNREG), (1, 4, 3, MAXNREG)]
    else:
        space = [(1, 4, 2, None), (1, 8, 2, None), (2, 8, 2, None), (2, 4, 2, None)]
        if kind == "dq":
            space.append((1, 4, 2, MAXNREG))
    return [triton.Config({"SPLIT": split}, num_warps=w, num_stages=st, maxnreg=cap) for split, w, st, cap in space]


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    # small tiles gain nothing from 8 warps; blocks of 64 and more may be visited as two half-height tiles
    # (64 x 32 at block 64: FlashAttention-2's Triton backward streams 32-row tiles past a resident key block); the
    # register cap is for head_dim 64 (at 128 the accumulators alone need more: it would spill)
    block = kwargs.get("BLOCK", named_args.get("BLOCK", 64))
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 64))
    # the 4-stage forward at head_dim 128: 1 program an SM; held to it (`attention_revision_ab.py --forced`, H100,
    # S 1024) it took 159.7 vs 117.7 us dense and 86.6 vs 59.8 at ~80% sparsity, yet an autotuner run picked it
    # (163 us, 0.55x sdpa, in a table run of 72087f5)
    kept = [c for c in configs if not (block <= 32 and c.num_warps > 4) and not (block < 64 and c.kwargs["SPLIT"] > 1)
            and not (c.maxnreg and block_d > 64) and not (c.num_stages > 3 and block_d > 64)]
    return kept or configs[:1]


# every kernel also keys on its list width (NKP / NQP, the block count's power of two): the sequence length's bucket.
# Keyed without it, the first length tuned for all: at D 64 on the H100 the 2- and 3-stage forwards are within 5% at
# S 1024 but 243 vs 277 us at S 2048 (2026-12-06), so a pick made at S 1024 could cost 14% at S 2048
_KEY = ["BLOCK", "BLOCK_D", "CAUSAL", "EVEN_S", "USE_TMA"]

# ---------------------------------------------------------------------------------------- helpers


@triton.jit
def _load_tile(base, row0, stride_s, offs_d, S, D, ROWS: tl.constexpr, EVEN_S: tl.constexpr,
               EVEN_D: tl.constexpr):
    """Rows [row0, row0 + ROWS) of a (S, D) row-major slab as a (ROWS, BLOCK_D) tile; out of range reads 0.

    Only the scalar row0 * stride is 64-bit; the tile's 2-D offsets are 32-bit and loop-invariant."""
    r = tl.arange(0, ROWS)
    ptrs = base + row0 * stride_s + (r[:, None] * stride_s + offs_d[None, :])
    if EVEN_S:
        if EVEN_D:  # noqa: SIM108 - constexpr branches read better than a ternary here
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=offs_d[None, :] < D, other=0.0)
    else:
        rows = row0 + r
        if EVEN_D:
            x = tl.load(ptrs, mask=rows[:, None] < S, other=0.0)
        else:
            x = tl.load(ptrs, mask=(rows[:, None] < S) & (offs_d[None, :] < D), other=0.0)
    return x


@triton.jit
def _load_rows(src, b, h, row0, stride_s, offs_d, S, D, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
               EVEN_S: tl.constexpr, EVEN_D: tl.constexpr, USE_TMA: tl.constexpr):
    """Rows [row0, row0 + ROWS) of head (b, h) as a (ROWS, BLOCK_D) tile, out of range reading 0: through the
    (B, H, S, D) tensor descriptor `src` (USE_TMA: one bulk copy, no address math in the threads), or from the
    pointer `src` to that head's (S, D) slab."""
    if USE_TMA:
        x = src.load([b.to(tl.int32), h.to(tl.int32), row0.to(tl.int32), 0]).reshape(ROWS, BLOCK_D)
    else:
        x = _load_tile(src, row0, stride_s, offs_d, S, D, ROWS, EVEN_S, EVEN_D)
    return x


@triton.jit
def _heads(ptr, b, h, sb, sh, ss, B, H, S, D, ROWS: tl.constexpr, BLOCK_D: tl.constexpr, USE_TMA: tl.constexpr):
    """What `_load_rows` reads a (B, H, S, D) operand through: a tensor descriptor of ROWS-row boxes (USE_TMA),
    or the pointer to head (b, h)."""
    if USE_TMA:
        src = tl.make_tensor_descriptor(ptr, shape=[B, H, S, D], strides=[sb, sh, ss, 1],
                                        block_shape=[1, 1, ROWS, BLOCK_D])
    else:
        src = ptr + b * sb + h * sh
    return src


@triton.jit
def _store_tile(base, x, row0, stride_s, offs_d, S, D, ROWS: tl.constexpr, EVEN_S: tl.constexpr,
                EVEN_D: tl.constexpr):
    r = tl.arange(0, ROWS)
    ptrs = base + row0 * stride_s + (r[:, None] * stride_s + offs_d[None, :])
    if EVEN_S:
        if EVEN_D:
            tl.store(ptrs, x)
        else:
            tl.store(ptrs, x, mask=offs_d[None, :] < D)
    else:
        rows = row0 + r
        if EVEN_D:
            tl.store(ptrs, x, mask=rows[:, None] < S)
        else:
            tl.store(ptrs, x, mask=(rows[:, None] < S) & (offs_d[None, :] < D))


@triton.jit
def _widen_head(bh, H):
    """(batch, head, batch * H + head) of a 32-bit grid position, as int64 for the pointer math: the divisions stay
    32-bit (a 64-bit one is a software routine of ~100 instructions on the GPU, in every program's prologue)."""
    return (bh // H).to(tl.int64), (bh % H).to(tl.int64), bh.to(tl.int64)


@triton.jit
def _dot(a, b, DOT_PREC: tl.constexpr):
    """a @ b with fp32 accumulation. "interp-bf16": the Triton interpreter's bf16 dot is wrong, so the
    (exactly representable) bf16 operands are widened there; compiled kernels never take this branch."""
    if DOT_PREC == "interp-bf16":
        c = tl.dot(a.to(tl.float32), b.to(tl.float32))
    else:
        c = tl.dot(a, b, input_precision=DOT_PREC)
    return c


@triton.jit
def _row_count(cnt_ptr, n_blocks):
    """A row's block count, clamped into [0, n_blocks]: a count past the grid read past the row (a crash)."""
    return tl.minimum(tl.maximum(tl.load(cnt_ptr), 0), n_blocks)


@triton.jit
def _block_at(list_ptr, j, S, BLOCK: tl.constexpr):
    """Entry j of a block list (int64), clamped into the grid. Layouts are validated where they are built
    (`BlockLayout`); one that skipped it (device tensors, unchecked) may compute wrong numbers, but never
    reads outside q, k, v."""
    return tl.minimum(tl.maximum(tl.load(list_ptr + j).to(tl.int64), 0), (S - 1) // BLOCK)


@triton.jit
def _row_entries(row_ptr, cnt, width, NKP: tl.constexpr):
    """The row's block list as a (NKP,) vector; slots past `cnt` hold a large sentinel. The load is masked by the
    table's `width`, not by `cnt`, so it does not wait for the count's load and the two global reads overlap (H100,
    same process against the count-masked load: forward within noise, backward 0.5-1% faster)."""
    pos = tl.arange(0, NKP)
    x = tl.load(row_ptr + pos, mask=pos < width, other=2147483647)
    return tl.where(pos < cnt, x, 2147483647)


@triton.jit
def _fwd_inner(
    acc, m_i, l_i, q, row_ptr, lo, hi, lim, k_src, v_src, b, h, sks, svs, offs_m, offs_d, L, S, D, qk_scale,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT: tl.constexpr, EVEN_S: tl.constexpr, EVEN_D: tl.constexpr,
    CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr, USE_TMA: tl.constexpr,
):
    """Entries [lo, hi) of a row's list; a block at or past `lim` (the causal diagonal, the padded length) gets the
    element mask, decided per tile. One loop, not an unmasked loop and a masked one: its trip count is the row's
    count, known one load in, where the split point needed the row's whole list reduced first, and the diagonal's
    keys are prefetched while the previous tile computes."""
    every_row = offs_m >= 0
    SUB: tl.constexpr = BLOCK // SPLIT
    # one key tile per iteration (SPLIT per listed block): the software pipeliner sees a single tile's loads, as in
    # a dense flash-attention loop, instead of SPLIT unrolled tiles whose buffers are all live at once
    for jj in range(lo * SPLIT, hi * SPLIT):
        kb = _block_at(row_ptr, jj // SPLIT, S, BLOCK)
        acc, m_i, l_i = _fwd_tile(
            acc, m_i, l_i, q, kb * BLOCK + (jj % SPLIT) * SUB, every_row, kb >= lim, k_src, v_src, b, h, sks, svs,
            offs_m, offs_d, L, S, D, qk_scale, SUB, BLOCK_D, EVEN_S, EVEN_D, CAUSAL, DOT_PREC, USE_TMA,
        )
    return acc, m_i, l_i


@triton.jit
def _fwd_tile(
    acc, m_i, l_i, q, n0, keep, masked, k_src, v_src, b, h, sks, svs, offs_m, offs_d, L, S, D, qk_scale,
    SUB: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_S: tl.constexpr, EVEN_D: tl.constexpr,
    CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr, USE_TMA: tl.constexpr,
):
    """Keys [n0, n0 + SUB) against the resident queries: the online softmax and P V. `masked` (a scalar, or a
    constant): only the `keep` queries (a (queries,) mask), keys inside the length and (causal) not after the query
    count."""
    k = _load_rows(k_src, b, h, n0, sks, offs_d, S, D, SUB, BLOCK_D, EVEN_S, EVEN_D, USE_TMA)
    v = _load_rows(v_src, b, h, n0, svs, offs_d, S, D, SUB, BLOCK_D, EVEN_S, EVEN_D, USE_TMA)
    qk = _dot(q, tl.trans(k), DOT_PREC)
    if masked:
        qk = tl.where(_tile_mask(keep, offs_m, n0 + tl.arange(0, SUB), L, CAUSAL), qk, float("-inf"))
    return _softmax_step(acc, m_i, l_i, qk, v, qk_scale, DOT_PREC)


@triton.jit
def _tile_mask(keep, offs_m, offs_n, L, CAUSAL: tl.constexpr):
    """Which (query, key) entries of a tile count: the `keep` queries, keys inside the length and (causal) not after
    the query."""
    ok = (offs_n[None, :] < L) & keep[:, None]
    if CAUSAL:
        ok = ok & (offs_n[None, :] <= offs_m[:, None])
    return ok


@triton.jit
def _softmax_step(acc, m_i, l_i, qk, v, qk_scale, DOT_PREC: tl.constexpr):
    """The online softmax over one tile of raw scores qk (masked entries -inf), and P V added into acc."""
    # raw-score row max, scaled once per row, so the exponent below is one FMA per element
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
    alpha = tl.math.exp2(m_i - m_use)
    p = tl.math.exp2(qk * qk_scale - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_PREC)
    return acc, m_new, l_i


@triton.jit
def _fwd_pair_inner(
    acc, m_i, l_i, q, row0_ptr, row1_ptr, cnt0, cnt1, start, n, k_src, v_src, b, h, sks, svs, offs_m, offs_d, L, S,
    D, qk_scale, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT: tl.constexpr, EVEN_S: tl.constexpr,
    EVEN_D: tl.constexpr, CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr, USE_TMA: tl.constexpr,
):
    """A pair of query blocks (2 * BLOCK rows): `n` key blocks of the union of both rows' lists, merged in
    increasing order from entry `start` of each list on. A block one row does not list is masked out of that
    row's half of the tile, as are the element masks (causal diagonal, padding)."""
    SUB: tl.constexpr = BLOCK // SPLIT
    i0 = start
    i1 = start
    for _ in range(0, n):
        kb, keep, i0, i1 = _merge_next(row0_ptr, row1_ptr, i0, i1, cnt0, cnt1, S, BLOCK)
        for t in tl.static_range(SPLIT):  # the listed block in SPLIT tiles
            acc, m_i, l_i = _fwd_tile(
                acc, m_i, l_i, q, kb * BLOCK + t * SUB, keep, True, k_src, v_src, b, h, sks, svs, offs_m, offs_d, L, S,
                D, qk_scale, SUB, BLOCK_D, EVEN_S, EVEN_D, CAUSAL, DOT_PREC, USE_TMA,
            )
    return acc, m_i, l_i


@triton.jit
def _pair_rows(kv_cnt_ptr, kv_idx_ptr, b, h, scb, sch, scr, sib, sih, sir, qb, NQ, L, lim, cnt, entries,
               BLOCK: tl.constexpr, NKP: tl.constexpr):
    """The second row of a query-block pair (qb, qb + 1) and how to walk the union of their lists: (its list
    pointer, its count, the length of the prefix both rows list alike below `lim` (no mask needed there), how many
    union entries follow it). Past the grid the second row is empty and points at the first row's table."""
    has1 = (qb + 1 < NQ) & ((qb + 1) * BLOCK < L)
    qb1 = tl.minimum(qb + 1, NQ - 1)
    cnt1 = tl.where(has1, _row_count(kv_cnt_ptr + b * scb + h * sch + qb1 * scr, NQ), 0)
    row1_ptr = kv_idx_ptr + b * sib + h * sih + qb1 * sir
    entries1 = _row_entries(row1_ptr, cnt1, NQ, NKP)
    pos = tl.arange(0, NKP)
    both = tl.min(tl.where((entries != entries1) | (entries >= lim), pos, NKP), 0)
    common = tl.sum(tl.sum(((entries[:, None] == entries1[None, :]) & (pos[:, None] < cnt)).to(tl.int32), 1), 0)
    return row1_ptr, cnt1, both, cnt + cnt1 - common - both


@triton.jit
def _merge_next(row0_ptr, row1_ptr, i0, i1, cnt0, cnt1, S, BLOCK: tl.constexpr):
    """The next block of the union of two sorted lists (clamped into the grid as `_block_at` does), which half of a
    2 * BLOCK-row tile may see it (a (2 * BLOCK,) mask), and both lists' positions after it."""
    k0 = tl.load(row0_ptr + i0, mask=i0 < cnt0, other=2147483647)
    k1 = tl.load(row1_ptr + i1, mask=i1 < cnt1, other=2147483647)
    listed = tl.minimum(k0, k1)
    in0 = k0 == listed
    in1 = k1 == listed
    kb = tl.minimum(tl.maximum(listed.to(tl.int64), 0), (S - 1) // BLOCK)
    row_ok = tl.where(tl.arange(0, 2 * BLOCK) < BLOCK, in0, in1)
    return kb, row_ok, i0 + in0.to(tl.int32), i1 + in1.to(tl.int32)


# ---------------------------------------------------------------------------------------- forward


@triton.autotune(configs=autotune_configs("fwd"), key=[*_KEY, "PAIR", "NKP"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _bsa_fwd_kernel(
    q_ptr,  # (B, H, S, D)
    k_ptr,  # (B, H, S, D)
    v_ptr,  # (B, H, S, D)
    o_ptr,  # (B, H, S, D) out
    lse_ptr,  # (B, H, S) fp32 out, log2 domain of the scaled scores
    kv_cnt_ptr,  # (LB, LH, NQ) int32; LB in {1, B}, LH in {1, H} (stride 0 broadcasts)
    kv_idx_ptr,  # (LB, LH, NQ, NK) int32
    lens_ptr,  # (B,) int32 valid lengths (read only if HAS_LENS)
    sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sob, soh, sos,
    scb, sch, scr, sib, sih, sir,
    H, BH, HG, S, NQ, qk_scale,
    D: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, NKP: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_LENS: tl.constexpr, EVEN_S: tl.constexpr, DOT_PREC: tl.constexpr, USE_TMA: tl.constexpr,
    SPLIT: tl.constexpr,
    PAIR: tl.constexpr,  # query blocks per program: 1, or 2 (a 2 * BLOCK-row tile over the union of two rows)
    EVEN_TILE: tl.constexpr,  # S is a multiple of PAIR * BLOCK: the resident query tile needs no row mask
):
    qk_scale = tl.cast(qk_scale, tl.float32)  # Inductor may pass Python floats as fp64
    ROWS: tl.constexpr = PAIR * BLOCK
    bh, t = grouped_tile(tl.program_id(0), BH, tl.cdiv(NQ, PAIR), HG)  # heads in groups of HG (`head_group`)
    qb = ((tl.cdiv(NQ, PAIR) - 1 - t) * PAIR).to(tl.int64)  # the tile's first query block; heaviest (last) first
    b, h, bh = _widen_head(bh, H)
    EVEN_D: tl.constexpr = BLOCK_D == D
    if HAS_LENS:  # noqa: SIM108
        L = tl.load(lens_ptr + b).to(tl.int64)
    else:
        L = S
    offs_m = qb * BLOCK + tl.arange(0, ROWS)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(q_ptr + b * sqb + h * sqh, qb * BLOCK, sqs, offs_d, S, D, ROWS, EVEN_TILE, EVEN_D)

    cnt = _row_count(kv_cnt_ptr + b * scb + h * sch + qb * scr, NQ)
    cnt = tl.where(qb * BLOCK < L, cnt, 0)  # a fully padded query block does nothing
    row_ptr = kv_idx_ptr + b * sib + h * sih + qb * sir
    # blocks before min(qb, L // BLOCK) need no element mask; sorted rows put them first
    lim = L // BLOCK
    if CAUSAL:
        lim = tl.minimum(lim, qb)

    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, BLOCK_D], tl.float32)
    k_src = _heads(k_ptr, b, h, skb, skh, sks, BH // H, H, S, D, BLOCK // SPLIT, BLOCK_D, USE_TMA)
    v_src = _heads(v_ptr, b, h, svb, svh, svs, BH // H, H, S, D, BLOCK // SPLIT, BLOCK_D, USE_TMA)
    if PAIR == 1:
        acc, m_i, l_i = _fwd_inner(
            acc, m_i, l_i, q, row_ptr, 0, cnt, lim, k_src, v_src, b, h, sks, svs, offs_m, offs_d, L, S, D,
            qk_scale, BLOCK, BLOCK_D, SPLIT, EVEN_S, EVEN_D, CAUSAL, DOT_PREC, USE_TMA,
        )
    else:
        # the prefix both rows list alike, below the first row's diagonal and the padding: full tiles, no mask (all
        # of a causal dense pair but its last two blocks); then the rest of the union, merged, masked per half
        entries = _row_entries(row_ptr, cnt, NQ, NKP)
        row1_ptr, cnt1, both, rest = _pair_rows(kv_cnt_ptr, kv_idx_ptr, b, h, scb, sch, scr, sib, sih, sir, qb, NQ,
                                                L, lim, cnt, entries, BLOCK, NKP)
        acc, m_i, l_i = _fwd_inner(
            acc, m_i, l_i, q, row_ptr, 0, both, lim, k_src, v_src, b, h, sks, svs, offs_m, offs_d, L, S, D,
            qk_scale, BLOCK, BLOCK_D, SPLIT, EVEN_S, EVEN_D, CAUSAL, DOT_PREC, USE_TMA,
        )
        acc, m_i, l_i = _fwd_pair_inner(
            acc, m_i, l_i, q, row_ptr, row1_ptr, cnt, cnt1, both, rest, k_src, v_src, b, h, sks, svs, offs_m, offs_d,
            L, S, D, qk_scale, BLOCK, BLOCK_D, SPLIT, EVEN_S, EVEN_D, CAUSAL, DOT_PREC, USE_TMA,
        )
    # a row that saw a NaN score has l_i = NaN: it stays live, so O is NaN as in dense attention (only a
    # row with no visible key, l_i = 0, or a padded row gets O = 0)
    live = ((l_i > 0.0) | (l_i != l_i)) & (offs_m < L)
    o = acc / tl.where(live, l_i, 1.0)[:, None]
    o = tl.where(live[:, None], o, 0.0)
    lse = tl.where(live, m_i + tl.math.log2(tl.where(live, l_i, 1.0)), float("inf"))
    o_base = o_ptr + b * sob + h * soh
    _store_tile(o_base, o.to(o_ptr.dtype.element_ty), qb * BLOCK, sos, offs_d, S, D, ROWS, EVEN_TILE, EVEN_D)
    if EVEN_TILE:
        tl.store(lse_ptr + bh * S + offs_m, lse)
    else:
        tl.store(lse_ptr + bh * S + offs_m, lse, mask=offs_m < S)


# --------------------------------------------------------------------------------------- backward


@triton.jit
def _row_delta(o, do, delta_base, offs_m, S, EVEN: tl.constexpr):
    """delta = rowsum(dO * O) in fp32, stored for the rows inside S (rows past it load as 0); returned too."""
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if EVEN:
        tl.store(delta_base + offs_m, delta)
    else:
        tl.store(delta_base + offs_m, delta, mask=offs_m < S)
    return delta


@triton.jit
def _bsa_bwd_delta_kernel(
    o_ptr,  # (B, H, S, D)
    do_ptr,  # (B, H, S, D)
    delta_ptr,  # (B, H, S) fp32 out
    dq_acc_ptr,  # (B, H, S, D) fp32 out, zeroed here: the atomic dQ's accumulator
    sob, soh, sos, sdb, sdh, sds, sab, sah, sas,
    H, BH, S,
    D: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_S: tl.constexpr,
):
    pid = tl.program_id(0)
    qb = (pid // BH).to(tl.int64)
    b, h, bh = _widen_head(pid % BH, H)
    EVEN_D: tl.constexpr = BLOCK_D == D
    offs_m = qb * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_tile(o_ptr + b * sob + h * soh, qb * BLOCK, sos, offs_d, S, D, BLOCK, EVEN_S, EVEN_D)
    do = _load_tile(do_ptr + b * sdb + h * sdh, qb * BLOCK, sds, offs_d, S, D, BLOCK, EVEN_S, EVEN_D)
    _row_delta(o, do, delta_ptr + bh * S, offs_m, S, EVEN_S)
    zeros = tl.zeros([BLOCK, BLOCK_D], tl.float32)  # here rather than a memset: one launch fewer
    _store_tile(dq_acc_ptr + b * sab + h * sah, zeros, qb * BLOCK, sas, offs_d, S, D, BLOCK, EVEN_S, EVEN_D)


@triton.jit
def _dkdv_inner(
    dk, dv, k, v, col_ptr, lo, hi, lim, q_src, do_src, b, h, lse_base, delta_base, dq_base, sqs, sds, sdqs, offs_n,
    offs_d, L, S, D, qk_scale, sm_scale,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT: tl.constexpr, EVEN_S: tl.constexpr, EVEN_D: tl.constexpr,
    CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr, DQ_ATOMIC: tl.constexpr, USE_TMA: tl.constexpr,
):
    """Entries [lo, hi) of a column's list; a query block at or before `lim` gets the element mask, decided per tile
    (as `_fwd_inner`)."""
    every_key = offs_n >= 0
    SUB: tl.constexpr = BLOCK // SPLIT
    for jj in range(lo * SPLIT, hi * SPLIT):  # one query tile per iteration, as `_fwd_inner`
        qb = _block_at(col_ptr, jj // SPLIT, S, BLOCK)
        dk, dv = _dkdv_tile(
            dk, dv, k, v, qb * BLOCK + (jj % SPLIT) * SUB, every_key, qb <= lim, q_src, do_src, b, h, lse_base,
            delta_base, dq_base, sqs, sds, sdqs, offs_n, offs_d, L, S, D, qk_scale, sm_scale, SUB, BLOCK_D, EVEN_S,
            EVEN_D, CAUSAL, DOT_PREC, DQ_ATOMIC, USE_TMA,
        )
    return dk, dv


@triton.jit
def _dkdv_pair_inner(
    dk, dv, k, v, col0_ptr, col1_ptr, cnt0, cnt1, n, q_src, do_src, b, h, lse_base, delta_base, dq_base, sqs, sds,
    sdqs, offs_n, offs_d, L, S, D, qk_scale, sm_scale,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT: tl.constexpr, EVEN_S: tl.constexpr, EVEN_D: tl.constexpr,
    CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr, DQ_ATOMIC: tl.constexpr, USE_TMA: tl.constexpr,
):
    """dK/dV of a pair of key blocks over the first `n` blocks of the union of their query lists (the first cnt0 and
    cnt1 entries), merged in order; a query block one column does not list is masked out of that column's keys."""
    SUB: tl.constexpr = BLOCK // SPLIT
    i0 = cnt0 * 0
    i1 = cnt1 * 0
    for _ in range(0, n):
        qb, keep, i0, i1 = _merge_next(col0_ptr, col1_ptr, i0, i1, cnt0, cnt1, S, BLOCK)
        for t in tl.static_range(SPLIT):  # the listed block in SPLIT tiles
            dk, dv = _dkdv_tile(
                dk, dv, k, v, qb * BLOCK + t * SUB, keep, True, q_src, do_src, b, h, lse_base, delta_base, dq_base,
                sqs, sds, sdqs, offs_n, offs_d, L, S, D, qk_scale, sm_scale, SUB, BLOCK_D, EVEN_S, EVEN_D, CAUSAL,
                DOT_PREC, DQ_ATOMIC, USE_TMA,
            )
    return dk, dv


@triton.jit
def _dkdv_tile(
    dk, dv, k, v, m0, keep, masked, q_src, do_src, b, h, lse_base, delta_base, dq_base, sqs, sds, sdqs, offs_n,
    offs_d, L, S, D, qk_scale, sm_scale,
    SUB: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_S: tl.constexpr, EVEN_D: tl.constexpr, CAUSAL: tl.constexpr,
    DOT_PREC: tl.constexpr, DQ_ATOMIC: tl.constexpr, USE_TMA: tl.constexpr,
):
    """Queries [m0, m0 + SUB) against the resident keys: dK, dV (and, DQ_ATOMIC, dQ) shares. `masked` (a scalar, or a
    constant): only the `keep` keys (a (keys,) mask) inside the length, and (causal) not after the query, count."""
    offs_m = m0 + tl.arange(0, SUB)
    q = _load_rows(q_src, b, h, m0, sqs, offs_d, S, D, SUB, BLOCK_D, EVEN_S, EVEN_D, USE_TMA)
    do = _load_rows(do_src, b, h, m0, sds, offs_d, S, D, SUB, BLOCK_D, EVEN_S, EVEN_D, USE_TMA)
    if EVEN_S:
        lse = tl.load(lse_base + offs_m)
        delta = tl.load(delta_base + offs_m)
    else:
        lse = tl.load(lse_base + offs_m, mask=offs_m < S, other=float("inf"))
        delta = tl.load(delta_base + offs_m, mask=offs_m < S, other=0.0)
    qk_t = _dot(k, tl.trans(q), DOT_PREC)  # (keys, queries)
    p_t = tl.math.exp2(qk_t * qk_scale - lse[None, :])  # padded query rows have lse = +inf -> 0
    if masked:
        ok = (offs_n[None, :] < L) & keep[None, :]  # (queries, keys), transposed: keeps the branch in SASS
        if CAUSAL:
            ok = ok & (offs_n[None, :] <= offs_m[:, None])
        p_t = tl.where(tl.trans(ok), p_t, 0.0)
    dv += _dot(p_t.to(do.dtype), do, DOT_PREC)
    dp_t = _dot(v, tl.trans(do), DOT_PREC)
    ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
    dk += _dot(ds_t, q, DOT_PREC)
    if DQ_ATOMIC:  # this tile's share of dQ = s dS K, added into the fp32 accumulator
        dq = _dot(tl.trans(ds_t), k, DOT_PREC) * sm_scale
        if DQ_ATOMIC == 2:  # one bulk reduce-add through the accumulator's descriptor; rows past S are dropped
            dq_base.atomic_add([b.to(tl.int32), h.to(tl.int32), m0.to(tl.int32), 0], dq.reshape(1, 1, SUB, BLOCK_D))
        else:
            ptrs = dq_base + offs_m[:, None] * sdqs + offs_d[None, :]
            tl.atomic_add(ptrs, dq, mask=(offs_m[:, None] < S) & (offs_d[None, :] < D), sem="relaxed")
    return dk, dv


# the atomic dQ accumulates: autotune trials start it from zero (and so does the chosen config's run)
@triton.autotune(configs=autotune_configs("dkdv"), key=[*_KEY, "DQ_ATOMIC", "PAIR", "NQP"],
                 reset_to_zero=["dq_acc_ptr"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _bsa_bwd_dkdv_kernel(
    q_ptr,  # (B, H, S, D)
    k_ptr,  # (B, H, S, D)
    v_ptr,  # (B, H, S, D)
    do_ptr,  # (B, H, S, D)
    lse_ptr,  # (B, H, S) fp32
    delta_ptr,  # (B, H, S) fp32
    dk_ptr,  # (B, H, S, D) out
    dv_ptr,  # (B, H, S, D) out
    dq_acc_ptr,  # (B, H, S, D) fp32, zeroed, accumulated with atomics (used only if DQ_ATOMIC)
    q_cnt_ptr,  # (LB, LH, NK) int32: transposed layout
    q_idx_ptr,  # (LB, LH, NK, NQ) int32
    lens_ptr,  # (B,) int32
    sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sdb, sdh, sds, sdkb, sdkh, sdks, sdvb, sdvh, sdvs, sab, sah, sas,
    scb, sch, scr, sib, sih, sir,
    H, BH, HG, S, sm_scale, qk_scale,
    D: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, NQP: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_LENS: tl.constexpr, EVEN_S: tl.constexpr, DOT_PREC: tl.constexpr, USE_TMA: tl.constexpr,
    SPLIT: tl.constexpr,
    DQ_ATOMIC: tl.constexpr,  # 0: dQ has its own pass; 1: added here by element atomics; 2: by bulk reduce-adds (TMA)
    PAIR: tl.constexpr,  # key blocks per program (LONGEXPOSURE_BSA_PAIR): 2, a 2 * BLOCK-key tile over both columns
    EVEN_TILE: tl.constexpr,  # S is a multiple of PAIR * BLOCK: the resident key tile needs no row mask
):
    qk_scale = tl.cast(qk_scale, tl.float32)
    sm_scale = tl.cast(sm_scale, tl.float32)
    ROWS: tl.constexpr = PAIR * BLOCK
    NK = tl.cdiv(S, BLOCK)
    bh, t = grouped_tile(tl.program_id(0), BH, tl.cdiv(NK, PAIR), HG)  # heads in groups of HG (`head_group`)
    kb = (t * PAIR).to(tl.int64)  # the tile's first key block; causal: the first key blocks have the most queries
    b, h, bh = _widen_head(bh, H)
    EVEN_D: tl.constexpr = BLOCK_D == D
    if HAS_LENS:  # noqa: SIM108
        L = tl.load(lens_ptr + b).to(tl.int64)
    else:
        L = S
    offs_n = kb * BLOCK + tl.arange(0, ROWS)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_tile(k_ptr + b * skb + h * skh, kb * BLOCK, sks, offs_d, S, D, ROWS, EVEN_TILE, EVEN_D)
    v = _load_tile(v_ptr + b * svb + h * svh, kb * BLOCK, svs, offs_d, S, D, ROWS, EVEN_TILE, EVEN_D)

    cnt = _row_count(q_cnt_ptr + b * scb + h * sch + kb * scr, NK)
    cnt = tl.where(kb * BLOCK < L, cnt, 0)
    col_ptr = q_idx_ptr + b * sib + h * sih + kb * sir

    dk = tl.zeros([ROWS, BLOCK_D], tl.float32)
    dv = tl.zeros([ROWS, BLOCK_D], tl.float32)
    q_src = _heads(q_ptr, b, h, sqb, sqh, sqs, BH // H, H, S, D, BLOCK // SPLIT, BLOCK_D, USE_TMA)
    do_src = _heads(do_ptr, b, h, sdb, sdh, sds, BH // H, H, S, D, BLOCK // SPLIT, BLOCK_D, USE_TMA)
    if DQ_ATOMIC == 2:
        dq_base = tl.make_tensor_descriptor(dq_acc_ptr, shape=[BH // H, H, S, D], strides=[sab, sah, sas, 1],
                                            block_shape=[1, 1, BLOCK // SPLIT, BLOCK_D])
    else:
        dq_base = dq_acc_ptr + b * sab + h * sah
    lse_base, delta_base = lse_ptr + bh * S, delta_ptr + bh * S
    if PAIR == 1:
        # masked: the causal diagonal (and anything above it), or the whole column when this key block crosses the
        # valid length
        lim = kb if CAUSAL else -1
        lim = tl.where((kb + 1) * BLOCK > L, NK, lim)
        dk, dv = _dkdv_inner(
            dk, dv, k, v, col_ptr, 0, cnt, lim, q_src, do_src, b, h, lse_base, delta_base, dq_base, sqs, sds, sas,
            offs_n, offs_d, L, S, D, qk_scale, sm_scale, BLOCK, BLOCK_D, SPLIT, EVEN_S, EVEN_D, CAUSAL, DOT_PREC,
            DQ_ATOMIC, USE_TMA,
        )
    else:
        # the second column (empty past the grid or the length, pointing at the first column's table)
        has1 = (kb + 1 < NK) & ((kb + 1) * BLOCK < L)
        kb1 = tl.minimum(kb + 1, NK - 1)
        cnt1 = tl.where(has1, _row_count(q_cnt_ptr + b * scb + h * sch + kb1 * scr, NK), 0)
        col1_ptr = q_idx_ptr + b * sib + h * sih + kb1 * sir
        pos = tl.arange(0, NQP)
        # unmasked: the suffix both columns list alike, past both diagonals (causal), with both key blocks inside
        # the length; everything before it is the union of the two columns' other entries, merged and masked
        last0 = tl.load(col_ptr + cnt - 1 - pos, mask=pos < cnt, other=-1)
        last1 = tl.load(col1_ptr + cnt1 - 1 - pos, mask=pos < cnt1, other=-2)
        differ = (last0 != last1) | (pos >= cnt) | (pos >= cnt1)
        if CAUSAL:
            differ = differ | (last0 <= kb + 1)
        suffix = tl.min(tl.where(differ, pos, NQP), 0)
        suffix = tl.where((kb + 2) * BLOCK > L, 0, suffix)
        entries, entries1 = _row_entries(col_ptr, cnt, NK, NQP), _row_entries(col1_ptr, cnt1, NK, NQP)
        common = tl.sum(tl.sum(((entries[:, None] == entries1[None, :]) & (pos[:, None] < cnt)).to(tl.int32), 1), 0)
        dk, dv = _dkdv_pair_inner(
            dk, dv, k, v, col_ptr, col1_ptr, cnt - suffix, cnt1 - suffix, cnt + cnt1 - common - suffix, q_src,
            do_src, b, h, lse_base, delta_base, dq_base, sqs, sds, sas, offs_n, offs_d, L, S, D, qk_scale, sm_scale,
            BLOCK, BLOCK_D, SPLIT, EVEN_S, EVEN_D, CAUSAL, DOT_PREC, DQ_ATOMIC, USE_TMA,
        )
        dk, dv = _dkdv_inner(  # the suffix lies past both diagonals: -1 masks none of it
            dk, dv, k, v, col_ptr, cnt - suffix, cnt, -1, q_src, do_src, b, h, lse_base, delta_base, dq_base, sqs,
            sds, sas, offs_n, offs_d, L, S, D, qk_scale, sm_scale, BLOCK, BLOCK_D, SPLIT, EVEN_S, EVEN_D, CAUSAL,
            DOT_PREC, DQ_ATOMIC, USE_TMA,
        )
    dk = dk * sm_scale
    dk_base, dv_base = dk_ptr + b * sdkb + h * sdkh, dv_ptr + b * sdvb + h * sdvh
    _store_tile(dk_base, dk.to(dk_ptr.dtype.element_ty), kb * BLOCK, sdks, offs_d, S, D, ROWS, EVEN_TILE, EVEN_D)
    _store_tile(dv_base, dv.to(dv_ptr.dtype.element_ty), kb * BLOCK, sdvs, offs_d, S, D, ROWS, EVEN_TILE, EVEN_D)


@triton.jit
def _dq_inner(
    dq, q, do, lse, delta, row_ptr, lo, hi, lim, k_src, v_src, b, h, sks, svs, offs_m, offs_d, L, S, D, qk_scale,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT: tl.constexpr, EVEN_S: tl.constexpr, EVEN_D: tl.constexpr,
    CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr, USE_TMA: tl.constexpr,
):
    every_row = offs_m >= 0
    SUB: tl.constexpr = BLOCK // SPLIT
    for jj in range(lo * SPLIT, hi * SPLIT):  # one key tile per iteration, masked per tile, as `_fwd_inner`
        kb = _block_at(row_ptr, jj // SPLIT, S, BLOCK)
        dq = _dq_tile(dq, q, do, lse, delta, kb * BLOCK + (jj % SPLIT) * SUB, every_row, kb >= lim, k_src, v_src, b,
                      h, sks, svs, offs_m, offs_d, L, S, D, qk_scale, SUB, BLOCK_D, EVEN_S, EVEN_D, CAUSAL, DOT_PREC,
                      USE_TMA)
    return dq


@triton.jit
def _dq_pair_inner(
    dq, q, do, lse, delta, row0_ptr, row1_ptr, cnt0, cnt1, start, n, k_src, v_src, b, h, sks, svs, offs_m, offs_d,
    L, S, D, qk_scale, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT: tl.constexpr, EVEN_S: tl.constexpr,
    EVEN_D: tl.constexpr, CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr, USE_TMA: tl.constexpr,
):
    """dQ of a pair of query blocks over the union of their lists, as `_fwd_pair_inner` walks it."""
    SUB: tl.constexpr = BLOCK // SPLIT
    i0 = start
    i1 = start
    for _ in range(0, n):
        kb, keep, i0, i1 = _merge_next(row0_ptr, row1_ptr, i0, i1, cnt0, cnt1, S, BLOCK)
        for t in tl.static_range(SPLIT):  # the listed block in SPLIT tiles
            dq = _dq_tile(dq, q, do, lse, delta, kb * BLOCK + t * SUB, keep, True, k_src, v_src, b, h, sks, svs,
                          offs_m, offs_d, L, S, D, qk_scale, SUB, BLOCK_D, EVEN_S, EVEN_D, CAUSAL, DOT_PREC, USE_TMA)
    return dq


@triton.jit
def _dq_tile(
    dq, q, do, lse, delta, n0, keep, masked, k_src, v_src, b, h, sks, svs, offs_m, offs_d, L, S, D, qk_scale,
    SUB: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_S: tl.constexpr, EVEN_D: tl.constexpr, CAUSAL: tl.constexpr,
    DOT_PREC: tl.constexpr, USE_TMA: tl.constexpr,
):
    """Keys [n0, n0 + SUB) against the resident queries: their dQ share (masks as in `_fwd_tile`)."""
    k = _load_rows(k_src, b, h, n0, sks, offs_d, S, D, SUB, BLOCK_D, EVEN_S, EVEN_D, USE_TMA)
    v = _load_rows(v_src, b, h, n0, svs, offs_d, S, D, SUB, BLOCK_D, EVEN_S, EVEN_D, USE_TMA)
    qk = _dot(q, tl.trans(k), DOT_PREC)
    p = tl.math.exp2(qk * qk_scale - lse[:, None])
    if masked:
        p = tl.where(_tile_mask(keep, offs_m, n0 + tl.arange(0, SUB), L, CAUSAL), p, 0.0)
    dp = _dot(do, tl.trans(v), DOT_PREC)
    ds = p * (dp - delta[:, None])
    return dq + _dot(ds.to(k.dtype), k, DOT_PREC)


@triton.autotune(configs=autotune_configs("dq"), key=[*_KEY, "PAIR", "NKP"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _bsa_bwd_dq_kernel(
    q_ptr,  # (B, H, S, D)
    k_ptr,  # (B, H, S, D)
    v_ptr,  # (B, H, S, D)
    do_ptr,  # (B, H, S, D)
    o_ptr,  # (B, H, S, D)
    lse_ptr,  # (B, H, S) fp32
    delta_ptr,  # (B, H, S) fp32 out: rowsum(dO * O), for the dK/dV kernel after this one
    dq_ptr,  # (B, H, S, D) out
    kv_cnt_ptr,  # (LB, LH, NQ) int32
    kv_idx_ptr,  # (LB, LH, NQ, NK) int32
    lens_ptr,  # (B,) int32
    sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sdb, sdh, sds, sob, soh, sos, sdqb, sdqh, sdqs,
    scb, sch, scr, sib, sih, sir,
    H, BH, HG, S, NQ, sm_scale, qk_scale,
    D: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, NKP: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_LENS: tl.constexpr, EVEN_S: tl.constexpr, DOT_PREC: tl.constexpr, USE_TMA: tl.constexpr,
    SPLIT: tl.constexpr,
    PAIR: tl.constexpr,  # query blocks per program, as in the forward (LONGEXPOSURE_BSA_PAIR)
    EVEN_TILE: tl.constexpr,  # S is a multiple of PAIR * BLOCK
):
    qk_scale = tl.cast(qk_scale, tl.float32)
    sm_scale = tl.cast(sm_scale, tl.float32)
    ROWS: tl.constexpr = PAIR * BLOCK
    bh, t = grouped_tile(tl.program_id(0), BH, tl.cdiv(NQ, PAIR), HG)  # heads in groups of HG (`head_group`)
    qb = ((tl.cdiv(NQ, PAIR) - 1 - t) * PAIR).to(tl.int64)
    b, h, bh = _widen_head(bh, H)
    EVEN_D: tl.constexpr = BLOCK_D == D
    if HAS_LENS:  # noqa: SIM108
        L = tl.load(lens_ptr + b).to(tl.int64)
    else:
        L = S
    offs_m = qb * BLOCK + tl.arange(0, ROWS)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(q_ptr + b * sqb + h * sqh, qb * BLOCK, sqs, offs_d, S, D, ROWS, EVEN_TILE, EVEN_D)
    do = _load_tile(do_ptr + b * sdb + h * sdh, qb * BLOCK, sds, offs_d, S, D, ROWS, EVEN_TILE, EVEN_D)
    o = _load_tile(o_ptr + b * sob + h * soh, qb * BLOCK, sos, offs_d, S, D, ROWS, EVEN_TILE, EVEN_D)
    delta = _row_delta(o, do, delta_ptr + bh * S, offs_m, S, EVEN_TILE)
    if EVEN_TILE:
        lse = tl.load(lse_ptr + bh * S + offs_m)
    else:
        lse = tl.load(lse_ptr + bh * S + offs_m, mask=offs_m < S, other=float("inf"))

    cnt = _row_count(kv_cnt_ptr + b * scb + h * sch + qb * scr, NQ)
    cnt = tl.where(qb * BLOCK < L, cnt, 0)
    row_ptr = kv_idx_ptr + b * sib + h * sih + qb * sir
    lim = L // BLOCK
    if CAUSAL:
        lim = tl.minimum(lim, qb)

    dq = tl.zeros([ROWS, BLOCK_D], tl.float32)
    k_src = _heads(k_ptr, b, h, skb, skh, sks, BH // H, H, S, D, BLOCK // SPLIT, BLOCK_D, USE_TMA)
    v_src = _heads(v_ptr, b, h, svb, svh, svs, BH // H, H, S, D, BLOCK // SPLIT, BLOCK_D, USE_TMA)
    if PAIR == 1:
        dq = _dq_inner(
            dq, q, do, lse, delta, row_ptr, 0, cnt, lim, k_src, v_src, b, h, sks, svs, offs_m, offs_d, L, S, D,
            qk_scale, BLOCK, BLOCK_D, SPLIT, EVEN_S, EVEN_D, CAUSAL, DOT_PREC, USE_TMA,
        )
    else:  # as the forward walks a pair
        entries = _row_entries(row_ptr, cnt, NQ, NKP)
        row1_ptr, cnt1, both, rest = _pair_rows(kv_cnt_ptr, kv_idx_ptr, b, h, scb, sch, scr, sib, sih, sir, qb, NQ,
                                                L, lim, cnt, entries, BLOCK, NKP)
        dq = _dq_inner(
            dq, q, do, lse, delta, row_ptr, 0, both, lim, k_src, v_src, b, h, sks, svs, offs_m, offs_d, L, S, D,
            qk_scale, BLOCK, BLOCK_D, SPLIT, EVEN_S, EVEN_D, CAUSAL, DOT_PREC, USE_TMA,
        )
        dq = _dq_pair_inner(
            dq, q, do, lse, delta, row_ptr, row1_ptr, cnt, cnt1, both, rest, k_src, v_src, b, h, sks, svs, offs_m,
            offs_d, L, S, D, qk_scale, BLOCK, BLOCK_D, SPLIT, EVEN_S, EVEN_D, CAUSAL, DOT_PREC, USE_TMA,
        )
    dq = dq * sm_scale
    dq_base = dq_ptr + b * sdqb + h * sdqh
    _store_tile(dq_base, dq.to(dq_ptr.dtype.element_ty), qb * BLOCK, sdqs, offs_d, S, D, ROWS, EVEN_TILE, EVEN_D)


# ----------------------------------------------------------------------------------- layout union


@triton.jit
def _layout_union_kernel(
    sel_ptr,  # (BH, A) uint8: 1 where atom a is selected for this (batch, head)
    tab_ptr,  # (A, R, W) int32: each atom's block list per row (query rows, then key rows)
    tab_cnt_ptr,  # (A, R) int32
    cnt_ptr,  # (BH, R) int32 out
    idx_ptr,  # (BH, R, C) int32 out: sorted union, then zeros
    A, R, C,
    W: tl.constexpr, CP: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    r = pid % R
    bh = pid // R
    cols = tl.arange(0, CP)
    w = tl.arange(0, W)
    member = tl.zeros([CP], dtype=tl.int32)
    for a in range(0, A):
        on = tl.load(sel_ptr + bh * A + a)
        n = tl.load(tab_cnt_ptr + a * R + r)
        n = tl.where(on != 0, n, 0)
        ent = tl.load(tab_ptr + (a * R + r) * W + w, mask=w < n, other=-1)
        hit = (ent[:, None] == cols[None, :]).to(tl.int32)
        member = tl.maximum(member, tl.max(hit, axis=0))
    member = tl.where(cols < C, member, 0)  # entries past the width would be written past the row
    count = tl.sum(member, axis=0)
    pos = tl.cumsum(member, axis=0) - 1
    out = idx_ptr + (bh * R + r) * C
    tl.store(out + pos, cols, mask=member != 0)
    tl.store(out + cols, tl.zeros([CP], dtype=tl.int32), mask=(cols >= count) & (cols < C))
    tl.store(cnt_ptr + bh * R + r, count)


# -------------------------------------------------------------------------------------- launchers

class _Launch:
    """`kernel[grid](...)`, traceable when it must be.

    Under torch.compile tracing (fake or functional tensor arguments) the call goes through
    `wrap_triton`, so Inductor sees the kernel; eager calls go straight to the kernel: `wrap_triton`
    outside a `triton_op` would route every eager call through its higher-order op, which re-runs the
    autotuner each time. In the Triton interpreter a kernel cannot be traced at all, so fake calls are
    skipped (torch.compile there works with backend="eager" only, propagating shapes through the op).
    """

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            from torch._subclasses.fake_tensor import is_fake

            # every launch passes a tensor first, and under tracing all of them are fake: checking only the
            # first keeps this off the eager hot path (all ~30 arguments: ~3,000 is_fake calls and a few ms
            # per OPT-1.3B step in a cProfile)
            tracing = isinstance(args[0], torch.Tensor) and is_fake(args[0])
            if not tracing:
                return self.kernel[grid](*args, **kwargs)
            if interpreting():
                return None
            return wrap_triton(self.kernel)[grid](*args, **kwargs)

        return run


def _launch(kernel):
    return _Launch(kernel)


_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be (batch, heads, seq, head_dim), got shape {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise ValueError(f"{name} dtype {t.dtype} is not supported; use one of {_DTYPES}")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in head_dim (stride(-1) == 1), got {t.stride()}")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(
                f"{name} shape {tuple(t.shape)} != q shape {tuple(q.shape)} (no GQA here: repeat the kv heads)"
            )
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{name} is {t.dtype} on {t.device}, q is {q.dtype} on {q.device}")
    if q.shape[-1] > 256:
        raise ValueError(f"head_dim {q.shape[-1]} > 256 is not supported")


def _check_table(name: str, t: torch.Tensor, shape: tuple[int, ...], device: torch.device) -> None:
    if t.dtype != torch.int32:
        raise ValueError(f"{name} must be int32, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, q is on {device}")
    fits = t.dim() == len(shape) and all(
        a in (1, e) if i < 2 else a == e for i, (a, e) in enumerate(zip(t.shape, shape, strict=True))
    )
    if not fits:
        raise ValueError(f"{name} shape {tuple(t.shape)} does not fit {shape} (batch and heads may be 1)")
    if t.stride(-1) != 1 and len(shape) == 4:
        raise ValueError(f"{name} must be contiguous in its last dimension")


def _layout_strides(t: torch.Tensor) -> tuple[int, int, int]:
    """Strides of a (LB, LH, rows, ...) table, 0 where batch/heads broadcast."""
    return (0 if t.shape[0] == 1 else t.stride(0), 0 if t.shape[1] == 1 else t.stride(1), t.stride(2))


def _check_lens(seq_lens: torch.Tensor | None, batch: int, device: torch.device) -> None:
    if seq_lens is None:
        return
    if seq_lens.dtype != torch.int32 or tuple(seq_lens.shape) != (batch,) or seq_lens.device != device:
        raise ValueError(
            f"seq_lens must be int32 of shape ({batch},) on {device}, got {seq_lens.dtype} {tuple(seq_lens.shape)} "
            f"on {seq_lens.device}"
        )


DQ_MODES = ("pass", "atomic", "bulk")


def dq_mode() -> str:
    """How the backward computes dQ: LONGEXPOSURE_BSA_DQ (read per launch), `pass` (default: its own kernel over
    the layout's rows, recomputing P), `atomic` (added by the dK/dV kernel, element by element) or `bulk` (added by
    the dK/dV kernel, a tile per bulk reduce-add: Hopper or newer, compiled kernels); `pass` under
    `torch.use_deterministic_algorithms`, since atomics sum in a varying order. Both others are slower than the
    pass on the H100 at every density (atomic 16-42%, bfce6c9; bulk 11-43%, 9355523): kept to measure, not to use."""
    mode = os.environ.get("LONGEXPOSURE_BSA_DQ", "pass")
    if mode not in DQ_MODES:
        raise ValueError(f"LONGEXPOSURE_BSA_DQ={mode!r} is not one of {DQ_MODES}")
    return "pass" if torch.are_deterministic_algorithms_enabled() else mode


def query_pair(block: int) -> int:
    """Layout blocks per program (query blocks in the forward and dQ, key blocks in dK/dV): LONGEXPOSURE_BSA_PAIR=1
    (opt-in, read per launch or per trace) gives 2 for blocks up to 64, a 2 * block-row tile (128 rows at block 64:
    each streamed block loaded once for both) over the union of the two rows' (columns') lists, each block masked
    out of the half that does not list it; 1 (default, and blocks of 128, whose 256-row pair tiles overflow shared
    memory at head_dim 80-128) otherwise. The pair costs compute where adjacent rows list different blocks (random
    layouts) and saves loads where they agree (causal dense, local windows). Timed on the H100 (ea9c963,
    `artifacts/fig12_attention/h100_attn_ab_pair_ea9c963.md`, S 2048): 0.77x sdpa at 0% (default 0.72x fwd, both
    0.77x bwd), but 0.86x / 1.54x at 50% / 80% (default 1.18x / 2.11x): opt-in."""
    value = os.environ.get("LONGEXPOSURE_BSA_PAIR", "0")
    if value not in ("0", "1"):
        raise ValueError(f"LONGEXPOSURE_BSA_PAIR={value!r}: expected '0' or '1'")
    return 2 if value == "1" and block <= 64 else 1


def _check_block(block: int) -> None:
    if not isinstance(block, int) or block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 16, got {block}")


L2_SHARE = 3  # the part of L2 one head group's streamed tensors may fill: 1 / L2_SHARE


@functools.lru_cache(maxsize=8)
def _l2_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).L2_cache_size
    return 50 << 20  # the interpreter: an H100's L2


def head_group(q: torch.Tensor) -> int:
    """Heads per group of the kernels' grid order (`tile_order.grouped_tile`): as many as fit two (S, D) tensors each
    (the streamed K and V, or Q and dO) into a third of L2. One group of all heads (a block row of every head in
    flight at once) thrashes L2 once their tensors outgrow it: on an H100 at B 4, H 32, fp16, groups cut the
    forward / backward by 13% / 14% at D 128, S 2048 (128 MB of K and V; 19% / 17% at 80% block sparsity), 6% / 12%
    at D 64, S 2048, and stay within 5% either way at D 64, S 1024 (32 MB: two groups). One process, fdc6bd5
    against bfce6c9 (artifacts/fig12_attention/README.md)."""
    bsz, heads, seq, d = q.shape
    per_head = 2 * seq * d * q.element_size()
    return max(1, min(bsz * heads, _l2_bytes(q.device) // L2_SHARE // per_head))


def _use_tma(*streamed: torch.Tensor) -> bool:
    """Whether a kernel reads the operands its inner loop streams block by block (K and V, or Q and dO) through
    tensor descriptors: LONGEXPOSURE_BSA_TMA=1 and `kernels/descriptors.py`'s rule."""
    from torch._subclasses.fake_tensor import is_fake

    return descriptors.use("LONGEXPOSURE_BSA_TMA", *streamed, traced=is_fake(streamed[0]))


def _meta(q: torch.Tensor, block: int, scale: float) -> dict:
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    d = q.shape[-1]
    interp_bf16 = interpreting() and q.dtype == torch.bfloat16
    return {
        "D": d,
        "BLOCK": block,
        "BLOCK_D": max(16, triton.next_power_of_2(d)),
        "EVEN_S": q.shape[2] % block == 0,
        "DOT_PREC": "ieee" if q.dtype == torch.float32 else ("interp-bf16" if interp_bf16 else "tf32"),
    }


def block_sparse_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_counts: torch.Tensor,
    kv_indices: torch.Tensor,
    seq_lens: torch.Tensor | None,
    *,
    block: int,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward. Returns O (like q) and lse (B, H, S) fp32 in the log2 domain."""
    _check_qkv(q, k, v)
    _check_block(block)
    bsz, heads, seq, _ = q.shape
    nq = triton.cdiv(seq, block)
    _check_table("kv_counts", kv_counts, (bsz, heads, nq), q.device)
    _check_table("kv_indices", kv_indices, (bsz, heads, nq, nq), q.device)
    _check_lens(seq_lens, bsz, q.device)
    o = torch.empty_like(q)
    lse = torch.empty((bsz, heads, seq), device=q.device, dtype=torch.float32)
    pair = query_pair(block)
    grid = (triton.cdiv(nq, pair) * bsz * heads,)
    _launch(_bsa_fwd_kernel)[grid](
        q, k, v, o, lse, kv_counts, kv_indices, seq_lens if seq_lens is not None else kv_counts,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
        *_layout_strides(kv_counts), *_layout_strides(kv_indices),
        heads, bsz * heads, head_group(q), seq, nq, scale * math.log2(math.e),
        NKP=max(16, triton.next_power_of_2(nq)), CAUSAL=causal, HAS_LENS=seq_lens is not None,
        USE_TMA=_use_tma(k, v), PAIR=pair, EVEN_TILE=seq % (pair * block) == 0, **_meta(q, block, scale),
    )
    return o, lse


def block_sparse_attention_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    kv_counts: torch.Tensor,
    kv_indices: torch.Tensor,
    q_counts: torch.Tensor,
    q_indices: torch.Tensor,
    seq_lens: torch.Tensor | None,
    *,
    block: int,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward: the dQ pass (which also writes delta), then dK/dV over the transposed layout; with
    `dq_mode()` "atomic" or "bulk", the delta kernel, then dK/dV adding dQ by atomics. Returns dq, dk, dv."""
    _check_qkv(q, k, v)
    _check_block(block)
    if do.shape != q.shape or do.stride(-1) != 1:
        raise ValueError(f"do must have q's shape {tuple(q.shape)} and stride(-1) == 1, got {tuple(do.shape)}")
    bsz, heads, seq, _ = q.shape
    nq = triton.cdiv(seq, block)
    _check_table("kv_counts", kv_counts, (bsz, heads, nq), q.device)
    _check_table("kv_indices", kv_indices, (bsz, heads, nq, nq), q.device)
    _check_table("q_counts", q_counts, (bsz, heads, nq), q.device)
    _check_table("q_indices", q_indices, (bsz, heads, nq, nq), q.device)
    _check_lens(seq_lens, bsz, q.device)
    if lse.shape != (bsz, heads, seq) or not lse.is_contiguous():
        raise ValueError(f"lse must be contiguous ({bsz}, {heads}, {seq}), got {tuple(lse.shape)}")
    meta = _meta(q, block, scale)
    lens = seq_lens if seq_lens is not None else kv_counts
    mode = dq_mode()
    atomic = mode != "pass"
    if mode == "bulk" and (interpreting() or not descriptors.has_tma(q.device)):
        raise ValueError("LONGEXPOSURE_BSA_DQ=bulk adds dQ by tensor reduce-adds (TMA): it needs a Hopper (sm_90) or "
                         "newer GPU and compiled kernels (the Triton interpreter has no descriptor reduce); use "
                         "'pass' or 'atomic'")
    delta = torch.empty_like(lse)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    pow2 = max(16, triton.next_power_of_2(nq))
    pair, group = query_pair(block), head_group(q)
    if atomic:  # delta first, and the atomic dQ's fp32 accumulator zeroed by the same launch
        # rows padded to BLOCK_D floats: every stride a multiple of 16 bytes at any head_dim, as bulk's descriptor
        # needs (the element atomics use the same buffer, so the CPU tests cover its allocation and slicing)
        dq_acc = torch.empty((*q.shape[:3], meta["BLOCK_D"]), device=q.device, dtype=torch.float32)
        if mode == "bulk":
            descriptors.install_allocator()
        _launch(_bsa_bwd_delta_kernel)[(nq * bsz * heads,)](
            o, do, delta, dq_acc, *o.stride()[:3], *do.stride()[:3], *dq_acc.stride()[:3], heads, bsz * heads, seq,
            D=meta["D"], BLOCK=block, BLOCK_D=meta["BLOCK_D"], EVEN_S=meta["EVEN_S"],
        )
    else:  # the dQ pass first: it writes delta for dK/dV; dk stands in for the accumulator, never read
        dq_acc = dk
        dq = torch.empty_like(q)
        _launch(_bsa_bwd_dq_kernel)[(triton.cdiv(nq, pair) * bsz * heads,)](
            q, k, v, do, o, lse, delta, dq, kv_counts, kv_indices, lens,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *o.stride()[:3], *dq.stride()[:3],
            *_layout_strides(kv_counts), *_layout_strides(kv_indices),
            heads, bsz * heads, group, seq, nq, scale, scale * math.log2(math.e),
            NKP=pow2, CAUSAL=causal, HAS_LENS=seq_lens is not None, USE_TMA=_use_tma(k, v), PAIR=pair,
            EVEN_TILE=seq % (pair * block) == 0, **meta,
        )
    _launch(_bsa_bwd_dkdv_kernel)[(triton.cdiv(nq, pair) * bsz * heads,)](
        q, k, v, do, lse, delta, dk, dv, dq_acc, q_counts, q_indices, lens,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *dk.stride()[:3], *dv.stride()[:3],
        *dq_acc.stride()[:3], *_layout_strides(q_counts), *_layout_strides(q_indices),
        heads, bsz * heads, group, seq, scale, scale * math.log2(math.e),
        NQP=pow2, CAUSAL=causal, HAS_LENS=seq_lens is not None, DQ_ATOMIC=DQ_MODES.index(mode),
        USE_TMA=_use_tma(q, do), PAIR=pair, EVEN_TILE=seq % (pair * block) == 0,
        **meta,  # Q and dO stream past each key block
    )
    return (dq_acc[..., : q.shape[3]].to(q.dtype) if atomic else dq), dk, dv


def layout_union(
    selection: torch.Tensor, table: torch.Tensor, table_counts: torch.Tensor, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Union of the selected atoms' block lists for every (batch*head, row); one launch, no sync.

    Args:
        selection: (BH, A) bool or uint8, which atoms each (batch, head) combines.
        table: (A, R, W) int32 per-atom, per-row sorted block lists (slots past the count unused).
        table_counts: (A, R) int32.
        width: C, the number of columns (block indices lie in [0, C)).

    Returns:
        counts (BH, R) int32 and indices (BH, R, C) int32 (sorted union, then zeros).
    """
    if selection.dim() != 2 or selection.shape[1] != table.shape[0]:
        raise ValueError(f"selection must be (BH, {table.shape[0]}), got {tuple(selection.shape)}")
    if selection.dtype == torch.bool:
        selection = selection.view(torch.uint8)
    if selection.dtype != torch.uint8:
        raise ValueError(f"selection must be bool or uint8, got {selection.dtype}")
    if table.dtype != torch.int32 or table_counts.dtype != torch.int32:
        raise ValueError("table and table_counts must be int32")
    if not (selection.is_contiguous() and table.is_contiguous() and table_counts.is_contiguous()):
        raise ValueError("selection, table and table_counts must be contiguous")
    bh, n_atoms = selection.shape
    _, rows, w = table.shape
    counts = torch.empty((bh, rows), dtype=torch.int32, device=table.device)
    indices = torch.empty((bh, rows, width), dtype=torch.int32, device=table.device)
    _layout_union_kernel[(bh * rows,)](
        selection, table, table_counts, counts, indices, n_atoms, rows, width,
        W=w, CP=max(16, triton.next_power_of_2(width)),
    )
    return counts, indices

