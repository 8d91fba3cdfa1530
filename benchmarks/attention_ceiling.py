"""What a plain Triton flash-attention forward reaches on issue 21's attention shapes, beside sdpa and this project's
block-sparse kernel on the dense causal layout.

Issue 21 asks the block-sparse forward for sdpa's speed at 0% sparsity; it runs at 0.57-0.78x (H100, fp16, D 64 and
128). This asks where that gap lies, as `gemm_ceiling.py` does for the MLP: the kernel here is the shape of Triton's
fused-attention tutorial (a resident BM-row query tile, BN-key tiles streamed over a static causal range, the
online softmax in exp2, the diagonal tiles in a second, masked loop) with switches that each add one feature of the
block-sparse kernel or of the Hopper tutorial:
  - `indirect`: each key tile's index is read from a table in the loop (the block-sparse kernel's layout walk; the
    table is the identity here, so the work is the same);
  - `tma`: K and V through device-side tensor descriptors (bulk copies);
  - `ws`: `tl.range(warp_specialize=True)` on the unmasked loop (descriptors too; Triton's automatic warp
    specialisation, producer warps for the loads). A variant the compiler rejects is reported with its error.
Every variant runs over tiles BM x BN in {64 x 64, 128 x 64, 128 x 128} and (warps, stages) in {4, 8} x {2, 3}
(64 x 128 never won on the H100, 2026-12-06); the table keeps each variant's best and the JSON every config. Same
launch order as the block-sparse kernel (one flat axis, heaviest query tiles first). Timed beside sdpa (its kernel
named by torch.profiler) and the block-sparse forward on the dense causal layout (blocks 64 and 128, autotuned, with
the config its autotuner picked), all CUDA-graph medians in one process on one GPU. `--forced-configs` adds the
block-sparse forward at each config of `FORCED` (the autotuner held to one config), descriptors off and on: which
tile the kernel itself runs best at, beside the tutorial tile of the same shape. Random inputs; no sparsity anywhere.
Launch:

    python benchmarks/attention_ceiling.py --out artifacts/fig12_attention/<device>_attention_ceiling.json
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import platform

import torch
import triton
import triton.language as tl

VARIANTS = {"plain": {}, "indirect": {"INDIRECT": True}, "tma": {"TMA": True}, "tma+ws": {"TMA": True, "WS": True},
            "indirect+tma": {"INDIRECT": True, "TMA": True}}
TILES = [(bm, bn, w, st) for bm, bn in ((64, 64), (128, 64), (128, 128)) for w, st in itertools.product((4, 8), (2, 3))]
# the block-sparse forward's (layout block, SPLIT, warps, stages) held fixed: a block of 128 in two 64-key tiles, or
# whole; a block of 64 whole
FORCED = [(128, 2, 4, 2), (128, 2, 4, 3), (128, 2, 8, 2), (128, 1, 8, 3), (64, 1, 4, 2), (64, 1, 4, 3)]


@triton.jit
def _keys(k_src, v_src, kb, row0, offs_n, offs_d, D: tl.constexpr, TMA: tl.constexpr, BN: tl.constexpr):
    if TMA:
        k = k_src.load([row0 + kb * BN, 0])
        v = v_src.load([row0 + kb * BN, 0])
    else:
        rows = row0 + kb * BN + offs_n
        k = tl.load(k_src + rows[:, None] * D + offs_d[None, :])
        v = tl.load(v_src + rows[:, None] * D + offs_d[None, :])
    return k, v


@triton.jit
def _step(acc, m_i, l_i, q, k, v, qk_scale, mask):
    qk = tl.dot(q, tl.trans(k))
    qk = tl.where(mask, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(qk * qk_scale - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i


@triton.jit
def _causal_fwd(q_ptr, k_ptr, v_ptr, o_ptr, idx_ptr, BH, S, qk_scale, D: tl.constexpr, BM: tl.constexpr,
                BN: tl.constexpr, INDIRECT: tl.constexpr, TMA: tl.constexpr, WS: tl.constexpr):
    """Causal attention of contiguous (B * H, S, D) q, k, v (S a multiple of BM and BN) into o."""
    pid = tl.program_id(0)
    m = S // BM - 1 - pid // BH  # heaviest tiles first
    bh = pid % BH
    row0 = bh * S
    offs_m = m * BM + tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    offs_d = tl.arange(0, D)
    q = tl.load(q_ptr + (row0 + offs_m)[:, None] * D + offs_d[None, :])
    if TMA:
        k_src = tl.make_tensor_descriptor(k_ptr, shape=[BH * S, D], strides=[D, 1], block_shape=[BN, D])
        v_src = tl.make_tensor_descriptor(v_ptr, shape=[BH * S, D], strides=[D, 1], block_shape=[BN, D])
    else:
        k_src = k_ptr
        v_src = v_ptr
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    n_full = (m * BM) // BN
    every = offs_m[:, None] >= 0
    for j in tl.range(0, n_full, warp_specialize=WS):
        kb = tl.load(idx_ptr + j) if INDIRECT else j
        k, v = _keys(k_src, v_src, kb, row0, offs_n, offs_d, D, TMA, BN)
        acc, m_i, l_i = _step(acc, m_i, l_i, q, k, v, qk_scale, every)
    for j in range(n_full, tl.cdiv((m + 1) * BM, BN)):
        kb = tl.load(idx_ptr + j) if INDIRECT else j
        k, v = _keys(k_src, v_src, kb, row0, offs_n, offs_d, D, TMA, BN)
        acc, m_i, l_i = _step(acc, m_i, l_i, q, k, v, qk_scale, (kb * BN + offs_n)[None, :] <= offs_m[:, None])
    o = acc / l_i[:, None]
    tl.store(o_ptr + (row0 + offs_m)[:, None] * D + offs_d[None, :], o.to(o_ptr.dtype.element_ty))


def triton_causal(q, k, v, idx, tile, variant):
    """A launcher of `_causal_fwd` for one (BM, BN, warps, stages) tile and one variant's switches."""
    bm, bn, warps, stages = tile
    bsz, heads, seq, d = q.shape
    o = torch.empty_like(q)
    flags = {"INDIRECT": False, "TMA": False, "WS": False, **VARIANTS[variant]}
    grid = (seq // bm * bsz * heads,)
    scale = d ** -0.5 * math.log2(math.e)

    def run():
        _causal_fwd[grid](q, k, v, o, idx, bsz * heads, seq, scale, D=d, BM=bm, BN=bn, num_warps=warps,
                          num_stages=stages, **flags)
        return o

    return run


def block_sparse(q, k, v, block):
    """This project's block-sparse forward on the dense causal layout at `block`."""
    from longexposure.kernels.block_sparse_attention import block_sparse_attention_fwd

    from longexposure.attention.layout import BlockLayout

    nq = q.shape[2] // block
    layout = BlockLayout.from_dense(torch.ones(nq, nq, dtype=torch.bool, device=q.device).tril(), block)
    scale = q.shape[-1] ** -0.5
    return lambda: block_sparse_attention_fwd(q, k, v, layout.kv_counts, layout.kv_indices, None, block=block,
                                              causal=True, scale=scale)[0]


@contextlib.contextmanager
def forced_config(split: int, warps: int, stages: int, tma: bool):
    """The block-sparse forward's autotuner held to one config, its descriptors switched as `tma` says."""
    from unittest import mock

    from longexposure.kernels.block_sparse_attention import _bsa_fwd_kernel as tuner

    from longexposure.measure import autotuner_held_to

    with autotuner_held_to(tuner, [triton.Config({"SPLIT": split}, num_warps=warps, num_stages=stages)]), \
            mock.patch.dict(os.environ, {"LONGEXPOSURE_BSA_TMA": "1" if tma else "0"}):
        yield


def measure_shape(d: int, seq: int, batch: int, heads: int, variants: list[str],
                  forced: bool = False) -> tuple[list[dict], list[dict]]:
    """One (head dim, length): sdpa, the block-sparse forward and every variant's tiles; (table rows, all configs)."""
    from longexposure.kernels.block_sparse_attention import _bsa_fwd_kernel as tuner

    from longexposure.measure import cuda_kernels

    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(batch, heads, seq, d, device=dev, dtype=torch.float16, generator=gen) for _ in range(3))
    idx = torch.arange(seq // 64, device=dev, dtype=torch.int32)
    flops = 4 * batch * heads * seq * seq * d / 2
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).float()

    def record(name, fn, extra=None):
        err = float((fn().float() - ref).norm() / ref.norm())
        t = triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median") * 1e3
        row = {"S": seq, "D": d, "kernel": name, "us": round(t, 1), "tflops": round(flops / t / 1e6, 1),
               "rel_err": err, **(extra or {})}
        print(row, flush=True)
        return row

    def sdpa():
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    rows = [record("sdpa", sdpa, {"kernels": [n for n, _, _ in cuda_kernels(sdpa)]})]
    configs = []
    for block in (64, 128):
        row = record(f"block-sparse (block {block}, dense causal)", block_sparse(q, k, v, block))
        rows.append({**row, "autotuned": str(tuner.best_config)})
    for block, split, warps, stages in FORCED if forced else []:
        for tma in (False, True):
            label = {"block": block, "SPLIT": split, "warps": warps, "stages": stages, "tma": tma}
            try:
                with forced_config(split, warps, stages, tma):
                    configs.append(record(f"block-sparse forced (block {block})", block_sparse(q, k, v, block), label))
            except Exception as exc:  # noqa: BLE001 - a config that does not fit this head dim
                configs.append({"S": seq, "D": d, **label, "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
    for variant in variants:
        best = None
        for tile in TILES:
            label = {"variant": variant, "BM": tile[0], "BN": tile[1], "warps": tile[2], "stages": tile[3]}
            try:
                row = record(f"triton tile ({variant})", triton_causal(q, k, v, idx, tile, variant), label)
            except Exception as exc:  # noqa: BLE001 - out of shared memory, or a variant the compiler rejects
                row = {"S": seq, "D": d, **label, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                print(row, flush=True)
            configs.append(row)
            if "us" in row and row["rel_err"] < 1e-2 and (best is None or row["us"] < best["us"]):
                best = row
        if best is not None:
            rows.append(best)
    for row in rows + configs:
        if "us" in row:
            row["x_sdpa"] = round(rows[0]["us"] / row["us"], 2)
    return rows, configs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON file to write (a .md table is written beside it)")
    ap.add_argument("--seq", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--variants", nargs="+", default=["plain", "indirect", "tma"], choices=list(VARIANTS))
    ap.add_argument("--forced-configs", action="store_true", help="also the block-sparse forward at each of FORCED")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("attention_ceiling.py needs a CUDA GPU")
    from longexposure.kernels import descriptors
    from tabulate import tabulate

    triton.set_allocator(descriptors._scratch)
    rows, configs = [], []
    for d, seq in itertools.product(args.head_dims, args.seq):
        shape_rows, shape_configs = measure_shape(d, seq, args.batch, args.heads, args.variants, args.forced_configs)
        rows += shape_rows
        configs += shape_configs
    from longexposure.suite.provenance import provenance

    meta = {**provenance(), "host": platform.node(), "batch": args.batch, "heads": args.heads, "dtype": "float16",
            "weights": "random inputs", "sparsity": "none (dense causal)"}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows, "configs": configs}, f, indent=1)
    cols = ["S", "D", "kernel", "BM", "BN", "warps", "stages", "us", "tflops", "x_sdpa", "rel_err", "autotuned"]
    md = tabulate([[r.get(c, "") for c in cols] for r in rows], headers=cols, tablefmt="github")
    with open(args.out.rsplit(".", 1)[0] + ".md", "w") as f:
        f.write(f"# {meta['device']}, torch {meta['torch']}, triton {meta['triton']}; B {args.batch}, "
                f"H {args.heads}, fp16, causal\n\n{md}\n")
    print(md)


if __name__ == "__main__":
    main()
