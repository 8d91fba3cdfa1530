"""The neuron-block MLP op's host cost per eager call with its kernels stubbed out (empty outputs), on a CPU.

TRITON_INTERPRET=1 python artifacts/fig12_mlp/cpu_op_dispatch_probe.py
(2026-12-06, 2-core CPU, torch 2.13: about 60 us a call; the H100 probe beside it measured 220-470 us with kernels.)
"""

import cProfile
import io
import pstats
import time
from unittest import mock

import torch
from longexposure.kernels import neuron_block_mlp as K

from longexposure.ops.neuron_block_mlp import neuron_block_mlp, neuron_major

D, FFN, TOKENS, BLOCK = 256, 1024, 64, 64


def stub(x, ids, _n, _w1, _b1, w2, _b2, block, *_rest, wrap=None):  # noqa: ANN001, ARG001 - the forward's signature
    cap = ids.numel() * block
    return (x.new_empty(x.shape[0], w2.shape[0]), x.new_empty(x.shape[0], cap), x.new_empty(x.shape[0], 0),
            K.relu_bits(x.shape[0], cap, x.device))


def main() -> None:
    x, w1, b1 = torch.randn(TOKENS, D), torch.randn(FFN, D), torch.randn(FFN)
    w2, b2 = neuron_major(torch.randn(D, FFN)), torch.randn(D)
    ids = torch.arange(8, dtype=torch.int32)
    with mock.patch.object(K, "neuron_block_mlp_forward", stub):
        def call() -> None:
            neuron_block_mlp(x, ids, w1, b1, w2, b2, block_size=BLOCK)

        for _ in range(20):
            call()
        start = time.perf_counter()
        for _ in range(200):
            call()
        print(f"host us per call, kernels stubbed: {(time.perf_counter() - start) / 200 * 1e6:.1f}")
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(200):
            call()
        profile.disable()
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(12)
        print(out.getvalue())


if __name__ == "__main__":
    main()
