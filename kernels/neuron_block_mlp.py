"""Neuron-block MLP: `y = relu(x W1[act]^T + b1[act]) W2[:, act]^T + b2` over a runtime set of blocks.

A neuron block is `BLOCK` consecutive hidden neurons (rows of fc1.weight, columns of fc2.weight). Only
the active blocks are loaded and multiplied; fc1 writes a compact (tokens, capacity*BLOCK) activation
buffer whose column `c` is hidden neuron `row(c) = ids[c // BLOCK] * BLOCK + c % BLOCK`, and fc2 reads it.

Weights are read as neuron-major (ffn, k) operands, so an active block is BLOCK whole rows:
  - fc1.weight (ffn, d_model) already is one (nn.Linear layout).
  - fc2.weight (d_model, ffn) is read through its transpose (ffn, d_model); that view is contiguous
    once its storage is column-major, which `longexposure.ops.neuron_block_mlp.neuron_major_` does
    once at patch time (the parameter keeps its shape). Any strides work; those are the fast ones.

Dynamic count: `ids` has a fixed capacity and `count` (a 1-element int32 device tensor) says how many
are valid. The count is read inside the kernels: grids are sized from the capacity, programs whose tile
lies past `count*BLOCK` exit at once (the active tiles are packed first), and reduction loops over the
compact dimension run to `count*BLOCK`. Changing the count recompiles nothing and syncs nothing.

Four kernels (named by which operand is compact, stk-style):
  - `_sdd_kernel`: compact = dense @ W[act]^T (+ low-rank, bias, ReLU or ReLU-mask epilogue); fc1
    forward (also writing the ReLU bits, `relu_bits`) and, in backward, dZ = (dy @ W2[:, act] + dv @ A2[:, act])
    * (h > 0), the mask read from those bits, with db1 = dZ.sum(0) added by fp32 atomics. Its optional
    "skinny" epilogue also adds compact_tile @ S[act rows] into a (tokens, r) fp32 buffer by atomics:
    the fc2 LoRA input v = h A2[:, act]^T in forward, du = dZ B1[act] in backward (so a rank-r output
    never needs its own, badly parallel, pass over the compact buffer; atomics make it order-dependent
    in the last fp32 bits).
  - `_dsd_kernel`: dense = compact @ W[act] (+ bias); fc2 forward and, in backward, dx = dZ @ W1[act].
  - `_wgrad_kernel`: G[act rows] = compact^T @ dense, zeros in G's other rows (no fill first); dW1, dB1 (LoRA),
    dW2^T, dA2^T (LoRA's, at most SKINNY_N wide, through `_wgrad_skinny_kernel`: the same kernel over narrow tiles).
  - `_colsum_kernel`: g[act] = sum over tokens of compact; db1 in a fixed order, where deterministic algorithms
    are asked for (`torch.use_deterministic_algorithms`).
On Hopper, sdd and dsd by default (`TMA_DEFAULT`; LONGEXPOSURE_TMA names the kernels, `1` adds wgrad) read their
main product's operands through tensor descriptors (Hopper's bulk tensor copies) instead of per-element
pointers: in dsd a K step inside one neuron block is BK contiguous weight rows (one box at
`id * BLOCK + k % BLOCK`); in sdd a column tile inside one block, or over blocks with consecutive ids, is BN
contiguous rows (one (BN, BK) box per K step; other tiles gather through pointers); wgrad loads (tokens,
columns) boxes of the compact buffer and transposes them in shared memory. Eager and compiled calls alike
(`kernels/descriptors.py` says when an operand may be read so). Each autotuner runs once per capacity, at the
first call's count, so a capacity far above later counts would leave most SMs idle: sdd (and wgrad where
LONGEXPOSURE_NARROW lists it) compiles a half-width tile too and picks it at run time from the count (`_narrow`).
Then the launchers (validation, allocation, grids). Autograd is the `longexposure::neuron_block_mlp` op's, registered
in `longexposure.ops.neuron_block_mlp` (the one path, eager and compiled).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.language as tl
from longexposure.kernels import descriptors
from longexposure.kernels.tile_order import grouped_tile

from longexposure.backends import interpreting

# Decided when the kernels are defined: @triton.jit builds interpreter functions iff this is set.
INTERPRET = interpreting()
BLOCK_SIZES = (16, 32, 64, 128)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# (BM, BN, BK, warps, stages) with LONGEXPOSURE_AUTOTUNE=0: with no autotuner to skip a config that does not fit, it
# must fit every kernel and dtype. Four stages did not: a persistent fp32 sdd with descriptors needs 262,168 bytes of
# shared memory, over the H100's 232,448 (seen on the H100, 2026-12-06); three need 196,624.
FALLBACK_TILE = (128, 128, 64, 8, 3)


def _autotune_configs(large_tiles: bool = True) -> list[triton.Config]:
    """Tile shapes (BM, BN, BK = output rows, output columns, reduction) for the matmul kernels.

    Under the interpreter one small tile (so CPU tests stay fast and still cross tile boundaries);
    with LONGEXPOSURE_AUTOTUNE=0 one good Hopper tile; otherwise a small space for the autotuner.
    The autotuner runs once per key, at whatever count that call has, so every kernel whose number of
    tiles shrinks with the count (sdd, wgrad) keys on the buffer's capacity: a capacity near the count
    (replayed ids, exact or padded to the widest layer) tunes at its density. Before the capacity was a
    key, sdd and wgrad left out the 256-wide tiles, since one that won at density 1.0 left most SMs idle at
    density 0.1 (measured on the H100: 2.4x slower there); `large_tiles=False` is that space. A capacity
    far above the count (predicted ids: every block) tunes at the first call's density.
    """
    def cfg(bm: int, bn: int, bk: int, warps: int, stages: int) -> triton.Config:
        return triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8}, num_warps=warps, num_stages=stages)

    if INTERPRET:
        return [cfg(32, 32, 32, 4, 1)]
    if os.environ.get("LONGEXPOSURE_AUTOTUNE", "1") == "0":
        return [cfg(*FALLBACK_TILE)]
    large = [cfg(128, 256, 64, 8, 3), cfg(128, 256, 64, 8, 4), cfg(256, 128, 64, 8, 3)] if large_tiles else []
    return large + [
        cfg(128, 128, 64, 8, 4),
        cfg(128, 128, 64, 8, 3),
        cfg(128, 128, 64, 4, 4),
        cfg(64, 128, 64, 4, 4),
        cfg(128, 64, 64, 4, 4),
        cfg(64, 64, 64, 4, 5),
    ]


def _skinny_configs() -> list[triton.Config]:
    """Tiles for a weight gradient whose output is at most 32 columns wide (LoRA's dB1 and dA2, N = the rank): 16 or
    32 columns, so the tensor cores do not multiply a 64- to 256-wide tile of which all but N columns are masked off
    (on the H100, dB1 + dA2 at rank 16 took 89 us at density 1.0 in a 128 x 256 tile tuned for dW1, 6 us in cuBLAS)."""
    def cfg(bm: int, bn: int, bk: int, warps: int, stages: int) -> triton.Config:
        return triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8}, num_warps=warps, num_stages=stages)

    if INTERPRET:
        return [cfg(32, 16, 32, 4, 1)]
    if os.environ.get("LONGEXPOSURE_AUTOTUNE", "1") == "0":
        return [cfg(64, 32, 64, 4, 3)]
    return [cfg(bm, bn, bk, 4, 4) for bm in (64, 128) for bn in (16, 32) for bk in (64, 128)]


SKINNY_N = 32  # widest weight-gradient output that takes `_skinny_configs`' tiles

_KEY = ["T_BUCKET", "K", "BLOCK", "HAS_LOW_RANK", "HAS_BIAS", "EPILOGUE"]


@triton.jit
def _neuron_rows(ids_ptr, offs_c, mask_c, BLOCK: tl.constexpr):
    """Hidden-neuron index (int64) of each compact column `offs_c`."""
    block_id = tl.load(ids_ptr + offs_c // BLOCK, mask=mask_c, other=0).to(tl.int64)
    return block_id * BLOCK + offs_c % BLOCK


@triton.jit
def _block_id_at(ids_ptr, k, K, BLOCK: tl.constexpr):
    """Id of the neuron block that compact column k lies in; 0 at or past the buffer's width K (a prefetch one step
    past the loop). dsd's loops read the next step's id one step ahead: an id loaded and used in the same step made
    the weight load depend on a load of its own iteration, and the compiler then double- instead of multi-buffered
    the operands (an sm_90 compile: 64 KB of shared memory instead of 4 x 32 KB)."""
    i = k // BLOCK
    return tl.load(ids_ptr + i, mask=i < K // BLOCK, other=0)


@triton.jit
def _pointer_product(acc, a_ptrs, w_ptrs, K, offs_k, stride_ak, stride_wk, BK: tl.constexpr, EVEN_K: tl.constexpr,
                     UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc += A @ W over a reduction of length K, both read through pointer tiles: A (BM, BK) steps along its
    columns, W (BK, BN) along its rows; a ragged tail (not EVEN_K) loads as zeros. sdd's main product with
    gathered weight rows (any ids), and wgrad's with the compact buffer read transposed."""
    for k in range(0, K, BK):
        if EVEN_K:
            a = tl.load(a_ptrs)
            w = tl.load(w_ptrs)
        else:
            a = tl.load(a_ptrs, mask=offs_k[None, :] < K - k, other=0.0)
            w = tl.load(w_ptrs, mask=offs_k[:, None] < K - k, other=0.0)
        if UPCAST:
            a, w = a.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
        a_ptrs += BK * stride_ak
        w_ptrs += BK * stride_wk
    return acc


@triton.jit
def _sdd_boxes(acc, a_desc, w_desc, K, w_row, pid_m, BM: tl.constexpr, BK: tl.constexpr, UPCAST: tl.constexpr,
               PRECISION: tl.constexpr):
    """sdd's main product through tensor descriptors (a (BM, BK) box of the dense operand, a (BN, BK) box of the
    weight), the tile's weight rows being w_row .. w_row + BN - 1.

    Rows past the tokens or the weight and a ragged K tail load as zeros; columns past the count come from
    whatever rows follow and are never stored."""
    for k in range(0, K, BK):
        a = a_desc.load([pid_m * BM, k])
        wt = w_desc.load([w_row, k])
        if UPCAST:
            a, wt = a.to(tl.float32), wt.to(tl.float32)
        acc = tl.dot(a, wt.T, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _bit_bytes(m_ptr, offs_m, mask_m, pid_n, n_cols, stride_mm, BN: tl.constexpr):
    """Pointers to a compact tile's BM x BN/8 bytes of ReLU bits (`relu_bits` has their order) and their mask, for
    writing or reading them whole: a byte load per column took 8 one-byte loads per byte and made dZ 1.5x fc1's
    time (206 vs 134 us, H100, ea9c963). Whole 32-column groups: the last one past the count too."""
    tl.static_assert(BN % 32 == 0, "the ReLU bits come in 32-column groups")
    offs_b = pid_n.to(tl.int64) * (BN // 8) + tl.arange(0, BN // 8)
    return (m_ptr + offs_m[:, None] * stride_mm + offs_b[None, :],
            mask_m[:, None] & (offs_b < tl.cdiv(n_cols, 32) * 4)[None, :])


@triton.jit
def _bit_values():
    """1 << (2q + e) at a (q, b, e) position in a 32-column group (column 8q + 2b + e), shaped to broadcast."""
    q = tl.arange(0, 4)[None, None, :, None, None]
    e = tl.arange(0, 2)[None, None, None, None, :]
    return 1 << (2 * q + e)


@triton.jit
def _pack_bits(kept, BM: tl.constexpr, BN: tl.constexpr):
    """(BM, BN) booleans -> (BM, BN / 8) bytes in `relu_bits`' order. Each byte holds columns that one thread
    of Hopper's MMA accumulator owns (two adjacent columns in each of four 8-column groups), so packing needs no
    exchange between threads: packing 8 adjacent columns a byte took 129 warp shuffles a 128 x 256 tile (sm_90
    compile, Triton 3.6), this takes none. Timed on the H100 (fig12_mlp run 14): fc1 the same, dZ (which unpacks)
    10-11% faster with pointer loads. A select of each column's bit value, then sums (the bits are disjoint), not a
    0/1 integer shifted into place: the epilogue runs while the tensor cores wait."""
    groups = tl.reshape(kept, (BM, BN // 32, 4, 4, 2))  # (row, group, q, b, e)
    packed = tl.sum(tl.sum(tl.where(groups, _bit_values(), 0), axis=4), axis=2)  # (row, group, b)
    return tl.reshape(packed, (BM, BN // 8))


@triton.jit
def _unpack_bits(packed, BM: tl.constexpr, BN: tl.constexpr):
    """`_pack_bits`' inverse: (BM, BN / 8) bytes -> (BM, BN) booleans."""
    groups = tl.reshape(packed.to(tl.int32), (BM, BN // 32, 1, 4, 1))
    return tl.reshape((groups & _bit_values()) != 0, (BM, BN))


@triton.jit
def _sdd_tile(
    tile, num_m, num_n, n_cols, a_ptr, w_ptr, a_desc, w_desc, c_desc, m_desc, e_ptr, l_ptr, bias_ptr, m_ptr, c_ptr,
    s_ptr, o2_ptr, cs_ptr, ids_ptr, T, K, R, R2, stride_am, stride_ak, stride_wn, stride_wk, stride_em, stride_er,
    stride_ln, stride_lr, stride_mm, stride_cm, stride_cc, stride_sn, stride_sr, stride_om, stride_bias,
    BLOCK: tl.constexpr, HAS_LOW_RANK: tl.constexpr, HAS_BIAS: tl.constexpr, EPILOGUE: tl.constexpr,
    MASK_OUT: tl.constexpr, HAS_SKINNY: tl.constexpr, HAS_COLSUM: tl.constexpr, BR: tl.constexpr, BR2: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, USE_TMA: tl.constexpr, BITS_TMA: tl.constexpr, BM: tl.constexpr,
    BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
):
    """One (BM, BN) compact tile of sdd: a program's whole work, or one turn of a persistent program's loop (the
    kernel makes the descriptors, once per program)."""
    pid_m, pid_n = grouped_tile(tile, num_m, num_n, GROUP_M)
    offs_m = pid_m.to(tl.int64) * BM + tl.arange(0, BM)
    offs_c = pid_n.to(tl.int64) * BN + tl.arange(0, BN)
    mask_m = offs_m < T
    mask_c = offs_c < n_cols
    rows = _neuron_rows(ids_ptr, offs_c, mask_c, BLOCK)  # block 0 for columns past the count: in bounds
    offs_k = tl.arange(0, BK)
    # Loads need no row/column masks: token rows wrap (% T) and past-count columns read block 0; the
    # store is masked. Only a ragged K needs a mask.
    a_ptrs = a_ptr + (offs_m % T)[:, None] * stride_am + offs_k[None, :] * stride_ak
    w_ptrs = w_ptr + rows[None, :] * stride_wn + offs_k[:, None] * stride_wk

    acc = tl.zeros((BM, BN), dtype=tl.float32)
    if USE_TMA and (BLOCK % BN == 0 or BN % BLOCK == 0):
        # The tile's BN compact columns are BN consecutive weight rows when the tile lies inside one neuron
        # block, or spans whole blocks with consecutive ids (every tile at density 1, most of a reordered
        # layer's): then one (BN, BK) box per K step; other tiles gather their rows through pointers.
        c0 = pid_n * BN
        first_block = tl.load(ids_ptr + c0 // BLOCK)
        blocks_in_tile = tl.minimum(tl.cdiv(BN, BLOCK), n_cols // BLOCK - c0 // BLOCK)  # valid blocks (>= 1)
        last_block = tl.load(ids_ptr + c0 // BLOCK + blocks_in_tile - 1)  # first_block when BN <= BLOCK
        if last_block - first_block == blocks_in_tile - 1:
            acc = _sdd_boxes(acc, a_desc, w_desc, K, first_block * BLOCK + c0 % BLOCK, pid_m, BM, BK, UPCAST,
                             PRECISION)
        else:
            acc = _pointer_product(acc, a_ptrs, w_ptrs, K, offs_k, stride_ak, stride_wk, BK, EVEN_K, UPCAST,
                                   PRECISION)
    else:
        acc = _pointer_product(acc, a_ptrs, w_ptrs, K, offs_k, stride_ak, stride_wk, BK, EVEN_K, UPCAST, PRECISION)
    if HAS_LOW_RANK:
        for r in range(0, R, BR):
            offs_r = r + tl.arange(0, BR)
            mask_r = offs_r < R
            e = tl.load(e_ptr + (offs_m % T)[:, None] * stride_em + offs_r[None, :] * stride_er,
                        mask=mask_r[None, :], other=0.0)
            lw = tl.load(l_ptr + rows[None, :] * stride_ln + offs_r[:, None] * stride_lr,
                         mask=mask_r[:, None], other=0.0)
            if UPCAST:
                e, lw = e.to(tl.float32), lw.to(tl.float32)
            acc = tl.dot(e, lw, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows * stride_bias).to(tl.float32)[None, :]
    mask_mc = mask_m[:, None] & mask_c[None, :]
    # NaN stays NaN, as in torch.relu and its backward (which zeroes only where h <= 0): the default
    # maximum returns the non-NaN operand, which turned a NaN token's row into fc2's bias.
    if EPILOGUE == 1:
        acc = tl.maximum(acc, 0.0, propagate_nan=tl.PropagateNan.ALL)
    if EPILOGUE == 2:  # ReLU's backward: keep where the forward's bit is set
        bit_ptrs, bit_mask = _bit_bytes(m_ptr, offs_m, mask_m, pid_n, n_cols, stride_mm, BN)
        packed = tl.load(bit_ptrs, mask=bit_mask, other=0)
        acc = tl.where(_unpack_bits(packed, BM, BN), acc, 0.0)
    out = acc.to(c_ptr.dtype.element_ty)
    if USE_TMA:  # two bulk stores of half tiles, clipped to the tokens and the count by the descriptor's shape: the
        # staging buffer is half a tile (32 KB at 128 x 256), which leaves room for a fourth pipeline stage
        halves = tl.split(tl.permute(tl.reshape(out, (BM, 2, BN // 2)), (0, 2, 1)))
        c_desc.store([pid_m * BM, pid_n * BN], halves[0])
        c_desc.store([pid_m * BM, pid_n * BN + BN // 2], halves[1])
    else:
        tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_c[None, :] * stride_cc, out, mask=mask_mc)
    if MASK_OUT:  # ReLU's backward state, 8 columns a byte (`relu_bits`): not (h <= 0) of the stored value, so NaN
        # keeps its gradient as in torch's ReLU. After the ReLU that is h != 0 (h is >= 0 or NaN; -0.0 == 0), one
        # comparison a column instead of two
        tl.static_assert(EPILOGUE == 1, "the ReLU bits are the ReLU epilogue's")
        packed = _pack_bits(out != 0, BM, BN).to(tl.uint8)
        if BITS_TMA and BN >= 128:  # one bulk store (a box's rows are 16 bytes or more), clipped by the
            # descriptor at the count's last 16-byte chunk (bytes past the count in it are never read): no layout
            # conversion through shared memory before the stores
            m_desc.store([pid_m * BM, pid_n * (BN // 8)], packed)
        else:
            bit_ptrs, bit_mask = _bit_bytes(m_ptr, offs_m, mask_m, pid_n, n_cols, stride_mm, BN)
            tl.store(bit_ptrs, packed, mask=bit_mask)
    if HAS_SKINNY:  # the LoRA product of this compact tile, summed over column tiles by fp32 atomics
        offs_r2 = tl.arange(0, BR2)
        mask_r2 = offs_r2 < R2
        sw = tl.load(s_ptr + rows[:, None] * stride_sn + offs_r2[None, :] * stride_sr,
                     mask=mask_c[:, None] & mask_r2[None, :], other=0.0)
        part = tl.where(mask_mc, out, 0.0)
        if UPCAST:
            part, sw = part.to(tl.float32), sw.to(tl.float32)
        part = tl.dot(part.to(sw.dtype), sw, input_precision=PRECISION)
        tl.atomic_add(o2_ptr + offs_m[:, None] * stride_om + offs_r2[None, :], part,
                      mask=mask_m[:, None] & mask_r2[None, :], sem="relaxed")
    if HAS_COLSUM:  # the tile's column sums of what was stored (fc1's bias gradient), summed over row tiles
        part = tl.sum(tl.where(mask_mc, out.to(tl.float32), 0.0), axis=0)
        tl.atomic_add(cs_ptr + rows, part, mask=mask_c, sem="relaxed")


@triton.jit
def _narrow(wide_tiles, narrow_tiles, SLOTS, programs):
    """Whether a launch walks half-width tiles: when the count leaves too few full-width tiles to fill the SMs
    (SLOTS of them), counted in waves, a half-width tile taken as 0.55 of a full one (it shares less of its loads),
    and the launch has `programs` enough for them (one per tile; a persistent loop passes narrow_tiles). At 2048
    tokens and density 0.1 of 8192 neurons, 128 x 256 tiles made 64 programs for 132 SMs and fc1 took 2x its time
    tuned at that count (H100: 31 vs 16 us)."""
    faster = 11 * tl.cdiv(narrow_tiles, SLOTS) < 20 * tl.cdiv(wide_tiles, SLOTS)
    return faster & (narrow_tiles <= programs)


@triton.jit
def _sdd_program(
    n_cols, a_ptr, w_ptr, e_ptr, l_ptr, bias_ptr, m_ptr, c_ptr, s_ptr, o2_ptr, cs_ptr, ids_ptr, T, K, R, R2, W_ROWS,
    stride_am, stride_ak, stride_wn, stride_wk, stride_em, stride_er, stride_ln, stride_lr, stride_mm, stride_cm,
    stride_cc, stride_sn, stride_sr, stride_om, stride_bias,
    BLOCK: tl.constexpr, HAS_LOW_RANK: tl.constexpr, HAS_BIAS: tl.constexpr, EPILOGUE: tl.constexpr,
    MASK_OUT: tl.constexpr, HAS_SKINNY: tl.constexpr, HAS_COLSUM: tl.constexpr, BR: tl.constexpr, BR2: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, USE_TMA: tl.constexpr, BITS_TMA: tl.constexpr,
    PERSISTENT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    """One program of sdd over (BM, BN) tiles: its descriptors, then its tile (or, persistent, its tiles)."""
    num_m = tl.cdiv(T, BM)
    num_n = tl.cdiv(n_cols, BN)
    if USE_TMA and (BLOCK % BN == 0 or BN % BLOCK == 0):
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[T, K], strides=[stride_am, 1], block_shape=[BM, BK])
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[W_ROWS, K], strides=[stride_wn, 1], block_shape=[BN, BK])
    else:  # unused
        a_desc, w_desc = a_ptr, w_ptr
    if USE_TMA:  # bounded by the count (at least 1 wide: with a count of 0 no tile stores)
        c_desc = tl.make_tensor_descriptor(c_ptr, shape=[T, tl.maximum(n_cols, 1)], strides=[stride_cm, 1],
                                           block_shape=[BM, BN // 2])
    else:
        c_desc = c_ptr
    if BITS_TMA and BN >= 128:  # bounded by the count's last 16-byte chunk (128 columns), not its last
        # 4-byte group: an H100 wrote a box's whole 16 bytes past a bound of 20 (so the bound says what is written)
        m_desc = tl.make_tensor_descriptor(m_ptr, shape=[T, tl.maximum(tl.cdiv(n_cols, 128) * 16, 16)],
                                           strides=[stride_mm, 1], block_shape=[BM, BN // 8])
    else:
        m_desc = m_ptr
    if PERSISTENT:  # the tiles up to the device-side count, as in dsd
        for tile in tl.range(tl.program_id(0), num_m * num_n, tl.num_programs(0), flatten=True):
            _sdd_tile(
                tile, num_m, num_n, n_cols, a_ptr, w_ptr, a_desc, w_desc, c_desc, m_desc, e_ptr, l_ptr, bias_ptr, m_ptr,
                c_ptr, s_ptr, o2_ptr, cs_ptr, ids_ptr, T, K, R, R2, stride_am, stride_ak, stride_wn, stride_wk,
                stride_em, stride_er, stride_ln, stride_lr, stride_mm, stride_cm, stride_cc, stride_sn, stride_sr,
                stride_om, stride_bias, BLOCK, HAS_LOW_RANK, HAS_BIAS, EPILOGUE, MASK_OUT, HAS_SKINNY, HAS_COLSUM, BR,
                BR2, UPCAST, PRECISION, USE_TMA, BITS_TMA, BM, BN, BK, GROUP_M, EVEN_K,
            )
    elif tl.program_id(0) < num_m * num_n:  # else a tile past the device-side count: nothing to do
        _sdd_tile(
            tl.program_id(0), num_m, num_n, n_cols, a_ptr, w_ptr, a_desc, w_desc, c_desc, m_desc, e_ptr, l_ptr,
            bias_ptr, m_ptr, c_ptr, s_ptr, o2_ptr, cs_ptr, ids_ptr, T, K, R, R2, stride_am, stride_ak, stride_wn,
            stride_wk, stride_em, stride_er, stride_ln, stride_lr, stride_mm, stride_cm, stride_cc, stride_sn,
            stride_sr, stride_om, stride_bias, BLOCK, HAS_LOW_RANK, HAS_BIAS, EPILOGUE, MASK_OUT, HAS_SKINNY,
            HAS_COLSUM, BR, BR2, UPCAST, PRECISION, USE_TMA, BITS_TMA, BM, BN, BK, GROUP_M, EVEN_K,
        )


# reset_to_zero: the skinny output is accumulated by atomics, so every autotuning run must start from
# zeros (without it the first, tuning call returned the sum of all benchmark runs: seen on the H100).
@triton.autotune(configs=_autotune_configs(), key=[*_KEY, "CAP", "USE_TMA", "PERSISTENT", "NARROW"],
                 reset_to_zero=["o2_ptr", "cs_ptr"])
@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BK"] == 0})
@triton.jit
def _sdd_kernel(
    a_ptr,  # (tokens, K) dense left operand: x (fc1 forward) or dy (backward)
    w_ptr,  # (ffn, K) neuron-major weight: fc1.weight, or fc2.weight^T
    e_ptr,  # (tokens, R) low-rank left operand (HAS_LOW_RANK): scaled x A1^T, or dv
    l_ptr,  # (ffn, R) neuron-major low-rank weight (HAS_LOW_RANK): B1, or A2^T
    bias_ptr,  # (ffn,) (HAS_BIAS)
    m_ptr,  # (tokens, capacity*BLOCK/8) uint8 ReLU bits: written when MASK_OUT, read when EPILOGUE == 2
    c_ptr,  # (tokens, capacity*BLOCK) compact output
    s_ptr,  # (ffn, R2) neuron-major skinny weight (HAS_SKINNY): A2^T (forward) or B1 (backward)
    o2_ptr,  # (tokens, R2) fp32, zeroed: += c_tile @ s[rows] (HAS_SKINNY), by atomics across column tiles
    cs_ptr,  # (ffn,) fp32, zeroed: [rows] += column sums of the stored tile (HAS_COLSUM), by atomics across row tiles
    ids_ptr,  # (capacity,) int32 active block ids; the first count are valid
    count_ptr,  # (1,) int32
    T, K, R, R2, T_BUCKET,
    CAP,  # capacity*BLOCK: the compact width (grid and autotuner key; the count bounds the work)
    W_ROWS,  # ffn: rows of w (the descriptor's bound)
    SLOTS,  # programs the GPU runs at once (its SMs): `_narrow`'s measure of a wave
    stride_am, stride_ak, stride_wn, stride_wk, stride_em, stride_er, stride_ln, stride_lr,
    stride_mm, stride_cm, stride_cc, stride_sn, stride_sr, stride_om, stride_bias,
    BLOCK: tl.constexpr,
    HAS_LOW_RANK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EPILOGUE: tl.constexpr,  # 0: none, 1: ReLU, 2: ReLU's backward (zero where the forward's bit is clear)
    MASK_OUT: tl.constexpr,  # write the ReLU bits (with EPILOGUE 1)
    HAS_SKINNY: tl.constexpr,
    HAS_COLSUM: tl.constexpr,
    BR: tl.constexpr,
    BR2: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr,  # main product through tensor descriptors where a tile's weight rows are consecutive; the
    # compact output stored through one
    BITS_TMA: tl.constexpr,  # MASK_OUT's bits stored through a descriptor (with USE_TMA, legal bits; BN >= 128)
    PERSISTENT: tl.constexpr,  # one program per SM walks the tiles (`_persistent`); else one per tile
    NARROW: tl.constexpr,  # half-width (BM, BN / 2) tiles where the count leaves too few full ones (`_narrow`)
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    n_cols = tl.load(count_ptr) * BLOCK
    num_m = tl.cdiv(T, BM)
    # (a half tile keeps the ReLU bits' 32-column groups: BN >= 64)
    narrow_tiles = num_m * tl.cdiv(n_cols, BN // 2)
    if (NARROW and BN >= 64) and _narrow(num_m * tl.cdiv(n_cols, BN), narrow_tiles, SLOTS,
                                         narrow_tiles if PERSISTENT else tl.num_programs(0)):
        _sdd_program(
            n_cols, a_ptr, w_ptr, e_ptr, l_ptr, bias_ptr, m_ptr, c_ptr, s_ptr, o2_ptr, cs_ptr, ids_ptr, T, K, R, R2,
            W_ROWS, stride_am, stride_ak, stride_wn, stride_wk, stride_em, stride_er, stride_ln, stride_lr, stride_mm,
            stride_cm, stride_cc, stride_sn, stride_sr, stride_om, stride_bias, BLOCK, HAS_LOW_RANK, HAS_BIAS,
            EPILOGUE, MASK_OUT, HAS_SKINNY, HAS_COLSUM, BR, BR2, UPCAST, PRECISION, USE_TMA, BITS_TMA, PERSISTENT, BM,
            BN // 2, BK, GROUP_M, EVEN_K,
        )
    else:
        _sdd_program(
            n_cols, a_ptr, w_ptr, e_ptr, l_ptr, bias_ptr, m_ptr, c_ptr, s_ptr, o2_ptr, cs_ptr, ids_ptr, T, K, R, R2,
            W_ROWS, stride_am, stride_ak, stride_wn, stride_wk, stride_em, stride_er, stride_ln, stride_lr, stride_mm,
            stride_cm, stride_cc, stride_sn, stride_sr, stride_om, stride_bias, BLOCK, HAS_LOW_RANK, HAS_BIAS,
            EPILOGUE, MASK_OUT, HAS_SKINNY, HAS_COLSUM, BR, BR2, UPCAST, PRECISION, USE_TMA, BITS_TMA, PERSISTENT, BM,
            BN, BK, GROUP_M, EVEN_K,
        )


@triton.jit
def _dsd_tile(tile, k_end, c_ptr, w_ptr, c_desc, w_desc, bias_ptr, o_ptr, ids_ptr, T, N, K,
              stride_cm, stride_cc, stride_wn, stride_wk, stride_om, stride_on, stride_bias,
              BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
              USE_TMA: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    """One (BM, BN) output tile of dsd: a program's whole work, or one turn of a persistent program's loop (the
    kernel makes the descriptors, once per program)."""
    pid_m, pid_n = grouped_tile(tile, tl.cdiv(T, BM), tl.cdiv(N, BN), GROUP_M)
    offs_m = pid_m.to(tl.int64) * BM + tl.arange(0, BM)
    offs_n = pid_n.to(tl.int64) * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    c_ptrs = c_ptr + (offs_m % T)[:, None] * stride_cm + offs_k[None, :] * stride_cc
    w_offs = (offs_n % N)[None, :] * stride_wk

    acc = tl.zeros((BM, BN), dtype=tl.float32)
    if USE_TMA and BLOCK % BK == 0:
        # Out-of-range rows/columns of a tile load as zeros; the store below is masked.
        next_id = _block_id_at(ids_ptr, 0, K, BLOCK)
        for k in range(0, k_end, BK):
            block_id = next_id
            next_id = _block_id_at(ids_ptr, k + BK, K, BLOCK)
            c = c_desc.load([pid_m * BM, k])
            w = w_desc.load([block_id * BLOCK + k % BLOCK, pid_n * BN])
            if UPCAST:
                c, w = c.to(tl.float32), w.to(tl.float32)
            acc = tl.dot(c, w, acc, input_precision=PRECISION)
    elif BLOCK % BK == 0:
        # Every K step lies inside one neuron block: one id, then BK consecutive weight rows.
        w_offs += offs_k[:, None] * stride_wn
        next_id = _block_id_at(ids_ptr, 0, K, BLOCK).to(tl.int64)
        for k in range(0, k_end, BK):
            block_id = next_id
            next_id = _block_id_at(ids_ptr, k + BK, K, BLOCK).to(tl.int64)
            c = tl.load(c_ptrs)
            w = tl.load(w_ptr + (block_id * BLOCK + k % BLOCK) * stride_wn + w_offs)
            if UPCAST:
                c, w = c.to(tl.float32), w.to(tl.float32)
            acc = tl.dot(c, w, acc, input_precision=PRECISION)
            c_ptrs += BK * stride_cc
    else:
        for k in range(0, k_end, BK):
            mask_k = offs_k < k_end - k
            rows = _neuron_rows(ids_ptr, k + offs_k, mask_k, BLOCK)
            c = tl.load(c_ptrs, mask=mask_k[None, :], other=0.0)
            w = tl.load(w_ptr + rows[:, None] * stride_wn + w_offs, mask=mask_k[:, None], other=0.0)
            if UPCAST:
                c, w = c.to(tl.float32), w.to(tl.float32)
            acc = tl.dot(c, w, acc, input_precision=PRECISION)
            c_ptrs += BK * stride_cc
    mask_n = offs_n < N
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n * stride_bias, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(o_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
             acc.to(o_ptr.dtype.element_ty), mask=(offs_m < T)[:, None] & mask_n[None, :])


@triton.autotune(configs=_autotune_configs(), key=[*_KEY, "USE_TMA", "PERSISTENT"])
@triton.jit
def _dsd_kernel(
    c_ptr,  # (tokens, capacity*BLOCK) compact left operand: h (forward) or dZ (backward)
    w_ptr,  # (ffn, N) neuron-major right operand: fc2.weight^T, A2^T, fc1.weight or B1
    bias_ptr,  # (N,) (HAS_BIAS)
    o_ptr,  # (tokens, N) dense output
    ids_ptr,  # (capacity,) int32
    count_ptr,  # (1,) int32
    T, N, K, T_BUCKET,  # K: the compact width (capacity*BLOCK); it also keys the autotuner
    W_ROWS,  # ffn: rows of w (the descriptor's bound)
    stride_cm, stride_cc, stride_wn, stride_wk, stride_om, stride_on, stride_bias,
    BLOCK: tl.constexpr,
    HAS_LOW_RANK: tl.constexpr,  # unused; keeps one autotune key for every kernel
    HAS_BIAS: tl.constexpr,
    EPILOGUE: tl.constexpr,  # unused
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr,  # operands through tensor descriptors (needs unit inner strides, 16-byte rows)
    PERSISTENT: tl.constexpr,  # one program per SM walks the tiles (`_persistent`); else one per tile
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    k_end = tl.load(count_ptr) * BLOCK  # runtime loop bound: the count never recompiles
    if USE_TMA and BLOCK % BK == 0:
        c_desc = tl.make_tensor_descriptor(c_ptr, shape=[T, K], strides=[stride_cm, 1], block_shape=[BM, BK])
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[W_ROWS, N], strides=[stride_wn, 1], block_shape=[BK, BN])
    else:  # unused
        c_desc, w_desc = c_ptr, w_ptr
    if PERSISTENT:
        # flatten: the tile loop and the K loop are pipelined as one, so the next tile's first loads are in
        # flight while this tile's epilogue stores (Triton's persistent-matmul schedule)
        for tile in tl.range(tl.program_id(0), tl.cdiv(T, BM) * tl.cdiv(N, BN), tl.num_programs(0), flatten=True):
            _dsd_tile(tile, k_end, c_ptr, w_ptr, c_desc, w_desc, bias_ptr, o_ptr, ids_ptr, T, N, K, stride_cm,
                      stride_cc, stride_wn, stride_wk, stride_om, stride_on, stride_bias, BLOCK, HAS_BIAS, UPCAST,
                      PRECISION, USE_TMA, BM, BN, BK, GROUP_M)
    else:
        _dsd_tile(tl.program_id(0), k_end, c_ptr, w_ptr, c_desc, w_desc, bias_ptr, o_ptr, ids_ptr, T, N, K,
                  stride_cm, stride_cc, stride_wn, stride_wk, stride_om, stride_on, stride_bias, BLOCK, HAS_BIAS,
                  UPCAST, PRECISION, USE_TMA, BM, BN, BK, GROUP_M)


@triton.jit
def _wgrad_program(n_cols, c_ptr, d_ptr, g_ptr, ids_ptr, T, N, K, stride_cm, stride_cc, stride_dm, stride_dn,
                   stride_gn, stride_gk, BLOCK: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                   USE_TMA: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                   GROUP_M: tl.constexpr, EVEN_T: tl.constexpr):
    """One program of wgrad: its (BM, BN) tile of G."""
    num_m = tl.cdiv(n_cols, BM)
    num_n = tl.cdiv(N, BN)
    pid = tl.program_id(0)
    if pid >= num_m * num_n:  # a tile past the device-side count
        return
    pid_m, pid_n = grouped_tile(pid, num_m, num_n, GROUP_M)
    offs_c = pid_m.to(tl.int64) * BM + tl.arange(0, BM)
    offs_n = pid_n.to(tl.int64) * BN + tl.arange(0, BN)
    mask_c = offs_c < n_cols
    mask_n = offs_n < N
    offs_t = tl.arange(0, BK)
    # The compact operand is read as a transposed (columns, tokens) pointer tile. Loading (tokens,
    # columns) and transposing in registers with tl.trans measured 6x slower on the H100 (1.40 ms vs
    # 0.23 ms for dW1 at density 1.0), so this form stays.
    # Columns wrap modulo the buffer's width K: past-count columns read finite data of the buffer and their rows of G
    # are never stored. (A clamp, min(offs_c, n_cols - 1), hid the columns' contiguity from the compiler: no
    # vectorised loads, so no cp.async pipelining, one stage of shared memory; the offline sm_90 compile shows it.)
    ct_ptrs = c_ptr + (offs_c % K)[:, None] * stride_cc + offs_t[None, :] * stride_cm
    d_ptrs = d_ptr + offs_t[:, None] * stride_dm + (offs_n % N)[None, :] * stride_dn

    acc = tl.zeros((BM, BN), dtype=tl.float32)
    if USE_TMA:
        # (tokens, columns) boxes; columns past the count are finite data of the buffer (or zeros past
        # its width) and their rows are never stored; a ragged token tail loads as zeros.
        c_desc = tl.make_tensor_descriptor(c_ptr, shape=[T, K], strides=[stride_cm, 1], block_shape=[BK, BM])
        d_desc = tl.make_tensor_descriptor(d_ptr, shape=[T, N], strides=[stride_dm, 1], block_shape=[BK, BN])
        for t in range(0, T, BK):
            c = c_desc.load([t, pid_m * BM])
            d = d_desc.load([t, pid_n * BN])
            if UPCAST:
                c, d = c.to(tl.float32), d.to(tl.float32)
            acc = tl.dot(c.T, d, acc, input_precision=PRECISION)
    else:
        acc = _pointer_product(acc, ct_ptrs, d_ptrs, T, offs_t, stride_cm, stride_dm, BK, EVEN_T, UPCAST, PRECISION)
    rows = _neuron_rows(ids_ptr, offs_c, mask_c, BLOCK)
    tl.store(g_ptr + rows[:, None] * stride_gn + offs_n[None, :] * stride_gk,
             acc.to(g_ptr.dtype.element_ty), mask=mask_c[:, None] & mask_n[None, :])


@triton.jit
def _zero_inactive_block(block, ids_ptr, count, g_ptr, N, stride_gn, stride_gk, BLOCK: tl.constexpr,
                         BN: tl.constexpr):
    """Zeros in neuron block `block`'s rows of G, unless it is one of the first `count` ids (strictly increasing: a
    binary search), whose rows the products write. So G needs no zero fill first: at density 1.0 that fill wrote
    every row twice (11 us for dW1's 32 MB on the H100), and below it the zeros are stored while the products run.
    One program a block (all its columns), not one a (block, column tile): a program holds the products' registers
    and shared memory, so an SM runs about one at a time, and each starts with the search's dependent loads."""
    lo = count * 0
    hi = count
    while lo < hi:
        mid = (lo + hi) // 2
        below = tl.load(ids_ptr + mid) < block
        lo = tl.where(below, mid + 1, lo)
        hi = tl.where(below, hi, mid)
    if tl.load(ids_ptr + lo, mask=lo < count, other=-1) != block:
        rows = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        zeros = tl.zeros((BLOCK, BN), dtype=g_ptr.dtype.element_ty)
        for n in range(0, N, BN):
            offs_n = n + tl.arange(0, BN)
            tl.store(g_ptr + rows[:, None] * stride_gn + offs_n[None, :] * stride_gk, zeros, mask=(offs_n < N)[None, :])


# K, the compact width, is the capacity; N, the output's width, tells dW1 / dW2 (d_model) from the LoRA gradients (rank)
@triton.autotune(configs=_autotune_configs(), key=[*_KEY, "USE_TMA", "N", "NARROW", "ZERO_REST"])
@triton.heuristics({"EVEN_T": lambda args: args["T"] % args["BK"] == 0})
@triton.jit
def _wgrad_kernel(
    c_ptr,  # (tokens, capacity*BLOCK) compact left operand (transposed): dZ or h
    d_ptr,  # (tokens, N) dense right operand: x, scaled x A1^T, dy or dv
    g_ptr,  # (ffn, N) neuron-major gradient: rows of active blocks get their products, the others zeros (ZERO_REST)
    ids_ptr,  # (capacity,) int32
    count_ptr,  # (1,) int32
    T, N, K, T_BUCKET,  # K: the capacity*BLOCK (compact width)
    SLOTS,  # programs the GPU runs at once (its SMs): `_narrow`'s measure of a wave
    stride_cm, stride_cc, stride_dm, stride_dn, stride_gn, stride_gk,
    BLOCK: tl.constexpr,
    HAS_LOW_RANK: tl.constexpr,  # unused
    HAS_BIAS: tl.constexpr,  # unused
    EPILOGUE: tl.constexpr,  # unused
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr,  # operands through tensor descriptors; the compact box is transposed in shared memory
    NARROW: tl.constexpr,  # (BM, BN / 2) tiles where the count leaves too few full ones (`_narrow`)
    ZERO_REST: tl.constexpr,  # zeros in the inactive blocks' rows too (`_zero_inactive_block`); else they are left
    BM: tl.constexpr,  # compact rows of G per program
    BN: tl.constexpr,
    BK: tl.constexpr,  # tokens per reduction step
    GROUP_M: tl.constexpr,
    EVEN_T: tl.constexpr,
):
    count = tl.load(count_ptr)
    n_cols = count * BLOCK
    num_m = tl.cdiv(n_cols, BM)
    products = tl.cdiv(K, BM) * tl.cdiv(N, BN)  # the grid's first programs; with ZERO_REST, one a block follows
    if ZERO_REST and tl.program_id(0) >= products:
        _zero_inactive_block(tl.program_id(0) - products, ids_ptr, count, g_ptr, N, stride_gn, stride_gk, BLOCK, BN)
    elif (NARROW and BN >= 32) and _narrow(num_m * tl.cdiv(N, BN), num_m * tl.cdiv(N, BN // 2), SLOTS, products):
        _wgrad_program(n_cols, c_ptr, d_ptr, g_ptr, ids_ptr, T, N, K, stride_cm, stride_cc, stride_dm, stride_dn,
                       stride_gn, stride_gk, BLOCK, UPCAST, PRECISION, USE_TMA, BM, BN // 2, BK, GROUP_M, EVEN_T)
    else:
        _wgrad_program(n_cols, c_ptr, d_ptr, g_ptr, ids_ptr, T, N, K, stride_cm, stride_cc, stride_dm, stride_dn,
                       stride_gn, stride_gk, BLOCK, UPCAST, PRECISION, USE_TMA, BM, BN, BK, GROUP_M, EVEN_T)


# The same kernel over `_skinny_configs`' narrow tiles, for outputs at most SKINNY_N wide
_wgrad_skinny_kernel = triton.autotune(configs=_skinny_configs(), key=[*_KEY, "USE_TMA", "N", "NARROW", "ZERO_REST"])(
    _wgrad_kernel.fn)


@triton.jit
def _colsum_kernel(
    c_ptr,  # (tokens, capacity*BLOCK) compact dZ
    g_ptr,  # (ffn,) bias gradient; entries of active blocks are written
    ids_ptr,  # (capacity,) int32
    count_ptr,  # (1,) int32
    T, stride_cm, stride_cc, stride_g,
    BLOCK: tl.constexpr,
    BC: tl.constexpr,
    BT: tl.constexpr,
):
    n_cols = tl.load(count_ptr) * BLOCK
    offs_c = tl.program_id(0).to(tl.int64) * BC + tl.arange(0, BC)
    if tl.program_id(0) * BC >= n_cols:
        return
    mask_c = offs_c < n_cols
    acc = tl.zeros((BC,), dtype=tl.float32)
    for t in range(0, T, BT):
        offs_t = t + tl.arange(0, BT).to(tl.int64)
        c = tl.load(c_ptr + offs_t[:, None] * stride_cm + offs_c[None, :] * stride_cc,
                    mask=(offs_t < T)[:, None] & mask_c[None, :], other=0.0)
        acc += tl.sum(c.to(tl.float32), axis=0)
    rows = _neuron_rows(ids_ptr, offs_c, mask_c, BLOCK)
    tl.store(g_ptr + rows * stride_g, acc.to(g_ptr.dtype.element_ty), mask=mask_c)


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------

Wrap = Callable[[Any], Any]


def _no_wrap(kernel: Any) -> Any:
    return kernel


def _flags(dtype: torch.dtype) -> dict[str, Any]:
    # The interpreter's bf16 dot is wrong (triton 3.9); upcasting exact bf16 values to fp32 is the same math.
    return {
        "UPCAST": INTERPRET and dtype == torch.bfloat16,
        "PRECISION": "ieee" if dtype == torch.float32 else "tf32",
    }


def _bucket(t: int) -> int:
    """The power of two at or above t (at least 1). Integer arithmetic: `triton.next_power_of_2` is a constexpr
    function, whose host calls cost about 5 us each under cProfile (H100, fig12_mlp run 25; 4 a forward)."""
    return 1 << (max(int(t), 1) - 1).bit_length()


@functools.lru_cache(maxsize=64)
def _full_count(capacity: int, device: torch.device) -> torch.Tensor:
    """A cached, never-written count tensor holding `capacity` (all ids valid)."""
    return torch.full((1,), capacity, dtype=torch.int32, device=device)


@functools.lru_cache(maxsize=16)
def _scratch_f32(device: torch.device) -> torch.Tensor:
    """A 1-element fp32 placeholder for the unused skinny output (eager only; traced calls allocate)."""
    return torch.zeros(1, dtype=torch.float32, device=device)


def _low_rank_block(r: int) -> int:
    return max(16, _bucket(r))


def check_inputs(
    x: torch.Tensor,
    active_block_ids: torch.Tensor,
    n_active: torch.Tensor | None,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor | None,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor | None,
    block_size: int,
    fc1_lr_x: torch.Tensor | None = None,
    fc1_lr_weight: torch.Tensor | None = None,
    fc2_lr_weight: torch.Tensor | None = None,
    check_indices: bool | None = None,
) -> None:
    """Raise ValueError/TypeError naming the offending argument; see `neuron_block_mlp_forward`.

    Index values (range, strictly increasing, count <= capacity) need the values on the host, which
    is a sync on a GPU: they are checked when `check_indices` is True, or when it is None and the
    tensors are on the CPU or LONGEXPOSURE_CHECK_INDICES=1.
    """
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size: {block_size} is not one of {BLOCK_SIZES}")
    if x.dim() != 2:
        raise ValueError(f"x: expected (tokens, d_model), got shape {tuple(x.shape)}")
    if x.dtype not in DTYPES:
        raise TypeError(f"x: dtype {x.dtype} not supported; use one of {DTYPES}")
    tokens, d_model = x.shape
    if fc1_weight.dim() != 2 or fc1_weight.shape[1] != d_model:
        raise ValueError(f"fc1_weight: expected (ffn, d_model={d_model}), got {tuple(fc1_weight.shape)}")
    ffn = fc1_weight.shape[0]
    if ffn % block_size:
        raise ValueError(f"fc1_weight: ffn={ffn} is not a multiple of block_size={block_size}")
    expected = {
        "fc1_weight": (fc1_weight, (ffn, d_model)),
        "fc1_bias": (fc1_bias, (ffn,)),
        "fc2_weight": (fc2_weight, (d_model, ffn)),
        "fc2_bias": (fc2_bias, (d_model,)),
    }
    if (fc1_lr_x is None) != (fc1_lr_weight is None):
        raise ValueError("fc1_lr_x and fc1_lr_weight: give both or neither")
    if fc1_lr_x is not None:
        r1 = fc1_lr_x.shape[-1]
        expected["fc1_lr_x"] = (fc1_lr_x, (tokens, r1))
        expected["fc1_lr_weight"] = (fc1_lr_weight, (ffn, r1))
    if fc2_lr_weight is not None:
        expected["fc2_lr_weight"] = (fc2_lr_weight, (fc2_lr_weight.shape[0], ffn))
    for name, (t, shape) in expected.items():
        if t is None:
            continue
        if tuple(t.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")
        if t.dtype != x.dtype:
            raise TypeError(f"{name}: dtype {t.dtype} differs from x's {x.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name}: on {t.device}, but x is on {x.device}")
    num_blocks = ffn // block_size
    if active_block_ids.dtype != torch.int32 or active_block_ids.dim() != 1:
        raise TypeError(
            "active_block_ids: expected a 1-D int32 tensor, "
            f"got {active_block_ids.dtype} {tuple(active_block_ids.shape)}"
        )
    if active_block_ids.device != x.device:
        raise ValueError(f"active_block_ids: on {active_block_ids.device}, but x is on {x.device}")
    capacity = active_block_ids.numel()
    if capacity > num_blocks:
        raise ValueError(f"active_block_ids: capacity {capacity} exceeds ffn/block_size = {num_blocks} blocks")
    if n_active is not None:
        if n_active.dtype != torch.int32 or n_active.numel() != 1:
            raise TypeError(
                f"n_active: expected a 1-element int32 tensor, got {n_active.dtype} {tuple(n_active.shape)}"
            )
        if n_active.device != x.device:
            raise ValueError(f"n_active: on {n_active.device}, but x is on {x.device}")
    if check_indices is None:
        check_indices = x.device.type == "cpu" or os.environ.get("LONGEXPOSURE_CHECK_INDICES") == "1"
    if check_indices:
        count = capacity if n_active is None else int(n_active.reshape(()).item())
        if not 0 <= count <= capacity:
            raise ValueError(f"n_active: {count} is outside [0, capacity={capacity}]")
        ids = active_block_ids[:count].long().cpu()
        if count and (ids.min() < 0 or ids.max() >= num_blocks):
            raise ValueError(f"active_block_ids: values must lie in [0, {num_blocks}), got {ids.min()}..{ids.max()}")
        if count > 1 and not bool((ids[1:] > ids[:-1]).all()):
            raise ValueError("active_block_ids: the valid ids must be strictly increasing (sorted, no repeats)")


# After the autotuner has chosen a config for a key, eager launches call the JIT function directly with
# it: the Autotuner and Heuristics wrappers rebuild several argument dicts per launch (about a quarter
# of a forward's host time in a cProfile on the H100 machine; the end-to-end gain was within that VM's
# noise). Traced calls (wrap is not _no_wrap) always go through the autotuner, as torch.compile expects.
_CHOSEN: dict[tuple, triton.Config] = {}


def _launch(wrap: Wrap, kernel, grid, args: tuple, consts: dict[str, Any], key: tuple,
            even: tuple[str, int] | None = None) -> None:
    """Launch an autotuned kernel; `key` must determine the autotuner's key (shapes it keys on, dtype)."""
    key = (kernel, *key, *consts.values())
    config = _CHOSEN.get(key) if wrap is _no_wrap else None
    if config is None:
        wrap(kernel)[grid](*args, **consts)
        if wrap is _no_wrap and not INTERPRET:
            _CHOSEN[key] = kernel.best_config
        return
    meta = {**consts, **config.all_kwargs()}
    jit = kernel.fn
    if even is not None:  # the kernel's one heuristic, evaluated here
        meta[even[0]] = even[1] % meta["BK"] == 0
        jit = jit.fn
    jit[grid(meta)](*args, **meta)


def _launch_sdd(a, w, ids, count, block, *, bias=None, e=None, lw=None, mask=None, epilogue=1, out, skinny=None,
                skinny_out=None, colsum_out=None, wrap=_no_wrap):
    """out (compact) = epilogue(a @ w[rows]^T + e @ lw[rows]^T + bias[rows]); skinny_out += out @ skinny[rows];
    colsum_out[rows] += out.sum(0) (an (ffn,) fp32 buffer, zeroed by the caller).

    `mask` (tokens, capacity*block/8) uint8, the ReLU bits (`relu_bits`): written by the ReLU epilogue (1) when
    given, read by the ReLU-backward epilogue (2), which needs it."""
    tokens, k = a.shape
    cap_cols = out.shape[1]
    if epilogue == 2 and mask is None:
        raise ValueError("mask: the ReLU-backward epilogue reads the forward's ReLU bits")
    if tokens == 0 or cap_cols == 0:
        return out
    r = 0 if e is None else e.shape[1]
    r2 = 0 if skinny is None else skinny.shape[1]
    dummy = a
    if skinny_out is None:  # never a real input: the autotuner zeroes this argument while tuning
        skinny_out = _scratch_f32(a.device) if wrap is _no_wrap else a.new_empty(1, dtype=torch.float32)
    use_tma = _use_tma("sdd", a, w, out, traced=wrap is not _no_wrap)
    persistent = _persistent(use_tma)
    mask_out = epilogue == 1 and mask is not None
    tiles = lambda meta: triton.cdiv(tokens, meta["BM"]) * triton.cdiv(cap_cols, meta["BN"])  # noqa: E731
    grid = lambda meta: (min(tiles(meta), _programs(a.device)) if persistent else tiles(meta),)  # noqa: E731
    _launch(wrap, _sdd_kernel, grid, (
        a, w, dummy if e is None else e, dummy if lw is None else lw, dummy if bias is None else bias,
        dummy if mask is None else mask, out, dummy if skinny is None else skinny,
        skinny_out, skinny_out if colsum_out is None else colsum_out, ids, count,  # no column sum: never written
        tokens, k, r, r2, _bucket(tokens), cap_cols, w.shape[0], _programs(a.device),
        a.stride(0), a.stride(1), w.stride(0), w.stride(1),
        0 if e is None else e.stride(0), 0 if e is None else e.stride(1),
        0 if lw is None else lw.stride(0), 0 if lw is None else lw.stride(1),
        0 if mask is None else mask.stride(0),
        out.stride(0), out.stride(1),
        0 if skinny is None else skinny.stride(0), 0 if skinny is None else skinny.stride(1),
        skinny_out.stride(0), 0 if bias is None else bias.stride(0),
    ), dict(
        BLOCK=block, HAS_LOW_RANK=e is not None, HAS_BIAS=bias is not None, EPILOGUE=epilogue,
        MASK_OUT=mask_out, HAS_SKINNY=skinny is not None,
        HAS_COLSUM=colsum_out is not None, BR=_low_rank_block(r), BR2=_low_rank_block(r2), **_flags(a.dtype),
        USE_TMA=use_tma, BITS_TMA=mask_out and use_tma and descriptors.legal(mask, wrap is not _no_wrap),
        PERSISTENT=persistent, NARROW=skinny is None and _narrow_tiles("sdd"),
    ), key=(a.dtype, _bucket(tokens), k, r, r2, cap_cols), even=("EVEN_K", k))
    return out


TMA_KERNELS = ("sdd", "dsd", "wgrad")  # the names LONGEXPOSURE_TMA may list
# LONGEXPOSURE_TMA where unset: the kernels descriptors (with the persistent schedule) sped up on the H100 at density
# 1.0 and at fig7's scattered 0.62 (fig12_mlp run 17: fc1 0.116 vs 0.131 ms, dZ 0.117 vs 0.130, dsd 0.095 vs 0.098);
# the weight gradient is faster with pointer loads (run 7). fig7's compiled step ties either way (1.26x at 5ca8a49).
TMA_DEFAULT = "sdd,dsd"


def _use_tma(kernel: str, *operands: torch.Tensor, traced: bool = False) -> bool:
    """LONGEXPOSURE_TMA (`TMA_DEFAULT` where unset; `0` none, `1` all, or a list such as `sdd,dsd`; read per launch,
    or per trace) names `kernel`, on a Hopper GPU (or the interpreter), with descriptor-legal operands: the rule of
    `kernels/descriptors.py`. Traced calls (torch.compile) take descriptors too since 2026-12-05."""
    return descriptors.use("LONGEXPOSURE_TMA", *operands, traced=traced, kernel=kernel, kernels=TMA_KERNELS,
                           default=TMA_DEFAULT)


def _persistent(with_descriptors: bool) -> bool:
    """Whether sdd and dsd run one program per SM, each walking tiles in a loop that Triton pipelines across tile
    boundaries: LONGEXPOSURE_PERSISTENT=1 / 0 (read per launch or per trace), and where unset, when the launch reads
    through descriptors. dsd runs persistent only with descriptor loads.

    Timed on the H100 (1be31af, `artifacts/fig12_mlp`, run 7, d 2048 / ffn 8192 / 2048 tokens): persistent sdd
    0.129 ms at density 1.0 with descriptors (0.149 one program per tile); persistent dsd 0.098 ms with descriptors
    but 1.18 ms with pointer loads (0.102 one program per tile), so `_launch_dsd` keeps pointer loads one per tile."""
    value = os.environ.get("LONGEXPOSURE_PERSISTENT")
    if value is None:
        return with_descriptors
    if value not in ("0", "1"):
        raise ValueError(f"LONGEXPOSURE_PERSISTENT={value!r}: expected '0' or '1'")
    return value == "1"


NARROW_KERNELS = ("sdd", "wgrad")  # the names LONGEXPOSURE_NARROW may list
# LONGEXPOSURE_NARROW where unset. Measured on the H100 (f062cd9, fig12_mlp run 20, 2048 tokens, d 2048 / ffn 8192,
# capacity every block, tuned at density 1.0): at density 0.1 half-width tiles took fc1 from 31.3 to 22.5 us and dZ
# from 37.1 to 26.3, and cost nothing at 0.5 and 1.0; the weight gradient's went from 24.2 to 19.7 us at 0.1 but its
# kernel ran 3% slower at 0.5 and 1.0 (all gradients' backward 0.278 vs 0.271 and 0.473 vs 0.460 ms), and sdd with
# a LoRA epilogue (`skinny`) 3-8% slower at every density: those two stay full-width.
NARROW_DEFAULT = "sdd"


def _narrow_tiles(kernel: str) -> bool:
    """Whether `kernel` may switch to half-width tiles when the device-side count leaves too few full ones
    (`_narrow`): LONGEXPOSURE_NARROW (`NARROW_DEFAULT` where unset; `0` none, `1` both, or a list of NARROW_KERNELS),
    read per launch or per trace."""
    return descriptors.switched_on("LONGEXPOSURE_NARROW", kernel, NARROW_KERNELS, default=NARROW_DEFAULT)


@functools.cache
def _programs(device: torch.device) -> int:
    """Programs the GPU runs at once (a persistent launch's grid, `_narrow`'s wave): one per SM; 3 in the interpreter,
    so tests walk several tiles per program, and for a tensor off CUDA (a trace with fake CPU tensors: nothing runs)."""
    if INTERPRET or device.type != "cuda":
        return 3
    return torch.cuda.get_device_properties(device).multi_processor_count


def _launch_dsd(c, w, ids, count, block, *, bias=None, out, wrap=_no_wrap):
    tokens, n = out.shape
    if tokens == 0 or n == 0:
        return out
    if c.shape[1] == 0:  # no capacity: the product is empty
        return out.copy_(bias.expand_as(out)) if bias is not None else out.zero_()
    use_tma = _use_tma("dsd", c, w, traced=wrap is not _no_wrap)
    persistent = _persistent(use_tma) and use_tma  # the pointer path's persistent loop ran 11x slower (`_persistent`)
    tiles = lambda meta: triton.cdiv(tokens, meta["BM"]) * triton.cdiv(n, meta["BN"])  # noqa: E731
    grid = lambda meta: (min(tiles(meta), _programs(c.device)) if persistent else tiles(meta),)  # noqa: E731
    _launch(wrap, _dsd_kernel, grid, (
        c, w, c if bias is None else bias, out, ids, count,
        tokens, n, c.shape[1], _bucket(tokens), w.shape[0],
        c.stride(0), c.stride(1), w.stride(0), w.stride(1), out.stride(0), out.stride(1),
        0 if bias is None else bias.stride(0),
    ), dict(BLOCK=block, HAS_LOW_RANK=False, HAS_BIAS=bias is not None, EPILOGUE=0, **_flags(c.dtype),
            USE_TMA=use_tma, PERSISTENT=persistent),
        key=(c.dtype, _bucket(tokens), c.shape[1], n))
    return out


def _launch_wgrad(c, d, ids, count, block, *, out, zero_rest=True, wrap=_no_wrap):
    """out (ffn, n) = c^T @ d in the active blocks' rows, zeros in the others (`out` may start uninitialised); with
    zero_rest=False the others are left as they are (`out` zeroed by the caller: the way before 2026-12-06)."""
    tokens, n = d.shape
    cap_cols = c.shape[1]
    if n == 0:
        return out
    if tokens == 0 or cap_cols == 0:  # no products: every row is zero
        return out.zero_() if zero_rest else out
    # the products' tiles (up to the capacity), then one program per neuron block for the zeros
    grid = lambda meta: (triton.cdiv(cap_cols, meta["BM"]) * triton.cdiv(n, meta["BN"])  # noqa: E731
                         + (out.shape[0] // block if zero_rest else 0),)
    _launch(wrap, _wgrad_skinny_kernel if n <= SKINNY_N else _wgrad_kernel, grid, (
        c, d, out, ids, count,
        tokens, n, cap_cols, _bucket(tokens), _programs(c.device),
        c.stride(0), c.stride(1), d.stride(0), d.stride(1), out.stride(0), out.stride(1),
    ), dict(BLOCK=block, HAS_LOW_RANK=False, HAS_BIAS=False, EPILOGUE=3, **_flags(c.dtype),
            USE_TMA=_use_tma("wgrad", c, d, traced=wrap is not _no_wrap), NARROW=_narrow_tiles("wgrad"),
            ZERO_REST=zero_rest),
        key=(c.dtype, _bucket(tokens), cap_cols, n), even=("EVEN_T", tokens))
    return out


def _launch_colsum(c, ids, count, block, *, out, wrap=_no_wrap):
    tokens, cap_cols = c.shape
    if tokens == 0 or cap_cols == 0:
        return out
    bc = 32 if INTERPRET else 128
    wrap(_colsum_kernel)[(triton.cdiv(cap_cols, bc),)](
        c, out, ids, count, tokens, c.stride(0), c.stride(1), out.stride(0),
        BLOCK=block, BC=bc, BT=32 if INTERPRET else 64,
    )
    return out


def _ids_and_count(active_block_ids: torch.Tensor, n_active: torch.Tensor | None):
    """Kernel-ready (ids, count, capacity): the kernels index ids densely, so a strided view is copied."""
    active_block_ids = active_block_ids.contiguous()
    capacity = active_block_ids.numel()
    if n_active is None:
        n_active = _full_count(capacity, active_block_ids.device)
    if capacity == 0:  # a real pointer for the kernels; never read since the count is 0
        active_block_ids = torch.zeros(1, dtype=torch.int32, device=active_block_ids.device)
        n_active = _full_count(0, active_block_ids.device)
    return active_block_ids, n_active.reshape(1), capacity


def neuron_block_mlp_forward(
    x: torch.Tensor,
    active_block_ids: torch.Tensor,
    n_active: torch.Tensor | None,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor | None,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor | None,
    block_size: int,
    fc1_lr_x: torch.Tensor | None = None,
    fc1_lr_weight: torch.Tensor | None = None,
    fc2_lr_weight: torch.Tensor | None = None,
    *,
    check_indices: bool | None = False,
    wrap: Wrap = _no_wrap,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward of the neuron-block MLP (validation is the caller's: `check_inputs`).

    Args:
        x: (tokens, d_model).
        active_block_ids: (capacity,) int32; the first `n_active` are the active blocks, increasing.
        n_active: (1,) int32 device tensor, or None for "all `capacity` ids are valid".
        fc1_weight, fc1_bias: (ffn, d_model), (ffn,) or None.
        fc2_weight, fc2_bias: (d_model, ffn) (fast when column-major), (d_model,) or None.
        block_size: neurons per block (16, 32, 64 or 128).
        fc1_lr_x, fc1_lr_weight: low-rank fc1 term u (tokens, r1) and B1 (ffn, r1): z += u B1[act]^T.
        fc2_lr_weight: A2 (r2, ffn): also return v = h A2[:, act]^T.

    Returns:
        y (tokens, d_model); h (tokens, capacity*block_size), the compact ReLU output (columns past
        n_active*block_size unwritten); v (tokens, r2), or (tokens, 0) without fc2_lr_weight; bits
        (tokens, capacity*block_size/8) uint8, h's ReLU bits (`relu_bits`), all the backward needs of h
        unless fc2's weight or LoRA A is trained.
    """
    ids, count, capacity = _ids_and_count(active_block_ids, n_active)
    tokens, d_model = x.shape
    h = x.new_empty(tokens, capacity * block_size)
    bits = relu_bits(tokens, capacity * block_size, x.device)
    v32 = None if fc2_lr_weight is None else x.new_zeros(tokens, fc2_lr_weight.shape[0], dtype=torch.float32)
    _launch_sdd(x, fc1_weight, ids, count, block_size, bias=fc1_bias, e=fc1_lr_x, lw=fc1_lr_weight, epilogue=1,
                mask=bits, out=h, skinny=None if v32 is None else fc2_lr_weight.t(), skinny_out=v32, wrap=wrap)
    y = _launch_dsd(h, fc2_weight.t(), ids, count, block_size, bias=fc2_bias, out=x.new_empty(tokens, d_model),
                    wrap=wrap)
    v = x.new_empty(tokens, 0) if v32 is None else v32.to(x.dtype)
    return y, h, v, bits


def relu_bits(tokens: int, cap_cols: int, device: torch.device) -> torch.Tensor:
    """An uninitialised uint8 buffer for the ReLU bits of a compact activation, 4 bytes for each 32 columns, rows
    rounded up to 16 bytes (so fc1 can store them through a tensor descriptor, which may also write the bytes past
    the count up to the next 16-byte boundary; nothing reads them): column 32g + 8q + 2b + e of a row is bit
    2q + e of byte 4g + b, set where that column kept its value (h > 0, or NaN). That order is what a Hopper MMA thread
    holds (`_pack_bits`). A sixteenth of an fp16 h, so a frozen fc2 saves 1/16 of the activation for the backward, not
    all of it (fig7 memory, issue 18)."""
    return torch.empty(_relu_bits_shape(tokens, cap_cols), dtype=torch.uint8, device=device)


def _relu_bits_shape(tokens: int, cap_cols: int) -> tuple[int, int]:
    return tokens, triton.cdiv(cap_cols, 128) * 16


def neuron_block_mlp_backward(
    dy: torch.Tensor,
    dv: torch.Tensor | None,
    x: torch.Tensor | None,
    h: torch.Tensor | None,
    bits: torch.Tensor,
    active_block_ids: torch.Tensor,
    n_active: torch.Tensor | None,
    fc1_weight: torch.Tensor,
    fc2_weight: torch.Tensor,
    block_size: int,
    fc1_lr_x: torch.Tensor | None,
    fc1_lr_weight: torch.Tensor | None,
    fc2_lr_weight: torch.Tensor | None,
    needs: tuple[bool, bool, bool, bool, bool, bool, bool, bool],
    *,
    wrap: Wrap = _no_wrap,
) -> list[torch.Tensor | None]:
    """Gradients of `neuron_block_mlp_forward`, only those asked for.

    x is read only for fc1's weight gradient and h only for fc2's weight and LoRA A gradients (None otherwise:
    the ReLU's backward reads `bits`); dy gives the shapes. `needs` flags, in order: x, fc1_weight, fc1_bias,
    fc2_weight, fc2_bias, fc1_lr_x, fc1_lr_weight, fc2_lr_weight. Returns the gradients in that order (None where
    not needed). Weight and bias gradients are full-shaped with zeros outside the active blocks; fc2_weight's and
    fc2_lr_weight's come back with their parameter's strides (neuron-major storage stays neuron-major).
    """
    need_x, need_w1, need_b1, need_w2, need_b2, need_u, need_b1lr, need_a2 = needs
    ids, count, capacity = _ids_and_count(active_block_ids, n_active)
    has_dv = fc2_lr_weight is not None and dv is not None and dv.numel() > 0
    out: list[torch.Tensor | None] = [None] * 8
    if (need_w2 or need_a2) and h is None:
        raise ValueError("h: fc2's weight and LoRA A gradients read the forward's activations")
    if need_w1 and x is None:
        raise ValueError("x: fc1's weight gradient reads the forward's input")
    expected = _relu_bits_shape(dy.shape[0], capacity * block_size)
    if tuple(bits.shape) != expected or bits.dtype != torch.uint8:
        raise ValueError(f"bits: expected the forward's ReLU bits, uint8 {expected} (`relu_bits`), got "
                         f"{bits.dtype} {tuple(bits.shape)}")
    if need_x or need_w1 or need_b1 or need_u or need_b1lr:
        dz = dy.new_empty(dy.shape[0], capacity * block_size)
        du32 = dy.new_zeros(fc1_lr_x.shape, dtype=torch.float32) if need_u else None
        # fc1's bias gradient: summed in dZ's epilogue by fp32 atomics (no second pass over dZ), or, where
        # deterministic algorithms are asked for, by the column-sum kernel in a fixed order
        fused_db1 = need_b1 and not torch.are_deterministic_algorithms_enabled()
        db1_32 = dy.new_zeros(fc1_weight.shape[0], dtype=torch.float32) if fused_db1 else None
        _launch_sdd(dy, fc2_weight.t(), ids, count, block_size,
                    e=dv if has_dv else None, lw=fc2_lr_weight.t() if has_dv else None,
                    mask=bits, epilogue=2, out=dz, skinny=fc1_lr_weight if need_u else None, skinny_out=du32,
                    colsum_out=db1_32, wrap=wrap)
        if need_u:
            out[5] = du32.to(dy.dtype)
        if fused_db1:
            out[2] = db1_32.to(dy.dtype)
        if need_x:
            out[0] = _launch_dsd(dz, fc1_weight, ids, count, block_size, out=torch.empty_like(dy), wrap=wrap)
        if need_w1:
            out[1] = _launch_wgrad(dz, x, ids, count, block_size, out=torch.empty_like(fc1_weight), wrap=wrap)
        if need_b1 and not fused_db1:
            out[2] = _launch_colsum(dz, ids, count, block_size,
                                    out=torch.zeros(fc1_weight.shape[0], dtype=dy.dtype, device=dy.device),
                                    wrap=wrap)
        if need_b1lr:
            out[6] = _launch_wgrad(dz, fc1_lr_x, ids, count, block_size, out=torch.empty_like(fc1_lr_weight), wrap=wrap)
    if need_w2:
        g = torch.empty_like(fc2_weight)  # keeps the parameter's strides
        _launch_wgrad(h, dy, ids, count, block_size, out=g.t(), wrap=wrap)
        out[3] = g
    if need_b2:  # dy's column sums as a matrix-vector product: cuBLAS's took 5.0 us at 2048 tokens, d 2048 on the
        # H100, torch's column reduction 9.4 (same error against fp64; fig12_mlp run 21)
        out[4] = torch.mv(dy.t(), dy.new_ones(dy.shape[0]))
    if need_a2:
        g = torch.empty_like(fc2_lr_weight) if has_dv else torch.zeros_like(fc2_lr_weight)
        if has_dv:
            _launch_wgrad(h, dv, ids, count, block_size, out=g.t(), wrap=wrap)
        out[7] = g
    return out

