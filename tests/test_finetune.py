import json
import math
from pathlib import Path

import pytest
from conftest import tiny_setup

from longexposure.cli import main
from longexposure.finetune import PRECISION_CHOICES, _parse_options, finetune
from longexposure.training import PRECISIONS

E2E = Path(__file__).resolve().parents[2] / "shared" / "data" / "e2e"


@pytest.mark.skipif(not E2E.is_dir(), reason=f"E2E data not found at {E2E}")
def test_finetune_lowers_the_loss_and_saves_what_it_trained(tmp_path):
    setup = tiny_setup(method="bitfit", batch=4, seq_len=32, lr=5e-2, dataset="e2e", data_path=str(E2E))
    summary = finetune(setup, steps=12, out=tmp_path, device="cpu", log_every=4)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "losses.jsonl").read_text().splitlines()]
    assert len(losses) == 12
    assert sum(losses[-3:]) < sum(losses[:3]) - 0.3, losses
    assert summary["final_loss"] == losses[-1]
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["info"]["sparsity_source"] == "none (dense)"
    assert saved["ms_per_step"]["total_ms"]["n"] == 11  # every step after the first
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
    args = ["finetune", *common, "--attn", "eager", "--steps", "2", "--log-every", "1", "--out", str(out),
            "--held-out-batches", "2"]  # fmt: skip
    for pair in expose:
        args += ["--expose", pair]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ms_per_step"]["predict_ms"]["p50"] > 0
    assert summary["info"]["sparsity_source"].startswith("predicted: live predictors from")
    assert (out / "predictors" / "predictors.json").exists()
    held = summary["held_out"]
    assert held["held_out_batches"] == 2 and math.isfinite(held["held_out_loss"])
    assert held["held_out_mlp_density_all"] == 1.0 and "seed 3: unseen batches" in held["held_out_data"]
    printed = capsys.readouterr().out
    assert "sparsity: predicted" in printed
    assert f"held-out loss {held['held_out_loss']:.4f} (2 batches: " in printed and "with every MLP block" in printed
    assert main(["finetune", *common, "--expose", "source=guess", "--steps", "1"]) == 2
    # E2E held out only when fine-tuning on its train split, refused before any step
    assert main(["finetune", *common, "--dataset", "e2e", "--held-out-batches", "2", "--steps", "1"]) == 2
    assert "needs data_split: train" in capsys.readouterr().err


def test_finetune_on_the_corpus_holds_out_its_tail(tmp_path, capsys):
    """`--dataset corpus`: fine-tuning reads pretraining's stream and the held-out loss the tail it holds out;
    without `--data-split train` a held-out evaluation is refused before any step."""
    import numpy as np

    corpus = tmp_path / "corpus.npy"
    np.save(corpus, (np.arange(20000) % 1000).astype(np.uint16))
    common = ["--model", "opt-tiny", "--seq-len", "32", "--batch", "2", "--device", "cpu", "--dataset", "corpus",
              "--data-path", str(corpus), "--held-out-batches", "2", "--steps", "2"]  # fmt: skip
    assert main(["finetune", *common, "--out", str(tmp_path / "run"), "--data-split", "train"]) == 0
    held = json.loads((tmp_path / "run" / "summary.json").read_text())["held_out"]
    assert "split held-out (the tail pretraining holds out: 400 tokens)" in held["held_out_data"]
    assert math.isfinite(held["held_out_loss"])
    assert main(["finetune", *common]) == 2
    assert "corpus fine-tuning with held_out_batches needs data_split: train" in capsys.readouterr().err


def test_held_out_line_says_when_an_adapter_needs_its_sparsity():
    from longexposure.finetune import held_out_line

    held = {"held_out_loss": 1.64, "held_out_batches": 16, "held_out_data": "e2e held-out"}
    held |= {"held_out_loss_mlp_predicted": 1.64, "held_out_loss_mlp_random": 1.69, "held_out_loss_mlp_all": 2.17}
    assert "depends on its sparsity: run dense (merged) its loss is 1.323x" in held_out_line(held)
    assert "depends" not in held_out_line({**held, "held_out_loss_mlp_all": 1.66})
    dense = {k: held[k] for k in ("held_out_loss", "held_out_batches", "held_out_data")}
    assert held_out_line(dense) == "held-out loss 1.6400 (16 batches: e2e held-out)"


def _tiny_setup():
    return tiny_setup(method="bitfit", seq_len=16)


def test_ms_per_step_is_a_median_over_every_step_after_warmup():
    """The median was over one mean per log interval (2 values for 20 steps, the first holding the warm-up
    step): it is over every step after the first, read back once per interval."""
    summary = finetune(_tiny_setup(), steps=6, out=None, device="cpu", log_every=3)
    assert summary["warmup_steps"] == 1
    assert summary["ms_per_step"]["total_ms"]["n"] == 5
    assert all(row["ms"] > 0 for row in summary["losses"]) and len(summary["losses"]) == 6


def test_progress_is_logged_when_stderr_is_not_a_terminal(capsys):
    """tqdm shows nothing when stderr is piped (CI, logs): a line every log interval shows progress there."""
    finetune(_tiny_setup(), steps=4, out=None, device="cpu", log_every=2)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("finetune: step")]
    assert [line.split(",")[0] for line in lines] == ["finetune: step 2/4", "finetune: step 4/4"]
    assert all("loss " in line and "ms/step" in line for line in lines)


def test_help_shows_the_defaults(capsys):
    """`finetune --help` did not say what --steps, --batch or --lr default to."""
    with pytest.raises(SystemExit) as exit_:
        main(["finetune", "--help"])
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for text in ("optimizer steps (default: 100)", "sequences per step (default: 4)", "(default: 0.0001)"):
        assert text in out
    assert "(default: None)" not in out


def test_unknown_expose_key_is_one_line_naming_the_valid_keys(capsys):
    """A misspelt --expose key failed after the model was built, without saying which keys exist."""
    assert main(["finetune", "--expose", "sorce=replay", "--steps", "1", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "unknown key 'sorce' (did you mean 'source'?)" in err
    assert "valid keys: " in err and "mlp_block" in err and "predictors" in err


def test_precision_choices_match_the_trainer():
    """`--precision` choices are spelt out so the parser needs no torch; they must stay the trainer's."""
    assert set(PRECISION_CHOICES) == {"auto", *PRECISIONS}


def test_finetune_cli_takes_the_training_loss_and_names_the_valid_ones(tmp_path, capsys):
    args = ["finetune", "--model", "opt-tiny", "--steps", "2", "--seq-len", "16", "--batch", "2", "--device", "cpu"]
    assert main([*args, "--loss", "fused-linear-ce", "--out", str(tmp_path)]) == 0
    summary = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert "fused-linear-ce" in json.dumps(summary)
    capsys.readouterr()
    assert main([*args, "--loss", "fused-ce"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "fused-linear-ce" in err and "training_loss" in err
