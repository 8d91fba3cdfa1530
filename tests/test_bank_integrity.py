"""Predictor banks load only when whole and only onto the weights they were trained for (issue 16, item 6).

Every case here used to load silently: a bank for another random init, a JSON with configs for 1 of 2
layers, an empty or partial tensor file, a truncated tensor file; an interrupted save left a JSON that
made the bank look complete. The model is random-init opt-tiny (2 layers): no corpus, a few seconds.
"""

from __future__ import annotations

import json

import pytest
import torch
from longexposure.predictors.lowrank import PredictorError
from longexposure.predictors.offline import PredictorBank, weights_id

from longexposure.models import build_model

MLP_BLOCK, ATTN_BLOCK = 32, 16


def _model(seed: int = 0) -> torch.nn.Module:
    return build_model("opt-tiny", attn_implementation="eager", seed=seed).requires_grad_(False).eval()


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return _model(0)


def _bank(model: torch.nn.Module) -> PredictorBank:
    torch.manual_seed(0)
    return PredictorBank.build(model, mlp_config={"block_size": MLP_BLOCK}, attn_config={"attn_block": ATTN_BLOCK})


@pytest.fixture
def saved(tmp_path, model):
    """A complete saved bank (untrained mlp-lowrank + attn-lowrank) for `model`."""
    return _bank(model).save(tmp_path / "bank", model)


def _rewrite_state(directory, state) -> None:
    """Replace predictors.pt and record it in the JSON as a save would: only the contents are wrong."""
    from longexposure.predictors.offline import _sha256

    pt = directory / "predictors.pt"
    torch.save(state, pt)
    meta = json.loads((directory / "predictors.json").read_text())
    meta["tensors"].update(bytes=pt.stat().st_size, sha256=_sha256(pt), keys=sorted(state))
    (directory / "predictors.json").write_text(json.dumps(meta))


def test_round_trip_records_the_weights_id_and_loads_tensors_only(saved, model, monkeypatch):
    """The JSON names the weights; the tensor file is read with weights_only=True (no arbitrary pickles)."""
    meta = json.loads((saved / "predictors.json").read_text())
    assert meta["model"]["id"] == weights_id(model)["id"] and meta["model"]["weights"] == "random-init"
    assert meta["tensors"]["keys"] == sorted([f"{t}.{i}" for t in ("mlp", "attention") for i in range(2)])
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k) or real_load(*a, **k))
    loaded = PredictorBank.load(saved, model)
    assert [k.get("weights_only") for k in calls] == [True]
    x = torch.randn(2, 64, 64)
    original = _bank(model)
    for target in ("mlp", "attention"):
        for layer in range(2):
            assert torch.equal(loaded[target, layer](x), original[target, layer](x))


def test_a_bank_for_other_weights_is_refused_naming_both_ids(saved, model):
    other = _model(seed=1)  # same architecture, another random init
    with pytest.raises(ValueError, match="trained for other weights") as err:
        PredictorBank.load(saved, other)
    assert weights_id(model)["id"] in str(err.value) and weights_id(other)["id"] in str(err.value)
    assert weights_id(model)["id"] != weights_id(other)["id"]


def test_reordered_neurons_are_other_weights(saved, model):
    """A bank predicts neuron-block ids in the order it saw: a reordered fc1 must not reuse it."""
    import copy

    permuted = copy.deepcopy(model)
    fc1 = permuted.model.decoder.layers[0].fc1
    perm = torch.randperm(fc1.out_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fc1.weight.copy_(fc1.weight[perm])
    with pytest.raises(PredictorError, match="other weights"):
        PredictorBank.load(saved, permuted)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_same_weights_in_another_dtype_load(saved, model, dtype):
    """The id is about the weights, not their precision: a bf16 / fp16 copy has the same id and loads."""
    low = _model(0).to(dtype)
    assert weights_id(low)["id"] == weights_id(model)["id"]
    assert PredictorBank.load(saved, low)


def test_rescaled_weights_with_the_same_signs_are_refused(saved, model):
    import copy

    scaled = copy.deepcopy(model)
    with torch.no_grad():
        scaled.model.decoder.layers[1].self_attn.k_proj.weight.mul_(1.5)
    assert weights_id(scaled)["id"] == weights_id(model)["id"]
    with pytest.raises(PredictorError, match="other weights.*same signs"):
        PredictorBank.load(saved, scaled)


def test_configs_for_fewer_layers_than_the_model_has_are_refused(saved, model):
    meta = json.loads((saved / "predictors.json").read_text())
    meta["targets"]["mlp"]["configs"] = meta["targets"]["mlp"]["configs"][:1]
    (saved / "predictors.json").write_text(json.dumps(meta))
    with pytest.raises(PredictorError, match="mlp configs for 1 of the model's 2 layers"):
        PredictorBank.load(saved, model)


def test_a_layer_missing_from_the_tensors_is_refused(saved, model):
    state = torch.load(saved / "predictors.pt", weights_only=True)
    del state["attention.1"]
    _rewrite_state(saved, state)
    with pytest.raises(PredictorError, match=r"no trained attention weights for layer 1"):
        PredictorBank.load(saved, model)


def test_an_empty_state_dict_is_refused(saved, model):
    _rewrite_state(saved, {})
    with pytest.raises(PredictorError, match=r"no trained mlp weights for layer 0"):
        PredictorBank.load(saved, model)


def test_tensors_of_the_wrong_shape_are_refused(saved, model):
    state = torch.load(saved / "predictors.pt", weights_only=True)
    state["mlp.1"]["out.weight"] = state["mlp.1"]["out.weight"][:-2]
    _rewrite_state(saved, state)
    with pytest.raises(PredictorError, match=r"\[mlp.1\]: out.weight has shape"):
        PredictorBank.load(saved, model)


def test_a_truncated_tensor_file_is_refused(saved, model):
    pt = saved / "predictors.pt"
    pt.write_bytes(pt.read_bytes()[: pt.stat().st_size // 2])
    with pytest.raises(PredictorError, match="truncated or replaced"):
        PredictorBank.load(saved, model)


def test_a_missing_tensor_file_is_an_incomplete_bank(saved, model):
    (saved / "predictors.pt").unlink()
    with pytest.raises(FileNotFoundError, match="incomplete"):
        PredictorBank.load(saved, model)


def test_an_interrupted_save_never_looks_complete(saved, model, monkeypatch):
    """Tensors first, JSON last: a save that dies writing the tensors leaves no JSON, even over an old bank."""
    assert PredictorBank.is_saved(saved)

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space"):
        _bank(model).save(saved, model)
    assert not (saved / "predictors.json").exists() and not PredictorBank.is_saved(saved)
    assert not list(saved.glob(".*.tmp")), "the temporary file is cleaned up"
    with pytest.raises(FileNotFoundError, match="no saved predictors .*interrupted save"):
        PredictorBank.load(saved, model)


def test_an_incomplete_bank_is_not_saved(tmp_path, model):
    bank = _bank(model)
    bank.predictors["mlp"] = bank.predictors["mlp"][:1]
    with pytest.raises(PredictorError, match="mlp predictors for 1 of 2 layers"):
        bank.save(tmp_path / "bank", model)
    assert not (tmp_path / "bank" / "predictors.json").exists()


def test_a_format_1_bank_is_refused_with_what_to_do(saved, model):
    meta = json.loads((saved / "predictors.json").read_text())
    meta["format"] = 1
    (saved / "predictors.json").write_text(json.dumps(meta))
    assert not PredictorBank.is_saved(saved)  # a cache retrains it
    with pytest.raises(PredictorError, match="format 1.*train the bank again"):
        PredictorBank.load(saved, model)


def test_loss_curve_cache_refits_a_bank_it_cannot_load(tmp_path, monkeypatch):
    """`predictors: auto` reuses a cached bank only when complete and current: a bank dir holding only the
    tensors (an interrupted save) or a format-1 JSON (no weights id) is refitted, not reused."""
    from longexposure import prepared
    from longexposure.tasks import loss_curve

    monkeypatch.setenv("LONGEXPOSURE_CACHE", str(tmp_path))
    fits = []
    monkeypatch.setattr(
        "longexposure.predictors.fit.fit_predictors_for", lambda model, weights, out, **kw: fits.append(out)
    )
    case = loss_curve.LossCurveCase(model="opt-tiny", exposure={"source": "predicted", "predictors": "auto"})
    out = prepared.auto_predictors(case, None, 16, 300, torch.device("cpu"), 0)
    assert fits == [out]
    out.mkdir(parents=True)
    (out / "predictors.pt").write_bytes(b"torn")
    prepared.auto_predictors(case, None, 16, 300, torch.device("cpu"), 0)
    (out / "predictors.json").write_text(json.dumps({"format": 1, "model": {}, "targets": {}}))
    prepared.auto_predictors(case, None, 16, 300, torch.device("cpu"), 0)
    assert fits == [out] * 3


def test_auto_predictors_fit_at_the_exposure_recall_target_in_their_own_cache_entry(tmp_path, monkeypatch):
    """`recall_target` in the exposure reaches the offline calibration and keys the cached bank (a bank
    calibrated for 0.97 is never reused for 0.9); without it the default 0.97 is used and the key is unchanged."""
    from longexposure import prepared
    from longexposure.tasks import loss_curve

    monkeypatch.setenv("LONGEXPOSURE_CACHE", str(tmp_path))
    fits = []
    monkeypatch.setattr(
        "longexposure.predictors.fit.fit_predictors_for", lambda model, weights, out, **kw: fits.append((out, kw))
    )
    outs = []
    for extra in ({}, {"recall_target": 0.9}):
        exposure = {"source": "predicted", "predictors": "auto", **extra}
        case = loss_curve.LossCurveCase(model="opt-tiny", exposure=exposure)
        outs.append(prepared.auto_predictors(case, None, 16, 300, torch.device("cpu"), 0))
    assert outs[0] != outs[1]
    assert [kw["recall_target"] for _, kw in fits] == [0.97, 0.9]
