"""Suite files: flat YAML naming a paper table/figure, a task, a grid, presets and the paper's numbers.

Validation is strict and names the file and key: an unknown top-level key, an unknown task, a
parameter the task's case type does not have, a preset that does not exist, a name that is not
registered, an option the typed config it feeds does not have. Nothing is ignored, and all of it is
checked before a run starts, so a typo in the last case never costs the cases before it.

`include:` (a file name or a list, relative to the including file) pulls shared settings in before validation: at
the top of a suite, suite keys (defaults under the suite's own); in any mapping below it, that mapping's keys (e.g.
`exposure: {include: include/replay-opt-1.3b.yaml, mlp: false}`; the mapping's own keys win). Included files may
include others; a missing file, a cycle or a file that is not a mapping is an error naming the files.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import itertools
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from longexposure.registry import MODEL_PRESETS, PEFT_METHODS, TASKS, RegistryError, registry

# What each preset is, as its table says it (a cpu-tiny number is never read as a paper number).
PRESETS = {
    "cpu-tiny": "a smoke test: tiny shapes on the CPU check that the pipeline runs end to end; its times swing "
    "from run to run and say nothing about the paper's claims",
    "paper": "the paper's shapes, for a GPU",
    "cpu-quality": "a quality check on the CPU: a small model really trained, whose losses mean something at that "
    "scale and whose times say nothing",
}
# A suite's name is a folder under `--out`: the registry's name pattern, plus '_' (shipped suites use it).
SUITE_NAME = re.compile(r"[a-z0-9][a-z0-9._\-]*")
# `weights` keywords a task resolves itself (anything else is a local path or a hub id `org/name`).
WEIGHTS_KEYWORDS = {"loss-curve": ("pretrained",), "evaluate": ("pretrained",), "sparsity-profile": ("random-init",)}
# Case fields that name a registered backend, per task.
BACKEND_FIELDS = {
    "mlp-operator": {"backend": ("mlp_backend",)},
    "attention-operator": {"backend": ("attention_backend",)},
    "sparsity-profile": {"time_backend": ("mlp_backend", "attention_backend")},
}
# Keywords that stand for a file a task finds or makes itself.
PATH_KEYWORDS = {"profile": ("reference",), "predictors": ("auto",)}


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
    paper_setup: str = ""

    @property
    def case_type(self) -> type:
        return TASKS.entry(self.task).meta["case"]

    def resolve_preset(self, preset: str) -> str:
        if preset == "auto":
            import torch

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

    def label(self, preset: str, case: dict[str, Any]) -> str:
        """The case as its row names it (`method=lora, variant=peft-sdpa`), or its whole dict with one case."""
        axes = self.axes(preset) + (["variant"] if "variant" in case and "variant" not in self.axes(preset) else [])
        return ", ".join(f"{a}={case[a]}" for a in axes) or str(case_fields(case))

    def check_paths(self, preset: str) -> None:
        """Every local path the preset's cases name exists on this machine (FileNotFoundError naming the file,
        case and key otherwise). Apart from `load_suite` because it is a fact of this machine, not of the file."""
        keywords = {"weights": WEIGHTS_KEYWORDS.get(self.task, ()), **PATH_KEYWORDS}
        for case in self.cases(preset):
            for key, value in _local_paths(case, keywords):
                if not Path(value).expanduser().exists():
                    hint = " (a hub id is org/name)" if key.endswith(("weights", "model")) else ""
                    raise FileNotFoundError(
                        f"{self.path}: preset {preset!r}, case {self.label(preset, case)}: {key}: {value!r} does not "
                        f"exist{hint}"
                    )


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
    "paper_setup",
}


def _read_mapping(path: Path, seen: tuple[Path, ...], reached: str) -> dict[str, Any]:
    """A YAML file holding a mapping; `seen` is the chain of files that included it (a repeat is a cycle)."""
    if not path.exists():
        raise SuiteError(f"{reached}{path} does not exist")
    if path.resolve() in [p.resolve() for p in seen]:
        chain = " -> ".join(str(p) for p in (*seen, path))
        raise SuiteError(f"{seen[-1]}: include cycle: {chain}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise SuiteError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        kind = "a suite file" if not seen else "an included file"
        raise SuiteError(f"{path}: {kind} is a mapping of keys, got {type(data).__name__}")
    return data


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over`'s keys win; a mapping in both is merged one level deep (an include's `params` under the suite's)."""
    merged = dict(base)
    for key, value in over.items():
        both = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = {**merged[key], **value} if both else value
    return merged


def _included(node: dict[str, Any], path: Path, seen: tuple[Path, ...], top: bool) -> dict[str, Any]:
    """`node` with its `include:` (a file name or a list of them, relative to `path`) resolved: each file's mapping
    first, in order, then the node's own keys over them. At the top of a suite an included file is a suite file
    (its keys are suite keys); below it, a fragment of whatever mapping includes it (e.g. an `exposure` block)."""
    names = node.get("include")
    names = [] if names is None else [names] if isinstance(names, str) else names
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise SuiteError(f"{path}: include must be a file name or a list of file names, got {node['include']!r}")
    merged: dict[str, Any] = {}
    for name in names:
        file = path.parent / name
        base = _read_mapping(file, (*seen, path), f"{path}: include {name!r}: ")
        merged = _merge(merged, _load_top(base, file, (*seen, path)) if top else _expand(base, file, (*seen, path)))
    own = {k: _expand(v, path, seen) for k, v in node.items() if k != "include"}
    return _merge(merged, own)


def _expand(value: Any, path: Path, seen: tuple[Path, ...]) -> Any:
    """Every mapping below the top of a suite file with its `include:` resolved."""
    if isinstance(value, list):
        return [_expand(v, path, seen) for v in value]
    if not isinstance(value, dict):
        return value
    if "include" in value:
        return _included(value, path, seen, top=False)
    return {k: _expand(v, path, seen) for k, v in value.items()}


def _load_top(data: dict[str, Any], path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise SuiteError(f"{path}: unknown key {unknown[0]!r}; valid keys: {sorted(_TOP_KEYS)}")
    return _included(data, path, seen, top=True)


def _load_yaml(path: Path) -> dict[str, Any]:
    """A suite file with every `include:` merged in (at the top, or in any mapping below it), before validation."""
    return _load_top(_read_mapping(path, (), "suite file "), path, ())


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


def _close(value: object, valid: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(str(value), list(valid), n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def _type_name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint)


def _is_hub_id(value: str) -> bool:
    """`owner/name`, as the Hugging Face hub spells a repository (what `from_pretrained` would fetch)."""
    return re.fullmatch(r"[A-Za-z0-9][\w.\-]*/[A-Za-z0-9][\w.\-]*", value) is not None


def _is_path_like(value: str) -> bool:
    return value.startswith((".", "/", "~"))


def _check_name(key: str, kinds: tuple[str, ...], value: Any, default: Any = None) -> None:
    """`value` is registered in one of the registries `kinds` (or is the field's own default, e.g. `auto`)."""
    if value is None or value == default or any(value in registry(kind) for kind in kinds):
        return
    if len(kinds) == 1:
        try:
            registry(kinds[0]).entry(value)
        except RegistryError as exc:
            raise ValueError(f"{key}: {exc}") from None
    names = sorted({name for kind in kinds for name in registry(kind).names()})
    raise ValueError(
        f"{key}: {value!r} is not a registered {' or '.join(kinds)}.{_close(value, names)} Valid names: "
        f"{', '.join(names)}"
    )


def _check_model(value: str) -> None:
    """A preset, or what `build_model` loads instead: a local checkpoint directory or a hub id."""
    if value in MODEL_PRESETS or _is_path_like(value) or _is_hub_id(value) or os.path.isdir(value):
        return
    try:
        MODEL_PRESETS.entry(value)
    except RegistryError as exc:
        raise ValueError(f"model: {exc} (or a local checkpoint directory, or a hub id owner/name)") from None


@functools.cache
def attention_implementations() -> tuple[str, ...]:
    """What `attn_implementation=` accepts: eager, transformers' AttentionInterface names, this project's."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from longexposure.attention_backends import HF_NAME

    return tuple(sorted({"eager", HF_NAME, *ALL_ATTENTION_FUNCTIONS.valid_keys()}))


def _check_attn(value: str) -> None:
    valid = attention_implementations()
    if value in valid or "/" in value:  # owner/name: a hub kernel transformers fetches itself
        return
    raise ValueError(
        f"attn: unknown attention implementation {value!r}.{_close(value, valid)} Valid: {', '.join(valid)}"
    )


def _check_options(key: str, options: Any, hints: dict[str, Any], owner: str, of: str = "") -> None:
    """`options` is a mapping of `owner`'s option names (`hints`: name -> type) to values of those types."""
    if not isinstance(options, dict):
        raise ValueError(f"{key} must be a mapping of {owner} options, got {options!r}")
    for name, value in options.items():
        if name not in hints:
            raise ValueError(
                f"{key}: unknown option {name!r}{of}.{_close(name, hints)} Valid options ({owner}): {', '.join(hints)}"
            )
        if not _type_ok(value, hints[name]):
            raise ValueError(f"{key}.{name}: {value!r} is not {_type_name(hints[name])}")


class _NamedProfile:
    """Stands for the profile a suite names (`reference` or a path) while ExposureConfig checks its fields;
    validation never reads profile files."""


def _check_exposure(options: Any) -> None:
    """Keys and value types of `expose.ExposureConfig`, its source and backend names, then its own checks."""
    from longexposure.expose import SOURCES, ExposureConfig

    defaults = {f.name: f.default for f in dataclasses.fields(ExposureConfig)}
    hints = {**typing.get_type_hints(ExposureConfig), "profile": str}  # a suite names its profile
    _check_options("exposure", options, hints, "longexposure.expose.ExposureConfig")
    for name in ("source", "mlp_source", "attention_source"):
        value = options.get(name)
        if value is not None and value not in SOURCES:
            raise ValueError(
                f"exposure.{name}: unknown sparsity source {value!r}.{_close(value, SOURCES)} Valid: "
                f"{', '.join(SOURCES)}"
            )
    for name in ("attention_backend", "mlp_backend"):
        _check_name(f"exposure.{name}", (name,), options.get(name), defaults[name])
    try:
        ExposureConfig(**{**options, **({"profile": _NamedProfile()} if "profile" in options else {})})
    except (TypeError, ValueError) as exc:
        raise ValueError(f"exposure: {exc}") from None


def _check_narrow_mlp(options: Any) -> None:
    """The options of `narrow.narrow_to_profile_` (all but the model); the profile is required."""
    from longexposure.narrow import narrow_to_profile_

    hints = typing.get_type_hints(narrow_to_profile_)
    names = list(inspect.signature(narrow_to_profile_).parameters)[1:]
    _check_options("narrow_mlp", options, {n: str if n == "profile" else hints[n] for n in names}, "narrow_mlp")
    if "profile" not in options:
        raise ValueError("narrow_mlp: missing 'profile' (`reference` or a recorded profile JSON)")


@functools.cache
def method_options(method: str) -> dict[str, Any] | None:
    """Option name -> type of a PEFT method: its typed config's fields, else its signature (None: any **options)."""
    config_type = PEFT_METHODS.entry(method).meta.get("config")
    if config_type is not None:
        hints = typing.get_type_hints(config_type)
        return {f.name: hints[f.name] for f in dataclasses.fields(config_type)}
    fn = PEFT_METHODS.get(method)
    params = list(inspect.signature(fn).parameters.values())[1:]  # the first is the model
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # noqa: BLE001 - an annotation this module cannot resolve: check names only
        hints = {}
    return {p.name: hints.get(p.name, Any) for p in params}


def check_case_names(task: str, case: dict[str, Any], case_type: type) -> None:
    """Every name a case gives (model, PEFT method, dataset, attention, backends) is registered and every
    nested option (`exposure`, `method_options`, `narrow_mlp`) is a field of the typed config it feeds.
    Raises ValueError naming the key; builds nothing."""
    from longexposure.methods.builtin import method_config
    from longexposure.training import TrainingSetup

    if isinstance(case.get("model"), str):
        _check_model(case["model"])
    if isinstance(case.get("dataset"), str):
        _check_name("dataset", ("dataset",), case["dataset"])
    if isinstance(case.get("attn"), str):
        _check_attn(case["attn"])
    defaults = {f.name: f.default for f in dataclasses.fields(case_type)}
    for key, kinds in BACKEND_FIELDS.get(task, {}).items():
        _check_name(key, kinds, case.get(key), defaults.get(key))
    if issubclass(case_type, TrainingSetup) and isinstance(case.get("method"), str):
        _check_name("method", ("peft_method",), case["method"])
        options = method_options(case["method"])
        if options is not None:
            of = f" of peft_method {case['method']!r}"
            _check_options("method_options", case.get("method_options", {}), options, case["method"], of)
            try:  # a method with a typed config: its own value checks, before anything runs
                method_config(case["method"], case.get("method_options", {}))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"method_options: {exc}") from None
    if case.get("exposure") is not None:
        _check_exposure(case["exposure"])
    if case.get("narrow_mlp") is not None:
        _check_narrow_mlp(case["narrow_mlp"])


def _local_paths(case: dict[str, Any], keywords: dict[str, tuple[str, ...]]) -> list[tuple[str, str]]:
    """(key, path) of each local file or directory the case names; keywords and hub ids are not local."""
    named = [(k, case.get(k)) for k in ("model", "weights", "data_path")]
    for group in ("exposure", "narrow_mlp"):
        options = case.get(group) or {}
        named += [(f"{group}.{k}", options.get(k)) for k in ("profile", "predictors") if isinstance(options, dict)]
    paths = []
    for key, value in named:
        if not isinstance(value, str) or value in keywords.get(key.rsplit(".", 1)[-1], ()):
            continue
        if (key == "model" and not _is_path_like(value)) or (key == "weights" and _is_hub_id(value)):
            continue  # a preset or a hub id (`load_suite` refuses a bare model name that is neither)
        paths.append((key, value))
    return paths


def _check_case(path: Path, preset: str, case: dict[str, Any], where: str, task: str, case_type: type) -> None:
    fields = case_fields(case)
    hints = typing.get_type_hints(case_type)
    for key, value in fields.items():
        if not _type_ok(value, hints.get(key, Any)):
            raise SuiteError(f"{path}: preset {preset!r}: parameter {key!r} = {value!r} is not {hints[key]}")
    try:
        check_case_names(task, fields, case_type)
    except ValueError as exc:
        raise SuiteError(f"{path}: preset {preset!r}, case {where}: {exc}") from None
    try:
        case_type(**fields)
    except (TypeError, ValueError) as exc:
        raise SuiteError(f"{path}: preset {preset!r}: invalid case {fields}: {exc}") from None


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
    name = _require(data, "name", str, path)
    if not SUITE_NAME.fullmatch(name):
        raise SuiteError(
            f"{path}: key 'name': {name!r} names the folder under --out, so it must be lowercase letters, digits, "
            "'-', '_' or '.' (not first)"
        )
    suite = Suite(
        path=path,
        name=name,
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
        paper_setup=str(data.get("paper_setup", "")).strip(),
    )
    for pname in presets:
        for case in suite.cases(pname):
            _check_case(path, pname, case, suite.label(pname, case), task, case_type)
    known = set(metrics) | {f.name for f in dataclasses.fields(case_type)} | {"variant"}
    for i, row in enumerate(suite.paper_results):
        unknown = sorted(set(row) - known)
        if unknown:
            raise SuiteError(f"{path}: paper_results[{i}]: unknown key {unknown[0]!r} (not a metric or parameter)")
    return suite
