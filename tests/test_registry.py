import subprocess
import sys

import pytest

from longexposure.registry import ALL, Registry, RegistryError, registry


def test_unknown_name_lists_valid_names_and_suggests():
    reg = Registry("widget")
    reg.register("flash-attn", object())
    reg.register("eager", object())
    with pytest.raises(RegistryError) as err:
        reg.get("flash-atn")
    msg = str(err.value)
    assert "unknown widget 'flash-atn'" in msg
    assert "Did you mean 'flash-attn'?" in msg
    assert "eager, flash-attn" in msg


def test_conflicting_registration_is_an_error_but_same_object_is_idempotent():
    reg = Registry("widget")
    a = object()
    reg.register("a", a)
    reg.register("a", a)
    with pytest.raises(RegistryError, match="already registered"):
        reg.register("a", object())


@pytest.mark.parametrize("bad", ["Upper", "with space", "under_score", ""])
def test_names_are_lowercase_hyphenated(bad):
    with pytest.raises(RegistryError, match="lowercase"):
        Registry("widget").register(bad, object())


def test_decorator_registration_returns_the_object():
    reg = Registry("widget")

    @reg.register("thing", help="a thing", devices=("cpu",))
    def thing():
        return 1

    assert reg.get("thing") is thing
    assert reg.entry("thing").meta == {"help": "a thing", "devices": ("cpu",)}


def test_unknown_kind():
    with pytest.raises(RegistryError, match="Did you mean 'peft_method'"):
        registry("peft_methods")


def test_builtin_registries_load_and_list_their_entries():
    assert {"opt-1.3b", "opt-tiny", "gpt2-xl", "relu-micro"} <= set(registry("model_preset").names())
    assert {"full", "lora", "adapter", "bitfit", "p-tuning"} <= set(registry("peft_method").names())
    assert {"synthetic", "e2e", "alpaca"} <= set(registry("dataset").names())
    assert "train-step" in registry("task")
    assert set(ALL) >= {"attention_backend", "mlp_backend", "exposer", "predictor", "mask_policy"}


def test_import_is_light():
    """`import longexposure` must not import torch, triton or any built-in plug-in module."""
    code = "import sys, longexposure; print(sorted(m for m in ('torch', 'triton', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


@pytest.mark.parametrize("kind", sorted(ALL))
def test_every_registered_plugin_has_a_one_line_help(kind):
    """`longexposure list` shows each entry's `help`: every built-in plug-in of every kind has one (model
    presets, MLP backends and two tasks had none; attention backends and mask policies used `description=`)."""
    reg = registry(kind)
    assert len(reg) > 0
    for entry in reg:
        text = entry.meta.get("help")
        assert isinstance(text, str) and text.strip() and "\n" not in text, f"{kind} {entry.name!r}: help {text!r}"


def test_help_is_the_one_description_key():
    """A second key (`description=`) was silently not shown by `longexposure list`: it is refused."""
    reg = Registry("widget")
    with pytest.raises(RegistryError, match="help="):
        reg.register("a", object(), description="a widget")
    with pytest.raises(RegistryError, match="one line"):
        reg.register("b", object(), help="two\nlines")
