"""One generic registry for every pluggable kind (model presets, PEFT methods, datasets, backends, ...).

Why one type: every kind gets the same lookup rules, the same error text ("Did you mean"), the same
conflict check, and the same lazy loading, so `import longexposure` stays cheap and GPU-free: the
modules that hold a kind's built-in entries are imported only when that kind is first looked up.
"""

from __future__ import annotations

import difflib
import importlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")

_NAME = re.compile(r"^[a-z0-9][a-z0-9.\-]*$")


class RegistryError(LookupError):
    """An unknown name, a bad name or a conflicting registration."""


@dataclass
class Entry(Generic[T]):
    """A registered object with free-form metadata (capabilities, help text)."""

    name: str
    obj: T
    meta: dict[str, Any] = field(default_factory=dict)


class Registry(Generic[T]):
    """Name -> object table for one kind.

    Args:
        kind: what the entries are, used in error messages and `longexposure list KIND`.
        builtin_modules: modules imported on first lookup; they register the built-in entries.
    """

    def __init__(self, kind: str, builtin_modules: tuple[str, ...] = ()):
        self.kind = kind
        self._builtin_modules = builtin_modules
        self._loaded = False
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, obj: T | None = None, **meta: Any) -> Any:
        """Register `obj` under `name`; without `obj`, return a decorator.

        Names are lowercase-hyphenated; registering a taken name is an error (no silent override).
        `help` is the one-line description `longexposure list` shows; it is the only description key, so
        `description=` is refused rather than silently not shown.
        """
        if not _NAME.match(name):
            raise RegistryError(f"{self.kind} name {name!r} must be lowercase letters, digits, '-' or '.'")
        if "description" in meta:
            raise RegistryError(f"{self.kind} {name!r}: pass its one-line description as help=, not description=")
        text = meta.get("help")
        if text is not None and (not isinstance(text, str) or "\n" in text):
            raise RegistryError(f"{self.kind} {name!r}: help must be one line of text, got {text!r}")

        def add(target: T) -> T:
            if name in self._entries and self._entries[name].obj is not target:
                raise RegistryError(f"{self.kind} {name!r} is already registered ({self._entries[name].obj!r})")
            self._entries[name] = Entry(name, target, dict(meta))
            return target

        return add if obj is None else add(obj)

    def _load_builtins(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        for module in self._builtin_modules:
            importlib.import_module(module)

    def entry(self, name: str) -> Entry[T]:
        self._load_builtins()
        try:
            return self._entries[name]
        except KeyError:
            raise RegistryError(self._unknown(name)) from None

    def get(self, name: str) -> T:
        """The object registered as `name`; an unknown name raises an error listing the valid ones."""
        return self.entry(name).obj

    def _unknown(self, name: object) -> str:
        names = self.names()
        close = difflib.get_close_matches(str(name), names, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        valid = ", ".join(names) if names else "(none registered)"
        return f"unknown {self.kind} {name!r}.{hint} Valid {self.kind} names: {valid}"

    def names(self) -> list[str]:
        self._load_builtins()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        self._load_builtins()
        return name in self._entries

    def __iter__(self) -> Iterator[Entry[T]]:
        self._load_builtins()
        return iter([self._entries[n] for n in sorted(self._entries)])

    def __len__(self) -> int:
        self._load_builtins()
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {len(self._entries)} loaded)"


# The registries. Each lists the modules that register its built-ins; plug-ins register from anywhere.
MODEL_PRESETS: Registry[Any] = Registry("model_preset", ("longexposure.models.presets",))
PEFT_METHODS: Registry[Callable[..., Any]] = Registry(
    "peft_method", ("longexposure.methods.builtin", "longexposure.methods.sylva", "longexposure.methods.sp_lora")
)
DATASETS: Registry[Callable[..., Any]] = Registry("dataset", ("longexposure.data.builtin",))
ATTENTION_BACKENDS: Registry[Any] = Registry("attention_backend", ("longexposure.attention_backends",))
MLP_BACKENDS: Registry[Any] = Registry("mlp_backend", ("longexposure.mlp_backends",))
MASK_POLICIES: Registry[Any] = Registry("mask_policy", ("longexposure.mask_policies",))
EXPOSERS: Registry[Any] = Registry("exposer", ("longexposure.exposers",))
PREDICTORS: Registry[Any] = Registry("predictor", ("longexposure.predictors.builtin",))
SPARSITY_SOURCES: Registry[Any] = Registry("sparsity_source", ("longexposure.sparsity_sources",))
TRAINING_LOSSES: Registry[Callable[..., Any]] = Registry("training_loss", ("longexposure.losses",))
DATA_PARALLEL: Registry[Callable[..., Any]] = Registry("data_parallel", ("longexposure.distributed",))
TASKS: Registry[Callable[..., Any]] = Registry(
    "task",
    (
        "longexposure.tasks.train_step",
        "longexposure.tasks.loss_curve",
        "longexposure.tasks.mlp_operator",
        "longexposure.tasks.attention_operator",
        "longexposure.tasks.sparsity_profile",
        "longexposure.tasks.peer_systems",
        "longexposure.tasks.evaluate",
    ),
)

ALL: dict[str, Registry[Any]] = {
    r.kind: r
    for r in (
        MODEL_PRESETS,
        PEFT_METHODS,
        DATASETS,
        ATTENTION_BACKENDS,
        MLP_BACKENDS,
        MASK_POLICIES,
        EXPOSERS,
        PREDICTORS,
        SPARSITY_SOURCES,
        TRAINING_LOSSES,
        DATA_PARALLEL,
        TASKS,
    )
}


def registry(kind: str) -> Registry[Any]:
    """The registry of one kind, with the same unknown-name error as a registry lookup."""
    if kind not in ALL:
        close = difflib.get_close_matches(kind, list(ALL), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise RegistryError(f"unknown registry kind {kind!r}.{hint} Valid kinds: {', '.join(ALL)}")
    return ALL[kind]
