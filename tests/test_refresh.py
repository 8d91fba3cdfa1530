"""The predictor refresh's fast paths against their readable references: vectorized slack calibration vs.
the slack-by-slack loop, device-side evaluation vs. the per-unit `.item()` loop, stacked training of every
layer vs. `train_mlp` per layer; and a grouped refresh changes tensors in place and reads the host once."""

import copy
import traceback

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from longexposure.predictors.lowrank import MlpLowRank, PredictorConfig, PredictorError
from longexposure.predictors.offline import (
    LayerData,
    _calibrate,
    calibrate_mlp,
    evaluate_mlp,
    group_block_sums,
    mlp_block_stats,
    mlp_truth,
    stacked_slack_metrics,
    threshold_masks,
    train_mlp,
    train_mlp_group,
)
from longexposure.predictors.refresh import (
    ROW_KEYS,
    MlpRefresher,
    RefreshConfig,
    _fused_relu_block_stats,
    layer_data,
    refresh_layers,
)
from test_no_host_sync import HostValueProbe

D = 16


def _fc1(n_blocks: int, block: int, gen: torch.Generator) -> torch.nn.Linear:
    fc1 = torch.nn.Linear(D, n_blocks * block)
    with torch.no_grad():
        fc1.weight.copy_(torch.randn(fc1.weight.shape, generator=gen) / D**0.5)
        fc1.bias.copy_(torch.randn(fc1.bias.shape, generator=gen) - 0.5)  # some blocks mostly quiet
    return fc1


def _data(fc1: torch.nn.Linear, block: int, units: int, tokens: int, gen: torch.Generator) -> LayerData:
    per_unit = [layer_data(torch.randn(2, tokens, D, generator=gen), fc1, block) for _ in range(units)]
    return LayerData(**{k: torch.cat([getattr(d, k) for d in per_unit]) for k in ("mlp_x", "mlp_frac", "mlp_mass")})


def _pred(n_blocks: int, block: int, seed: int, **config) -> MlpLowRank:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MlpLowRank(D, n_blocks * block, PredictorConfig(block_size=block, rank=4, **config)).eval()


# ---------------------------------------------------------------------------------------- references
def _reference_evaluate(pred, data) -> dict[str, float]:
    """evaluate_mlp as it was: per batch unit, each metric read on the host, then averaged."""
    policy = pred.config.exposer()
    rows = []
    for u in range(data.units()):
        truth, mass = mlp_truth(data, u, policy)
        got = pred.block_mask(data.mlp_x[u])
        hit = (got & truth).sum().item()
        rows.append(
            {
                "recall": hit / max(1, truth.sum().item()),
                "precision": hit / max(1, got.sum().item()),
                "density": got.float().mean().item(),
                "exposer_density": truth.float().mean().item(),
                "mass_kept": float(mass[got].sum() / mass.sum().clamp_min(1e-12)),
                "exposer_mass_kept": float(mass[truth].sum() / mass.sum().clamp_min(1e-12)),
            }
        )
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}


def _reference_calibrate(pred, data, target: float, grid) -> float:
    """calibrate_mlp as it was: one full evaluation per slack, in grid order."""
    return _calibrate(pred, "slack", grid, lambda: _reference_evaluate(pred, data)["recall"], target)


SLACK = st.floats(0.1, 2.5, allow_nan=False).map(lambda v: round(v, 3))


# ------------------------------------------------------------------------------------- calibration
@given(
    n_blocks=st.integers(2, 12),
    block=st.sampled_from([4, 8]),
    units=st.integers(1, 3),
    tokens=st.integers(3, 40),
    theta=st.floats(0.0, 0.6),
    alpha=st.floats(0.0, 1.0),
    grid=st.lists(SLACK, min_size=1, max_size=12),
    target=st.one_of(st.floats(0.0, 1.0), st.integers(0, 11)),  # an int: exactly the recall at that grid index
    seed=st.integers(0, 2**16),
)
@example(n_blocks=8, block=8, units=2, tokens=17, theta=0.3, alpha=0.5, grid=[2.0, 1.0, 0.5], target=1, seed=0)
@example(n_blocks=8, block=8, units=1, tokens=9, theta=0.5, alpha=0.5, grid=[2.0, 0.9], target=1.0, seed=3)
def test_vectorized_calibration_picks_the_loops_slack(n_blocks, block, units, tokens, theta, alpha, grid, target, seed):
    """Every slack scored in one batched comparison picks what the slack-by-slack loop picks (the first in
    grid order reaching the target, else the last), also when a recall sits exactly at the target."""
    gen = torch.Generator().manual_seed(seed)
    data = _data(_fc1(n_blocks, block, gen), block, units, tokens, gen)
    pred = _pred(n_blocks, block, seed, theta=theta, alpha=alpha)
    if isinstance(target, int):  # a target on a recall boundary
        probe = copy.deepcopy(pred)
        probe.config.slack = grid[target % len(grid)]
        probe.sync_config()
        target = _reference_evaluate(probe, data)["recall"]
    ref = copy.deepcopy(pred)
    want = _reference_calibrate(ref, data, target, grid)
    got = calibrate_mlp(pred, data, target, grid)
    assert got == want and pred.config.slack == want, (got, want, target)
    assert pred.theta_scale.item() == ref.theta_scale.item() == torch.tensor(want).item()


@given(
    n_blocks=st.integers(1, 12),
    theta=st.floats(0.0, 1.0),
    alpha=st.floats(0.0, 1.0),
    scales=st.lists(SLACK, min_size=1, max_size=8),
    seed=st.integers(0, 2**16),
)
def test_threshold_masks_equal_the_policy_at_each_scale(n_blocks, theta, alpha, scales, seed):
    gen = torch.Generator().manual_seed(seed)
    count = (torch.rand(n_blocks, generator=gen) * 50).round() * (torch.rand(n_blocks, generator=gen) > 0.3)
    mass = torch.rand(n_blocks, generator=gen) * count
    policy = PredictorConfig(block_size=4, theta=theta, alpha=alpha).exposer()
    t = torch.tensor(scales, dtype=torch.float32)
    masks = threshold_masks(count, mass, policy, t)
    for i, s in enumerate(t):
        assert torch.equal(masks[i], policy.mask_from_stats(count, mass, theta=policy.theta * s)), (i, s)


def test_device_evaluation_matches_the_per_unit_loop():
    gen = torch.Generator().manual_seed(0)
    data = _data(_fc1(8, 8, gen), 8, 3, 20, gen)
    for slack in (2.0, 1.0, 0.3):
        pred = _pred(8, 8, 1, theta=0.2, slack=slack)
        got, want = evaluate_mlp(pred, data, pred.config, time_it=False), _reference_evaluate(pred, data)
        assert got.keys() == want.keys()
        for k in want:
            assert got[k] == pytest.approx(want[k], rel=1e-6, abs=1e-7), k
        assert got["recall"] == want["recall"]  # the one calibration compares: the same float64 rounding


def _layers(n: int, units: int, seed: int) -> tuple[list[MlpLowRank], list[LayerData]]:
    """n layers' predictors (own input and mass scales) and batches (`units` each), 8 blocks of 8."""
    gen = torch.Generator().manual_seed(seed)
    datas = [_data(_fc1(8, 8, gen), 8, units, 20, gen) for _ in range(n)]
    preds = [_pred(8, 8, seed + i, theta=0.2) for i in range(n)]
    for i, p in enumerate(preds):
        p.in_scale.fill_(0.5 + i)
        p.mass_scale.fill_(2.0 + i)
    return preds, datas


@pytest.mark.parametrize("units", [1, 2])
def test_grouped_block_sums_equal_each_predictors_own(units):
    """One batched forward for every layer (a refresh's calibration on a GPU) gives each predictor's `block_sums`:
    to fp32 rounding with fp32 matmuls, to bf16's with bf16 ones (against the predictor under bf16 autocast, as
    the fine-tuning step runs it)."""
    preds, datas = _layers(3, units, seed=0)
    xs = [d.mlp_x for d in datas]
    for low, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        count, mass = group_block_sums(preds, xs, low)
        assert count.shape == mass.shape == (3, units, 8)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=low == torch.bfloat16):
            own = [[p.block_sums(x[u]) for u in range(units)] for p, x in zip(preds, xs, strict=True)]
        for i, rows in enumerate(own):
            for u, (c, m) in enumerate(rows):
                torch.testing.assert_close(count[i, u], c.float(), rtol=tol, atol=tol, msg=f"{low} layer {i} count")
                torch.testing.assert_close(mass[i, u], m.float(), rtol=tol, atol=tol, msg=f"{low} layer {i} mass")
    with pytest.raises(PredictorError, match="mlp-lowrank predictors of one shape"):
        group_block_sums([preds[0], _pred(4, 16, 0)], xs[:2], torch.float32)


@pytest.mark.parametrize("units", [1, 3])
def test_grouped_calibration_scores_like_the_per_layer_loop(units):
    """`stacked_slack_metrics` with `matmul_dtype` (the batched forward and the stacked true stats) scores every
    slack of every layer as the per-layer loop does (fp32 matmuls: the same masks, metrics to float64 rounding)."""
    preds, datas = _layers(3, units, seed=1)
    scales = torch.tensor([[5.0, 3.0, 2.0, 1.0, 0.3]] * 3)  # theta 0.2: 5 keeps the peak block only
    loop = stacked_slack_metrics(preds, datas, scales)
    grouped = stacked_slack_metrics(preds, datas, scales, matmul_dtype=torch.float32)
    assert loop[..., 0].min() < 1 and loop[..., 2].max() > loop[..., 2].min(), "slacks that change nothing"
    torch.testing.assert_close(grouped, loop, rtol=0, atol=1e-9)


# ---------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("seeds", [[7, 7, 7], [0, 1, 2]], ids=["one-seed", "per-layer-seeds"])
@pytest.mark.parametrize("rank", [4, 0])
def test_grouped_training_equals_train_mlp_per_layer(seeds, rank):
    """The same draws, loss and Adam steps per layer: stacked parameters end where `train_mlp` leaves each
    layer's, up to float32 rounding (batched matmuls and reductions add in another order; Adam's normalised
    steps keep such differences at the rounding level: measured ~3e-8 after 50 steps, against 1e-2 moved)."""
    gen = torch.Generator().manual_seed(0)
    datas = [_data(_fc1(8, 8, gen), 8, 2, 150, gen) for _ in range(3)]
    for d, scale in zip(datas, (1.0, 3.0, 0.2), strict=True):
        d.mlp_x.mul_(scale)  # layers of different input scales
    preds = [MlpLowRank(D, 64, PredictorConfig(block_size=8, rank=rank)).eval() for _ in range(3)]  # distinct inits
    ref, init = [copy.deepcopy(p) for p in preds], [copy.deepcopy(p) for p in preds]
    losses = [
        train_mlp(p, d, steps=30, lr=3e-3, seed=s, tokens_per_step=256)
        for p, d, s in zip(ref, datas, seeds, strict=True)
    ]
    tensors = [t for p in preds for t in (*p.parameters(), *p.buffers())]
    ptrs = [t.data_ptr() for t in tensors]
    grouped = train_mlp_group(preds, datas, steps=30, lr=3e-3, seeds=seeds, tokens_per_step=256)
    assert [t.data_ptr() for t in tensors] == ptrs, "parameters and buffers must change in place"
    torch.testing.assert_close(grouped, torch.tensor(losses).T, rtol=1e-5, atol=1e-6)
    for layer, (p, r, p0) in enumerate(zip(preds, ref, init, strict=True)):
        for (name, a), b, a0 in zip(p.named_parameters(), r.parameters(), p0.parameters(), strict=True):
            assert (a - a0).abs().max() > 1e-3, f"layer {layer} {name}: training moved nothing to compare"
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=f"layer {layer} {name}")
        for (name, a), b in zip(p.named_buffers(), r.buffers(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=0, msg=f"layer {layer} {name}")


def test_low_precision_input_layer_trains_like_fp32():
    """matmul_dtype=bf16 (what a refresh uses on a GPU with bf16 MLP inputs): the same draws and loss, the input
    layer's operands rounded to bf16 with fp32 accumulation; the loss curve stays within 1% of fp32's, and the
    trained predictors keep the same blocks on held-out batches."""
    gen = torch.Generator().manual_seed(0)
    fc1s = [_fc1(8, 8, gen) for _ in range(3)]
    datas = [_data(f, 8, 2, 150, gen) for f in fc1s]
    held = [_data(f, 8, 1, 150, gen) for f in fc1s]
    preds = [_pred(8, 8, i) for i in range(3)]
    low = [copy.deepcopy(p) for p in preds]
    exact = train_mlp_group(preds, datas, steps=120, lr=3e-3, tokens_per_step=256)
    rounded = train_mlp_group(low, datas, steps=120, lr=3e-3, tokens_per_step=256, matmul_dtype=torch.bfloat16)
    assert (exact[-1] < 0.7 * exact[0]).all(), exact  # it trained
    torch.testing.assert_close(rounded, exact, rtol=1e-2, atol=0)
    for p, q in zip(preds, low, strict=True):  # the input scale from fp32-accumulated moments of the stored x
        torch.testing.assert_close(q.in_scale, p.in_scale, rtol=1e-6, atol=0)
    for p, q, h in zip(preds, low, held, strict=True):
        assert torch.equal(p.block_mask(h.mlp_x[0]), q.block_mask(h.mlp_x[0]))


def test_grouped_training_refuses_mixed_shapes():
    gen = torch.Generator().manual_seed(0)
    d8, d4 = _data(_fc1(8, 8, gen), 8, 1, 10, gen), _data(_fc1(8, 8, gen), 8, 1, 12, gen)
    with pytest.raises(PredictorError, match="one rank, shape"):
        train_mlp_group([_pred(8, 8, 0), _pred(8, 8, 1)], [d8, d4], steps=1)
    with pytest.raises(PredictorError, match="one rank, shape"):
        train_mlp_group([_pred(8, 8, 0), _pred(16, 4, 1)], [d8, d8], steps=1)


# ------------------------------------------------------------------------------------- refresh_layers
def _refreshers(layers: int, steps: int = 5) -> dict[int, MlpRefresher]:
    gen = torch.Generator().manual_seed(1)
    config = RefreshConfig(steps=steps, lr=3e-3, buffer=2, keep_tokens=40)
    return {i: MlpRefresher(_pred(8, 8, i, theta=0.2), _fc1(8, 8, gen), config, seed=i) for i in range(layers)}


def _inputs(layers: int, seed: int) -> dict[int, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {i: torch.randn(2 * 48, D, generator=gen) for i in range(layers)}  # OPT-style (tokens, d)


def test_grouped_refresh_equals_refreshing_layer_by_layer():
    """refresh_layers over all layers gives each layer the rows and weights its own refresher would."""
    grouped, alone = _refreshers(3), _refreshers(3)
    for step in range(3):
        inputs = _inputs(3, step)
        rows = refresh_layers(grouped, inputs)
        single = {i: alone[i](x) for i, x in inputs.items()}
        assert list(rows) == [0, 1, 2] and all(list(r) == list(ROW_KEYS) for r in rows.values())
        for i in rows:
            assert all(isinstance(v, float) for v in rows[i].values())
            assert rows[i]["slack"] == single[i]["slack"] == grouped[i].pred.config.slack, (step, i)
            assert rows[i] == pytest.approx(single[i], abs=1e-6), (step, i)
            for a, b in zip(grouped[i].pred.parameters(), alone[i].pred.parameters(), strict=True):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    for r in grouped.values():
        assert r.count == 3 and not r.pred.training and not any(p.requires_grad for p in r.pred.parameters())


def test_the_training_pool_keeps_its_shape_from_the_first_refresh():
    """The pool holds `buffer` batches from the first refresh on (the newest fills the empty slots), so a kept
    training graph, keyed on the pool's shape, is captured once; later the oldest batch leaves."""
    refreshers = _refreshers(1)  # buffer 2, 40 tokens kept per batch
    r = refreshers[0]
    pools = []
    for step in range(3):
        refresh_layers(refreshers, _inputs(1, step))
        pools.append(r._pool().mlp_x.clone())
        torch.testing.assert_close(pools[-1][:, :, 40:], r.recent[-1].mlp_x, rtol=0, atol=0)  # the newest last
    assert [tuple(p.shape)[2] for p in pools] == [80, 80, 80]
    assert torch.equal(pools[0][:, :, :40], pools[0][:, :, 40:]), "one batch so far: it fills both slots"
    assert torch.equal(pools[1][:, :, :40], pools[0][:, :, 40:]), "two batches: the older one first"
    assert not torch.equal(pools[2][:, :, :40], pools[0][:, :, 40:]), "the oldest batch leaves the pool"


def test_refresh_changes_every_tensor_in_place():
    """A captured CUDA graph reads the predictors' tensors by address: a refresh must write into them."""
    refreshers = _refreshers(3)
    refresh_layers(refreshers, _inputs(3, 0))
    tensors = {f"{i}.{n}": t for i, r in refreshers.items() for n, t in (*r.pred.named_parameters(),
                                                                           *r.pred.named_buffers())}  # fmt: skip
    before = {n: (t.data_ptr(), t.detach().clone()) for n, t in tensors.items()}
    refresh_layers(refreshers, _inputs(3, 1))
    assert {n: t.data_ptr() for n, t in tensors.items()} == {n: p for n, (p, _) in before.items()}
    changed = {n for n, t in tensors.items() if not torch.equal(t, before[n][1])}
    assert {f"{i}.out.weight" for i in refreshers} <= changed and {f"{i}.inp.weight" for i in refreshers} <= changed


def _in_optimizer() -> bool:
    """torch.optim keeps Adam's step counter on the host for a non-capturable optimizer, whatever the
    parameters' device: its `.item()` waits for nothing on a GPU, so it is no host sync."""
    return any("torch/optim/" in f.filename for f in traceback.extract_stack())


class _RefreshProbe(HostValueProbe):
    """Host reads as test_no_host_sync counts them, but for the optimizer's step counter."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if _in_optimizer():
            return func(*args, **(kwargs or {}))
        return super().__torch_dispatch__(func, types, args, kwargs)


def test_grouped_refresh_reads_the_host_once(monkeypatch):
    """Four layers refreshed: no `.item()`, `nonzero` or host-made tensor, and one read of all the rows."""
    refreshers = _refreshers(4)
    refresh_layers(refreshers, _inputs(4, 0))  # the first refresh may build and cache (the slack grid)
    reads = []

    def counted(name, real):
        def call(t, *args, **kwargs):
            if not _in_optimizer():
                reads.append(name)
            return real(t, *args, **kwargs)

        return call

    for name in ("tolist", "cpu", "numpy", "item"):
        monkeypatch.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
    probe = _RefreshProbe()
    with probe:
        rows = refresh_layers(refreshers, _inputs(4, 1))
    assert len(rows) == 4
    assert not probe.seen, f"host reads in a grouped refresh: {dict(probe.seen)}"
    assert reads == ["tolist"], reads


def test_layer_data_multiplies_in_fp32_off_the_gpu():
    gen = torch.Generator().manual_seed(0)
    fc1 = _fc1(4, 8, gen)
    x = torch.randn(3, 10, D, generator=gen).to(torch.bfloat16)
    low, ref = layer_data(x, fc1, 8), layer_data(x.float(), fc1, 8)
    assert low.mlp_x.dtype == torch.float32 and low.mlp_x.shape == (1, 1, 30, D)
    for k in ("mlp_x", "mlp_frac", "mlp_mass"):
        assert torch.equal(getattr(low, k), getattr(ref, k)), k


@pytest.mark.parametrize("dtype, tokens, ffn, block", [(torch.bfloat16, 37, 256, 64), (torch.float32, 8, 96, 32)])
def test_fused_block_stats_equal_the_eager_ones(dtype, tokens, ffn, block):
    """The compiled pass over fc1's pre-activation (what a GPU refresh runs; here Inductor's CPU code) gives
    `mlp_block_stats` of its ReLU: the same firing fractions, the masses to float32 rounding; exact zeros and
    whole quiet or whole firing blocks included."""
    gen = torch.Generator().manual_seed(tokens)
    z = torch.randn(tokens, ffn, generator=gen).to(dtype)
    z[0] = 0.0  # no neuron fires (0 is not > 0)
    z[1, :block] = z[1, :block].abs() + 0.5  # a block that fires whole
    z[2, block : 2 * block] = -1.0  # a quiet block
    want, got = mlp_block_stats(torch.relu(z), block), _fused_relu_block_stats(z, block)
    assert got[0].dtype == got[1].dtype == torch.float32
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1], rtol=1e-6, atol=1e-6)
    with pytest.raises(PredictorError, match="not divisible by block_size"):
        layer_data(torch.randn(4, D), torch.nn.Linear(D, 40), 16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_layer_data_multiplies_bf16_in_bf16_on_the_gpu():
    """In the input's dtype on a GPU (fp32 accumulation in cuBLAS): block stats within bf16 rounding of fp32's."""
    gen = torch.Generator().manual_seed(0)
    fc1 = _fc1(16, 64, gen).cuda().to(torch.bfloat16)
    x = torch.randn(256, D, generator=gen).cuda().to(torch.bfloat16)
    low, ref = layer_data(x, fc1, 64), layer_data(x.float(), fc1.float(), 64)
    assert low.mlp_x.dtype == torch.bfloat16 and low.mlp_mass.dtype == low.mlp_frac.dtype == torch.float32
    torch.testing.assert_close(low.mlp_mass, ref.mlp_mass, rtol=2e-2, atol=1e-2)
    assert (low.mlp_frac - ref.mlp_frac).abs().max() <= 4 / 64


def _cuda_data(data: LayerData, dtype: torch.dtype = torch.float32) -> LayerData:
    return LayerData(mlp_x=data.mlp_x.cuda().to(dtype), mlp_frac=data.mlp_frac.cuda(), mlp_mass=data.mlp_mass.cuda())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("low", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_captured_training_steps_replay_the_eager_ones(low):
    """After two eager steps one step is captured and replayed: the same draws (each replay advances the
    generators), the same loss curve and parameters as eager steps, up to capturable Adam's rounding."""
    gen = torch.Generator().manual_seed(0)
    datas = [_cuda_data(_data(_fc1(8, 8, gen), 8, 2, 150, gen), low or torch.float32) for _ in range(3)]
    graphed = [_pred(8, 8, i).cuda() for i in range(3)]
    eager = copy.deepcopy(graphed)
    tensors = [t for p in graphed for t in (*p.parameters(), *p.buffers())]
    ptrs = [t.data_ptr() for t in tensors]
    kwargs = {"steps": 60, "lr": 3e-3, "tokens_per_step": 256, "seeds": [4, 4, 9], "matmul_dtype": low}
    a = train_mlp_group(graphed, datas, graph=True, **kwargs)
    b = train_mlp_group(eager, datas, graph=False, **kwargs)
    assert [t.data_ptr() for t in tensors] == ptrs
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    for p, q in zip(graphed, eager, strict=True):
        for (name, x), y in zip(p.named_parameters(), q.parameters(), strict=True):
            torch.testing.assert_close(x, y, rtol=0, atol=1e-4, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("low", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_kept_training_graph_reruns_like_a_fresh_call(low):
    """`keep`: the second call (new data, new seeds, predictors changed in between) replays the first call's captured
    step after resetting its inputs, Adam and generators in place: the same result as a fresh call's."""
    gen = torch.Generator().manual_seed(0)
    rounds = [[_cuda_data(_data(_fc1(8, 8, gen), 8, 2, 150, gen), low or torch.float32) for _ in range(3)]
              for _ in range(2)]  # fmt: skip
    kept_preds = [_pred(8, 8, i).cuda() for i in range(3)]
    fresh_preds = copy.deepcopy(kept_preds)
    kwargs = {"steps": 30, "lr": 3e-3, "tokens_per_step": 256, "matmul_dtype": low, "graph": True}
    keep: dict = {}
    for seeds, datas in zip(([1, 1, 1], [2, 2, 2]), rounds, strict=True):
        a = train_mlp_group(kept_preds, datas, seeds=seeds, keep=keep, **kwargs)
        b = train_mlp_group(fresh_preds, datas, seeds=seeds, **kwargs)
        assert len(keep) == 1
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        for p, q in zip(kept_preds, fresh_preds, strict=True):
            for (name, x), y in zip(p.named_parameters(), q.parameters(), strict=True):
                torch.testing.assert_close(x, y, rtol=0, atol=1e-4, msg=name)
            torch.testing.assert_close(p.in_scale, q.in_scale)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_grouped_refresh_on_the_gpu_synchronizes_once():
    """bf16 MLP inputs on the GPU (the fc1 product in bf16, captured training): one synchronizing call, the row
    read, counted by CUDA's own sync debug mode; every tensor stays where it was."""
    import warnings

    refreshers = _refreshers(4, steps=8)
    for r in refreshers.values():
        r.pred.cuda()
        r.fc1.cuda().to(torch.bfloat16)
    inputs = lambda seed: {i: x.cuda().to(torch.bfloat16) for i, x in _inputs(4, seed).items()}  # noqa: E731
    refresh_layers(refreshers, inputs(0))  # the first refresh may build and cache (the slack grid)
    tensors = [t for r in refreshers.values() for t in (*r.pred.parameters(), *r.pred.buffers())]
    ptrs = [t.data_ptr() for t in tensors]
    feed = inputs(1)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            rows = refresh_layers(refreshers, feed)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in seen if "called a synchronizing CUDA operation" in str(w.message)]
    assert len(syncs) == 1, syncs
    assert len(rows) == 4 and [t.data_ptr() for t in tensors] == ptrs
