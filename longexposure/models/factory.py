"""Build a causal LM from a preset name (random init) or from weights on disk/hub (from_pretrained).

torch and transformers are imported inside the functions: importing this module (and so `longexposure.models`,
whose presets `longexposure list` shows) stays free of them. The one case that reaches the network is a
model/weights name that is not a local path but looks like a hub id (`owner/name`): transformers then
fetches it from the Hugging Face hub (HF_HUB_OFFLINE=1 forbids it), and says so on stderr.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from longexposure.arch import FAMILIES
from longexposure.registry import MODEL_PRESETS

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

_log = logging.getLogger(__name__)


def _model_type(family: str) -> str:
    """The HF `model_type` of a family (`arch.FAMILIES` is keyed by it)."""
    if family not in FAMILIES:
        raise KeyError(family)
    return family


def preset_config(name: str, **overrides: Any):
    """The HF config of a registered preset, with overrides."""
    from transformers import AutoConfig

    preset = MODEL_PRESETS.get(name)
    return AutoConfig.for_model(_model_type(preset.family), **{**preset.config, **overrides})


def build_model(
    model: str,
    *,
    weights: str | None = None,
    attn_implementation: str = "sdpa",
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    seed: int = 0,
    **config_overrides: Any,
) -> PreTrainedModel:
    """A causal LM ready to fine-tune.

    Args:
        model: a registered preset name (random-initialised from its real config), or a local
            checkpoint directory / hub id (loaded with `from_pretrained`; a hub id is fetched from the
            Hugging Face hub, the only download this project makes for a model).
        weights: optional checkpoint (local path or hub id) to load for a preset's architecture.
        attn_implementation: `eager`, `sdpa`, or any name registered with transformers' AttentionInterface.
        device, dtype: where and in which dtype (default float32) the parameters live.
        seed: seeds the random initialisation so every case of a suite gets the same weights.
    """
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.float32 if dtype is None else dtype
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
    local = os.path.isdir(source)
    online = local or _hub_reachable()
    if not local and online:  # offline, only the local hub cache is read, and a miss is the error below
        _log.warning("model %r is not a local path: loading it from the Hugging Face hub", source)
    try:
        lm = AutoModelForCausalLM.from_pretrained(
            source,
            attn_implementation=attn_implementation,
            dtype=dtype,
            **({} if online else {"local_files_only": True, "adapter_kwargs": {"local_files_only": True}}),
            **config_overrides,
        ).to(device)
    except OSError as exc:
        if local:
            raise FileNotFoundError(f"could not load the checkpoint {source!r}: {_first_line(exc)}") from exc
        why = f"loading it from the hub failed ({_first_line(exc)})" if online else "the hub cannot be reached"
        raise FileNotFoundError(
            f"model {source!r} is not a local path and {why}; pass a local checkpoint directory or one of the "
            f"presets: {', '.join(MODEL_PRESETS.names())}"
        ) from exc
    lm.config.longexposure_weights = describe_weights(source)
    return lm.train()


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the hub answers a TCP connect. Offline, transformers retries each file for ~25 s and prints every
    retry; answering from the local cache only (local_files_only) fails at once instead."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # a proxy decides; transformers reports what it says
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((url.hostname, url.port or (80 if url.scheme == "http" else 443)), timeout_s).close()
    except OSError:
        return False
    return True


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__


def describe_weights(source: str) -> str:
    """`source`, plus how `longexposure pretrain` made it when its `pretrain.json` is there: the recipe
    (act_l1 included) changes the sparsity every downstream number measures, so outputs must say it."""
    record = Path(source) / "pretrain.json"
    if not record.is_file():
        return source
    try:
        run = json.loads(record.read_text())
        recipe = run["recipe"]
        group = f", act_group_l1 {recipe['act_group_l1']}" if recipe.get("act_group_l1") else ""
        return (
            f"{source} (longexposure pretrain --preset {run['preset']}: {recipe['steps']} steps of "
            f"{recipe['batch']}x{recipe['seq_len']}, act_l1 {recipe.get('act_l1', 0.0)}{group}, "
            f"held-out loss {run['held_out_loss']:.3f})"
        )
    except (ValueError, KeyError, TypeError) as exc:
        return f"{source} (its pretrain.json is unreadable: {exc.__class__.__name__})"
