"""A suite run never loses or duplicates results, never writes outside `--out`, and refuses a bad case before
the first case runs (issue 16, items 2-4)."""

import builtins
import io
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from longexposure.cli import main
from longexposure.registry import TASKS
from longexposure.suite.config import SuiteError, load_suite
from longexposure.suite.results import read_rows
from longexposure.suite.runner import run_suite
from longexposure.training import TrainingSetup

CALLS: list[int] = []
NESTED: dict[str, object] = {}


@dataclass
class SafetyCase:
    x: int = 0
    nest_at: int = -1


@TASKS.register("test-safety", case=SafetyCase, help="test: counts its calls")
def safety_task(case: SafetyCase, ctx):
    CALLS.append(case.x)
    if case.x == case.nest_at and "suite" in NESTED and "error" not in NESTED:
        NESTED["error"] = None  # a second run started while this one holds the output directory
        try:
            run_suite(NESTED["suite"], preset="cpu-tiny", out=NESTED["out"], device="cpu")
        except Exception as exc:  # noqa: BLE001 - the test inspects what the second run did
            NESTED["error"] = exc
    return {"y_ms": float(case.x), "info": {"sparsity_source": "none"}}


@dataclass
class FakeTrainCase(TrainingSetup):
    """The real training setup (so the real checks apply) whose task counts calls instead of training."""

    x: int = 0


@TASKS.register("test-safety-train", case=FakeTrainCase, help="test: a training setup that counts calls")
def fake_train(case: FakeTrainCase, ctx):
    CALLS.append(case.x)
    return {"y_ms": 1.0, "info": {}}


BASE = """
name: safety
paper: test
task: test-safety
metrics: [y_ms]
matrix: {x: [1, 2, 3, 4]}
presets: {cpu-tiny: {}}
"""

TRAIN = """
name: safety-train
paper: test
task: test-safety-train
metrics: [y_ms]
params: {model: opt-tiny, batch: 2, seq_len: 32, precision: fp32}
matrix: {x: [1, 2]}
variants:
  - {name: dense, method: lora, attn: eager}
  - name: exposed
    method: bitfit
    attn: sdpa
    exposure: {source: all-active, attn_block: 16, mlp_block: 32, mlp_backend: torch-gather}
presets: {cpu-tiny: {}}
"""


def write(tmp_path: Path, text: str, name: str = "suite.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def results_of(out: Path, name: str = "safety") -> Path:
    return out / name / "cpu-tiny" / "results.jsonl"


# ------------------------------------------------------------------------ 2. results files are never lost


def test_a_kill_while_the_results_file_is_rewritten_loses_no_row(tmp_path, monkeypatch):
    path, out = write(tmp_path, BASE), tmp_path / "art"
    run_suite(path, preset="cpu-tiny", out=out, device="cpu")
    results = results_of(out)
    with results.open("a") as f:
        f.write('{"case": {"x": 5, "tru')  # a torn last line: the next start rewrites the file without it

    real_open = io.open

    class KilledMidWrite:
        """A file whose first write stops halfway and kills the process (what SIGKILL does to a rewrite)."""

        def __init__(self, f):
            self.f = f

        def write(self, text):
            self.f.write(text[: len(text) // 2])
            self.f.flush()
            raise KeyboardInterrupt("killed during the rewrite")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def __getattr__(self, name):
            return getattr(self.f, name)

    def dying_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        return KilledMidWrite(f) if "w" in mode and "results.jsonl" in os.fspath(file) else f

    monkeypatch.setattr(io, "open", dying_open)
    monkeypatch.setattr(builtins, "open", dying_open)
    with pytest.raises(KeyboardInterrupt):
        run_suite(path, preset="cpu-tiny", out=out, device="cpu")
    monkeypatch.undo()
    assert [r["case"]["x"] for r in read_rows(results)] == [1, 2, 3, 4], "the kill lost finished rows"
    CALLS.clear()
    run_suite(path, preset="cpu-tiny", out=out, device="cpu")
    assert CALLS == [], "every finished case survived the kill"


def test_a_second_run_into_the_same_out_is_refused_and_no_case_runs_twice(tmp_path):
    path, out = write(tmp_path, BASE.replace("matrix:", "params: {nest_at: 1}\nmatrix:")), tmp_path / "art"
    NESTED.clear()
    NESTED.update(suite=path, out=out)
    CALLS.clear()
    try:
        run_suite(path, preset="cpu-tiny", out=out, device="cpu")
    finally:
        NESTED.pop("suite")
    error = NESTED["error"]
    assert isinstance(error, ValueError), f"the second run was not refused: {error!r}"
    message = str(error)
    assert str(out / "safety" / "cpu-tiny") in message and "another" in message and "\n" not in message
    assert CALLS == [1, 2, 3, 4], "the refused run ran cases"
    assert [r["case"]["x"] for r in read_rows(results_of(out))] == [1, 2, 3, 4]
    CALLS.clear()
    run_suite(path, preset="cpu-tiny", out=out, device="cpu")  # the lock went with the first run
    assert CALLS == []


def test_a_torn_line_in_the_middle_is_skipped_with_a_warning_and_its_case_reruns(tmp_path, capsys):
    path, out = write(tmp_path, BASE), tmp_path / "art"
    run_suite(path, preset="cpu-tiny", out=out, device="cpu")
    results = results_of(out)
    lines = results.read_text().splitlines(keepends=True)
    lines[1] = lines[1][:25] + "\n"  # case x=2 torn, cases after it intact
    results.write_text("".join(lines))
    capsys.readouterr()
    assert main(["report", str(path), "--preset", "cpu-tiny", "--out", str(out)]) == 0
    assert f"{results}:2" in capsys.readouterr().err, "the warning names the torn line"
    CALLS.clear()
    run_suite(path, preset="cpu-tiny", out=out, device="cpu")
    assert f"{results}:2" in capsys.readouterr().err
    assert CALLS == [2], "only the torn case runs again"
    assert sorted(r["case"]["x"] for r in read_rows(results)) == [1, 2, 3, 4]


# ------------------------------------------------------------------------ 3. a suite name stays inside --out


@pytest.mark.parametrize("name", ["../../x", "{tmp}/x", "a/../../../x", ".hidden", "Upper"])
def test_a_suite_name_that_is_not_a_plain_name_is_refused(tmp_path, name):
    path = write(tmp_path, BASE.replace("name: safety", f"name: {name.format(tmp=tmp_path)!r}"))
    with pytest.raises(SuiteError, match=r"key 'name'") as err:
        load_suite(path)
    assert str(path) in str(err.value)
    out = tmp_path / "art" / "deep"
    with pytest.raises(SuiteError):
        run_suite(path, preset="cpu-tiny", out=out, device="cpu")
    assert not (tmp_path / "x").exists() and not out.exists(), "the refused run wrote something"


# ------------------------------------------------------------------------ 4. validate catches what run dies on


@pytest.mark.parametrize(
    "old, new, message",
    [
        ("method: lora", "method: lroa", r"method: unknown peft_method 'lroa'\. Did you mean 'lora'\?"),
        ("model: opt-tiny", "model: opt-tiyn", r"model: unknown model_preset 'opt-tiyn'\. Did you mean 'opt-tiny'\?"),
        ("precision: fp32", "precision: fp32, dataset: synthetc", r"dataset: .*Did you mean 'synthetic'\?"),
        ("attn: eager", "attn: spda", r"attn: unknown attention implementation 'spda'\. Did you mean 'sdpa'\?"),
        ("attn_block: 16", "atn_block: 16", r"exposure: unknown option 'atn_block'\. Did you mean 'attn_block'\?"),
        ("source: all-active", "source: all-activ", r"exposure\.source: .*Did you mean 'all-active'\?"),
        ("mlp_backend: torch-gather", "mlp_backend: torch-gathr", r"exposure\.mlp_backend: .*'torch-gather'\?"),
        ("attn_block: 16", "attn_block: sixteen", r"exposure\.attn_block: 'sixteen' is not int"),
        (
            "method: lora, attn: eager",
            "method: lora, method_options: {alpah: 8}, attn: eager",
            r"method_options: unknown option 'alpah' of peft_method 'lora'\. Did you mean 'alpha'\?",
        ),
        (  # a typed method config (SylvaConfig, SpLoraConfig) is checked field by field, then built
            "method: bitfit",
            "method: sylva\n    method_options: {sparsty: 0.9}",
            r"method_options: unknown option 'sparsty' of peft_method 'sylva'\. Did you mean 'sparsity'\?",
        ),
        (
            "method: bitfit",
            "method: kfac-pruner\n    method_options: {sparsity: 1.5}",
            r"method_options: PEFT method 'kfac-pruner': sparsity must be in \[0, 1\)",
        ),
        (
            "method: bitfit",
            "method: sp-lora\n    method_options: {prune: wand}",
            r"method_options: PEFT method 'sp-lora': unknown pruning method 'wand'",
        ),
        (
            "method: lora, attn: eager",
            "method: lora, attn: eager, narrow_mlp: {profile: reference, thetta: 0.1}",
            r"narrow_mlp: unknown option 'thetta'\. Did you mean 'theta'\?",
        ),
        (
            "method: lora, attn: eager",
            "method: lora, attn: eager, narrow_mlp: {theta: 0.1}",
            r"narrow_mlp: missing 'profile'",
        ),
    ],
)
def test_validate_names_the_case_and_key_of_a_typo(tmp_path, capsys, old, new, message):
    assert old in TRAIN
    path = write(tmp_path, TRAIN.replace(old, new, 1))
    with pytest.raises(SuiteError, match=message) as err:
        load_suite(path)
    text = str(err.value)
    assert text.startswith(f"{path}: preset 'cpu-tiny', case ") and "\n" not in text
    capsys.readouterr()
    assert main(["validate", str(path)]) == 2
    assert text in capsys.readouterr().err


def test_validate_refuses_a_missing_weights_path_but_leaves_a_hub_id(tmp_path, capsys):
    missing = tmp_path / "no-such-checkpoint"
    path = write(tmp_path, TRAIN.replace("precision: fp32", f"precision: fp32, weights: {missing}"))
    load_suite(path)  # the file is well formed; whether a path exists is a fact of this machine
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"weights: {str(missing)!r} does not exist" in err and str(path) in err
    hub = write(tmp_path, TRAIN.replace("precision: fp32", "precision: fp32, weights: facebook/opt-125m"), "hub.yaml")
    assert main(["validate", str(hub)]) == 0
    missing.mkdir()
    assert main(["validate", str(path)]) == 0


def test_run_refuses_a_typo_in_a_later_case_before_the_first_case_runs(tmp_path):
    typo = TRAIN.replace("method: bitfit", "method: bitfti")
    path, out = write(tmp_path, typo), tmp_path / "art"
    CALLS.clear()
    with pytest.raises(SuiteError, match="Did you mean 'bitfit'"):
        run_suite(path, preset="cpu-tiny", out=out, device="cpu")
    assert CALLS == [] and not results_of(out, "safety-train").exists()
    missing = TRAIN.replace("method: bitfit\n", f"method: bitfit\n    weights: {tmp_path / 'gone'}\n")
    with pytest.raises(FileNotFoundError, match="gone"):
        run_suite(write(tmp_path, missing), preset="cpu-tiny", out=out, device="cpu")
    assert CALLS == []


# ------------------------------------------------------------------------ keep going past a failing case


@dataclass
class FlakyCase:
    x: int = 0


@TASKS.register("test-safety-flaky", case=FlakyCase, help="test: case x=2 fails")
def flaky(case: FlakyCase, ctx):
    CALLS.append(case.x)
    if case.x == 2:
        raise RuntimeError("case two breaks")
    return {"y_ms": float(case.x), "info": {}}


def test_keep_going_runs_every_case_marks_the_failure_and_retries_it(tmp_path):
    path, out = write(tmp_path, BASE.replace("task: test-safety", "task: test-safety-flaky")), tmp_path / "art"
    CALLS.clear()
    with pytest.raises(RuntimeError, match="case two breaks"):
        run_suite(path, preset="cpu-tiny", out=out, device="cpu")
    assert CALLS == [1, 2], "without keep_going the first failure stops the run"
    CALLS.clear()
    with pytest.raises(RuntimeError, match=r"1 case\(s\) failed .*x=2"):
        run_suite(path, preset="cpu-tiny", out=out, device="cpu", keep_going=True)
    assert CALLS == [2, 3, 4], "the finished case is kept; every other case runs"
    rows = {r["case"]["x"]: r for r in read_rows(results_of(out))}
    assert rows[2]["status"] == "failed" and "case two breaks" in rows[2]["info"]["error"]
    table = (out / "safety" / "cpu-tiny" / "table.md").read_text()
    assert "FAILED" in table and "1 failed" in table
    CALLS.clear()
    with pytest.raises(RuntimeError):
        run_suite(path, preset="cpu-tiny", out=out, device="cpu", keep_going=True)
    assert CALLS == [2], "a failed case is retried by the next run; finished ones are not"
