"""Suite files: flat YAML naming a paper table/figure, a task, a grid, presets and the paper's numbers.

Validation is strict and names the file and key: an unknown top-level key, an unknown task, a
parameter the task's case type does not have, a preset that does not exist. Nothing is ignored.
"""

from __future__ import annotations

import dataclasses
import itertools
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from longexposure.registry import TASKS, RegistryError

PRESETS = ("cpu-tiny", "paper")


class SuiteError(ValueError):
    """A malformed suite file; the message names the file and the key."""


@dataclass
class TableSpec:
    """Rows (case keys), metric columns, `share_of` (show % of this metric), speedup columns
    (`speedup_of` metric of each `speedup_vs` variant over this row's, same case otherwise) and relative
    columns (this row's `relative_of` metric over each `relative_vs` variant's, e.g. loss vs dense)."""

    rows: list[str] | None = None
    columns: list[str] | None = None
    share_of: str | None = None
    speedup_of: str | None = None
    speedup_vs: list[str] = field(default_factory=list)
    relative_of: str | None = None
    relative_vs: list[str] = field(default_factory=list)


@dataclass
class PlotSpec:
    """`bar` (one bar per row, stacked over y), `line` (y against the case key x, one line per
    `series`), or `curve` (each row's y metric is a list, e.g. a loss per step: one line per row)."""

    kind: str = "bar"
    x: str | None = None
    y: list[str] = field(default_factory=list)
    series: str | None = None
    facet: str | None = None
    logy: bool = False


@dataclass
class Suite:
    """A validated suite file."""

    path: Path
    name: str
    paper: str
    task: str
    metrics: list[str]
    params: dict[str, Any]
    matrix: dict[str, list[Any]]
    presets: dict[str, dict[str, Any]]
    paper_results: list[dict[str, Any]]
    table: TableSpec
    plot: PlotSpec | None
    notes: str = ""
    variants: list[dict[str, Any]] = field(default_factory=list)

    @property
    def case_type(self) -> type:
        return TASKS.entry(self.task).meta["case"]

    def resolve_preset(self, preset: str) -> str:
        if preset == "auto":
            return "paper" if torch.cuda.is_available() else "cpu-tiny"
        if preset not in self.presets:
            raise SuiteError(
                f"{self.path}: unknown preset {preset!r}; this suite has {sorted(self.presets)} (or 'auto')"
            )
        return preset

    def grid(self, preset: str) -> tuple[dict[str, Any], dict[str, list[Any]]]:
        """The params and matrix of a preset (its keys override the suite's)."""
        over = self.presets[self.resolve_preset(preset)]
        return {**self.params, **over.get("params", {})}, {**self.matrix, **over.get("matrix", {})}

    def cases(self, preset: str) -> list[dict[str, Any]]:
        """Every case of a preset: params + one matrix combination (+ one variant, labelled `variant`)."""
        params, matrix = self.grid(preset)
        axes = list(matrix)
        combos = [{**params, **dict(zip(axes, combo, strict=True))} for combo in itertools.product(*matrix.values())]
        variants = self.variants_of(preset)
        if not variants:
            return combos
        return [
            {**combo, **{k: v for k, v in variant.items() if k != "name"}, "variant": variant["name"]}
            for combo in combos
            for variant in variants
        ]

    def variants_of(self, preset: str) -> list[dict[str, Any]]:
        """The preset's own `variants` if it has them, else the suite's."""
        return self.presets[self.resolve_preset(preset)].get("variants", self.variants)

    def axes(self, preset: str) -> list[str]:
        """Matrix axes that take more than one value (they name a row in tables), then `variant`."""
        axes = [k for k, v in self.grid(preset)[1].items() if len(v) > 1]
        return axes + (["variant"] if len(self.variants_of(preset)) > 1 else [])


_TOP_KEYS = {
    "name",
    "paper",
    "task",
    "metrics",
    "params",
    "matrix",
    "presets",
    "paper_results",
    "table",
    "plot",
    "include",
    "notes",
    "variants",
}


def _load_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    if not path.exists():
        raise SuiteError(f"suite file {path} does not exist")
    if path in seen:
        raise SuiteError(f"{path}: include cycle through {[str(p) for p in seen]}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise SuiteError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise SuiteError(f"{path}: a suite file is a mapping of keys, got {type(data).__name__}")
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise SuiteError(f"{path}: unknown key {unknown[0]!r}; valid keys: {sorted(_TOP_KEYS)}")
    includes = data.pop("include", []) or []
    merged: dict[str, Any] = {}
    for inc in [includes] if isinstance(includes, str) else includes:
        base = _load_yaml(path.parent / inc, (*seen, path))
        for key, value in base.items():
            merged[key] = {**merged[key], **value} if isinstance(value, dict) and key in merged else value
    for key, value in data.items():
        merged[key] = (
            {**merged[key], **value} if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
        )
    return merged


def _require(data: dict[str, Any], key: str, kind: type, path: Path) -> Any:
    if key not in data:
        raise SuiteError(f"{path}: missing required key {key!r}")
    if not isinstance(data[key], kind):
        raise SuiteError(f"{path}: key {key!r} must be a {kind.__name__}, got {type(data[key]).__name__}")
    return data[key]


def _check_fields(path: Path, where: str, keys: set[str], case_type: type, task: str) -> None:
    names = {f.name for f in dataclasses.fields(case_type)}
    unknown = sorted(keys - names)
    if unknown:
        raise SuiteError(f"{path}: {where}: unknown parameter {unknown[0]!r} for task {task!r}; valid: {sorted(names)}")


def _type_ok(value: Any, hint: Any) -> bool:
    """A light check of YAML values against a case field's annotation (int is accepted for float)."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is not None:
        return isinstance(value, origin)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _check_variants(path: Path, where: str, variants: Any, case_type: type, task: str) -> None:
    if not isinstance(variants, list):
        raise SuiteError(f"{path}: {where} must be a list of mappings with a 'name'")
    for i, variant in enumerate(variants):
        if not isinstance(variant, dict) or not isinstance(variant.get("name"), str):
            raise SuiteError(f"{path}: {where}[{i}] must be a mapping with a string 'name'")
        _check_fields(path, f"{where}[{i}] ({variant['name']})", set(variant) - {"name"}, case_type, task)


def case_fields(case: dict[str, Any]) -> dict[str, Any]:
    """The case without its variant label: the arguments of the task's case type."""
    return {k: v for k, v in case.items() if k != "variant"}


def _check_case(path: Path, preset: str, case: dict[str, Any], case_type: type) -> None:
    case = case_fields(case)
    hints = typing.get_type_hints(case_type)
    for key, value in case.items():
        if not _type_ok(value, hints.get(key, Any)):
            raise SuiteError(f"{path}: preset {preset!r}: parameter {key!r} = {value!r} is not {hints[key]}")
    try:
        case_type(**case)
    except (TypeError, ValueError) as exc:
        raise SuiteError(f"{path}: preset {preset!r}: invalid case {case}: {exc}") from None


def load_suite(path: str | Path) -> Suite:
    """Read and validate a suite file (and its includes)."""
    path = Path(path)
    data = _load_yaml(path)
    task = _require(data, "task", str, path)
    try:
        entry = TASKS.entry(task)
    except RegistryError as exc:
        raise SuiteError(f"{path}: key 'task': {exc}") from None
    case_type = entry.meta["case"]
    params = data.get("params", {}) or {}
    matrix = data.get("matrix", {}) or {}
    for key, value in matrix.items():
        if not isinstance(value, list) or not value:
            raise SuiteError(f"{path}: matrix.{key} must be a non-empty list, got {value!r}")
    _check_fields(path, "params", set(params), case_type, task)
    _check_fields(path, "matrix", set(matrix), case_type, task)
    presets = data.get("presets") or {"cpu-tiny": {}}
    for pname, over in presets.items():
        if pname not in PRESETS:
            raise SuiteError(f"{path}: unknown preset {pname!r}; valid presets: {list(PRESETS)}")
        over = over or {}
        presets[pname] = over
        extra = sorted(set(over) - {"params", "matrix", "variants"})
        if extra:
            raise SuiteError(
                f"{path}: presets.{pname}: unknown key {extra[0]!r}; valid: ['matrix', 'params', 'variants']"
            )
        _check_variants(path, f"presets.{pname}.variants", over.get("variants", []), case_type, task)
        _check_fields(path, f"presets.{pname}.params", set(over.get("params", {})), case_type, task)
        _check_fields(path, f"presets.{pname}.matrix", set(over.get("matrix", {})), case_type, task)
    variants = data.get("variants") or []
    _check_variants(path, "variants", variants, case_type, task)
    metrics = _require(data, "metrics", list, path)
    table_raw = data.get("table", {}) or {}
    try:
        table = TableSpec(**table_raw)
    except TypeError as exc:
        raise SuiteError(f"{path}: table: {exc}") from None
    plot = None
    if data.get("plot"):
        raw = dict(data["plot"])
        if isinstance(raw.get("y"), str):
            raw["y"] = [raw["y"]]
        try:
            plot = PlotSpec(**raw)
        except TypeError as exc:
            raise SuiteError(f"{path}: plot: {exc}") from None
        if plot.kind not in ("bar", "line", "curve"):
            raise SuiteError(f"{path}: plot.kind must be 'bar', 'line' or 'curve', got {plot.kind!r}")
    suite = Suite(
        path=path,
        name=_require(data, "name", str, path),
        paper=str(data.get("paper", "")),
        task=task,
        metrics=metrics,
        params=params,
        matrix=matrix,
        presets=presets,
        paper_results=list(data.get("paper_results", []) or []),
        table=table,
        plot=plot,
        notes=str(data.get("notes", "")),
        variants=variants,
    )
    for pname in presets:
        for case in suite.cases(pname):
            _check_case(path, pname, case, case_type)
    known = set(metrics) | {f.name for f in dataclasses.fields(case_type)} | {"variant"}
    for i, row in enumerate(suite.paper_results):
        unknown = sorted(set(row) - known)
        if unknown:
            raise SuiteError(f"{path}: paper_results[{i}]: unknown key {unknown[0]!r} (not a metric or parameter)")
    return suite
