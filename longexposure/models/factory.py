"""Build a causal LM from a preset name (random init) or from weights on disk/hub (from_pretrained)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from longexposure.registry import MODEL_PRESETS

_CONFIG_TYPES = {"opt": "opt", "gpt2": "gpt2", "llama": "llama"}


def family_of(model: torch.nn.Module) -> str:
    """`opt`, `gpt2` or `llama` for a (possibly PEFT-wrapped) HF model; an error names other types."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in _CONFIG_TYPES:
        raise ValueError(
            f"unsupported model type {model_type!r} ({type(model).__name__}); supported: {sorted(_CONFIG_TYPES)}"
        )
    return _CONFIG_TYPES[model_type]


def preset_config(name: str, **overrides: Any):
    """The HF config of a registered preset, with overrides."""
    preset = MODEL_PRESETS.get(name)
    return AutoConfig.for_model(_CONFIG_TYPES[preset.family], **{**preset.config, **overrides})


def build_model(
    model: str,
    *,
    weights: str | None = None,
    attn_implementation: str = "sdpa",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    **config_overrides: Any,
) -> PreTrainedModel:
    """A causal LM ready to fine-tune.

    Args:
        model: a registered preset name (random-initialised from its real config), or a local
            checkpoint directory / hub id (loaded with `from_pretrained`).
        weights: optional checkpoint (local path or hub id) to load for a preset's architecture.
        attn_implementation: `eager`, `sdpa`, or any name registered with transformers' AttentionInterface.
        device, dtype: where and in which dtype the parameters live.
        seed: seeds the random initialisation so every case of a suite gets the same weights.
    """
    source = weights
    if model in MODEL_PRESETS and weights is None:
        config = preset_config(model, **config_overrides)
        config._attn_implementation = attn_implementation
        torch.manual_seed(seed)
        with torch.device(device):
            lm = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=dtype)
        lm.config.longexposure_weights = "random-init"
        return lm.train()
    if source is None:
        if model not in MODEL_PRESETS and "/" not in model and not os.path.isdir(model):
            MODEL_PRESETS.get(model)  # neither a preset nor loadable: the error lists the presets
        source = model
    source = os.path.expanduser(source)
    if source.startswith((".", "/")) and not os.path.exists(source):
        raise FileNotFoundError(f"weights path {source!r} does not exist")
    try:
        lm = AutoModelForCausalLM.from_pretrained(
            source, attn_implementation=attn_implementation, dtype=dtype, **config_overrides
        ).to(device)
    except OSError as exc:
        raise FileNotFoundError(
            f"could not load weights {source!r}: not a local checkpoint directory, and the hub is unreachable "
            f"or has no such model ({exc.__class__.__name__}). Pass a local path to a saved HF checkpoint."
        ) from exc
    lm.config.longexposure_weights = describe_weights(source)
    return lm.train()


def describe_weights(source: str) -> str:
    """`source`, plus how `longexposure pretrain` made it when its `pretrain.json` is there: the recipe
    (act_l1 included) changes the sparsity every downstream number measures, so outputs must say it."""
    record = Path(source) / "pretrain.json"
    if not record.is_file():
        return source
    try:
        run = json.loads(record.read_text())
        recipe = run["recipe"]
        return (
            f"{source} (longexposure pretrain --preset {run['preset']}: {recipe['steps']} steps of "
            f"{recipe['batch']}x{recipe['seq_len']}, act_l1 {recipe.get('act_l1', 0.0)}, "
            f"held-out loss {run['held_out_loss']:.3f})"
        )
    except (ValueError, KeyError, TypeError) as exc:
        return f"{source} (its pretrain.json is unreadable: {exc.__class__.__name__})"
