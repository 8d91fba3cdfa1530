"""Exposer policies: formats the operators accept, eager references, density bounds, real micro-model data."""

import itertools
import math

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from relu_fixture import ATTN_BLOCK, MLP_BLOCK, e2e_ids, micro_checkpoint, micro_model  # noqa: F401

from longexposure.exposers import (
    ATTENTION_POLICIES,
    MLP_POLICIES,
    AtomSet,
    ExposerError,
    LongExposureAttention,
    ThresholdMlp,
    atom_mask,
    attention_block_mass,
    attention_mass_kept,
    block_stats,
    candidate_atoms,
    head_specific_mask,
    make_exposer,
    pool_selection,
    snap_to_atoms,
)
from longexposure.profiling import capture
from longexposure.registry import EXPOSERS, RegistryError


def _random_act(gen: torch.Generator, shape: tuple[int, ...], active: float) -> torch.Tensor:
    z = torch.randn(*shape, generator=gen) - torch.distributions.Normal(0, 1).icdf(torch.tensor(1 - active))
    return torch.relu(z)


def random_mass(gen: torch.Generator, b: int, h: int, n: int, temp: float = 1.0) -> torch.Tensor:
    logits = torch.randn(b, h, n, n, generator=gen) * 3 / temp
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    return logits.masked_fill(~causal, float("-inf")).softmax(-1)


def assert_block_ids(ids: torch.Tensor, n_blocks: int) -> None:
    assert ids.dtype == torch.int32 and ids.dim() == 1
    assert torch.equal(ids, torch.unique(ids)), "ids must be sorted and unique"
    assert ids.numel() == 0 or (int(ids.min()) >= 0 and int(ids.max()) < n_blocks)


def assert_causal_mask(mask: torch.Tensor, shape: tuple[int, ...]) -> None:
    assert mask.dtype == torch.bool and tuple(mask.shape) == shape
    n = shape[-1]
    assert not (mask & ~torch.ones(n, n, dtype=torch.bool).tril()).any(), "mask has blocks above the diagonal"


# ---------------------------------------------------------------------------------------------- registry
def test_registry_lists_every_policy():
    assert set(EXPOSERS.names()) == set(MLP_POLICIES) | set(ATTENTION_POLICIES)


def test_unknown_name_and_wrong_target_errors():
    with pytest.raises(RegistryError, match="Did you mean 'threshold'"):
        make_exposer("treshold", "mlp")
    with pytest.raises(ExposerError, match="serves attention, not mlp"):
        make_exposer("longformer", "mlp")
    with pytest.raises(ExposerError, match="target must be"):
        make_exposer("dense", "conv")
    with pytest.raises(ExposerError, match="unexpected keyword"):
        make_exposer("threshold", "mlp", tau=0.5)
    with pytest.raises(ExposerError, match="theta"):
        make_exposer("threshold", "mlp", theta=1.5)


# -------------------------------------------------------------------------------------------------- MLP
def _threshold_reference(act: torch.Tensor, block: int, theta: float, alpha: float) -> torch.Tensor:
    """Loop-per-block reference of the threshold policy (boolean per block)."""
    flat = act.reshape(-1, act.shape[-1]).double()
    n = flat.shape[1] // block
    count = [float((flat[:, b * block : (b + 1) * block] > 0).sum()) for b in range(n)]
    mass = [float(flat[:, b * block : (b + 1) * block].sum()) for b in range(n)]
    imp = [
        alpha * c / max(max(count), 1e-12) + (1 - alpha) * m / max(max(mass), 1e-12)
        for c, m in zip(count, mass, strict=True)
    ]
    peak = max(imp)
    keep = [i >= theta * peak and c > 0 for i, c in zip(imp, count, strict=True)]
    if not any(keep):
        keep[max(range(n), key=lambda b: imp[b])] = True
    return torch.tensor(keep)


@given(
    tokens=st.integers(1, 40),
    blocks=st.integers(1, 12),
    block=st.sampled_from([1, 4, 16, 64]),
    theta=st.floats(0.0, 1.0),
    alpha=st.floats(0.0, 1.0),
    active=st.floats(0.02, 0.9),
    seed=st.integers(0, 2**16),
)
@example(tokens=1, blocks=1, block=64, theta=1.0, alpha=0.5, active=0.02, seed=0)
def test_threshold_matches_reference(tokens, blocks, block, theta, alpha, active, seed):
    gen = torch.Generator().manual_seed(seed)
    act = _random_act(gen, (tokens, blocks * block), active)
    if not (act > 0).any():
        act[0, 0] = 1.0
    pol = ThresholdMlp(block_size=block, theta=theta, alpha=alpha)
    got = pol.block_mask(act)
    ref = _threshold_reference(act, block, theta, alpha)
    # the reference and the policy may differ only on blocks within rounding of the threshold
    differ = got != ref
    if differ.any():
        count, mass = block_stats(act, block)
        imp = alpha * count / count.max() + (1 - alpha) * mass / mass.max()
        assert torch.allclose(imp[differ], theta * imp.max(), atol=1e-5)
    assert_block_ids(pol(act), blocks)


def test_mlp_policies_on_micro_model(micro_model, e2e_ids):  # noqa: F811
    acts = [c.mlp_act for c in capture(micro_model, e2e_ids[0], attention=False)]
    n_blocks = acts[0].shape[-1] // MLP_BLOCK
    for act in acts:
        dense = make_exposer("dense", "mlp", block_size=MLP_BLOCK)(act)
        assert torch.equal(dense, torch.arange(n_blocks, dtype=torch.int32))
        shadowy = make_exposer("shadowy", "mlp")(act)  # neuron granularity
        assert_block_ids(shadowy, act.shape[-1])
        assert torch.equal(shadowy.long(), ((act > 0).flatten(0, 1).any(0)).nonzero().flatten())
        previous = n_blocks + 1
        for theta in (0.0, 0.05, 0.1, 0.3, 0.6, 1.0):
            pol = make_exposer("threshold", "mlp", block_size=MLP_BLOCK, theta=theta)
            ids = pol(act)
            assert_block_ids(ids, n_blocks)
            assert 1 <= ids.numel() <= previous, "density must not grow with theta"
            previous = ids.numel()
        # theta = 0 keeps exactly the blocks with any activation: the shadowy union at block granularity
        block_any = make_exposer("shadowy", "mlp", block_size=MLP_BLOCK)(act)
        assert torch.equal(make_exposer("threshold", "mlp", block_size=MLP_BLOCK, theta=0.0)(act), block_any)


def test_block_stats_rejects_indivisible_ffn():
    with pytest.raises(ExposerError, match="not divisible by block_size 64"):
        block_stats(torch.rand(3, 100), 64)


# --------------------------------------------------------------------------------------------- attention
def _mass_reference(q: torch.Tensor, k: torch.Tensor, block: int) -> torch.Tensor:
    b, h, s, d = q.shape
    n = s // block
    out = torch.zeros(b, h, n, n, dtype=torch.float64)
    for bi, hi in itertools.product(range(b), range(h)):
        scores = (q[bi, hi].double() @ k[bi, hi].double().T) / math.sqrt(d)
        scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
        p = scores.softmax(-1)
        for i, j in itertools.product(range(n), range(n)):
            out[bi, hi, i, j] = p[i * block : (i + 1) * block, j * block : (j + 1) * block].sum() / block
    return out


@given(
    b=st.integers(1, 2),
    h=st.integers(1, 3),
    n=st.integers(1, 5),
    block=st.sampled_from([1, 4, 16]),
    seed=st.integers(0, 999),
)
def test_attention_block_mass_matches_reference(b, h, n, block, seed):
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(2, b, h, n * block, 8, generator=gen)
    got = attention_block_mass(q, k, block, head_chunk=2)
    torch.testing.assert_close(got.double(), _mass_reference(q, k, block), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.sum(-1), torch.ones(b, h, n), atol=1e-5, rtol=0)


def test_attention_mass_rejects_bad_shapes():
    q = torch.randn(1, 2, 48, 8)
    with pytest.raises(ExposerError, match="48 is not divisible by the attention block size 32"):
        attention_block_mass(q, q, 32)
    with pytest.raises(ExposerError, match=r"\(B, H, S, D\)"):
        attention_block_mass(q[0], q[0], 16)
    with pytest.raises(ExposerError, match=r"\(B, H, N, N\)"):
        make_exposer("long-exposure", "attention").block_mask(torch.rand(2, 3, 4))


@pytest.mark.parametrize("name", ATTENTION_POLICIES)
def test_attention_policy_format(name):
    gen = torch.Generator().manual_seed(0)
    mass = random_mass(gen, 2, 3, 9)
    mask = make_exposer(name, "attention", block=16).block_mask(mass)
    assert_causal_mask(mask, (2, 3, 9, 9))
    density = mask.sum((-1, -2)).float() / 45
    assert (density > 0).all() and (density <= 1).all()


def test_dense_longformer_bigbird_patterns():
    gen = torch.Generator().manual_seed(0)
    mass = random_mass(gen, 1, 2, 8)
    tril = torch.ones(8, 8, dtype=torch.bool).tril()
    assert torch.equal(make_exposer("dense", "attention").block_mask(mass)[0, 0], tril)
    lf = make_exposer("longformer", "attention", window_blocks=2, global_blocks=1).block_mask(mass)[0, 0]
    i, j = torch.arange(8)[:, None], torch.arange(8)[None]
    assert torch.equal(lf, tril & ((i - j < 2) | (j < 1)))
    bb = make_exposer("bigbird", "attention", window_blocks=1, global_blocks=0, random_blocks=2, seed=3).block_mask(
        mass
    )
    assert torch.equal(bb[0, 0], bb[0, 1]), "bigbird is uniform over heads"
    assert (bb[0, 0].sum(-1) <= torch.clamp(torch.arange(8) + 1, max=3)).all()
    again = make_exposer("bigbird", "attention", window_blocks=1, global_blocks=0, random_blocks=2, seed=3).block_mask(
        mass
    )
    other = make_exposer("bigbird", "attention", window_blocks=1, global_blocks=0, random_blocks=2, seed=4).block_mask(
        mass
    )
    assert torch.equal(bb, again) and not torch.equal(bb, other)


@given(n=st.integers(1, 7), tau=st.floats(0.3, 1.0), temp=st.sampled_from([0.3, 1.0, 3.0]), seed=st.integers(0, 999))
def test_head_specific_mask_is_minimal(n, tau, temp, seed):
    mass = random_mass(torch.Generator().manual_seed(seed), 1, 2, n, temp)
    mask = head_specific_mask(mass, tau)
    kept = (mass * mask).sum(-1)
    assert (kept >= tau - 1e-5).all()
    # dropping the lightest kept block of any row falls below tau, unless the row keeps a single block
    for h, i in itertools.product(range(2), range(n)):
        row_mask, row = mask[0, h, i], mass[0, h, i]
        if row_mask.sum() > 1:
            lightest = row[row_mask].min()
            assert kept[0, h, i] - lightest < tau + 1e-5


@given(n=st.integers(1, 6), tau=st.floats(0.5, 0.99), seed=st.integers(0, 999))
def test_snap_is_cheapest_qualifying_atom_set(n, tau, seed):
    mass = random_mass(torch.Generator().manual_seed(seed), 1, 2, n)
    raw = head_specific_mask(mass, tau)
    mask, choice = snap_to_atoms(mass, raw, tau)
    assert_causal_mask(mask, (1, 2, n, n))
    assert ((mass * mask).sum(-1) >= tau - 1e-4).all()
    specs = candidate_atoms(n)
    for h in range(2):
        best = min(
            int(atom_mask(s, n).sum()) for s in specs if ((mass[0, h] * atom_mask(s, n)).sum(-1) >= tau - 1e-5).all()
        )
        assert int(mask[0, h].sum()) == best
        assert torch.equal(mask[0, h], atom_mask(specs[int(choice[0, h])], n))


def test_atoms_match_the_pattern_pool_names():
    """The snapped AtomSets name pool atoms; each name's pool reference mask equals ours, seeded random atoms too."""
    pool = pytest.importorskip("longexposure.attention.pattern_pool")
    n = 9
    for spec in (AtomSet(3, 0), AtomSet(1, 2), AtomSet(2, 1, stride=4), AtomSet(4, 1, random=2, seed=5)):
        union = torch.zeros(n, n, dtype=torch.bool)
        for name in spec.names():
            union |= pool.Atom.parse(name).dense(n, causal=True)
        assert torch.equal(union, atom_mask(spec, n)), spec
    sel = pool_selection([[AtomSet(3, 0), AtomSet(1, 2)]], ["local-1", "local-3", "global-2"])
    assert sel.tolist() == [[[False, True, False], [True, False, True]]]
    with pytest.raises(ExposerError, match="not in the pattern pool"):
        pool_selection([[AtomSet(5, 0)]], ["local-1"])


def test_attention_policies_on_micro_model(micro_model, e2e_ids):  # noqa: F811
    caps = capture(micro_model, e2e_ids[0], mlp=False)
    for cap in caps:
        b, h, s, _ = cap.q.shape
        n = s // ATTN_BLOCK
        mass = attention_block_mass(cap.q, cap.k, ATTN_BLOCK)
        for tau in (0.8, 0.95):
            pol = LongExposureAttention(block=ATTN_BLOCK, tau=tau)
            mask = pol(cap.q, cap.k)
            assert_causal_mask(mask, (b, h, n, n))
            assert ((mass * mask).sum(-1) >= tau - 1e-4).all(), "every query block keeps >= tau of its mass"
            assert len(pol.atoms()) == b and len(pol.atoms()[0]) == h
            raw = LongExposureAttention(block=ATTN_BLOCK, tau=tau, snap=False).block_mask(mass)
            assert raw.sum() <= mask.sum(), "the head-specific mask is the fewest blocks; snapping adds"
        shadowy = make_exposer("shadowy", "attention", block=ATTN_BLOCK, eps=0.05).block_mask(mass)
        assert (shadowy == shadowy[:1, :1]).all(), "one mask for every head and batch element"
        assert attention_mass_kept(mass, shadowy).min() >= 0.5


@pytest.mark.parametrize(
    "name,target",
    [
        (e.name, t)
        for e in EXPOSERS
        for t in (("mlp", "attention") if e.meta["target"] == "both" else (e.meta["target"],))
    ],
)
def test_every_registered_exposer_conforms(name, target):
    """Conformance: each registered policy, for each target it serves, returns the operator's format."""
    gen = torch.Generator().manual_seed(1)
    if target == "mlp":
        pol = make_exposer(name, "mlp", **({} if name == "shadowy" else {"block_size": 16}))
        act = _random_act(gen, (2, 24, 128), 0.1)
        assert_block_ids(pol(act), 128 // pol.block_size)
        assert 1 <= pol(act).numel() <= 128 // pol.block_size
    else:
        pol = make_exposer(name, "attention", block=8)
        q, k = torch.randn(2, 2, 3, 40, 16, generator=gen)
        mask = pol(q, k)
        assert_causal_mask(mask, (2, 3, 5, 5))
        assert torch.equal(mask, pol(q, k)), "deterministic"
        with pytest.raises(ExposerError, match="not divisible"):
            pol(q[..., :36, :], k[..., :36, :])


@given(n=st.integers(1, 64), p=st.floats(0.0, 1.0), seed=st.integers(0, 999))
def test_fixed_capacity_ids_match_exact_ids(n, p, seed):
    from longexposure.exposers import ids_from_mask, ids_with_count

    mask = torch.rand(n, generator=torch.Generator().manual_seed(seed)) < p
    ids, count = ids_with_count(mask)
    exact = ids_from_mask(mask)
    assert ids.dtype == count.dtype == torch.int32 and ids.shape == (n,) and count.dim() == 0
    assert int(count) == exact.numel() and torch.equal(ids[: int(count)], exact)
    assert (ids[int(count) :] == 0).all()
