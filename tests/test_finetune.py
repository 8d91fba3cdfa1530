import json
from pathlib import Path

import pytest

from longexposure.cli import main
from longexposure.finetune import _parse_options, finetune
from longexposure.training import TrainingSetup

E2E = Path(__file__).resolve().parents[2] / "shared" / "data" / "e2e"


@pytest.mark.skipif(not E2E.is_dir(), reason=f"E2E data not found at {E2E}")
def test_finetune_lowers_the_loss_and_saves_what_it_trained(tmp_path):
    setup = TrainingSetup(
        model="opt-tiny",
        method="bitfit",
        batch=4,
        seq_len=32,
        precision="fp32",
        lr=5e-2,
        dataset="e2e",
        data_path=str(E2E),
    )
    summary = finetune(setup, steps=12, out=tmp_path, device="cpu", log_every=4)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "losses.jsonl").read_text().splitlines()]
    assert len(losses) == 12
    assert sum(losses[-3:]) < sum(losses[:3]) - 0.3, losses
    assert summary["final_loss"] == losses[-1]
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["info"]["sparsity_source"] == "none (dense)"
    assert saved["ms_per_step"]["total_ms"]["n"] == 3
    assert (tmp_path / "trainable.safetensors").exists()


def test_finetune_cli_saves_a_peft_adapter(tmp_path, capsys):
    code = main(
        [
            "finetune",
            "--model",
            "gpt2-tiny",
            "--method",
            "lora",
            "--method-option",
            "r=4",
            "--steps",
            "3",
            "--seq-len",
            "16",
            "--batch",
            "2",
            "--log-every",
            "3",
            "--out",
            str(tmp_path),
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 4
    assert "ms/step" in capsys.readouterr().out


def test_method_options_parse_and_reject_malformed_pairs():
    assert _parse_options(["r=8", "alpha=16.5", "target_modules=[q_proj]"]) == {
        "r": 8,
        "alpha": 16.5,
        "target_modules": ["q_proj"],
    }
    with pytest.raises(ValueError, match="key=value"):
        _parse_options(["r8"])


def test_train_predictors_then_finetune_with_them(tmp_path, capsys):
    """The CLI path of issue 6: a predictor bank trained and saved, then live in fine-tuning."""
    bank = tmp_path / "bank"
    common = ["--model", "opt-tiny", "--seq-len", "64", "--batch", "2", "--device", "cpu"]
    assert (
        main(
            [
                "train-predictors",
                *common,
                "--dataset",
                "synthetic",
                "--batches",
                "3",
                "--steps",
                "10",
                "--mlp-block",
                "32",
                "--attn-block",
                "16",
                "--out",
                str(bank),
            ]
        )
        == 0
    )
    assert (bank / "predictors.json").exists() and (bank / "predictors.pt").exists()
    expose = [
        "source=predicted",
        f"predictors={bank}",
        "mlp_block=32",
        "attn_block=16",
        "mlp_backend=torch-gather",
        "attention_backend=eager",
    ]
    out = tmp_path / "run"
    args = ["finetune", *common, "--attn", "eager", "--steps", "2", "--log-every", "1", "--out", str(out)]
    for pair in expose:
        args += ["--expose", pair]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ms_per_step"]["predict_ms"]["p50"] > 0
    assert summary["info"]["sparsity_source"].startswith("predicted: live predictors from")
    assert (out / "predictors" / "predictors.json").exists()
    assert "sparsity: predicted" in capsys.readouterr().out
    assert main(["finetune", *common, "--expose", "source=guess", "--steps", "1"]) == 2
