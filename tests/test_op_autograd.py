"""One autograd path per Triton operator: an eager call goes through the operator's `torch.library` op and
the autograd registered on it, exactly as a torch.compile trace does, never through a separate
`autograd.Function` with its own copy of the backward (issue 21).

The check walks the autograd graph of an eager call: the only custom (Python-defined) node in it must be
the one `register_autograd` generated for the op, and the gradients through it must be the reference's.
The compiled side: the joint forward+backward graph AOTAutograd builds (what Inductor compiles) must hold
every kernel of both directions, traced with real Triton kernels on fake tensors in a child process (the
interpreter's kernels cannot be traced; nothing is launched, so no GPU is needed).
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import subprocess
import sys
from unittest import mock

import torch
from numerics import assert_close

from longexposure.attention.layout import BlockLayout
from longexposure.ops.block_sparse_attention import block_sparse_attention, reference_attention
from longexposure.ops.neuron_block_mlp import LowRank, neuron_block_mlp, neuron_block_mlp_reference, neuron_major


def custom_nodes(out: torch.Tensor) -> set[str]:
    """Names of the autograd.Function classes whose nodes `out`'s graph holds (built-in nodes are left out)."""
    names, seen, stack = set(), set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        cls = getattr(node, "_forward_cls", None)  # set on the nodes of Python autograd.Functions only
        if cls is not None:
            names.add(cls.__name__)
        stack.extend(fn for fn, _ in node.next_functions)
    return names


def grads(out: torch.Tensor, leaves: list[torch.Tensor], seed: int) -> tuple[torch.Tensor, ...]:
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    return torch.autograd.grad(out, leaves, dout)


def test_neuron_block_mlp_backward_is_the_registered_ops():
    gen = torch.Generator().manual_seed(0)
    randn = lambda *s: (torch.randn(*s, generator=gen) * 0.3).requires_grad_()
    d, block, ffn = 32, 16, 64
    names = ["x", "w1", "b1", "w2", "b2", "a1", "lb1", "a2", "lb2"]
    leaves = [randn(2, 7, d), randn(ffn, d), randn(ffn), randn(d, ffn), randn(d), randn(3, d), randn(ffn, 3),
              randn(2, ffn), randn(d, 2)]
    x, w1, b1, w2, b2, a1, lb1, a2, lb2 = leaves
    ids = torch.tensor([0, 2, 3], dtype=torch.int32)
    n_active = torch.tensor([2], dtype=torch.int32)
    kw = dict(block_size=block, n_active=n_active, fc1_lora=LowRank(a1, lb1, 2.0), fc2_lora=LowRank(a2, lb2, 0.5))
    y = neuron_block_mlp(x, ids, w1, b1, w2, b2, **kw)
    assert custom_nodes(y) == {"GeneratedBackwardFor_longexposure_neuron_block_mlp_default"}
    y_ref = neuron_block_mlp_reference(x, ids, w1, b1, w2, b2, **kw)
    assert_close(y, y_ref, "y")
    for name, got, want in zip(names, grads(y, leaves, 1), grads(y_ref, leaves, 1), strict=True):
        assert_close(got, want, f"d{name}")


def test_block_sparse_attention_backward_is_the_registered_ops():
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 40, 16, generator=gen).requires_grad_() for _ in range(3))
    mask = torch.rand(1, 2, 3, 3, generator=gen) < 0.7
    layout = BlockLayout.from_dense(mask | torch.eye(3, dtype=torch.bool), 16)
    lens = torch.tensor([33], dtype=torch.int32)
    out = block_sparse_attention(q, k, v, layout, seq_lens=lens)
    assert custom_nodes(out) == {"GeneratedBackwardFor_longexposure_block_sparse_attn_fwd_default"}
    ref = reference_attention(q, k, v, layout, seq_lens=lens)
    assert_close(out, ref, "o")
    for name, got, want in zip("qkv", grads(out, [q, k, v], 3), grads(ref, [q, k, v], 3), strict=True):
        assert_close(got, want, f"d{name}")


def test_block_sparse_attention_takes_the_transposed_views_transformers_hands_it():
    """transformers passes q, k, v as (B, H, S, D) views of (B, S, H, D) projections and takes the output back
    to (B, S, H, D), so dO arrives as a transposed view too: the backward hands the kernels that view (they take
    strides), with the gradients of the reference, and copies nothing."""
    from longexposure.kernels import block_sparse_attention as kernels

    gen = torch.Generator().manual_seed(4)
    leaves = [torch.randn(2, 40, 3, 16, generator=gen).requires_grad_() for _ in range(3)]  # (B, S, H, D)
    q, k, v = (t.transpose(1, 2) for t in leaves)
    layout = BlockLayout.from_dense(torch.tril(torch.ones(3, 3, dtype=torch.bool)).expand(2, 3, 3, 3), 16)
    seen, launch = [], kernels.block_sparse_attention_bwd

    def record(do, *args, **kwargs):
        seen.append((do.is_contiguous(), do.stride()))
        return launch(do, *args, **kwargs)

    with mock.patch.object(kernels, "block_sparse_attention_bwd", record):
        out = block_sparse_attention(q, k, v, layout).transpose(1, 2).contiguous()
        got = grads(out, leaves, 5)
    ref = reference_attention(q, k, v, layout).transpose(1, 2).contiguous()
    assert_close(out, ref, "o")
    for name, g, w in zip("qkv", got, grads(ref, leaves, 5), strict=True):
        assert_close(g, w, f"d{name}")
    assert seen and not seen[0][0], f"dO was copied to (B, H, S, D) before the kernels: {seen}"


def compiled_kernels() -> dict[str, dict[str, int]]:
    """Per op: how often each Triton kernel appears in AOTAutograd's joint forward+backward graph; with the
    descriptor switches on (a Hopper GPU assumed), counted by the kernels' USE_TMA constant."""
    from longexposure.kernels import descriptors
    from torch._functorch.aot_autograd import aot_function
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    from torch._subclasses.fake_tensor import FakeTensorMode

    class Joint(Exception):  # the partitioner needs a Triton driver: stop at the joint graph
        pass

    def joint_graph(fn, inputs, tag=lambda args: ""):
        graphs = []

        def partition(joint, *args, **kwargs):
            graphs.append(joint)
            raise Joint

        compiled = aot_function(fn, fw_compiler=lambda gm, _: gm, partition_fn=partition)
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake = [mode.from_tensor(t).requires_grad_(t.is_floating_point()) for t in inputs]
            with contextlib.suppress(Joint):
                compiled(*fake)
        counts = collections.Counter()
        for node in graphs[0].graph.nodes:
            if "triton_kernel_wrapper" in str(node.target):
                kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
                while hasattr(kernel, "fn"):  # autotuner and heuristics wrappers
                    kernel = kernel.fn
                constants = kernel_side_table.get_constant_args(node.kwargs["constant_args_idx"])
                args = {**node.kwargs["kwargs"], **constants}
                counts[kernel.__name__ + tag(args)] += 1
        return dict(counts)

    r = lambda *s: torch.randn(*s)
    d, ffn = 64, 128

    def mlp(x, w1, b1, w2, b2, a1, lb1, a2, lb2, ids, n):
        return neuron_block_mlp(x, ids, w1, b1, w2, b2, block_size=32, n_active=n, check_indices=False,
                                fc1_lora=LowRank(a1, lb1, 2.0), fc2_lora=LowRank(a2, lb2, 0.5))

    layout = BlockLayout.from_dense(torch.tril(torch.ones(4, 4, dtype=torch.bool)), 16)

    def attention(q, k, v, kc, ki, qc, qi):
        return block_sparse_attention(q, k, v, BlockLayout(16, kc, ki, qc, qi, check=False))

    attention_inputs = [r(1, 2, 64, 32), r(1, 2, 64, 32), r(1, 2, 64, 32), layout.kv_counts, layout.kv_indices,
                        layout.q_counts, layout.q_indices]
    with mock.patch.dict(os.environ, {"LONGEXPOSURE_BSA_DQ": "atomic"}):
        atomic = joint_graph(attention, attention_inputs)
    # fc2's weight neuron-major, as the backends hold it (`neuron_major_`), so its products are descriptor-legal
    mlp_inputs = [r(24, d), r(ffn, d), r(ffn), neuron_major(r(d, ffn)), r(d), r(4, d), r(ffn, 4), r(5, ffn), r(d, 5),
                  torch.arange(4, dtype=torch.int32), torch.tensor([3], dtype=torch.int32)]
    tma = lambda args: f" tma={int(args['USE_TMA'])}" if "USE_TMA" in args else ""
    # a Hopper GPU where `hopper` says so (descriptors bring the persistent schedule by default); the fake CPU
    # tensors' SM count is `_programs`' stand-in for a device off CUDA
    hopper = mock.patch.object(descriptors, "has_tma", lambda _: True)
    with mock.patch.dict(os.environ, {"LONGEXPOSURE_TMA": "1"}), hopper:
        mlp_tma = joint_graph(mlp, mlp_inputs, tma)
    with mock.patch.dict(os.environ, {"LONGEXPOSURE_BSA_TMA": "1"}), hopper:
        attention_tma = joint_graph(attention, attention_inputs, tma)
    with mock.patch.dict(os.environ, {"LONGEXPOSURE_BSA_PAIR": "1"}):
        attention_pair = joint_graph(attention, attention_inputs, lambda args: f" pair={args.get('PAIR', '-')}")
    persistent = lambda args: " persistent" if args.get("PERSISTENT") else ""
    with mock.patch.dict(os.environ, {"LONGEXPOSURE_PERSISTENT": "1"}):
        mlp_persistent = joint_graph(mlp, mlp_inputs, persistent)
        with mock.patch.dict(os.environ, {"LONGEXPOSURE_TMA": "1"}), hopper:
            mlp_persistent_tma = joint_graph(mlp, mlp_inputs, persistent)
    with mock.patch.dict(os.environ), hopper:
        for switch in ("LONGEXPOSURE_TMA", "LONGEXPOSURE_PERSISTENT"):  # unset: the defaults on a Hopper GPU
            os.environ.pop(switch, None)
        mlp_hopper = joint_graph(mlp, mlp_inputs, lambda args: tma(args) + persistent(args))
    return {
        "mlp, defaults on Hopper": mlp_hopper,
        "mlp": joint_graph(mlp, mlp_inputs),
        "mlp, LONGEXPOSURE_TMA=1": mlp_tma,
        "mlp, LONGEXPOSURE_PERSISTENT=1": mlp_persistent,
        "mlp, LONGEXPOSURE_PERSISTENT=1 LONGEXPOSURE_TMA=1": mlp_persistent_tma,
        "attention": joint_graph(attention, attention_inputs),
        "attention, atomic dQ": atomic,
        "attention, LONGEXPOSURE_BSA_TMA=1": attention_tma,
        "attention, LONGEXPOSURE_BSA_PAIR=1": attention_pair,
    }


def test_compiled_graph_holds_every_kernel_of_both_directions():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    child = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stderr[-4000:]
    assert json.loads(child.stdout.splitlines()[-1]) == {
        # forward: fc1 (sdd), fc2 (dsd); backward: dZ (sdd, db1 summed in its epilogue), dx (dsd), dW1, dB1, dW2, dA2
        # (wgrad); the column-sum kernel only where deterministic algorithms are asked for
        "mlp": {"_sdd_kernel": 2, "_dsd_kernel": 2, "_wgrad_kernel": 4},
        # on Hopper, with no switch set: sdd and dsd through descriptors and persistent, wgrad with pointer loads
        "mlp, defaults on Hopper": {"_sdd_kernel tma=1 persistent": 2, "_dsd_kernel tma=1 persistent": 2,
                                    "_wgrad_kernel tma=0": 4},
        # traced launches read through descriptors too, where the operands allow: not dA2's, whose right operand
        # (tokens, rank 5) fp32 has 20-byte rows
        # LONGEXPOSURE_PERSISTENT=1 reaches traced launches: sdd persistent, dsd too where it reads through
        # descriptors (its pointer loop ran 11.6x slower persistent on the H100), wgrad as it was
        "mlp, LONGEXPOSURE_PERSISTENT=1": {"_sdd_kernel persistent": 2, "_dsd_kernel": 2, "_wgrad_kernel": 4},
        "mlp, LONGEXPOSURE_PERSISTENT=1 LONGEXPOSURE_TMA=1": {"_sdd_kernel persistent": 2, "_dsd_kernel persistent": 2,
                                                              "_wgrad_kernel": 4},
        "mlp, LONGEXPOSURE_TMA=1": {"_sdd_kernel tma=1": 2, "_dsd_kernel tma=1": 2, "_wgrad_kernel tma=1": 3,
                                    "_wgrad_kernel tma=0": 1},
        # the dQ pass writes delta for dK/dV: no delta launch
        "attention": {"_bsa_fwd_kernel": 1, "_bsa_bwd_dkdv_kernel": 1, "_bsa_bwd_dq_kernel": 1},
        # LONGEXPOSURE_BSA_DQ=atomic: the dK/dV kernel adds dQ, no dQ pass (its accumulator reset for autotuning)
        "attention, atomic dQ": {"_bsa_fwd_kernel": 1, "_bsa_bwd_delta_kernel": 1, "_bsa_bwd_dkdv_kernel": 1},
        # the three kernels that stream blocks read them through descriptors when traced too
        "attention, LONGEXPOSURE_BSA_TMA=1": {"_bsa_fwd_kernel tma=1": 1, "_bsa_bwd_dkdv_kernel tma=1": 1,
                                              "_bsa_bwd_dq_kernel tma=1": 1},
        # pairs reach traced launches: the forward and the dQ pass take two query blocks per program, dK/dV two keys'
        "attention, LONGEXPOSURE_BSA_PAIR=1": {"_bsa_fwd_kernel pair=2": 1, "_bsa_bwd_dkdv_kernel pair=2": 1,
                                               "_bsa_bwd_dq_kernel pair=2": 1},
    }


if __name__ == "__main__":  # the child of the test above, without TRITON_INTERPRET
    print(json.dumps(compiled_kernels()))
