import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from longexposure.registry import TASKS
from longexposure.suite.config import SuiteError, load_suite
from longexposure.suite.runner import read_rows, run_suite

SUITES = sorted((Path(__file__).resolve().parents[1] / "suites").glob("*.yaml"))


@dataclass
class CountingCase:
    x: int = 0
    fail_at: int = -1
    oom_at: int = -1


CALLS: list[int] = []


@TASKS.register("test-counting", case=CountingCase)
def counting(case: CountingCase, ctx):
    CALLS.append(case.x)
    if case.x == case.fail_at:
        raise KeyboardInterrupt
    if case.x == case.oom_at:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    return {
        "y_ms": {"p50": 2.0 * case.x, "p20": 1.0, "p80": 3.0, "min": 0.0, "max": 4.0, "n": 3},
        "z_ms": float(case.x),
        "info": {"weights": "none", "data": "counting", "sparsity_source": "none"},
    }


def write(tmp_path, text, name="suite.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


BASE = """
name: counting
paper: test
task: test-counting
metrics: [y_ms, z_ms]
matrix: {x: [1, 2, 3, 4]}
presets: {cpu-tiny: {}}
paper_results: [{x: 2, y_ms: 5.0}]
table: {rows: [x], share_of: y_ms}
plot: {kind: line, x: x, y: y_ms}
"""


@pytest.mark.parametrize("suite", SUITES, ids=[s.name for s in SUITES])
def test_every_shipped_suite_validates(suite):
    loaded = load_suite(suite)
    assert loaded.cases("cpu-tiny"), f"{suite.name} has no cpu-tiny cases"


@pytest.mark.parametrize(
    "text, match",
    [
        (BASE + "colour: red\n", "unknown key 'colour'"),
        (BASE.replace("task: test-counting", "task: test-countin"), "Did you mean 'test-counting'"),
        (BASE.replace("matrix: {x: [1, 2, 3, 4]}", "matrix: {y: [1]}"), "unknown parameter 'y'"),
        (BASE.replace("matrix: {x: [1, 2, 3, 4]}", "matrix: {x: 3}"), "matrix.x must be a non-empty list"),
        (BASE.replace("presets: {cpu-tiny: {}}", "presets: {huge: {}}"), "unknown preset 'huge'"),
        (BASE.replace("presets: {cpu-tiny: {}}", "presets: {cpu-tiny: {params: {q: 1}}}"), "presets.cpu-tiny.params"),
        (BASE.replace("paper_results: [{x: 2, y_ms: 5.0}]", "paper_results: [{w: 2}]"), "paper_results\\[0\\]"),
        (BASE.replace("kind: line", "kind: pie"), "plot.kind"),
        (BASE.replace("metrics: [y_ms, z_ms]\n", ""), "missing required key 'metrics'"),
        ("name: [unclosed\n", "not valid YAML"),
    ],
)
def test_malformed_suites_name_the_file_and_key(tmp_path, text, match):
    path = write(tmp_path, text)
    with pytest.raises(SuiteError, match=match) as err:
        load_suite(path)
    assert str(path) in str(err.value)


def test_include_merges_shared_defaults(tmp_path):
    write(tmp_path, "metrics: [y_ms]\nmatrix: {x: [7]}\npresets: {cpu-tiny: {}}\n", "_common.yaml")
    path = write(tmp_path, "include: _common.yaml\nname: inc\ntask: test-counting\nmatrix: {x: [1, 2]}\n")
    suite = load_suite(path)
    assert suite.metrics == ["y_ms"] and [c["x"] for c in suite.cases("cpu-tiny")] == [1, 2]


def test_run_writes_rows_table_and_plot_with_paper_numbers(tmp_path):
    out = run_suite(write(tmp_path, BASE), preset="cpu-tiny", out=tmp_path / "art", device="cpu")
    rows = read_rows(out / "results.jsonl")
    assert [r["case"]["x"] for r in rows] == [1, 2, 3, 4] and all(r["status"] == "ok" for r in rows)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["device"].startswith("CPU") and "torch" in meta["versions"]
    table = (out / "table.md").read_text()
    assert "| y_ms (paper)" in table.replace("|   ", "| ").replace("|  ", "| ") or "y_ms (paper)" in table
    assert "5" in table.splitlines()[-2] or "5" in table
    assert "sparsity source: none" in table
    assert (out / "table.png").stat().st_size > 1000


def test_interrupted_run_keeps_finished_cases_and_resumes(tmp_path):
    path = write(tmp_path, BASE.replace("matrix: {x: [1, 2, 3, 4]}", "params: {fail_at: 3}\nmatrix: {x: [1, 2, 3, 4]}"))
    CALLS.clear()
    with pytest.raises(KeyboardInterrupt):
        run_suite(path, preset="cpu-tiny", out=tmp_path / "art", device="cpu")
    results = tmp_path / "art" / "counting" / "cpu-tiny" / "results.jsonl"
    assert [r["case"]["x"] for r in read_rows(results)] == [1, 2]
    with results.open("a") as f:
        f.write('{"case": {"x": 3, "trunc')  # a line cut off by a kill
    path.write_text(path.read_text().replace("fail_at: 3", "fail_at: -1"))
    # the changed parameter makes these different cases: all four run again
    CALLS.clear()
    run_suite(path, preset="cpu-tiny", out=tmp_path / "art", device="cpu")
    assert CALLS == [1, 2, 3, 4]
    CALLS.clear()
    run_suite(path, preset="cpu-tiny", out=tmp_path / "art", device="cpu")
    assert CALLS == [], "a finished run resumes with nothing to do"
    CALLS.clear()
    run_suite(path, preset="cpu-tiny", out=tmp_path / "art", device="cpu", force=True)
    assert CALLS == [1, 2, 3, 4]


def test_resume_runs_only_missing_cases(tmp_path):
    path = write(tmp_path, BASE.replace("matrix: {x: [1, 2, 3, 4]}", "params: {fail_at: 3}\nmatrix: {x: [1, 2, 3, 4]}"))
    with pytest.raises(KeyboardInterrupt):
        run_suite(path, preset="cpu-tiny", out=tmp_path / "art", device="cpu")
    CALLS.clear()
    # same cases, but the failure is gone from the task itself: monkeypatch-free via a new task param is not
    # possible, so drop the failing value from the matrix: cases 1, 2 are done, 4 is new
    path.write_text(path.read_text().replace("matrix: {x: [1, 2, 3, 4]}", "matrix: {x: [1, 2, 4]}"))
    run_suite(path, preset="cpu-tiny", out=tmp_path / "art", device="cpu")
    assert CALLS == [4]


def test_oom_becomes_a_cell_not_a_crash(tmp_path):
    path = write(tmp_path, BASE.replace("matrix: {x: [1, 2, 3, 4]}", "params: {oom_at: 2}\nmatrix: {x: [1, 2, 3]}"))
    out = run_suite(path, preset="cpu-tiny", out=tmp_path / "art", device="cpu")
    rows = read_rows(out / "results.jsonl")
    assert [r["status"] for r in rows] == ["ok", "OOM", "ok"]
    assert "OOM" in (out / "table.md").read_text()


def test_parameter_types_are_checked(tmp_path):
    path = write(tmp_path, BASE.replace("matrix: {x: [1, 2, 3, 4]}", "matrix: {x: [1, 2]}\nparams: {oom_at: 'x'}"))
    with pytest.raises(SuiteError, match="parameter 'oom_at' = 'x' is not"):
        load_suite(path)


def test_a_failing_case_names_itself(tmp_path):
    @dataclass
    class BrokenCase:
        x: int = 0

    @TASKS.register("test-broken", case=BrokenCase)
    def broken(case, ctx):
        raise ZeroDivisionError("boom")

    path = write(tmp_path, BASE.replace("test-counting", "test-broken"))
    with pytest.raises(RuntimeError, match="case x=1 failed: boom"):
        run_suite(path, preset="cpu-tiny", out=tmp_path / "art", device="cpu")


VARIANTS = (
    BASE.replace(
        "table: {rows: [x], share_of: y_ms}", "table: {rows: [x, variant], speedup_of: y_ms, speedup_vs: [slow]}"
    )
    + """
variants:
  - {name: slow, fail_at: -1}
  - {name: fast, fail_at: -2}
"""
)


def test_variants_multiply_cases_and_give_speedup_columns(tmp_path):
    path = write(tmp_path, VARIANTS)
    suite = load_suite(path)
    cases = suite.cases("cpu-tiny")
    assert len(cases) == 8 and {c["variant"] for c in cases} == {"slow", "fast"}
    assert suite.axes("cpu-tiny") == ["x", "variant"]
    out = run_suite(path, preset="cpu-tiny", out=tmp_path / "art", device="cpu", only={"x": "2"})
    rows = read_rows(out / "results.jsonl")
    assert [(r["case"]["x"], r["case"]["variant"]) for r in rows] == [(2, "slow"), (2, "fast")]
    assert "speedup vs slow" in (out / "table.md").read_text() and "1.00x" in (out / "table.md").read_text()
    with pytest.raises(ValueError, match="no case key 'z'"):
        run_suite(path, preset="cpu-tiny", out=tmp_path / "art", device="cpu", only={"z": "1"})


def test_variant_with_an_unknown_parameter_is_an_error(tmp_path):
    path = write(tmp_path, VARIANTS.replace("fail_at: -2", "speed: 2"))
    with pytest.raises(SuiteError, match=r"variants\[1\] \(fast\): unknown parameter 'speed'"):
        load_suite(path)
