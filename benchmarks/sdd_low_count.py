"""fc1 (sdd) at density 0.1 taken apart: tile config x load mode (pointers / descriptors / descriptors + persistent) x
epilogue (none / bias + ReLU + bits), beside cuBLAS on the gathered weights.

`gemm_ceiling.py` found fc1 at 0.1 the one product where Inductor's Triton matmul beats these kernels (13.3 vs
17.1 us, H100). This times sdd at that count (12 and 13 of 128 blocks of 64; d 2048, 2048 tokens, fp16, random
weights, the first blocks active, no predictor) with one config at a time (the autotuner has nothing to choose), so
what the load mode, the tile and the epilogue each cost shows directly. CUDA-graph medians, us, printed as
`plain/with epilogue`. Launch: `python benchmarks/sdd_low_count.py` (one CUDA GPU).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.testing

CONFIGS = [(128, 128, 64, 8, 5), (128, 128, 64, 4, 4), (64, 128, 64, 4, 4)]  # BM, BN, BK, warps, stages
MODES = (("0", "0"), ("1", "0"), ("1", "1"))  # LONGEXPOSURE_TMA, LONGEXPOSURE_PERSISTENT


def us(fn) -> float:
    return triton.testing.do_bench_cudagraph(fn, rep=40, return_mode="median") * 1e3


def one_count(n: int, x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, blk: int) -> None:
    from longexposure.kernels import neuron_block_mlp as k

    t, dev = x.shape[0], x.device
    ids = torch.arange(n, device=dev, dtype=torch.int32)
    cnt = torch.tensor([n], device=dev, dtype=torch.int32)
    h = torch.empty(t, n * blk, device=dev, dtype=x.dtype)
    bits = k.relu_bits(t, n * blk, dev)
    w1c = w1[: n * blk].contiguous()
    print(f"n={n} cuBLAS {us(lambda: torch.mm(x, w1c.t())):.1f} us")
    for bm, bn, bk, warps, stages in CONFIGS:
        k._sdd_kernel.configs = [triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8}, num_warps=warps,
                                               num_stages=stages)]
        row = []
        for tma, persistent in MODES:
            os.environ["LONGEXPOSURE_TMA"], os.environ["LONGEXPOSURE_PERSISTENT"] = tma, persistent
            os.environ["LONGEXPOSURE_NARROW"] = "0"
            k._CHOSEN.clear()
            k._sdd_kernel.cache.clear()
            plain = us(lambda: k._launch_sdd(x, w1, ids, cnt, blk, epilogue=0, out=h))
            full = us(lambda: k._launch_sdd(x, w1, ids, cnt, blk, bias=b1, mask=bits, out=h))
            row.append(f"tma{tma}/p{persistent} {plain:.1f}/{full:.1f}")
        print((bm, bn, bk, warps, stages), " | ".join(row), flush=True)


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("sdd_low_count: needs a CUDA GPU")
    dev, dt, t, d, ffn, blk = "cuda", torch.float16, 2048, 2048, 8192, 64
    x = torch.randn(t, d, device=dev, dtype=dt)
    w1 = torch.randn(ffn, d, device=dev, dtype=dt) * d**-0.5
    b1 = torch.zeros(ffn, device=dev, dtype=dt)
    for n in (12, 13):
        one_count(n, x, w1, b1, blk)


if __name__ == "__main__":
    main()
