"""The fused block-sparse attention kernels (Triton; the interpreter on CPU) against the pure-torch
masked-softmax reference: forward and dq/dk/dv over random layouts, heads, head dims, dtypes, causal
and not, ragged lengths with padding, broadcast layouts; plus the launchers' errors, the autotune
switch, and torch.compile tracing without recompiling on a new layout."""

from __future__ import annotations

import contextlib
import os
from unittest import mock

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from longexposure.kernels import block_sparse_attention as K
from numerics import assert_close, assert_close_to_reference

from longexposure.attention.layout import BlockLayout
from longexposure.ops.block_sparse_attention import block_sparse_attention, reference_attention

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def make_layout(batch, heads, n, block, *, pattern, density, causal, broadcast, seed) -> BlockLayout:
    gen = torch.Generator().manual_seed(seed)
    lb, lh = (1 if broadcast == "batch" else batch), (1 if broadcast == "heads" else heads)
    if pattern == "all":
        mask = torch.ones(lb, lh, n, n, dtype=torch.bool)
    else:
        mask = torch.rand(lb, lh, n, n, generator=gen) < density
    if causal:
        mask &= torch.tril(torch.ones(n, n, dtype=torch.bool))
    if pattern == "diagonal-row":  # one query block sees only its own block
        row = n - 1
        mask[..., row, :] = False
        mask[..., row, row] = True
    if pattern == "empty-row":  # one query block sees nothing: its rows must be 0
        mask[..., n // 2, :] = False
    return BlockLayout.from_dense(mask, block)


def run_case(batch, heads, seq, head_dim, block, dtype, causal, pattern, density, ragged, broadcast, seed,
             device="cpu"):
    n = -(-seq // block)
    layout = make_layout(
        batch, heads, n, block, pattern=pattern, density=density, causal=causal, broadcast=broadcast, seed=seed
    )
    layout.validate(causal=causal, canonical=True)
    gen = torch.Generator().manual_seed(seed + 1)
    x = [torch.randn(batch, heads, seq, head_dim, generator=gen).to(device) for _ in range(4)]
    seq_lens = None
    if ragged:
        seq_lens = torch.randint(1, seq + 1, (batch,), generator=gen, dtype=torch.int32)
        seq_lens[0] = seq  # one full row, one (likely) padded
        seq_lens = seq_lens.to(device)
    layout = layout.to(device)
    dt = DTYPES[dtype]
    leaves = [t.to(dt).requires_grad_() for t in x[:3]]
    out = block_sparse_attention(*leaves, layout, causal=causal, seq_lens=seq_lens)
    grads = torch.autograd.grad(out, leaves, x[3].to(dt))
    hi = [t.double().requires_grad_() for t in x[:3]]
    hi_out = reference_attention(*hi, layout, causal=causal, seq_lens=seq_lens)
    hi_grads = torch.autograd.grad(hi_out, hi, x[3].double())
    names = ("out", "dq", "dk", "dv")
    if dt == torch.float32:
        for name, got, want in zip(names, (out, *grads), (hi_out, *hi_grads), strict=True):
            assert_close(got, want, name)
    else:
        lo = [t.to(dt).requires_grad_() for t in x[:3]]
        lo_out = reference_attention(*lo, layout, causal=causal, seq_lens=seq_lens)
        lo_grads = torch.autograd.grad(lo_out, lo, x[3].to(dt))
        for name, got, same, want in zip(names, (out, *grads), (lo_out, *lo_grads), (hi_out, *hi_grads), strict=True):
            assert_close_to_reference(got, same, want, name)
    return out, grads, layout, seq_lens


CASES = {
    "block": st.sampled_from([16, 32]),
    "n": st.integers(1, 4),
    "trim": st.integers(0, 15),
    "batch": st.integers(1, 2),
    "heads": st.integers(1, 3),
    "head_dim": st.sampled_from([16, 24, 32, 64, 80]),
    "dtype": st.sampled_from(["float32", "float32", "float16", "bfloat16"]),
    "causal": st.booleans(),
    "pattern": st.sampled_from(["random", "random", "all", "diagonal-row", "empty-row"]),
    "density": st.floats(0.2, 1.0),
    "ragged": st.booleans(),
    "broadcast": st.sampled_from(["none", "none", "batch", "heads"]),
    "seed": st.integers(0, 2**16),
}


@given(**CASES)
# head_dim 64 with every block listed: a public flash block-sparse backward was silently wrong there
@example(
    block=16,
    n=4,
    trim=0,
    batch=1,
    heads=2,
    head_dim=64,
    dtype="float32",
    causal=True,
    pattern="all",
    density=1.0,
    ragged=False,
    broadcast="none",
    seed=0,
)
# odd length (97 = 3 blocks of 32 + 1), padding, a query block with only its diagonal, non-causal
@example(
    block=32,
    n=4,
    trim=31,
    batch=2,
    heads=1,
    head_dim=64,
    dtype="float32",
    causal=False,
    pattern="diagonal-row",
    density=0.5,
    ragged=True,
    broadcast="heads",
    seed=1,
)
def test_forward_and_gradients_match_reference(
    block, n, trim, batch, heads, head_dim, dtype, causal, pattern, density, ragged, broadcast, seed
):
    seq = max(1, n * block - min(trim, block - 1))
    run_case(batch, heads, seq, head_dim, block, dtype, causal, pattern, density, ragged, broadcast, seed)


@contextlib.contextmanager
def dq_mode(mode: str):
    """LONGEXPOSURE_BSA_DQ for the calls inside (a context, not monkeypatch: hypothesis reruns the test body)."""
    with mock.patch.dict(os.environ, {"LONGEXPOSURE_BSA_DQ": mode}):
        assert K.dq_mode() == mode
        yield


@given(**CASES)
@example(  # every block listed, causal, ragged: each query row gets dQ shares from every key block before it
    block=16, n=4, trim=5, batch=2, heads=2, head_dim=24, dtype="float32", causal=True, pattern="all",
    density=1.0, ragged=True, broadcast="none", seed=3,
)
def test_atomic_dq_matches_reference(
    block, n, trim, batch, heads, head_dim, dtype, causal, pattern, density, ragged, broadcast, seed
):
    """LONGEXPOSURE_BSA_DQ=atomic: dQ added by the dK/dV kernel (no dQ pass), over the same cases."""
    seq = max(1, n * block - min(trim, block - 1))
    with dq_mode("atomic"):
        run_case(batch, heads, seq, head_dim, block, dtype, causal, pattern, density, ragged, broadcast, seed)


def test_atomic_dq_equals_the_dq_pass_and_leaves_dk_dv_alone():
    """Both modes on one case: dK and dV bit-equal (same kernel, same order), dQ equal to rounding; empty and
    padded rows keep dQ exactly 0 (the accumulator starts from zero)."""
    outs = {}
    for mode in ("atomic", "pass"):  # `bulk` needs a GPU (test_kernels_compile_sm90 compiles it)
        with dq_mode(mode):
            outs[mode] = run_case(2, 2, 61, 32, 16, "float32", True, "empty-row", 0.6, True, "none", 7)
    (_, (dq_a, dk_a, dv_a), layout, lens), (_, (dq_p, dk_p, dv_p), _, _) = outs["atomic"], outs["pass"]
    assert torch.equal(dk_a, dk_p) and torch.equal(dv_a, dv_p)
    assert_close(dq_a, dq_p, "dq atomic vs pass")
    for b in range(2):
        assert torch.all(dq_a[b, :, int(lens[b]) :] == 0)
    empty = ~layout.to_dense().any(-1)  # (B, H, NQ) query blocks that see nothing
    for b, h, r in empty.nonzero().tolist():
        assert torch.all(dq_a[b, h, r * 16 : (r + 1) * 16] == 0)


@given(**CASES)
@example(  # causal, every block listed, an odd number of query blocks: the last pair has one row
    block=16, n=3, trim=0, batch=1, heads=2, head_dim=32, dtype="float32", causal=True, pattern="all",
    density=1.0, ragged=False, broadcast="none", seed=4,
)
@example(  # a pair whose rows list different blocks, one row empty, padding inside the second row of a pair
    block=16, n=4, trim=9, batch=2, heads=1, head_dim=24, dtype="float32", causal=True, pattern="empty-row",
    density=0.5, ragged=True, broadcast="heads", seed=5,
)
def test_query_pairs_match_reference(
    block, n, trim, batch, heads, head_dim, dtype, causal, pattern, density, ragged, broadcast, seed
):
    """LONGEXPOSURE_BSA_PAIR=1: each forward and dQ program takes two query blocks (a 2 * block-row tile) over the
    union of their lists, masking a block out of the half whose row does not list it; each dK/dV program two key
    blocks over the union of their columns."""
    seq = max(1, n * block - min(trim, block - 1))
    launched = []

    class Spy(K._Launch):  # records (kernel, grid, PAIR) of every launch
        def __getitem__(self, grid):
            run = super().__getitem__(grid)
            return lambda *a, **kw: launched.append((self.kernel, grid, kw.get("PAIR"))) or run(*a, **kw)

    with mock.patch.dict(os.environ, {"LONGEXPOSURE_BSA_PAIR": "1"}), mock.patch.object(K, "_launch", Spy):
        run_case(batch, heads, seq, head_dim, block, dtype, causal, pattern, density, ragged, broadcast, seed)
    query_blocks = -(-seq // block)
    for kernel in (K._bsa_fwd_kernel, K._bsa_bwd_dq_kernel, K._bsa_bwd_dkdv_kernel):
        ((grid, pair),) = [(g, p) for k, g, p in launched if k is kernel]
        assert pair == 2 and grid == ((query_blocks + 1) // 2 * batch * heads,)


@pytest.mark.parametrize("causal, pattern, n, trim", [(True, "all", 5, 3), (False, "random", 4, 0),
                                                     (True, "empty-row", 3, 7)])
def test_pairs_with_dq_by_atomics_match_reference(causal, pattern, n, trim):
    """LONGEXPOSURE_BSA_PAIR=1 with LONGEXPOSURE_BSA_DQ=atomic: the paired dK/dV kernel adds dQ for both key blocks."""
    with mock.patch.dict(os.environ, {"LONGEXPOSURE_BSA_PAIR": "1"}), dq_mode("atomic"):
        run_case(2, 2, n * 16 - trim, 32, 16, "float32", causal, pattern, 0.5, True, "none", n)


def test_query_pair_switch_is_checked():
    with mock.patch.dict(os.environ, {"LONGEXPOSURE_BSA_PAIR": "2"}), pytest.raises(
        ValueError, match="LONGEXPOSURE_BSA_PAIR='2': expected '0' or '1'"
    ):
        K.query_pair(64)
    with mock.patch.dict(os.environ, {"LONGEXPOSURE_BSA_PAIR": "1"}):
        assert (K.query_pair(64), K.query_pair(128)) == (2, 1)  # block 128 pairs overflowed shared memory (H100)


@contextlib.contextmanager
def descriptor_loads():
    """LONGEXPOSURE_BSA_TMA=1 inside; yields the decisions the launches made (True: descriptors)."""
    decided = []
    use = K.descriptors.use

    def spy(switch, *operands, **kw):
        decided.append(use(switch, *operands, **kw))
        return decided[-1]

    with mock.patch.dict(os.environ, {"LONGEXPOSURE_BSA_TMA": "1"}), mock.patch.object(K.descriptors, "use", spy):
        yield decided


@given(**CASES)
def test_descriptor_loads_match_reference(
    block, n, trim, batch, heads, head_dim, dtype, causal, pattern, density, ragged, broadcast, seed
):
    """LONGEXPOSURE_BSA_TMA=1: the inner loops read K/V (forward, dQ) and Q/dO (dK/dV) through (B, H, S, D) tensor
    descriptors; rows past the sequence and columns past the head dim load as zeros, as the pointer loads do."""
    seq = max(1, n * block - min(trim, block - 1))
    with descriptor_loads() as decided:
        run_case(batch, heads, seq, head_dim, block, dtype, causal, pattern, density, ragged, broadcast, seed)
    assert decided and all(decided), "every launch of these contiguous operands must read through descriptors"


def test_descriptor_loads_of_strided_views_and_the_fallback():
    """Heads as a view of (B, S, H, D) projections (what the attention backends pass): descriptors take the strides
    as they are. A view whose start is not 16-byte aligned falls back to pointer loads, with the same result."""
    gen = torch.Generator().manual_seed(9)
    batch, heads, seq, dim, block = 2, 3, 45, 32, 16
    layout = make_layout(batch, heads, 3, block, pattern="random", density=0.7, causal=True, broadcast="none", seed=9)
    base = [torch.randn(batch, seq, heads, dim + 4, generator=gen) for _ in range(3)]  # fp32 rows of 144 bytes
    for view, expect in ((lambda t: t[..., :dim], True), (lambda t: t[..., 1 : dim + 1], False)):
        leaves = [view(t).transpose(1, 2).detach().requires_grad_() for t in base]
        with descriptor_loads() as decided:
            out = block_sparse_attention(*leaves, layout, causal=True)
            grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
        assert set(decided) == {expect}
        ref = [t.detach().double().requires_grad_() for t in leaves]
        ref_out = reference_attention(*ref, layout, causal=True)
        ref_grads = torch.autograd.grad(ref_out, ref, torch.ones_like(ref_out))
        for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref_out, *ref_grads), strict=True):
            assert_close(got, want, name)


def test_dq_mode_is_checked_and_deterministic_mode_keeps_the_pass():
    with mock.patch.dict(os.environ, {"LONGEXPOSURE_BSA_DQ": "atomics"}), pytest.raises(
        ValueError, match="LONGEXPOSURE_BSA_DQ='atomics' is not one of"
    ):
        K.dq_mode()
    with dq_mode("atomic"):
        torch.use_deterministic_algorithms(True)
        try:
            assert K.dq_mode() == "pass"
        finally:
            torch.use_deterministic_algorithms(False)


HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="LONGEXPOSURE_BSA_DQ=bulk needs a Hopper (sm_90) or newer GPU")
@pytest.mark.parametrize(("head_dim", "dtype", "pattern", "ragged", "pair"), [
    (64, "float16", "all", False, "0"), (80, "bfloat16", "random", True, "0"), (64, "float32", "empty-row", True, "0"),
    (64, "float16", "random", True, "1"),
])
def test_bulk_dq_matches_the_reference_on_hopper(monkeypatch, head_dim, dtype, pattern, ragged, pair):
    """The bulk reduce-adds (which the interpreter cannot run) against the float64 reference: every key block's
    share lands in the accumulator, padded rows and an empty row stay 0, paired key blocks too. On the lent GPU:
    `pytest -m gpu tests/test_block_sparse_attention.py -k bulk`."""
    monkeypatch.setenv("LONGEXPOSURE_BSA_DQ", "bulk")
    monkeypatch.setenv("LONGEXPOSURE_BSA_PAIR", pair)
    _, (dq, _, _), _, lens = run_case(2, 3, 200, head_dim, 64, dtype, True, pattern, 0.6, ragged, "none", 5,
                                      device="cuda")
    if ragged:
        assert torch.all(dq[1, :, int(lens[1]) :] == 0)


def test_bulk_dq_says_what_it_needs_where_it_cannot_run():
    """LONGEXPOSURE_BSA_DQ=bulk adds dQ by tensor reduce-adds, which the interpreter lacks: a clear error, not a
    silent fallback to another mode."""
    q = torch.randn(1, 1, 32, 16)
    layout = make_layout(1, 1, 2, 16, pattern="all", density=1.0, causal=True, broadcast="none", seed=0)
    o, lse = K.block_sparse_attention_fwd(q, q, q, layout.kv_counts, layout.kv_indices, None, block=16, causal=True,
                                          scale=0.25)
    with dq_mode("bulk"), pytest.raises(ValueError, match="LONGEXPOSURE_BSA_DQ=bulk .* needs a Hopper"):
        K.block_sparse_attention_bwd(torch.ones_like(o), q, q, q, o, lse, layout.kv_counts, layout.kv_indices,
                                     layout.q_counts, layout.q_indices, None, block=16, causal=True, scale=0.25)


def test_empty_rows_and_padding_give_zero_output_and_gradient():
    out, grads, layout, lens = run_case(2, 2, 64, 16, 16, "float32", True, "empty-row", 1.0, True, "none", 5)
    dense = layout.to_dense()
    for b in range(2):
        for h in range(2):
            assert torch.all(out[b, h, 32:48] == 0) == (not bool(dense[b, h, 2].any()))
        assert torch.all(out[b, :, int(lens[b]) :] == 0)
        assert torch.all(grads[0][b, :, int(lens[b]) :] == 0), "padded queries get no dq"
        assert torch.all(grads[1][b, :, int(lens[b]) :] == 0), "padded keys get no dk"


def test_backward_needs_the_transposed_layout():
    """The op itself runs forward without the transpose (inference); only its backward asks for it."""
    layout = make_layout(1, 2, 4, 16, pattern="random", density=0.6, causal=True, broadcast="none", seed=2)
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 64, 32, generator=gen).requires_grad_() for _ in range(3))
    bare, _ = torch.ops.longexposure.block_sparse_attn_fwd(
        q, k, v, layout.kv_counts, layout.kv_indices, None, None, None, 16, True, 32**-0.5
    )
    assert_close(bare, reference_attention(q, k, v, layout))
    with pytest.raises(RuntimeError, match="transposed layout"):
        bare.sum().backward()


def test_launcher_errors_name_the_argument():
    layout = make_layout(1, 2, 4, 16, pattern="all", density=1.0, causal=True, broadcast="none", seed=0)
    q = torch.randn(1, 2, 64, 16)
    kw = {"block": 16, "causal": True, "scale": 0.25}
    with pytest.raises(ValueError, match="^k shape"):
        K.block_sparse_attention_fwd(q, q[:, :1], q, layout.kv_counts, layout.kv_indices, None, **kw)
    with pytest.raises(ValueError, match="^v dtype torch.int64"):
        K.block_sparse_attention_fwd(q, q, q.long(), layout.kv_counts, layout.kv_indices, None, **kw)
    with pytest.raises(ValueError, match="^q must be contiguous in head_dim"):
        K.block_sparse_attention_fwd(q.transpose(-1, -2), q, q, layout.kv_counts, layout.kv_indices, None, **kw)
    with pytest.raises(ValueError, match="^kv_counts must be int32"):
        K.block_sparse_attention_fwd(q, q, q, layout.kv_counts.long(), layout.kv_indices, None, **kw)
    with pytest.raises(ValueError, match="^kv_indices shape"):
        K.block_sparse_attention_fwd(q, q, q, layout.kv_counts, layout.kv_indices[..., :3], None, **kw)
    with pytest.raises(ValueError, match="^seq_lens must be int32 of shape"):
        K.block_sparse_attention_fwd(q, q, q, layout.kv_counts, layout.kv_indices, torch.tensor([64]), **kw)
    with pytest.raises(ValueError, match="^block must be a power of two"):
        K.block_sparse_attention_fwd(
            q, q, q, layout.kv_counts, layout.kv_indices, None, block=24, causal=True, scale=0.25
        )


def test_autotune_space_prunes_by_block_and_collapses_for_ci(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("LONGEXPOSURE_AUTOTUNE", "1")
    assert all(len(K.autotune_configs(kind)) > 1 for kind in ("fwd", "dq", "dkdv"))
    splits = {block: {c.kwargs["SPLIT"] for c in K._prune(K.autotune_configs("dkdv"), {}, BLOCK=block)}
              for block in (32, 64, 128)}
    assert splits == {32: {1}, 64: {1, 2}, 128: {1, 2}}, "half-height tiles are candidates from block 64 on"
    for kind, capped in (("fwd", True), ("dq", True), ("dkdv", False)):
        caps = {d: {c.maxnreg for c in K._prune(K.autotune_configs(kind), {}, BLOCK=64, BLOCK_D=d)} for d in (64, 128)}
        assert caps == {64: {None, K.MAXNREG} if capped else {None}, 128: {None}}, (kind, caps)
    fwd = K.autotune_configs("fwd")
    stages = {d: {c.num_stages for c in K._prune(fwd, {}, BLOCK=64, BLOCK_D=d)} for d in (64, 128)}
    assert stages == {64: {2, 3, 4}, 128: {2, 3}}, "a 4-stage forward at head_dim 128 holds an SM alone"
    monkeypatch.setenv("LONGEXPOSURE_AUTOTUNE", "0")
    assert all(len(K.autotune_configs(kind)) == 1 for kind in ("fwd", "dq", "dkdv"))


def test_autotuners_key_on_the_length_bucket():
    # tuned once per power of two of the block count: a config picked at one length is not reused at another
    for kernel, width in ((K._bsa_fwd_kernel, "NKP"), (K._bsa_bwd_dq_kernel, "NKP"), (K._bsa_bwd_dkdv_kernel, "NQP")):
        assert width in kernel.keys and "BLOCK_D" in kernel.keys, kernel.keys


def test_compile_traces_the_op_and_new_layouts_do_not_recompile():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()  # backend="eager"-like: the interpreter's kernels cannot be traced deeper

    @torch.compile(backend=counter, fullgraph=True)
    def step(q, k, v, kv_counts, kv_indices, q_counts, q_indices):
        lay = BlockLayout(16, kv_counts, kv_indices, q_counts, q_indices)
        return block_sparse_attention(q, k, v, lay)

    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 64, 16, generator=gen).requires_grad_() for _ in range(3))
    for seed in range(3):
        lay = make_layout(
            1, 2, 4, 16, pattern="random", density=0.3 + 0.3 * seed, causal=True, broadcast="none", seed=seed
        )
        out = step(q, k, v, lay.kv_counts, lay.kv_indices, lay.q_counts, lay.q_indices)
        assert_close(out, reference_attention(q, k, v, lay))
        out.sum().backward()
    assert counter.frame_count == 1, f"recompiled for new layouts: {counter.frame_count} frames"
    torch._dynamo.reset()


@pytest.mark.parametrize(("causal", "ragged", "mode", "pair"), [
    (True, True, "pass", "0"), (False, False, "pass", "0"), (True, True, "atomic", "0"),
    (True, True, "pass", "1"), (False, True, "atomic", "1"),  # the query / key pairs' merged walks in SPLIT tiles
])
def test_split_tiles_match_reference(monkeypatch, causal, ragged, mode, pair):
    """SPLIT=2 (a listed block visited as two half-height tiles, one per loop iteration; autotuned on GPU), both dQ
    modes, single blocks and pairs."""
    monkeypatch.setenv("LONGEXPOSURE_BSA_DQ", mode)
    monkeypatch.setenv("LONGEXPOSURE_BSA_PAIR", pair)

    class Split2:
        def __init__(self, kernel):
            from triton.runtime.autotuner import Autotuner

            self.split = isinstance(kernel, Autotuner)  # only the autotuned kernels take SPLIT
            self.kernel = kernel.fn if self.split else kernel

        def __getitem__(self, grid):
            extra = {"SPLIT": 2, "num_warps": 4} if self.split else {}
            return lambda *a, **kw: self.kernel[grid](*a, **kw, **extra)

    monkeypatch.setattr(K, "_launch", Split2)
    run_case(2, 2, 93, 32, 32, "float32", causal, "random", 0.7, ragged, "none", 11)


@pytest.mark.parametrize(("group", "pair", "mode"), [(1, "0", "pass"), (4, "0", "pass"), (4, "1", "pass"),
                                                     (5, "0", "atomic"), (6, "1", "pass")])
def test_head_groups_match_reference(monkeypatch, group, pair, mode):
    """The grid walks heads in groups (`head_group`): every (tile, head) still gets exactly one program when the
    group does not divide batch * heads (6 here: groups of 4 and 5 leave a short last group), single and paired
    tiles, both dQ modes."""
    monkeypatch.setattr(K, "head_group", lambda q: group)
    monkeypatch.setenv("LONGEXPOSURE_BSA_PAIR", pair)
    monkeypatch.setenv("LONGEXPOSURE_BSA_DQ", mode)
    run_case(2, 3, 75, 32, 16, "float32", True, "random", 0.6, True, "none", 3)


def test_head_group_fits_two_streamed_tensors_into_a_third_of_l2(monkeypatch):
    monkeypatch.setattr(K, "_l2_bytes", lambda device: 48 << 20)
    q = torch.empty(4, 32, 2048, 128, dtype=torch.float16)  # 1 MB of K and V per head: 16 heads in 16 MB
    assert K.head_group(q) == 16
    assert K.head_group(q[:, :, :64]) == 128  # everything fits: one group of all 128 heads
    assert K.head_group(torch.empty(1, 1, 1 << 22, 128, dtype=torch.float16)) == 1  # never below one head
