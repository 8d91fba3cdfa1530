"""BlockLayout metadata and the atomic-pattern pool: atoms against hand-written masks, online
combination (both implementations) against the union computed densely, precise layout errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from longexposure.attention.layout import BlockLayout, LayoutError
from longexposure.attention.pattern_pool import Atom, PatternPool

ATOMS = ("full", "diagonal", "local-1", "local-3", "global-1", "global-2", "dilated-3x2", "strided-3",
         "random-2-s0", "random-1-s7")


def _pool(n: int, names: tuple[str, ...], causal: bool = True) -> PatternPool:
    return PatternPool(n, 16, names, causal=causal)


# ----------------------------------------------------------------------------------------------- atoms


def test_atom_names_round_trip():
    for name in ATOMS:
        assert Atom.parse(name).name == name


@pytest.mark.parametrize("bad", ["local", "local-0", "dilated-2", "random-2", "Local-2", "global--1", "ring-3"])
def test_bad_atom_names_are_rejected(bad):
    with pytest.raises(ValueError, match="atom"):
        Atom.parse(bad)


def test_atoms_match_hand_written_masks():
    n = 6
    tri = torch.tril(torch.ones(n, n, dtype=torch.bool))
    i, j = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    expected = {
        "full": tri,
        "diagonal": i == j,
        "local-3": (i - j >= 0) & (i - j < 3),
        "global-2": (j < 2) & tri,
        "dilated-3x2": (i - j >= 0) & ((i - j) % 2 == 0) & (i - j < 6),
        "strided-3": (j % 3 == 2) & tri,
    }
    for name, mask in expected.items():
        assert torch.equal(Atom.parse(name).dense(n), mask), name
    rand = Atom.parse("random-2-s0").dense(n)
    assert torch.equal(rand & ~tri, torch.zeros_like(rand))
    assert rand.sum(-1).tolist() == [min(2, r + 1) for r in range(n)]
    assert torch.equal(rand, Atom.parse("random-2-s0").dense(n)), "seeded: the same every time"


def test_non_causal_atoms():
    n = 5
    i, j = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    assert torch.equal(Atom.parse("local-2").dense(n, causal=False), (i - j).abs() < 2)
    assert torch.equal(Atom.parse("global-1").dense(n, causal=False), (j < 1) | (i < 1))
    assert torch.equal(Atom.parse("full").dense(n, causal=False), torch.ones(n, n, dtype=torch.bool))


# ---------------------------------------------------------------------------------------- combination


@given(
    n=st.integers(1, 12),
    atom_ids=st.sets(st.integers(0, len(ATOMS) - 1), min_size=1, max_size=6),
    batch=st.integers(1, 2),
    heads=st.integers(1, 3),
    causal=st.booleans(),
    seed=st.integers(0, 2**16),
)
@example(n=1, atom_ids={0}, batch=1, heads=1, causal=True, seed=0)
@example(n=9, atom_ids=set(range(len(ATOMS))), batch=2, heads=3, causal=True, seed=1)
def test_combination_equals_dense_union(n, atom_ids, batch, heads, causal, seed):
    names = tuple(ATOMS[i] for i in sorted(atom_ids))
    pool = _pool(n, names, causal)
    gen = torch.Generator().manual_seed(seed)
    sel = torch.rand(batch, heads, len(names), generator=gen) < 0.5
    sel[0, 0] = False  # an empty head: no blocks at all
    if batch * heads > 1:
        sel[-1, -1] = True  # and one with every atom
    expected = pool.dense_union(sel)
    for impl in ("torch", "triton"):
        layout = pool.combine(sel, impl=impl)
        layout.validate(causal=causal, canonical=True)  # also checks q_* is kv_*'s transpose
        assert torch.equal(layout.to_dense(), expected), impl
        assert torch.equal(layout.q_counts, expected.transpose(-1, -2).sum(-1, dtype=torch.int32)), impl


def test_combination_impls_agree_tensor_for_tensor():
    pool = _pool(7, ATOMS)
    sel = torch.rand(2, 4, len(ATOMS), generator=torch.Generator().manual_seed(3)) < 0.4
    a, b = pool.combine(sel, impl="torch"), pool.combine(sel, impl="triton")
    for name in ("kv_counts", "kv_indices", "q_counts", "q_indices"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_pool_selection_helpers_and_uniform():
    pool = _pool(5, ("local-2", "global-1", "diagonal"))
    sel = pool.selection([["local-2"], ["global-1", "diagonal"]])
    assert sel.shape == (1, 2, 3) and sel[0, 1].tolist() == [False, True, True]
    uni = pool.uniform(["local-2", "global-1"], batch=3, heads=4)
    assert (uni.batch, uni.heads) == (3, 4) and uni.kv_counts.stride(0) == 0
    expected = Atom.parse("local-2").dense(5) | Atom.parse("global-1").dense(5)
    assert torch.equal(uni.to_dense()[2, 3], expected)
    with pytest.raises(KeyError, match="not in this pool"):
        pool.index("local-3")
    with pytest.raises(ValueError, match=r"selection must be \(B, H, 3\)"):
        pool.combine(torch.zeros(1, 2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        pool.combine(torch.zeros(1, 2, 3, dtype=torch.int32))
    assert PatternPool.cached(5, 16, ("local-2",)) is PatternPool.cached(5, 16, ("local-2",))


# --------------------------------------------------------------------------------------------- layout


def _layout(n=4, seed=0, causal=True) -> BlockLayout:
    m = torch.rand(2, 3, n, n, generator=torch.Generator().manual_seed(seed)) < 0.5
    if causal:
        m &= torch.tril(torch.ones(n, n, dtype=torch.bool))
    return BlockLayout.from_dense(m, 16)


def test_layout_round_trips_and_transpose():
    lay = _layout()
    assert torch.equal(BlockLayout.from_dense(lay.to_dense(), 16).kv_indices, lay.kv_indices)
    bare = BlockLayout(16, lay.kv_counts, lay.kv_indices)
    built = bare.with_transpose()
    assert torch.equal(built.q_indices, lay.q_indices) and torch.equal(built.q_counts, lay.q_counts)
    lay.validate(causal=True, canonical=True)
    assert lay.narrow(1, 2).kv_counts.shape == (1, 2, 4)
    assert float(lay.density(causal=True)) == pytest.approx(float(lay.kv_counts.sum()) / (2 * 3 * 10))


def test_layout_metadata_errors_are_precise():
    lay = _layout()
    with pytest.raises(LayoutError, match="int32"):
        BlockLayout(16, lay.kv_counts.long(), lay.kv_indices)
    with pytest.raises(LayoutError, match=r"kv_indices must be \(B, H, NQ, NK\) = \(2, 3, 4, NK\)"):
        BlockLayout(16, lay.kv_counts, lay.kv_indices[:, :, :3])
    with pytest.raises(LayoutError, match="power of two"):
        BlockLayout(24, lay.kv_counts, lay.kv_indices)
    with pytest.raises(LayoutError, match="given together"):
        BlockLayout(16, lay.kv_counts, lay.kv_indices, lay.q_counts, None)
    with pytest.raises(LayoutError, match="layout has 4x4 blocks of 16"):
        lay.check_compatible(2, 3, 80, 80)
    with pytest.raises(LayoutError, match="heads 3 is neither 1 nor the input heads 4"):
        lay.check_compatible(2, 4, 64, 64)


def test_layout_value_errors_name_the_entry():
    lay = BlockLayout.from_dense(torch.tril(torch.ones(1, 1, 4, 4, dtype=torch.bool)), 16)
    bad = lay.kv_indices.clone()
    bad[0, 0, 3, 1] = 7
    with pytest.raises(LayoutError, match=r"kv_indices\[0, 0, 3, 1\] = 7 is outside \[0, 4\)"):
        BlockLayout(16, lay.kv_counts, bad).validate()
    bad = lay.kv_indices.clone()
    bad[0, 0, 2, :2] = torch.tensor([1, 0])
    with pytest.raises(LayoutError, match=r"kv_indices\[0, 0, 2, :\] is not strictly increasing at position 1"):
        BlockLayout(16, lay.kv_counts, bad).validate()
    counts = lay.kv_counts.clone()
    counts[0, 0, 1] = 9
    with pytest.raises(LayoutError, match=r"kv_counts\[0, 0, 1\] = 9 is outside \[0, 4\]"):
        BlockLayout(16, counts, lay.kv_indices).validate()
    with pytest.raises(LayoutError, match="not the transpose"):
        BlockLayout(16, lay.kv_counts, lay.kv_indices, lay.kv_counts, lay.kv_indices).validate()
    upper = BlockLayout.from_dense(torch.ones(1, 1, 3, 3, dtype=torch.bool), 16)
    upper.validate(causal=False)
    with pytest.raises(LayoutError, match="causal layout lists key block 1 for query block 0"):
        upper.validate(causal=True)
    padded = lay.kv_indices.clone()
    padded[0, 0, 0, 3] = 2
    BlockLayout(16, lay.kv_counts, padded).validate()  # padding is free unless canonical
    with pytest.raises(LayoutError, match="lies past the row's count"):
        BlockLayout(16, lay.kv_counts, padded).validate(canonical=True)
