"""The paper's PEFT methods: full fine-tuning, LoRA, Houlsby adapters, BitFit, P-Tuning.

Each method takes a base model, leaves exactly its own parameters trainable (everything else frozen)
and returns the model to train (peft-wrapped where peft implements the method), or `(model, info)` when it
has something to report about itself (Sylva / K-FAC pruner / SP-LoRA: mask source, factor bytes, ...):
`apply_method` gives the model, `apply_method_reporting` the model and that info. A method registered with
`config=` (Sylva, the K-FAC pruner, SP-LoRA) takes one frozen dataclass config, which `apply_method` builds from
the keyword options (`method_config`); the others take keyword options.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

from torch import nn

from longexposure.arch import FAMILIES, family_of
from longexposure.methods.adapter import attach_adapter
from longexposure.registry import PEFT_METHODS


def freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def _modules_ending_with(model: nn.Module, suffixes: tuple[str, ...]) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if n.endswith(suffixes)]


@PEFT_METHODS.register("full", help="all parameters trainable")
def full(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(True)
    return model


@PEFT_METHODS.register("lora", help="peft LoRA on the family's default targets")
def lora(
    model: nn.Module, r: int = 8, alpha: int = 16, dropout: float = 0.0, target_modules: list[str] | None = None
) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    targets = list(target_modules or FAMILIES[family_of(model)].lora)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


@PEFT_METHODS.register("adapter", help="Houlsby adapters after attention and MLP, plus layer norms")
def adapter(model: nn.Module, bottleneck: int = 64, train_layer_norms: bool = True) -> nn.Module:
    family = family_of(model)
    names = FAMILIES[family]
    freeze(model)
    dim = model.config.hidden_size
    targets = _modules_ending_with(model, names.attn_out + names.mlp_out)
    if not targets:
        raise ValueError(f"no attention/MLP output modules found for family {family!r}")
    for _, module in targets:
        attach_adapter(module, dim, bottleneck)
    if train_layer_norms:
        for _, norm in _modules_ending_with(model, names.norms):
            for p in norm.parameters():
                p.requires_grad_(True)
    return model


@PEFT_METHODS.register("bitfit", help="bias terms only")
def bitfit(model: nn.Module) -> nn.Module:
    freeze(model)
    biases = [p for n, p in model.named_parameters() if n.endswith(".bias")]
    if not biases:
        raise ValueError(f"{type(model).__name__} has no bias parameters: BitFit cannot train it")
    for p in biases:
        p.requires_grad_(True)
    return model


@PEFT_METHODS.register("p-tuning", help="peft P-Tuning: a prompt encoder feeding virtual tokens")
def p_tuning(model: nn.Module, num_virtual_tokens: int = 20, encoder_hidden_size: int = 128) -> nn.Module:
    from peft import PromptEncoderConfig, get_peft_model

    config = PromptEncoderConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens, encoder_hidden_size=encoder_hidden_size
    )
    return get_peft_model(model, config)


def apply_method(model: nn.Module, name: str, **options) -> nn.Module:
    """Look `name` up and apply it; unknown options are an error naming the method."""
    return apply_method_reporting(model, name, **options)[0]


def method_config(name: str, options: dict[str, Any]) -> Any:
    """The typed config (`config=` at registration, e.g. `SylvaConfig`) of method `name` built from `options`; None
    for a method that takes keyword options. An unknown option is a TypeError naming the valid fields, a bad value
    the config's own ValueError, both prefixed with the method's name."""
    config_type = PEFT_METHODS.entry(name).meta.get("config")
    if config_type is None:
        return None
    valid = [f.name for f in dataclasses.fields(config_type)]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        close = difflib.get_close_matches(unknown[0], valid, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise TypeError(
            f"PEFT method {name!r}: unknown option {unknown[0]!r}.{hint} Valid options ({config_type.__name__}): "
            f"{', '.join(valid)}"
        )
    try:
        return config_type(**options)
    except ValueError as exc:
        raise ValueError(f"PEFT method {name!r}: {exc}") from None


def apply_method_reporting(model: nn.Module, name: str, **options) -> tuple[nn.Module, dict[str, Any]]:
    """`apply_method`, and what the method reports about itself ({} for a method that reports nothing)."""
    method = PEFT_METHODS.get(name)
    config = method_config(name, options)
    try:
        result = method(model, **options) if config is None else method(model, config)
    except TypeError as exc:
        if config is None and "unexpected keyword" in str(exc):
            raise TypeError(f"PEFT method {name!r}: {exc}") from None
        raise
    return result if isinstance(result, tuple) else (result, {})
