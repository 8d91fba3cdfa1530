"""Predictors: every registered one on the micro model (formats, density, determinism), oracle recall,
trained recall on held-out batches, save/load, and clear errors on bad inputs."""

import copy

import pytest
import torch
from longexposure.predictors.builtin import build_predictor
from longexposure.predictors.lowrank import PredictorConfig, PredictorError
from longexposure.predictors.offline import (
    PredictorBank,
    evaluate_attention,
    evaluate_mlp,
    train_attention,
    train_bank,
    train_mlp,
)
from relu_fixture import (  # noqa: F401
    ATTN_BLOCK,
    MLP_BLOCK,
    e2e_ids,
    micro_checkpoint,
    micro_layer_data,
    micro_model,
)

from longexposure.registry import PREDICTORS, RegistryError

CASES = [
    (name, t)
    for name in ("attn-lowrank", "mlp-lowrank", "svd", "oracle", "random")
    for t in PREDICTORS.entry(name).meta["targets"]
]
OPTS = {"block_size": MLP_BLOCK, "attn_block": ATTN_BLOCK, "rank": 8}


def _x(data, target: str, unit: int = 0) -> torch.Tensor:
    return (data.mlp_x if target == "mlp" else data.attn_x)[unit]


def test_registry_names_and_errors(micro_model):  # noqa: F811
    assert set(PREDICTORS.names()) == {"attn-lowrank", "mlp-lowrank", "svd", "oracle", "random"}
    with pytest.raises(RegistryError, match="Did you mean 'oracle'"):
        build_predictor("oracel", micro_model, 0)
    with pytest.raises(PredictorError, match="predicts .*attention.*not 'mlp'"):
        build_predictor("attn-lowrank", micro_model, 0, target="mlp")
    with pytest.raises(PredictorError, match="target must be"):
        PredictorConfig(target="conv")
    with pytest.raises(PredictorError, match="out of range"):
        build_predictor("oracle", micro_model, 9)
    with pytest.raises(PredictorError, match="not divisible by block_size 48"):
        build_predictor("mlp-lowrank", micro_model, 0, block_size=48)


@pytest.mark.parametrize("name,target", CASES)
def test_output_format_density_and_determinism(name, target, micro_model, micro_layer_data):  # noqa: F811
    _, held = micro_layer_data
    x = _x(held[1], target)
    b, s, _ = x.shape
    torch.manual_seed(0)
    pred = build_predictor(name, micro_model, 1, target=target, **OPTS)
    out = pred(x)
    if target == "mlp":
        n_blocks = 512 // MLP_BLOCK
        assert out.dtype == torch.int32 and out.dim() == 1
        assert torch.equal(out, torch.unique(out)) and 1 <= out.numel() <= n_blocks
        assert int(out.min()) >= 0 and int(out.max()) < n_blocks
    else:
        n = s // ATTN_BLOCK
        assert out.dtype == torch.bool and tuple(out.shape) == (b, 4, n, n)
        assert not (out & ~torch.ones(n, n, dtype=torch.bool).tril()).any(), "causal"
        density = out.sum((-1, -2)).float() / (n * (n + 1) / 2)
        assert (density > 0).all() and (density <= 1).all()
        if name in ("attn-lowrank", "svd"):
            assert (out == out[:1]).all(), "one mask per head for the batch (reduced over the batch)"
    # determinism: the same construction (same seed) gives the same outputs, call after call
    torch.manual_seed(0)
    again = build_predictor(name, micro_model, 1, target=target, **OPTS)
    assert torch.equal(again(x), out)


def test_random_matches_oracle_density_and_seed(micro_model, micro_layer_data):  # noqa: F811
    _, held = micro_layer_data
    x = held[2].mlp_x[0]
    oracle = build_predictor("oracle", micro_model, 2, **OPTS)
    rnd = build_predictor("random", micro_model, 2, seed=1, **OPTS)
    assert rnd(x).numel() == oracle(x).numel()
    half = [build_predictor("random", micro_model, 2, seed=seed, density=0.5, **OPTS) for seed in (1, 1, 2)]
    draws = [[p(x) for _ in range(3)] for p in half]
    assert all(torch.equal(a, b) for a, b in zip(draws[0], draws[1], strict=True)), "same seed, same draws"
    assert any(not torch.equal(a, b) for a, b in zip(draws[0], draws[2], strict=True)), "another seed differs"
    fixed = build_predictor("random", micro_model, 2, density=0.5, **OPTS)
    assert fixed(x).numel() == 8


@pytest.mark.parametrize("target", ["mlp", "attention"])
def test_oracle_recall_is_one(target, micro_model, micro_layer_data):  # noqa: F811
    _, held = micro_layer_data
    for layer, data in enumerate(held):
        pred = build_predictor("oracle", micro_model, layer, target=target, **OPTS)
        ev = (evaluate_mlp if target == "mlp" else evaluate_attention)(pred, data, pred.config, time_it=False)
        assert ev["recall"] == 1.0 and ev["precision"] == 1.0
        assert ev["density"] == pytest.approx(ev["exposer_density"])


def test_fixed_capacity_output(micro_model, micro_layer_data):  # noqa: F811
    _, held = micro_layer_data
    x = held[1].mlp_x[0]
    torch.manual_seed(0)
    exact = build_predictor("mlp-lowrank", micro_model, 1, **OPTS)(x)
    torch.manual_seed(0)
    ids, count = build_predictor("mlp-lowrank", micro_model, 1, fixed_capacity=True, **OPTS)(x)
    assert ids.shape == (512 // MLP_BLOCK,) and torch.equal(ids[: int(count)], exact)


def test_full_rank_svd_is_exact_for_the_mlp(micro_model, micro_layer_data):  # noqa: F811
    _, held = micro_layer_data
    x = held[0].mlp_x[0]
    full = build_predictor("svd", micro_model, 0, block_size=MLP_BLOCK, rank=0)  # rank 0: full rank
    oracle = build_predictor("oracle", micro_model, 0, block_size=MLP_BLOCK)
    act = torch.relu(torch.nn.functional.linear(x, oracle.fc1.weight, oracle.fc1.bias))
    count, mass = full.block_sums(x)
    blocks = act.view(*act.shape[:-1], -1, MLP_BLOCK)
    torch.testing.assert_close(mass, blocks.sum((0, 1, 3)), atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(count, (blocks > 0).float().sum((0, 1, 3)), atol=2.0, rtol=1e-3)
    assert torch.equal(full(x), oracle(x))


def test_trained_predictors_recall_on_held_out(micro_model, micro_layer_data):  # noqa: F811
    train, held = micro_layer_data
    bank, info = train_bank(
        micro_model,
        train,
        mlp_config={"block_size": MLP_BLOCK, "rank": 32, "theta": 0.1},
        attn_config={"attn_block": ATTN_BLOCK, "rank": 8},
        steps=150,
        recall_target=0.97,
        mass_target=0.95,
    )
    assert len(info["layers"]) == len(train)
    for layer, data in enumerate(held):
        mlp = evaluate_mlp(bank["mlp", layer], data, bank["mlp", layer].config, time_it=False)
        rnd = build_predictor("random", micro_model, layer, block_size=MLP_BLOCK, theta=0.1, seed=layer)
        chance = evaluate_mlp(rnd, data, rnd.config, time_it=False)
        assert mlp["recall"] >= 0.9, (layer, mlp)
        assert mlp["mass_kept"] >= chance["mass_kept"], (layer, mlp, chance)
        att = evaluate_attention(bank["attention", layer], data, bank["attention", layer].config, time_it=False)
        assert att["mass_kept"] >= 0.9, (layer, att)


def test_training_is_deterministic_under_a_seed(micro_model, micro_layer_data):  # noqa: F811
    train, _ = micro_layer_data

    def fit(seed: int):
        torch.manual_seed(0)
        m = build_predictor("mlp-lowrank", micro_model, 1, **OPTS)
        a = build_predictor("attn-lowrank", micro_model, 1, target="attention", **OPTS)
        train_mlp(m, train[1], steps=20, seed=seed)
        train_attention(a, train[1], steps=20, seed=seed)
        return [p.detach().clone() for p in (*m.parameters(), *a.parameters())]

    first, second, other = fit(3), fit(3), fit(4)
    assert all(torch.equal(p, q) for p, q in zip(first, second, strict=True))
    assert any(not torch.equal(p, q) for p, q in zip(first, other, strict=True))


def test_train_bank_is_reproducible_whatever_the_callers_rng(micro_model, micro_layer_data):  # noqa: F811
    """The bank a user trains depends on the data and `seed` only (the initial weights included), and
    training it leaves the caller's RNG where it was."""
    train, _ = micro_layer_data
    opts = dict(mlp_config={"block_size": MLP_BLOCK, "rank": 16, "theta": 0.1}, attention=False, steps=10)

    def fit(seed: int, rng_state: int) -> list[torch.Tensor]:
        torch.manual_seed(rng_state)
        bank, _ = train_bank(micro_model, train[:2], seed=seed, **opts)
        return [p.detach().clone() for m in bank.predictors["mlp"] for p in m.parameters()]

    first = fit(5, rng_state=1)
    after = torch.rand(1)
    torch.manual_seed(1)
    assert torch.equal(after, torch.rand(1)), "train_bank moved the caller's RNG"
    second, other = fit(5, rng_state=2), fit(6, rng_state=1)
    assert all(torch.equal(p, q) for p, q in zip(first, second, strict=True))
    assert any(not torch.equal(p, q) for p, q in zip(first, other, strict=True))


def test_save_load_reproduces_outputs(tmp_path, micro_model, micro_layer_data):  # noqa: F811
    train, held = micro_layer_data
    bank, _ = train_bank(
        micro_model,
        train[:2] + train[2:],
        mlp_config={"block_size": MLP_BLOCK, "rank": 16},
        attn_config={"attn_block": ATTN_BLOCK, "rank": 4},
        steps=10,
    )
    bank.save(tmp_path / "pred", micro_model, report={"note": "test"})
    loaded = PredictorBank.load(tmp_path / "pred", micro_model)
    for layer, data in enumerate(held):
        for target in ("mlp", "attention"):
            x = _x(data, target)
            assert torch.equal(loaded[target, layer](x), bank[target, layer](x))
            assert loaded[target, layer].config == bank[target, layer].config  # calibrated slack survives
    # a model of another shape is refused with the offending key
    from longexposure.models import build_model

    other = build_model("opt-tiny")
    with pytest.raises(PredictorError, match="hidden_size"):
        PredictorBank.load(tmp_path / "pred", other)
    with pytest.raises(FileNotFoundError, match="no saved predictors"):
        PredictorBank.load(tmp_path / "nothing", micro_model)


@pytest.mark.parametrize("name,target", CASES)
def test_bad_inputs_give_clear_errors(name, target, micro_model, micro_layer_data):  # noqa: F811
    _, held = micro_layer_data
    pred = build_predictor(name, micro_model, 0, target=target, **OPTS)
    x = _x(held[0], target)
    with pytest.raises(PredictorError, match="hidden size 64 != the layer's hidden size 128"):
        pred(x[..., :64])
    with pytest.raises(PredictorError, match=r"\(batch, seq, hidden\)"):
        pred(x[0])
    if target == "attention":
        with pytest.raises(PredictorError, match="sequence length 60 is not divisible by the attention block size 16"):
            pred(x[:, :60])


def test_bank_build_for_any_pair(micro_model):  # noqa: F811
    bank = PredictorBank.build(
        copy.deepcopy(micro_model),
        mlp="svd",
        attention="oracle",
        mlp_config={"block_size": MLP_BLOCK},
        attn_config={"attn_block": ATTN_BLOCK},
    )
    assert bank.names == {"mlp": "svd", "attention": "oracle"}
    assert len(bank.predictors["mlp"]) == len(bank.predictors["attention"]) == 4


@pytest.mark.parametrize("name, target", [c for c in CASES if c[0] != "random"])
def test_compiled_call_builds_no_host_tensor(name, target, micro_model):  # noqa: F811
    """The torch.compile'd predictor call keeps every tensor on the input's device. A constant built on
    the host inside the traced region (it happened: the pattern-atom masks) becomes a host-to-device copy
    on every call, which a CUDA-graph capture refuses. Traced on `meta`, any host tensor shows."""
    from longexposure.predictors.compiled import EAGER

    opts = {**OPTS, "fixed_capacity": target == "mlp"}
    predictor = build_predictor(name, micro_model, 0, target=target, **opts)
    predictor = copy.deepcopy(predictor).to("meta")
    host_nodes = []

    def record(gm, example_inputs):
        for node in gm.graph.nodes:
            value = node.meta.get("example_value")
            for t in value if isinstance(value, (tuple, list)) else [value]:
                if isinstance(t, torch.Tensor) and t.device.type != "meta":
                    host_nodes.append(f"{node.op} {node.target}")
        return gm.forward

    torch._dynamo.reset()
    x = torch.randn(2, 4 * ATTN_BLOCK, micro_model.config.hidden_size, device="meta")
    torch.compile(EAGER[target], backend=record, fullgraph=True)(predictor, x)
    assert not host_nodes, f"{name}/{target} builds host tensors in the compiled call: {host_nodes[:5]}"


def test_refresher_follows_a_moved_pattern(micro_model):  # noqa: F811
    """A predictor fitted where neuron blocks {0, 1} fire is refreshed on batches where {4, 5} fire instead:
    its recall on a held-out batch of the new pattern goes from near 0 to >= 0.9, and each refresh
    calibrates on the batch before training on it (so `recall_after` is measured on unseen data)."""
    from longexposure.predictors.refresh import MlpRefresher, RefreshConfig, layer_data

    from longexposure.profiling import decoder_layers, layer_part

    fc1 = copy.deepcopy(layer_part(micro_model, decoder_layers(micro_model)[1], "fc1"))
    gen = torch.Generator().manual_seed(0)
    batch = lambda: torch.randn(2, 64, fc1.in_features, generator=gen)  # noqa: E731

    def firing(blocks: tuple[int, ...]) -> torch.nn.Linear:
        layer = copy.deepcopy(fc1)
        with torch.no_grad():
            layer.bias.fill_(-1e3)  # silent ...
            for b in blocks:  # ... except these blocks
                layer.bias[b * MLP_BLOCK : (b + 1) * MLP_BLOCK] = 10.0
        return layer

    old, new = firing((0, 1)), firing((4, 5))
    pred = build_predictor("mlp-lowrank", micro_model, 1, block_size=MLP_BLOCK, theta=0.1, rank=16)
    config = RefreshConfig(steps=60, lr=3e-3, buffer=2)
    first = MlpRefresher(pred, old, config)
    for _ in range(3):
        first(batch())
    held = layer_data(batch(), new, MLP_BLOCK)
    stale = evaluate_mlp(pred, held, pred.config, time_it=False)["recall"]
    refresher = MlpRefresher(pred, new, config)
    rows = [refresher(batch()) for _ in range(4)]
    fresh = evaluate_mlp(pred, held, pred.config, time_it=False)
    assert stale < 0.5 and fresh["recall"] >= 0.9, (stale, fresh, rows)
    assert rows[0]["recall_before"] < 0.5 and rows[-1]["recall_after"] >= 0.9, rows
    assert abs(fresh["density"] - fresh["exposer_density"]) <= 2 / (fc1.out_features // MLP_BLOCK), fresh
    assert not any(p.requires_grad for p in pred.parameters()) and not pred.training
    with pytest.raises(ValueError, match="refresh needs"):
        RefreshConfig(buffer=0)
