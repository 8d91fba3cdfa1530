"""Block SDDMM and the fused scatter-add update (Triton, interpreted on CPU) against the torch reference."""

import math

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from longexposure.kernels.block_sddmm import (
    EmbeddedSparseLinearFunction,
    block_sddmm,
    block_update_,
    make_block_update_plan,
)
from numerics import assert_close, assert_close_to_reference

from longexposure.ops.block_sddmm import (
    block_adamw_reference,
    block_mask_to_dense,
    block_sddmm_reference,
    dense_to_blocks,
)


def random_blocks(shape, block, density, gen):
    nbr, nbc = math.ceil(shape[0] / block), math.ceil(shape[1] / block)
    mask = torch.rand(nbr, nbc, generator=gen) < density
    mask.view(-1)[int(torch.randint(0, nbr * nbc, (1,), generator=gen))] = True  # at least one block
    rows, cols = mask.nonzero(as_tuple=True)
    return mask, rows.to(torch.int32), cols.to(torch.int32)


@given(
    tokens=st.integers(1, 70),
    out_f=st.integers(16, 80),
    in_f=st.integers(16, 80),
    block=st.sampled_from([16, 32]),
    density=st.floats(0.1, 1.0),
    split=st.integers(1, 3),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
@example(tokens=97, out_f=50, in_f=70, block=16, density=0.5, split=2, dtype=torch.float32, seed=1)
def test_sddmm_matches_reference(tokens, out_f, in_f, block, density, split, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    dy = torch.randn(tokens, out_f, generator=gen).to(dtype)
    x = torch.randn(tokens, in_f, generator=gen).to(dtype)
    _, rows, cols = random_blocks((out_f, in_f), block, density, gen)
    out = block_sddmm(dy, x, rows, cols, block, split=split)
    assert out.shape == (rows.numel(), block, block) and out.dtype == dtype
    if dtype == torch.float32:
        assert_close(out, block_sddmm_reference(dy, x, rows, cols, block), "dW blocks")
    else:
        hi = block_sddmm_reference(dy.double(), x.double(), rows, cols, block)
        same = block_sddmm_reference(dy, x, rows, cols, block)
        assert_close_to_reference(out, same, hi, "dW blocks (bf16)")
    # entries past the matrix edge are exactly zero
    edge = dense_to_blocks(torch.ones(out_f, in_f, dtype=torch.bool), rows, cols, block)
    assert (out[~edge] == 0).all()


@given(
    n_layers=st.integers(1, 3),
    block=st.sampled_from([16, 32]),
    adam=st.booleans(),
    mixed=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fused_update_matches_reference_and_leaves_frozen_entries(n_layers, block, adam, mixed, seed):
    gen = torch.Generator().manual_seed(seed)
    wdt = torch.bfloat16 if mixed else torch.float32
    shapes = [
        (int(torch.randint(16, 70, (1,), generator=gen)), int(torch.randint(16, 70, (1,), generator=gen)))
        for _ in range(n_layers)
    ]
    layers = []
    for shape in shapes:
        _, rows, cols = random_blocks(shape, block, 0.4, gen)
        w = torch.randn(shape, generator=gen).to(wdt)
        vals = dense_to_blocks(w.float(), rows, cols, block)  # fp32 master copy
        edge = dense_to_blocks(torch.ones(shape, dtype=torch.bool), rows, cols, block)
        grad = torch.randn(vals.shape, generator=gen) * edge
        layers.append((w, vals, grad, rows, cols))
    plan = make_block_update_plan(shapes, [layer[3] for layer in layers], [layer[4] for layer in layers], block)
    m1, m2 = torch.zeros(plan.nnz, block, block), torch.zeros(plan.nnz, block, block)
    refs = [(w.clone(), v.clone(), torch.zeros_like(v), torch.zeros_like(v)) for w, v, *_ in layers]
    originals = [w.clone() for w, *_ in layers]
    hp = dict(lr=0.05, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, adam=adam)
    for step in (1, 2):
        block_update_(
            plan,
            [lay[0] for lay in layers],
            [lay[1] for lay in layers],
            [lay[2] for lay in layers],
            m1,
            m2,
            step=step,
            **hp,
        )
        for (wr, vr, r1, r2), (_, _, g, rows, cols) in zip(refs, layers, strict=True):
            block_adamw_reference(wr, vr, g, r1, r2, rows, cols, block, step=step, **hp)
    for (w, v, _, rows, cols), (wr, vr, _, _), w0 in zip(layers, refs, originals, strict=True):
        assert_close(v, vr, "compact values")
        assert_close(w, wr, "dense weight")
        frozen = ~block_mask_to_dense(_mask(rows, cols, w.shape, block), tuple(w.shape), block)
        assert torch.equal(w[frozen], w0[frozen]), "an entry outside the mask blocks changed"


def _mask(rows, cols, shape, block):
    m = torch.zeros(math.ceil(shape[0] / block), math.ceil(shape[1] / block), dtype=torch.bool)
    m[rows.long(), cols.long()] = True
    return m


@given(tokens=st.integers(1, 40), dim=st.integers(16, 48), seed=st.integers(0, 2**16))
def test_embedded_function_gradients(tokens, dim, seed):
    gen = torch.Generator().manual_seed(seed)
    block = 16
    w = torch.randn(dim + 3, dim, generator=gen)
    mask, rows, cols = random_blocks(tuple(w.shape), block, 0.5, gen)
    values = dense_to_blocks(w, rows, cols, block).requires_grad_()
    x = torch.randn(2, tokens, dim, generator=gen, requires_grad=True)
    dy = torch.randn(2, tokens, dim + 3, generator=gen)
    EmbeddedSparseLinearFunction.apply(x, w, values, rows, cols, block).backward(dy)
    # reference: dense math with the masked weight as the only trainable part
    wt = w.clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    (x2 @ wt.t()).backward(dy)
    elem = block_mask_to_dense(mask, tuple(w.shape), block)
    assert_close(x.grad, x2.grad, "dX")
    assert_close(values.grad, dense_to_blocks(wt.grad * elem, rows, cols, block), "d(values)")


def test_launchers_name_bad_arguments():
    x = torch.randn(8, 32)
    rows = torch.zeros(1, dtype=torch.int32)
    with pytest.raises(ValueError, match="block must be one of"):
        block_sddmm(x, x, rows, rows, 8)
    with pytest.raises(ValueError, match="rows must be a contiguous 1-D int32"):
        block_sddmm(x, x, rows.long(), rows, 16)
    with pytest.raises(ValueError, match="dy has 8 tokens but x has 4"):
        block_sddmm(x, x[:4], rows, rows, 16)
    with pytest.raises(ValueError, match="cols has 2 entries"):
        block_sddmm(x, x, rows, torch.zeros(2, dtype=torch.int32), 16)
    plan = make_block_update_plan([(32, 32)], [rows], [rows], 16)
    with pytest.raises(ValueError, match="exp_avg must be fp32"):
        block_update_(
            plan,
            [x],
            [torch.zeros(1, 16, 16)],
            [torch.zeros(1, 16, 16)],
            torch.zeros(1, 16, 16, dtype=torch.float16),
            torch.zeros(1, 16, 16),
            lr=0.1,
        )
