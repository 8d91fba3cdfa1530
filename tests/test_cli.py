import subprocess
import sys
from pathlib import Path

import pytest
import torch

from longexposure.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_help_documents_run_and_list():
    """`python -m longexposure` is the command, for environments without the console script."""
    out = subprocess.run([sys.executable, "-m", "longexposure", "--help"], capture_output=True, text=True).stdout
    assert "run" in out and "list" in out and "validate" in out and "finetune" in out


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


def test_help_and_light_commands_import_no_torch():
    """`--help`, the module commands' help and `list model_preset` answer in a fraction of a second: they must
    not import torch or transformers (5-7 s per call before). A run still imports them, when it starts."""
    code = (
        "import contextlib, io, sys\n"
        "from longexposure.cli import main\n"
        "for argv in (['--help'], ['finetune', '--help'], ['train-predictors', '--help']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "        main(argv)\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "    assert main(['list', 'model_preset']) == 0\n"
        "assert 'opt-1.3b' in out.getvalue()\n"
        "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.endswith("\n") and err.count("\n") == 1, err
    return err


def test_failing_case_from_a_user_error_is_one_line(capsys, tmp_path, monkeypatch):
    """A case that fails because a backend cannot run here (BackendUnavailable under the runner's RuntimeError)
    is the user's error: one line naming the case and why, exit 2, no traceback."""
    from longexposure.kernels import neuron_block_mlp as kernels

    monkeypatch.setattr(kernels, "INTERPRET", False)  # as on a CPU without TRITON_INTERPRET=1
    suite = _tiny_mlp_suite(tmp_path, "triton")
    assert main(["run", str(suite), "--preset", "cpu-tiny", "--out", str(tmp_path / "out"), "--device", "cpu"]) == 2
    err = _one_line_error(capsys)
    assert err.startswith("longexposure run: error: ") and "needs the Triton interpreter" in err


def test_failing_case_from_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
    """A case failing on a bug (here an IndexError in the task) must not be reduced to one line."""
    from longexposure.registry import TASKS

    def buggy(case, ctx):
        return [][0]

    monkeypatch.setattr(TASKS.entry("mlp-operator"), "obj", buggy)
    suite = _tiny_mlp_suite(tmp_path, "dense")
    with pytest.raises(RuntimeError, match="failed") as err:
        main(["run", str(suite), "--preset", "cpu-tiny", "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert isinstance(err.value.__cause__, IndexError)


def _tiny_mlp_suite(tmp_path, backend: str):
    suite = tmp_path / "tiny.yaml"
    suite.write_text(
        "name: tiny\npaper: none\ntask: mlp-operator\nmetrics: [fwd_ms]\n"
        "params: {d_model: 32, ffn: 64, tokens: 16, block_size: 16, dtype: float32, warmup: 0, reps: 1}\n"
        f"matrix: {{backend: [{backend}]}}\npresets: {{cpu-tiny: {{}}}}\n"
        "table: {rows: [backend], columns: [fwd_ms]}\n"
    )
    return suite


@pytest.mark.parametrize(
    "raised, user",
    [
        (lambda: _backend_unavailable()("attention backend 'flex' does not run on cpu"), True),
        (lambda: _backend_unavailable()("mlp backend 'triton' needs Triton"), True),
        (lambda: _chain(RuntimeError("case x failed"), FileNotFoundError("no data at /x")), True),
        (lambda: _chain(RuntimeError("case x failed"), KeyError("k")), False),
        (lambda: KeyError("a bug's missing key"), False),
        (lambda: TypeError("a bug"), False),
    ],
)
def test_user_errors_are_one_line_and_bugs_keep_their_traceback(raised, user, monkeypatch, capsys):
    """The policy of main(): a user's error (or a RuntimeError raised from one) is one line and exit 2."""
    import longexposure.cli as cli

    exc = raised()

    def fail(args):
        raise exc

    monkeypatch.setattr(cli, "_cmd_list", fail)
    if user:
        assert main(["list"]) == 2
        assert _one_line_error(capsys).startswith("longexposure list: error: ")
    else:
        with pytest.raises(type(exc)):
            main(["list"])


def _backend_unavailable() -> type[Exception]:
    from longexposure.backends import BackendUnavailable

    return BackendUnavailable


def _chain(outer: Exception, cause: Exception) -> Exception:
    outer.__cause__ = cause
    return outer


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", [["run", str(ROOT / "suites" / "table1.yaml")], ["finetune", "--steps", "1"]])
def test_device_cuda_without_cuda_is_one_line(command, capsys, tmp_path):
    """`--device cuda` on a CPU torch (or a machine with no GPU) was an AssertionError traceback from torch."""
    assert main([*command, "--device", "cuda", "--out", str(tmp_path)]) == 2
    err = _one_line_error(capsys)
    assert "--device cuda" in err and "--device cpu" in err
