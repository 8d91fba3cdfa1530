"""Sylva: hierarchical K-FAC factors, online update, recursive inversion, importance, mask, embedded layer."""

import math
import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from numerics import assert_close

from longexposure.methods.builtin import apply_method, apply_method_reporting
from longexposure.methods.sylva import SylvaConfig, collect_block_masks, unload_
from longexposure.methods.sylva_importance import (
    block_importance,
    importance_scores,
    keep_count,
    top_block_mask,
    weight_importance,
)
from longexposure.methods.sylva_kfac import ExactFactor, HierarchicalFactor, brand_update
from longexposure.methods.sylva_layer import SylvaAdamW, SylvaLinear, sylva_layers
from longexposure.models import build_model
from longexposure.ops.block_sddmm import block_mask_to_dense


def correlated_data(n: int, dim: int, gen: torch.Generator) -> torch.Tensor:
    """Samples whose covariance decays away from the diagonal (nearby neurons correlate), as in LLMs."""
    idx = torch.arange(dim, dtype=torch.float64)
    cov = torch.exp(-(idx[:, None] - idx[None, :]).abs() / 4.0)
    return torch.randn(n, dim, generator=gen, dtype=torch.float64) @ torch.linalg.cholesky(cov).t()


@given(dim=st.integers(8, 48), levels=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_hierarchical_error_shrinks_with_rank_and_is_exact_at_full_rank(dim, levels, seed):
    gen = torch.Generator().manual_seed(seed)
    z = correlated_data(3 * dim, dim, gen).float()
    exact = ExactFactor(dim)
    exact.update_(z)
    errors = []
    for r in (1, 2, 4, 8, dim):
        h = HierarchicalFactor(dim, rank=r, levels=levels)
        h.update_(z)  # one update from an empty basis: the exact truncated SVD of every block
        errors.append(float((h.dense() - exact.dense()).norm() / exact.dense().norm()))
    assert all(b <= a + 1e-5 for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < 1e-5, errors


@given(
    dim=st.integers(8, 40),
    rank=st.integers(1, 12),
    chunks=st.lists(st.integers(1, 4), min_size=1, max_size=5),
    seed=st.integers(0, 2**16),
)
def test_online_update_equals_batch_svd_of_the_same_data(dim, rank, chunks, seed):
    """Streaming the data in chunks gives the SVD of the whole block when its rank fits (no truncation)."""
    gen = torch.Generator().manual_seed(seed)
    total = sum(chunks)
    z = torch.randn(total, dim, generator=gen, dtype=torch.float64)
    h = HierarchicalFactor(dim, rank=max(rank, total), levels=2, dtype=torch.float64)  # nothing truncated
    for part in z.split(chunks):
        h.update_(part)
    full = z.t() @ z
    assert_close(h.dense() * h.count, full, "online factor vs batch")
    half = h.padded // 2
    b12 = torch.nn.functional.pad(full, (0, h.padded - dim, 0, h.padded - dim))[:half, half:]
    sv = torch.linalg.svdvals(b12)
    k = h.S[0].shape[-1]
    assert_close(h.S[0][0], sv[:k], "singular values")


@given(h=st.integers(6, 24), c=st.integers(1, 6), rank=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_truncated_online_update_stays_near_the_batch_truncated_svd(h, c, rank, seed):
    """With truncation between chunks (a rank-r signal plus small noise), the online factors stay close to
    the best rank-r approximation (Eckart-Young) of the whole block."""
    gen = torch.Generator().manual_seed(seed)
    n = 8 * c
    us = torch.linalg.qr(torch.randn(h, rank, generator=gen, dtype=torch.float64))[0]
    vs = torch.linalg.qr(torch.randn(h, rank, generator=gen, dtype=torch.float64))[0]
    noise = lambda: 1e-4 * torch.randn(1, h, n, generator=gen, dtype=torch.float64)  # noqa: E731
    P = (us @ torch.randn(rank, n, generator=gen, dtype=torch.float64))[None] + noise()
    Q = (vs @ torch.randn(rank, n, generator=gen, dtype=torch.float64))[None] + noise()
    U = torch.zeros(1, h, 0, dtype=torch.float64)
    S = torch.zeros(1, 0, dtype=torch.float64)
    V = torch.zeros(1, h, 0, dtype=torch.float64)
    for p, q in zip(P.split(c, dim=2), Q.split(c, dim=2), strict=True):
        U, S, V = brand_update(U, S, V, p, q, rank)
    block = (P @ Q.transpose(1, 2))[0]
    best = torch.linalg.svdvals(block)
    best_err = float(best[rank:].square().sum().sqrt())
    err = float(((U[0] * S[0]) @ V[0].t() - block).norm())
    # greedy truncation discards signal x noise cross terms: within 1% of the block's norm of the optimum
    assert err <= 3 * best_err + 1e-2 * float(best[0]), (err, best_err)
    torch.testing.assert_close(S[0], best[:rank], rtol=1e-2, atol=1e-2 * float(best[0]))


@given(dim=st.integers(4, 40), rank=st.integers(1, 6), levels=st.integers(0, 3), seed=st.integers(0, 2**16))
def test_recursive_inverse_and_matmul_equal_dense(dim, rank, levels, seed):
    gen = torch.Generator().manual_seed(seed)
    h = HierarchicalFactor(dim, rank=rank, levels=levels, dtype=torch.float64)
    h.update_(correlated_data(2 * dim, dim, gen))
    dense = h.dense()
    x = torch.randn(dim, 3, generator=gen, dtype=torch.float64)
    assert_close(h.matmul(x), dense @ x, "hierarchical matmul")
    lam = 0.05 * dense.diagonal().mean()
    inv = torch.linalg.inv(dense + lam * torch.eye(dim, dtype=torch.float64))
    hinv = h.inverse(0.05)
    assert_close(hinv.diagonal(), inv.diagonal(), "diag of recursive inverse")
    assert_close(hinv.matmul(x), inv @ x, "recursive inverse apply")


def brute_force_importance(grad, A, G, damping):
    """Eqs. 19-20 one dimension at a time with dense factors and an explicit inverse."""
    out_f, in_f = grad.shape
    inv = lambda F: torch.linalg.inv(F + damping * F.diagonal().mean() * torch.eye(F.shape[0], dtype=F.dtype))  # noqa: E731
    a_inv, g_inv = inv(A), inv(G)
    s_in = torch.stack([grad[:, j] @ G @ grad[:, j] / a_inv[j, j] for j in range(in_f)])
    s_out = torch.stack([grad[k, :] @ A @ grad[k, :] / g_inv[k, k] for k in range(out_f)])
    omega = torch.zeros(out_f, in_f, dtype=grad.dtype)
    for k in range(out_f):
        for j in range(in_f):
            omega[k, j] = s_out[k] * s_in[j]
    return s_in, s_out, omega


@pytest.mark.parametrize("kind", ["exact", "hierarchical"])
@given(out_f=st.integers(3, 20), in_f=st.integers(3, 20), block=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_importance_equals_brute_force_eqs_19_20(kind, out_f, in_f, block, seed):
    gen = torch.Generator().manual_seed(seed)
    x = correlated_data(30, in_f, gen)
    dy = correlated_data(30, out_f, gen)
    grad = dy.t() @ x / 30
    make = (
        (lambda d: ExactFactor(d, dtype=torch.float64))
        if kind == "exact"
        else (lambda d: HierarchicalFactor(d, rank=2, levels=2, dtype=torch.float64))
    )
    A, G = make(in_f), make(out_f)
    A.update_(x)
    G.update_(dy)
    s_in, s_out = importance_scores(grad, A, G, 0.05)
    b_in, b_out, omega = brute_force_importance(grad, A.dense(), G.dense(), 0.05)
    close = lambda a, b, what: torch.testing.assert_close(a.double(), b, rtol=1e-6, atol=1e-9, msg=what)  # noqa: E731
    close(s_in, b_in, "input importance (eq. 19)")
    close(s_out, b_out, "output importance (eq. 20)")
    close(weight_importance(s_in, s_out), omega, "outer product")
    nbr, nbc = math.ceil(out_f / block), math.ceil(in_f / block)
    padded = torch.zeros(nbr * block, nbc * block, dtype=torch.float64)
    padded[:out_f, :in_f] = omega
    brute_blocks = padded.view(nbr, block, nbc, block).sum((1, 3))
    close(block_importance(s_in, s_out, block), brute_blocks, "block importance")
    mask = top_block_mask(brute_blocks, 0.7)
    assert int(mask.sum()) == keep_count(nbr * nbc, 0.7)
    assert brute_blocks[mask].min() >= brute_blocks[~mask].max() if (~mask).any() else True


SYLVA_OPTS = dict(
    block=16, sparsity=0.8, rank=4, levels=2, preprocess_batches=2, preprocess_batch=2, preprocess_seq_len=16
)


@pytest.mark.parametrize("arch", ["opt-tiny", "gpt2-tiny", "llama-tiny"])
@pytest.mark.parametrize("method", ["sylva", "kfac-pruner"])
def test_trainable_parameters_are_exactly_the_compact_blocks(arch, method):
    model, info = apply_method_reporting(build_model(arch), method, **SYLVA_OPTS)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(re.fullmatch(r".*\.values", n) for n in names)
    assert len(names) == len(sylva_layers(model)) > 0
    ids = torch.randint(0, 1000, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == names
    assert info["mask_source"] == ("hierarchical" if method == "sylva" else "exact") and info["factor_bytes"] > 0


@pytest.mark.parametrize("optimizer", ["fused", "torch-adamw"])
@pytest.mark.parametrize("method", ["sylva", "kfac-pruner"])
def test_frozen_entries_never_change_after_optimizer_steps(optimizer, method):
    model = apply_method(build_model("llama-tiny"), method, **SYLVA_OPTS)
    layers = sylva_layers(model)
    before = [m.weight.detach().clone() for m in layers]
    if method == "kfac-pruner":
        for m, w in zip(layers, before, strict=True):
            assert (w[~m.trainable_mask()] == 0).all(), "the K-FAC pruner must prune outside its mask"
    opt = (
        SylvaAdamW(layers, lr=1e-2)
        if optimizer == "fused"
        else torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    )
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        ids = torch.randint(0, 1000, (2, 12), generator=gen)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model(input_ids=ids)  # a generic optimizer's values reach W at the next forward
    changed = 0
    for m, w in zip(layers, before, strict=True):
        frozen = ~m.trainable_mask()
        assert torch.equal(m.weight[frozen], w[frozen]), "a frozen entry changed"
        inside = block_mask_to_dense(m.block_mask(), tuple(w.shape), m.block)
        from longexposure.ops.block_sddmm import blocks_to_dense

        dense_vals = blocks_to_dense(m.values.detach(), m.block_rows, m.block_cols, tuple(w.shape), m.block)
        assert torch.equal(m.weight[inside], dense_vals[inside].to(m.weight.dtype)), "W and values disagree"
        changed += int((m.weight != w).sum())
    assert changed > 0


def test_fused_and_reference_optimizer_agree_and_unload_keeps_the_function():
    torch.manual_seed(0)
    w = torch.randn(40, 56)
    mask = torch.rand(3, 4) < 0.5
    mask[0, 0] = True
    runs = []
    for backend in ("triton", "torch"):
        layer = SylvaLinear(w.clone(), torch.zeros(40), mask, 16, backend=backend)
        opt = SylvaAdamW([layer], lr=1e-2, weight_decay=0.1, backend=backend)
        x = torch.randn(3, 7, 56, generator=torch.Generator().manual_seed(1))
        for _ in range(2):
            layer(x).square().sum().backward()
            opt.step()
            opt.zero_grad()
        assert layer.backend_ran == backend and opt.backend_ran == backend
        runs.append(layer)
    assert_close(runs[0].weight, runs[1].weight, "fused vs reference optimizer")
    model = torch.nn.Sequential(runs[0])
    y = model(x)
    unload_(model)
    assert isinstance(model[0], torch.nn.Linear)
    assert_close(model(x), y, "unloaded layer")


def test_collect_block_masks_keeps_the_requested_fraction():
    model = build_model("opt-tiny")
    from longexposure.data import load_batches

    batches = load_batches("synthetic", batch=2, seq_len=16, vocab_size=model.config.vocab_size)
    config = SylvaConfig(sparsity=0.75, block=16, rank=4, levels=2, preprocess_batches=2)
    masks, report = collect_block_masks(model, iter(batches), config)
    for mask in masks.values():
        assert int(mask.sum()) == keep_count(mask.numel(), 0.75)
    assert not any(p.grad is not None for p in model.parameters())
    assert report["factor_bytes"] > 0


def test_bad_options_are_errors():
    with pytest.raises(ValueError, match="mask must be one of"):
        apply_method(build_model("opt-tiny"), "sylva", mask="magic")
    with pytest.raises(TypeError, match=r"'kfac-pruner': unknown option 'sparsty'\. Did you mean 'sparsity'\? Valid "):
        apply_method(build_model("opt-tiny"), "kfac-pruner", sparsty=0.9)
    with pytest.raises(ValueError, match="mask shape"):
        SylvaLinear(torch.zeros(32, 32), None, torch.ones(3, 2, dtype=torch.bool), 16)
    with pytest.raises(ValueError, match="unknown Sylva backend"):
        SylvaLinear(torch.zeros(32, 32), None, torch.ones(2, 2, dtype=torch.bool), 16, backend="cuda")
