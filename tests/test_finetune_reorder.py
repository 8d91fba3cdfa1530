"""`longexposure finetune --reorder-batches N`: neurons permuted exactly before predictors are trained on them."""

import json

import pytest
import torch
from longexposure.predictors.offline import PredictorBank
from relu_fixture import micro_checkpoint  # noqa: F401

from longexposure.cli import main
from longexposure.models import build_model

FLAGS = ["--model", "relu-micro", "--dataset", "e2e", "--data-split", "train", "--batch", "2", "--seq-len", "64",
         "--precision", "fp32", "--device", "cpu", "--method-option", "dropout=0.0"]  # fmt: skip


def _first_loss(out) -> float:
    return json.loads((out / "losses.jsonl").read_text().splitlines()[0])["loss"]


@pytest.mark.slow
def test_reorder_is_exact_and_predictors_are_trained_on_the_reordered_checkpoint(
    micro_checkpoint, tmp_path, monkeypatch  # noqa: F811
):
    monkeypatch.setenv("LONGEXPOSURE_CACHE", str(tmp_path / "cache"))
    plain, reordered = tmp_path / "plain", tmp_path / "reordered"
    assert main(["finetune", *FLAGS, "--weights", str(micro_checkpoint), "--steps", "2", "--out", str(plain)]) == 0
    args = ["finetune", *FLAGS, "--weights", str(micro_checkpoint), "--steps", "2", "--out", str(reordered),
            "--reorder-batches", "2", "--predictor-batches", "2", "--predictor-steps", "5",
            "--expose", "source=predicted", "--expose", "predictors=auto", "--expose", "attention=false",
            "--expose", "mlp_block=32", "--expose", "mlp_backend=torch-gather"]  # fmt: skip
    assert main(args) == 0
    summary = json.loads((reordered / "summary.json").read_text())
    ckpt = summary["setup"]["weights"]
    assert ckpt != str(micro_checkpoint) and "reordered" in ckpt
    # exact: the reordered checkpoint is a permutation of the original's neurons, the same function
    ids = torch.randint(0, 50000, (2, 64), generator=torch.Generator().manual_seed(0))
    a = build_model("relu-micro", weights=str(micro_checkpoint), attn_implementation="eager").eval()
    b = build_model("relu-micro", weights=ckpt, attn_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(b(input_ids=ids).logits, a(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
        assert not torch.equal(b.model.decoder.layers[0].fc1.weight, a.model.decoder.layers[0].fc1.weight)
    # the predictors belong to the reordered weights (a bank is refused for other weights)
    bank = summary["setup"]["exposure"]["predictors"]
    PredictorBank.load(bank, b)
    with pytest.raises(ValueError):
        PredictorBank.load(bank, a)
    # the dense run on the plain checkpoint starts from the same loss (same function, same first batch)
    assert _first_loss(reordered) == pytest.approx(_first_loss(plain), rel=0.02)


def test_reorder_needs_weights(capsys):
    assert main(["finetune", *FLAGS, "--steps", "2", "--reorder-batches", "2"]) == 2
    assert "--reorder-batches needs --weights" in capsys.readouterr().err
