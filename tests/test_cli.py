import subprocess
import sys
from pathlib import Path

from longexposure.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_help_documents_run_and_list():
    out = subprocess.run([sys.executable, "-m", "longexposure.cli", "--help"], capture_output=True, text=True).stdout
    assert "run" in out and "list" in out and "validate" in out


def test_list_prints_registries(capsys):
    assert main(["list", "peft_method"]) == 0
    out = capsys.readouterr().out
    assert "lora" in out and "p-tuning" in out


def test_unknown_kind_is_exit_2_with_valid_names(capsys):
    assert main(["list", "peft_methods"]) == 2
    err = capsys.readouterr().err
    assert "Did you mean 'peft_method'" in err


def test_validate_shipped_suite(capsys):
    assert main(["validate", str(ROOT / "suites" / "table1.yaml")]) == 0
    assert "cpu-tiny: 10 cases" in capsys.readouterr().out


def test_run_missing_suite_is_a_clear_error(capsys, tmp_path):
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
