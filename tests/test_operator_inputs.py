"""Inputs the operators used to accept and then get wrong, silently (issue 16, item 7).

- neuron-block MLP: strided bias views and strided ids give the reference's output; a NaN token gives a
  NaN row (it was fc2's bias); a list of ids or an int count is a TypeError naming the argument.
- block-sparse attention: a NaN query gives NaN in the rows dense sdpa makes NaN (they were zeros); a
  malformed layout (index past the last key block, a repeated index, a count past the grid) is a
  ValueError where it is built, for every backend; an unchecked one (device tensors) never crashes the
  process; the op itself reads nothing back from the device.
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import textwrap
import traceback

import pytest
import torch
import torch.nn.functional as F
from numerics import assert_close
from torch.utils._python_dispatch import TorchDispatchMode

from longexposure.attention.layout import BlockLayout, LayoutError
from longexposure.attention.pattern_pool import PatternPool
from longexposure.attention_backends import attention
from longexposure.ops.block_sparse_attention import block_sparse_attention, reference_attention
from longexposure.ops.neuron_block_mlp import neuron_block_mlp, neuron_block_mlp_reference
from longexposure.registry import MLP_BACKENDS

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BLOCK = 16


# ------------------------------------------------------------------------------------- neuron-block MLP


def _mlp(seed=0, tokens=12, d_model=32, num_blocks=4):
    gen = torch.Generator().manual_seed(seed)
    ffn = num_blocks * BLOCK
    x = torch.randn(tokens, d_model, generator=gen)
    w1 = torch.randn(ffn, d_model, generator=gen) / d_model**0.5
    w2 = torch.randn(d_model, ffn, generator=gen) / ffn**0.5
    b1 = torch.randn(2 * ffn, generator=gen)
    b2 = torch.randn(2 * d_model, generator=gen)
    x, w1, b1, w2, b2 = (t.to(DEVICE) for t in (x, w1, b1, w2, b2))
    return x, w1, b1[::2], w2, b2[::2]  # biases: every other element (stride 2), as a fused parameter's slice


def test_mlp_strided_bias_views_match_reference():
    x, w1, b1, w2, b2 = _mlp()
    b1.requires_grad_(True)
    b2.requires_grad_(True)
    assert b1.stride(0) == 2 and b2.stride(0) == 2
    ids = torch.tensor([0, 2, 3], dtype=torch.int32, device=DEVICE)
    y = neuron_block_mlp(x, ids, w1, b1, w2, b2, block_size=BLOCK)
    ref = neuron_block_mlp_reference(x, ids, w1, b1.contiguous(), w2, b2.contiguous(), block_size=BLOCK)
    assert_close(y, ref, "y")
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, (b1, b2), dy)
    want = torch.autograd.grad(neuron_block_mlp_reference(x, ids, w1, b1, w2, b2, block_size=BLOCK), (b1, b2), dy)
    for name, g, r in zip(("fc1_bias", "fc2_bias"), got, want, strict=True):
        assert_close(g, r, f"grad {name}")


@pytest.mark.parametrize("with_count", [False, True])
def test_mlp_strided_ids_match_reference(with_count):
    x, w1, b1, w2, b2 = _mlp(seed=1)
    b1, b2 = b1.contiguous(), b2.contiguous()
    ids = torch.tensor([1, 99, 2, 99, 3, 99], dtype=torch.int32, device=DEVICE)[::2]  # [1, 2, 3], stride 2
    n_active = torch.tensor([2], dtype=torch.int32, device=DEVICE) if with_count else None
    y = neuron_block_mlp(x, ids, w1, b1, w2, b2, block_size=BLOCK, n_active=n_active)
    ref = neuron_block_mlp_reference(x, ids.contiguous(), w1, b1, w2, b2, block_size=BLOCK, n_active=n_active)
    assert_close(y, ref, "y")


def test_mlp_nan_token_gives_the_references_nan_rows():
    x, w1, b1, w2, b2 = _mlp(seed=2)
    x[5, 3] = float("nan")
    ids = torch.tensor([0, 1, 3], dtype=torch.int32, device=DEVICE)
    args = (x, ids, w1, b1.contiguous(), w2, b2.contiguous())
    y = neuron_block_mlp(*args, block_size=BLOCK)
    ref = neuron_block_mlp_reference(*args, block_size=BLOCK)
    dense = F.linear(torch.relu(F.linear(x, w1, args[3])), w2, args[5])
    assert ref.isnan().any(-1).tolist() == dense.isnan().any(-1).tolist() == [i == 5 for i in range(x.shape[0])]
    assert torch.equal(y.isnan(), ref.isnan())
    keep = ~ref.isnan().any(-1)
    assert_close(y[keep], ref[keep], "finite rows")


@pytest.mark.parametrize("backend", ["op", "reference", "triton", "torch-gather"])
def test_mlp_active_set_of_the_wrong_type_names_the_argument(backend):
    x, w1, b1, w2, b2 = _mlp()
    ids = torch.tensor([0, 1], dtype=torch.int32, device=DEVICE)
    if backend in ("op", "reference"):
        fn = neuron_block_mlp if backend == "op" else neuron_block_mlp_reference

        def call(i, n):
            return fn(x, i, w1, b1, w2, b2, block_size=BLOCK, n_active=n)
    else:
        mlp = MLP_BACKENDS.get(backend)(block_size=BLOCK).prepare(w1, b1, w2, b2)

        def call(i, n):
            return mlp(x, i, n)

    with pytest.raises(TypeError, match=r"^n_active: expected a \(1,\) int32 torch.Tensor .*got int"):
        call(ids, 2)
    with pytest.raises(TypeError, match=r"^active_block_ids: expected a 1-D int32 torch.Tensor .*got list"):
        call([0, 1], None)


# ------------------------------------------------------------------------------------ attention


def _qkv(seed=0, batch=1, heads=2, seq=64, dim=16):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, seq, dim, generator=gen).to(DEVICE) for _ in range(3)]


def _causal_layout(n=4, device=DEVICE):
    return BlockLayout.from_dense(torch.tril(torch.ones(1, 1, n, n, dtype=torch.bool, device=device)), BLOCK)


def _nan_rows(t):
    return t.isnan().any(-1)


@pytest.mark.parametrize("sparse", [False, True])
def test_attention_nan_query_gives_sdpas_nan_rows(sparse):
    q, k, v = _qkv()
    q[0, 1, 37, 3] = float("nan")
    if sparse:  # query block 2 lists key blocks 0 and 2 only
        m = torch.tril(torch.ones(4, 4, dtype=torch.bool))
        m[2, 1] = False
        layout = BlockLayout.from_dense(m.to(DEVICE), BLOCK)
        dense = F.scaled_dot_product_attention(q, k, v, attn_mask=layout.token_mask(64, causal=True))
    else:
        layout = _causal_layout()
        dense = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    want = _nan_rows(dense)
    assert want.sum() == 1 and bool(want[0, 1, 37])
    for name, out in (
        ("triton", block_sparse_attention(q, k, v, layout)),
        ("reference", reference_attention(q, k, v, layout)),
    ):
        assert torch.equal(_nan_rows(out), want), name
        assert_close(out[~want], dense[~want], f"{name}: finite rows")


def _malformed(case: str):
    """(kv_counts, kv_indices, q_counts, q_indices) of a causal 4x4 layout on the CPU, broken as `case` says
    ("none": intact)."""
    lay = _causal_layout(device="cpu")
    kc, ki, qc, qi = (t.clone() for t in (lay.kv_counts, lay.kv_indices, lay.q_counts, lay.q_indices))
    if case == "index-past-last-block":
        ki[0, 0, 2, 2] = 4
    elif case == "repeated-index":
        ki[0, 0, 3] = torch.tensor([0, 1, 1, 3], dtype=torch.int32)
    elif case == "repeated-index-in-transpose":  # the backward's table: it gave wrong dK/dV
        qi[0, 0, 0] = torch.tensor([0, 1, 1, 3], dtype=torch.int32)
    elif case == "count-past-grid":
        kc[0, 0, 3] = 9
    return kc, ki, qc, qi


CASES = ["index-past-last-block", "repeated-index", "repeated-index-in-transpose", "count-past-grid"]
MESSAGES = {
    "index-past-last-block": r"kv_indices\[0, 0, 2, 2\] = 4 is outside \[0, 4\)",
    "repeated-index": r"kv_indices\[0, 0, 3, :\] is not strictly increasing",
    "repeated-index-in-transpose": r"q_indices\[0, 0, 0, :\] is not strictly increasing",
    "count-past-grid": r"kv_counts\[0, 0, 3\] = 9 is outside \[0, 4\]",
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", ["triton", "eager", "sdpa", "flex"])
def test_malformed_layout_is_a_value_error_for_every_backend(case, backend):
    q, k, v = _qkv()
    tables = _malformed(case)
    with pytest.raises(ValueError, match=MESSAGES[case]):  # built on the host: checked there
        attention(q, k, v, BlockLayout(BLOCK, *tables).to(DEVICE), backend=backend)
    with pytest.raises(LayoutError, match=MESSAGES[case]):  # on the device, when asked
        attention(q, k, v, BlockLayout(BLOCK, *(t.to(DEVICE) for t in tables), check=True), backend=backend)


def test_builders_check_once_and_vouch_for_their_layouts():
    pool = PatternPool(4, BLOCK, ["local-2", "global-1"])
    combined = pool.combine(pool.selection([["local-2"], ["local-2", "global-1"]]))
    assert combined.checked and combined.with_transpose().checked and combined.expand(1, 2).checked
    assert _causal_layout().checked and _causal_layout().narrow(1, 1).to("cpu").checked
    assert BlockLayout(BLOCK, *_malformed("none"), check=False).checked  # the caller vouches
    with pytest.raises(LayoutError, match="strictly increasing"):  # a pool validates its atoms' tables
        BlockLayout(BLOCK, *_malformed("repeated-index"), check=False).validate()


def test_layout_argument_of_the_wrong_type_names_it():
    q, k, v = _qkv()
    lay = _causal_layout()
    with pytest.raises(TypeError, match="^layout: expected a BlockLayout"):
        block_sparse_attention(q, k, v, (lay.kv_counts, lay.kv_indices))
    with pytest.raises(TypeError, match="^layout: expected a BlockLayout"):
        attention(q, k, v, lay.to_dense(), backend="eager")


def test_unchecked_malformed_layout_never_crashes():
    """A layout nobody checked (check=False here; device tensors by default) gives wrong numbers at worst.

    A count past the grid used to read past the table (a segfault, so this runs in a subprocess) and an
    index past the last key block read past k and v (non-finite output)."""
    script = textwrap.dedent(f"""
        import torch
        from longexposure.attention.layout import BlockLayout
        from longexposure.ops.block_sparse_attention import block_sparse_attention

        dev = torch.device("{DEVICE.type}")
        full = torch.tril(torch.ones(1, 1, 4, 4, dtype=torch.bool))
        lay = BlockLayout.from_dense(full, 16)
        kc, ki, qc, qi = (t.clone() for t in (lay.kv_counts, lay.kv_indices, lay.q_counts, lay.q_indices))
        kc[0, 0, 3] = 1000
        qc[0, 0, 0] = 1000
        ki[0, 0, 1, 1] = 1 << 20
        qi[0, 0, 2, 0] = -(1 << 20)
        bad = BlockLayout(16, *(t.to(dev) for t in (kc, ki, qc, qi)), check=False)
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 2, 64, 16, generator=gen).to(dev).requires_grad_() for _ in range(3))
        out = block_sparse_attention(q, k, v, bad)
        out.sum().backward()
        assert all(bool(t.isfinite().all()) for t in (out, q.grad, k.grad, v.grad))
        print("ok")
    """)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0 and done.stdout.strip() == "ok", (done.returncode, done.stderr[-2000:])


class _HostReads(TorchDispatchMode):
    """Records the ops that need a tensor's value on the host (a sync on a GPU)."""

    OPS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.is_nonzero.default",
           "aten.equal.default", "aten.lift_fresh.default"}

    def __init__(self):
        super().__init__()
        self.seen = collections.Counter()
        self.stacks = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) in self.OPS:
            stack = traceback.extract_stack()
            self.stacks.append(stack)
            where = [f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}" for f in stack if "torch/" not in f.filename]
            self.seen[f"{func} at {' <- '.join(where[-3:])}"] += 1
        return func(*args, **(kwargs or {}))


def test_attention_op_reads_nothing_back_with_a_built_layout():
    """The checks live where layouts are built: a step with a built (pool) layout asks the host nothing."""
    q, k, v = (t.requires_grad_() for t in _qkv())
    pool = PatternPool(4, BLOCK, ["local-2", "global-1"], device=DEVICE)
    layout = pool.combine(pool.selection([["local-2"], ["local-2", "global-1"]]))
    probe = _HostReads()
    with probe:
        out = block_sparse_attention(q, k, v, layout)
        out.sum().backward()
    assert probe.seen == {}


def test_host_layouts_are_read_only_by_the_construction_check():
    """A raw host layout built per step (predicted sparsity on the CPU) is read under `check_inputs`, the
    name tests/test_no_host_sync.py accepts for CPU-only checks; device layouts are not read (below)."""
    tables = _malformed("none")
    probe = _HostReads()
    with probe:
        lay = BlockLayout(BLOCK, *tables)
    assert lay.checked
    assert probe.seen and all(any(f.name == "check_inputs" for f in stack) for stack in probe.stacks)


def test_device_layouts_are_not_read_back_by_default():
    """'meta' tensors stand in for device ones (they have no values to read): construction reads none."""
    lay = BlockLayout(BLOCK, *(t.to("meta") for t in _malformed("count-past-grid")))
    assert not lay.checked and not lay.expand(2, 2).checked and not lay.narrow(1, 1).checked
