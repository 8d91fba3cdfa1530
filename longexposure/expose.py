"""`expose(model, config)`: patch a Hugging Face OPT / GPT-2 / LLaMA model in place to compute only the
blocks a sparsity source selects, in attention and (ReLU models) in the MLP; `unexpose` restores it.

Modules are patched, not forked: parameter names and module types stay, so `lora`, `adapter`, `bitfit`
and `p-tuning` apply before or after exposure unchanged, with or without a peft wrapper.

- Attention: the model's attention implementation becomes `long_exposure` (registered with
  transformers' AttentionInterface); a forward pre-hook on each attention module hands it this step's
  per-(batch, head) block layout from the source (`attention_backends.set_layout`).
- MLP (OPT, ReLU): `fc1.forward` runs the whole fc1 -> ReLU -> fc2 through a registered MLP backend
  on the source's active neuron blocks; `activation_fn` and `fc2.forward` become pass-throughs (fc2's
  forward hooks, e.g. Houlsby adapters, still run on the MLP output). LoRA adapters on fc1/fc2 are
  handed to the operator, which applies them where the math puts them.

Sparsity sources (`ExposureConfig.source`), recorded in every report:
    all-active  every block: the exposed model computes exactly the dense model (correctness check)
    replay      per-layer patterns from a recorded profile (`replay.RecordedProfile`); not this
                model's activations, and every report says so
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from longexposure.models.factory import family_of
from longexposure.registry import MLP_BACKENDS
from longexposure.replay import RecordedProfile

# Per architecture: where the decoder layers are, the attention module in a layer, and the MLP's
# (fc1, fc2, activation) attribute names when the MLP is a plain ReLU MLP the neuron-block op fits.
LAYOUTS: dict[str, dict[str, Any]] = {
    "opt": {"layers": "model.decoder.layers", "attn": "self_attn", "mlp": ("fc1", "fc2", "activation_fn")},
    "gpt2": {"layers": "transformer.h", "attn": "attn", "mlp": None},
    "llama": {"layers": "model.layers", "attn": "self_attn", "mlp": None},
}
SOURCES = ("all-active", "replay")
STATE_ATTR = "long_exposure"


@dataclass
class ExposureConfig:
    """What to expose and how.

    Attributes:
        source: where the patterns come from (see the module docstring).
        attention, mlp: expose attention / the MLP (MLP needs a ReLU MLP).
        attention_backend, mlp_backend: registered backends that run the sparse computation.
        attn_block, mlp_block: tokens per attention block; neurons per MLP block.
        theta: replay MLP filter: keep neuron blocks with mass >= theta x the layer's peak block.
        global_blocks: replay attention layouts: causal window + this many global blocks.
        profile: the recorded profile for `replay`.
    """

    source: str = "replay"
    attention: bool = True
    mlp: bool = True
    attention_backend: str = "triton"
    mlp_backend: str = "triton"
    attn_block: int = 64
    mlp_block: int = 64
    theta: float = 0.1
    global_blocks: int = 1
    profile: RecordedProfile | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"sparsity source {self.source!r} is not one of {SOURCES}")
        if self.source == "replay" and self.profile is None:
            raise ValueError("source 'replay' needs a profile (RecordedProfile.from_reference(shared_dir) or .load)")
        if not (self.attention or self.mlp):
            raise ValueError("nothing to expose: attention and mlp are both off")


def _base_model(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _resolve(root: nn.Module, dotted: str) -> Any:
    for part in dotted.split("."):
        root = getattr(root, part)
    return root


def _lora_of(module: nn.Module, allow_dropout: bool) -> Any:
    """The active peft LoRA adapter of a wrapped linear as an operator `LowRank`, or None."""
    if not hasattr(module, "lora_A"):
        return None
    from longexposure.ops.neuron_block_mlp import LowRank

    names = [n for n in module.active_adapters if n in module.lora_A]
    if len(names) != 1:
        raise ValueError(f"exposure supports one active LoRA adapter per layer, got {names}")
    name = names[0]
    drop = module.lora_dropout[name]
    dropout = None if isinstance(drop, nn.Identity) else drop
    if dropout is not None and not allow_dropout:
        raise ValueError("LoRA dropout on fc2 is not supported by the neuron-block operator; use lora_dropout=0")
    return LowRank(module.lora_A[name].weight, module.lora_B[name].weight, module.scaling[name], dropout)


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return t if t is None or t.dtype == dtype else t.to(dtype)


class Exposure:
    """The patch state of one model: what was replaced, the per-layer backends, and what ran."""

    def __init__(self, model: nn.Module, config: ExposureConfig):
        self.model = model
        self.config = config
        self.base = _base_model(model)
        self.family = family_of(self.base)
        spec = LAYOUTS[self.family]
        self.layers = list(_resolve(self.base, spec["layers"]))
        self.hf_config = self.base.config
        self._undo: list[Any] = []
        self._cache: dict[tuple, Any] = {}
        self.mlp_density: dict[int, float] = {}
        self.attn_density: dict[int, float] = {}
        ffn = getattr(self.hf_config, "ffn_dim", None)
        if config.profile is not None:
            config.profile.check_model(len(self.layers), ffn if config.mlp else None)
        if config.mlp:
            if spec["mlp"] is None or getattr(self.hf_config, "activation_function", None) != "relu":
                raise ValueError(
                    f"MLP exposure needs a ReLU MLP; {self.family} "
                    f"({getattr(self.hf_config, 'activation_function', getattr(self.hf_config, 'hidden_act', '?'))}) "
                    "has none: expose attention only (mlp=False)"
                )
            MLP_BACKENDS.entry(config.mlp_backend)  # unknown names fail before anything is patched

    # ------------------------------------------------------------------------------ sources
    # Both sources are static per (layer, shape, device): patterns are built once and reused, so the
    # training step neither rebuilds them nor synchronizes with the host.
    def _mlp_ids(self, layer: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        key = ("mlp", layer, device)
        if key not in self._cache:
            n_blocks = self.hf_config.ffn_dim // self.config.mlp_block
            if self.config.source == "all-active":
                ids = torch.arange(n_blocks, dtype=torch.int32)
            else:
                ids = self.config.profile.mlp_blocks(layer, self.config.mlp_block, self.config.theta)
            self.mlp_density[layer] = ids.numel() / n_blocks
            self._cache[key] = (ids.to(device), None)
        return self._cache[key]

    def _layout(self, layer: int, seq_len: int, device: torch.device):
        """A (1, 1, NQ, NK) layout, broadcast by the backends over batch and heads."""
        from longexposure.mask_policies import mask_layout

        key = ("attn", layer, seq_len, device)
        if key not in self._cache:
            block = self.config.attn_block
            n = -(-seq_len // block)
            if self.config.source == "all-active":
                layout = mask_layout("dense", 1, 1, seq_len, block, device=device)
            else:
                window = self.config.profile.attention_window(layer, n, self.config.global_blocks)
                layout = mask_layout(
                    "longformer",
                    1,
                    1,
                    seq_len,
                    block,
                    device=device,
                    window_blocks=window,
                    global_blocks=self.config.global_blocks,
                )
            self.attn_density[layer] = float(layout.kv_counts.sum()) / (n * (n + 1) / 2)
            self._cache[key] = layout
        return self._cache[key]

    # ------------------------------------------------------------------------------ patching
    def patch(self) -> None:
        try:
            if self.config.attention:
                self._patch_attention()
            if self.config.mlp:
                for i, layer in enumerate(self.layers):
                    self._patch_mlp(i, layer)
        except Exception:
            self.unpatch()
            raise

    def _patch_attention(self) -> None:
        from longexposure.attention_backends import SLOT_ATTR, register_transformers_attention, set_layout

        for i, layer in enumerate(self.layers):
            attn = _resolve(layer, LAYOUTS[self.family]["attn"])
            p = getattr(attn, "attention_dropout", getattr(attn, "dropout", 0.0))
            p = p.p if isinstance(p, nn.Dropout) else p
            if p and self.model.training:
                raise ValueError(
                    f"layer {i}: attention dropout {p} is not supported by sparse attention; "
                    "build the model with attention dropout 0"
                )
        name = register_transformers_attention()
        old = self.hf_config._attn_implementation
        self._set_attn_implementation(name)
        self._undo.append(lambda: self._set_attn_implementation(old))
        for i, layer in enumerate(self.layers):
            attn = _resolve(layer, LAYOUTS[self.family]["attn"])

            def pre_hook(module, args, kwargs, i=i):
                hidden = kwargs.get("hidden_states", args[0] if args else None)
                set_layout(
                    module, self._layout(i, hidden.shape[1], hidden.device), backend=self.config.attention_backend
                )

            handle = attn.register_forward_pre_hook(pre_hook, with_kwargs=True)
            self._undo.append(handle.remove)
            self._undo.append(lambda attn=attn: attn.__dict__.pop(SLOT_ATTR, None))

    def _set_attn_implementation(self, name: str) -> None:
        for cfg in {id(c): c for c in (self.hf_config, getattr(self.base, "config", None)) if c is not None}.values():
            cfg._attn_implementation = name

    def _patch_mlp(self, i: int, layer: nn.Module) -> None:
        fc1_name, fc2_name, act_name = LAYOUTS[self.family]["mlp"]
        fc1, fc2 = getattr(layer, fc1_name), getattr(layer, fc2_name)
        base1, base2 = getattr(fc1, "base_layer", fc1), getattr(fc2, "base_layer", fc2)
        backend = MLP_BACKENDS.get(self.config.mlp_backend)(block_size=self.config.mlp_block)
        backend.prepare(base1.weight, base1.bias, base2.weight, base2.bias)
        lora1, lora2 = _lora_of(fc1, allow_dropout=True), _lora_of(fc2, allow_dropout=False)

        def mlp_forward(x: torch.Tensor) -> torch.Tensor:
            ids, count = self._mlp_ids(i, x.device)
            dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
            weights = (base1.weight, base1.bias, base2.weight, base2.bias)
            cast = tuple(_cast(t, dtype) for t in weights)
            if any(c is not t for c, t in zip(cast, weights, strict=True)):
                backend.prepare(*cast)  # fp32 trainable weights under autocast: this step's low-precision copy
            l1, l2 = (
                None if lr is None else type(lr)(_cast(lr.a, dtype), _cast(lr.b, dtype), lr.scaling, lr.dropout)
                for lr in (lora1, lora2)
            )
            with torch.autocast(x.device.type, enabled=False):
                return backend(x.to(dtype), ids, count, fc1_lora=l1, fc2_lora=l2)

        original_act = getattr(layer, act_name)
        fc1.forward = mlp_forward
        fc2.forward = lambda h: h
        setattr(layer, act_name, nn.Identity())
        self._undo.append(lambda: setattr(base2.weight, "data", base2.weight.data.contiguous()))
        self._undo.append(lambda: setattr(layer, act_name, original_act))
        self._undo.append(lambda: fc2.__dict__.pop("forward", None))
        self._undo.append(lambda: fc1.__dict__.pop("forward", None))

    def unpatch(self) -> None:
        while self._undo:
            self._undo.pop()()

    def report(self) -> dict[str, Any]:
        """Per-layer densities of the last step and what produced them (for result records)."""
        source = self.config.source
        if source == "replay":
            source = f"replay: {self.config.profile.source} (recorded, not predicted from this model)"
        mean = lambda d: sum(d.values()) / len(d) if d else None  # noqa: E731
        return {
            "sparsity_source": source,
            "attention_backend": self.config.attention_backend if self.config.attention else None,
            "mlp_backend": self.config.mlp_backend if self.config.mlp else None,
            "mlp_block_density": mean(self.mlp_density),
            "attention_block_density_of_causal": mean(self.attn_density),
            "mlp_density_per_layer": dict(self.mlp_density),
            "attention_density_per_layer": dict(self.attn_density),
        }


def expose(model: nn.Module, config: ExposureConfig | None = None, **overrides: Any) -> Exposure:
    """Patch `model` in place (see the module docstring); returns the `Exposure` (also `model.long_exposure`)."""
    if getattr(model, STATE_ATTR, None) is not None:
        raise ValueError("model is already exposed; call unexpose(model) first")
    config = config or ExposureConfig(**overrides)
    exposure = Exposure(model, config)
    exposure.patch()
    object.__setattr__(model, STATE_ATTR, exposure)
    return exposure


def unexpose(model: nn.Module) -> None:
    """Undo `expose`: original forwards, activation, attention implementation and weight layout."""
    exposure = getattr(model, STATE_ATTR, None)
    if exposure is None:
        raise ValueError("model is not exposed")
    exposure.unpatch()
    with contextlib.suppress(AttributeError):
        object.__delattr__(model, STATE_ATTR)
