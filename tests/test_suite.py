import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from longexposure.registry import TASKS
from longexposure.suite.config import SuiteError, load_suite
from longexposure.suite.results import read_rows
from longexposure.suite.runner import run_suite

SUITES = sorted((Path(__file__).resolve().parents[1] / "suites").glob("*.yaml"))


@dataclass
class CountingCase:
    x: int = 0
    fail_at: int = -1
    oom_at: int = -1
    source: str = "none"


CALLS: list[int] = []


@TASKS.register("test-counting", case=CountingCase, help="test: counts its calls")
def counting(case: CountingCase, ctx):
    CALLS.append(case.x)
    if case.x == case.fail_at:
        raise KeyboardInterrupt
    if case.x == case.oom_at:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    return {
        "y_ms": {"p50": 2.0 * case.x, "p20": 1.0, "p80": 3.0, "min": 0.0, "max": 4.0, "n": 3},
        "z_ms": float(case.x),
        "info": {"weights": "none", "data": "counting", "sparsity_source": case.source},
    }


def tables(markdown: str) -> list[list[list[str]]]:
    """The github tables of a markdown text: each a list of rows (header first) of stripped cells."""
    found, current = [], []
    for line in markdown.splitlines() + [""]:
        if line.startswith("|"):
            if not set(line) <= set("|-: "):  # the separator line under the header
                current.append([cell.strip() for cell in line.strip("|").split("|")])
        elif current:
            found.append(current)
            current = []
    return found


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
    for preset in loaded.presets:
        loaded.check_paths(preset)


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


def test_include_below_the_top_merges_a_fragment_under_the_mappings_own_keys(tmp_path):
    (tmp_path / "parts").mkdir()
    write(tmp_path, "include: _base.yaml\noom_at: 9\n", "parts/params.yaml")  # relative to parts/
    write(tmp_path, "fail_at: 7\noom_at: 8\nsource: shared\n", "parts/_base.yaml")
    text = BASE.replace("matrix:", "params: {include: parts/params.yaml, source: own}\nmatrix:")
    suite = load_suite(write(tmp_path, text + "variants: [{name: a}, {include: parts/_base.yaml, name: b}]\n"))
    assert suite.params == {"fail_at": 7, "oom_at": 9, "source": "own"}, "the mapping's own keys win"
    assert [v["name"] for v in suite.variants] == ["a", "b"] and suite.variants[1]["oom_at"] == 8


def test_shipped_suites_include_the_exposure_blocks_they_used_to_repeat():
    fig10 = load_suite(Path(__file__).resolve().parents[1] / "suites" / "fig10.yaml")
    exposed = {v["name"]: v["exposure"] for v in fig10.variants if "exposure" in v}
    replay = {"source": "replay", "profile": "reference", "theta": 0.1, "attn_block": 64, "mlp_block": 64}
    assert exposed == {"long-exposure": replay}


@pytest.mark.parametrize(
    "files, match",
    [
        ({}, r"suite\.yaml: include 'part\.yaml': .*part\.yaml does not exist"),
        ({"part.yaml": "include: suite.yaml\n"}, r"include cycle: .*suite\.yaml -> .*part\.yaml -> .*suite\.yaml"),
        ({"part.yaml": "include: part.yaml\n"}, r"part\.yaml: include cycle"),
        ({"part.yaml": "- 1\n- 2\n"}, r"part\.yaml: an included file is a mapping of keys, got list"),
        ({"part.yaml": "a: [unclosed\n"}, r"part\.yaml: not valid YAML"),
        ({"part.yaml": "include: 3\n"}, r"part\.yaml: include must be a file name or a list of file names, got 3"),
    ],
)
def test_a_bad_include_is_an_error_naming_the_files(tmp_path, files, match):
    for name, text in files.items():
        write(tmp_path, text, name)
    path = write(tmp_path, BASE.replace("matrix:", "params: {include: part.yaml}\nmatrix:"))
    with pytest.raises(SuiteError, match=match):
        load_suite(path)


def test_an_included_suite_file_has_suite_keys(tmp_path):
    write(tmp_path, "colour: red\n", "_common.yaml")
    with pytest.raises(SuiteError, match=r"_common\.yaml: unknown key 'colour'"):
        load_suite(write(tmp_path, "include: _common.yaml\n" + BASE))


def test_run_writes_rows_table_and_plot_with_paper_numbers(tmp_path):
    out = run_suite(write(tmp_path, BASE), preset="cpu-tiny", out=tmp_path / "art", device="cpu")
    rows = read_rows(out / "results.jsonl")
    assert [r["case"]["x"] for r in rows] == [1, 2, 3, 4] and all(r["status"] == "ok" for r in rows)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["device"].startswith("CPU") and "torch" in meta["versions"]
    table = (out / "table.md").read_text()
    measured, paper = tables(table)
    assert measured[0] == ["x", "y_ms", "z_ms"]
    assert measured[2] == ["2", "4", "2 (50.0%)"], "y_ms is 2x; z_ms is x, a share of y_ms (same unit)"
    assert paper == [["x", "y_ms"], ["2", "5"]]
    assert tables(table.split("## The paper's numbers: test")[1]) == [paper], "under their own heading"
    assert "sparsity source: none" in table
    assert (out / "table.png").stat().st_size > 1000


def test_the_heading_says_what_was_measured_and_the_paper_numbers_keep_their_own_setup(tmp_path):
    text = BASE.replace("paper: test", "paper: Long Exposure, Table I\npaper_setup: OPT-1.3B, bs 4, A100")
    text = text.replace("matrix:", "params: {oom_at: -1}\nmatrix:")
    out = run_suite(write(tmp_path, text), preset="cpu-tiny", out=tmp_path / "art", device="cpu")
    table = (out / "table.md").read_text()
    heading, paper_part = table.split("## The paper's numbers: Long Exposure, Table I")
    first = heading.splitlines()[0]
    assert first.startswith("# counting, preset `cpu-tiny`: measured on CPU") and "A100" not in heading
    assert "- measured: oom_at -1; per row: x" in heading
    assert "smoke test" in heading and "swing from run to run" in heading
    assert "- the paper's setup: OPT-1.3B, bs 4, A100" in paper_part


def test_a_speedup_of_a_row_that_keeps_every_block_is_marked(tmp_path):
    path = write(tmp_path, VARIANTS.replace("fail_at: -2", "fail_at: -2, source: all-active"))
    out = run_suite(path, preset="cpu-tiny", out=tmp_path / "art", device="cpu", only={"x": "2"})
    measured = tables((out / "table.md").read_text())[0]
    assert measured[0][-1] == "speedup vs slow"
    assert [(line[1], line[-1]) for line in measured[1:]] == [("slow", "1.00x"), ("fast", "1.00x (all-active)")]
    assert "`(all-active)`: that row keeps every block" in (out / "table.md").read_text()


def test_without_a_terminal_each_finished_case_is_one_line_on_stderr(tmp_path, capsys):
    run_suite(write(tmp_path, BASE), preset="cpu-tiny", out=tmp_path / "art", device="cpu")
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("counting/cpu-tiny")]
    assert [line.split(" in ")[0] for line in lines] == [f"counting/cpu-tiny [{x}/4] x={x}: ok" for x in (1, 2, 3, 4)]


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

    @TASKS.register("test-broken", case=BrokenCase, help="test: always fails")
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
    # a misspelt value beside a good one is named, with the values there are; nothing runs
    misspelt = r"--only variant=fsat: no case of preset 'cpu-tiny' has it; its values: fast, slow"
    with pytest.raises(ValueError, match=misspelt):
        run_suite(path, preset="cpu-tiny", out=tmp_path / "art2", device="cpu", only={"variant": "slow,fsat"})
    assert not (tmp_path / "art2").exists()


def test_variant_with_an_unknown_parameter_is_an_error(tmp_path):
    path = write(tmp_path, VARIANTS.replace("fail_at: -2", "speed: 2"))
    with pytest.raises(SuiteError, match=r"variants\[1\] \(fast\): unknown parameter 'speed'"):
        load_suite(path)
