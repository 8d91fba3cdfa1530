"""What Triton itself reaches on the neuron-block MLP's matmul shapes, beside cuBLAS and this project's kernels.

Issue 21 asks the MLP kernels for cuBLAS speed; at low counts they take about 1.7x cuBLAS's time (fc1 at density
0.1: 19 us against 11 on the H100). This asks whether that is the kernels or the compiler: the same three products
(fc1 = x @ W1c^T, fc2 = hc @ W2c, dW1 = hc^T @ x; the compact operands are the first `density` of 8192 neurons,
d 2048, 2048 tokens, fp16) timed as
  - cuBLAS (`torch.mm` on the gathered operands), with the kernel cuBLAS picked (torch.profiler);
  - PyTorch Inductor's Triton matmul templates, max-autotune over Triton only (persistent TMA templates included):
    the best plain Triton matmul a well-kept library finds for that shape; Inductor prints its autotune table;
  - this project's kernels with no epilogue (sdd, dsd, wgrad on the active ids), each tuned at that count.
CUDA-graph medians (`triton.testing.do_bench_cudagraph`), one process, one GPU. Random weights, random tokens; no
sparsity is predicted: the active blocks are the first ones. Launch:

    python benchmarks/gemm_ceiling.py --out artifacts/fig12_mlp/<device>_gemm_ceiling.json
"""

from __future__ import annotations

import argparse
import json

import torch


def kernel_names(fn) -> list[str]:
    """The CUDA kernels a call of `fn` runs, by name."""
    from longexposure.measure import cuda_kernels

    return sorted(name for name, _, _ in cuda_kernels(fn))


def inductor_triton_mm(left: torch.Tensor, right: torch.Tensor):
    """torch.mm compiled by Inductor for these operands, max-autotuned over its Triton templates only (the first call,
    which compiles and tunes, runs inside the config patch)."""
    import torch._inductor.config as ic

    patches = {"max_autotune": True, "max_autotune_gemm": True, "max_autotune_gemm_backends": "TRITON"}
    if hasattr(ic.triton, "enable_persistent_tma_matmul"):
        patches["triton.enable_persistent_tma_matmul"] = True
    compiled = torch.compile(lambda a, b: torch.mm(a, b), dynamic=False)
    with ic.patch(patches):
        compiled(left, right)
    return compiled


def time_product(density: float, name: str, left: torch.Tensor, right: torch.Tensor, ours, us) -> dict:
    """One product timed three ways (module docstring), with the kernels cuBLAS and Inductor launched."""
    m_, k_ = left.shape
    flops = 2 * m_ * k_ * right.shape[1]
    compiled = inductor_triton_mm(left, right)  # autotunes (Inductor prints its table)
    ref = torch.mm(left, right).float()
    ours()
    row = {"density": density, "product": name, "m": m_, "n": right.shape[1], "k": k_,
           "cublas_us": us(lambda: torch.mm(left, right)),
           "inductor_triton_us": us(lambda: compiled(left, right)),
           "ours_us": us(ours),
           "inductor_err": float((compiled(left, right).float() - ref).norm() / ref.norm()),
           "cublas_kernels": kernel_names(lambda: torch.mm(left, right)),
           "inductor_kernels": kernel_names(lambda: compiled(left, right))}
    for key in ("cublas", "inductor_triton", "ours"):
        row[f"{key}_tflops"] = round(flops / row[f"{key}_us"] / 1e6, 1)
    print(f"density {density} {name} ({m_} x {right.shape[1]} x {k_}): cuBLAS {row['cublas_us']:.1f} us, "
          f"Inductor-Triton {row['inductor_triton_us']:.1f}, ours {row['ours_us']:.1f}; "
          f"cuBLAS kernel {row['cublas_kernels']}", flush=True)
    return row


def one_density(density: float, x, w1, w2n, gw, blk: int, us) -> list[dict]:
    """fc1, fc2 and dW1 over the first `density` of the neuron blocks."""
    from longexposure.kernels import neuron_block_mlp as k

    t, ffn = x.shape[0], w1.shape[0]
    n = int(ffn // blk * density)
    a_cols = n * blk
    ids = torch.arange(n, device=x.device, dtype=torch.int32)
    cnt = torch.tensor([n], device=x.device, dtype=torch.int32)
    h = torch.randn(t, a_cols, device=x.device, dtype=x.dtype)
    w1c, w2c = w1[:a_cols].contiguous(), w2n[:a_cols].contiguous()
    o = torch.empty_like(x)
    return [
        time_product(density, "fc1 x @ W1c^T", x, w1c.t(),
                     lambda: k._launch_sdd(x, w1, ids, cnt, blk, epilogue=0, out=h), us),
        time_product(density, "fc2 hc @ W2c", h, w2c, lambda: k._launch_dsd(h, w2n, ids, cnt, blk, out=o), us),
        time_product(density, "dW1 hc^T @ x", h.t(), x,
                     lambda: k._launch_wgrad(h, x, ids, cnt, blk, out=gw, zero_rest=False), us),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--densities", type=float, nargs="+", default=[0.1, 1.0])
    parser.add_argument("--tokens", type=int, default=2048)
    args = parser.parse_args()

    import triton.testing

    from longexposure.suite.provenance import provenance

    if not torch.cuda.is_available():
        raise SystemExit("gemm_ceiling: needs a CUDA GPU")
    dev, dt, d, ffn, blk, t = "cuda", torch.float16, 2048, 8192, 64, args.tokens
    us = lambda f: triton.testing.do_bench_cudagraph(f, rep=40, return_mode="median") * 1e3  # noqa: E731
    x = torch.randn(t, d, device=dev, dtype=dt)
    w1 = torch.randn(ffn, d, device=dev, dtype=dt) * d**-0.5
    w2n = torch.randn(ffn, d, device=dev, dtype=dt) * ffn**-0.5  # fc2.weight^T, neuron-major
    gw = torch.zeros(ffn, d, device=dev, dtype=dt)
    result = {**provenance(),
              "setup": {"tokens": t, "d": d, "ffn": ffn, "block": blk, "dtype": "float16",
                        "weights": "random", "ids": "the first blocks (no predictor)"}, "rows": []}
    for density in args.densities:
        result["rows"] += one_density(density, x, w1, w2n, gw, blk, us)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
