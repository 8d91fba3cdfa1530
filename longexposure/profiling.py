"""Profiling the sparsity each exposer policy finds in a real model on real data (Fig. 4, Fig. 9 left).

`capture` runs the frozen model once and records, per decoder layer, what the operators see: the MLP
input (fc1's input) and its ReLU output, the attention input (q_proj's input) and the per-head
queries and keys. `profile_layers` turns those into one row per (layer, policy) with the density
(fraction of blocks computed), the sparsity ratio (1 - density) and the fraction of activation mass /
attention mass the policy keeps; `per_token_vs_sequence` gives the Fig. 4 contrast: the fraction of
neurons silent for one token vs. silent for a whole sequence (and a whole batch).

Module names per architecture are data (`longexposure.arch.FAMILIES`); only ReLU families have MLP activation
sparsity.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from longexposure.arch import FAMILIES, Family, base_model
from longexposure.exposers import (
    AttentionExposer,
    MlpExposer,
    attention_block_mass,
    attention_density,
    attention_mass_kept,
    block_stats,
    make_exposer,
)

# Families with a ReLU MLP (`arch.Family.mlp`): the only ones with MLP activation sparsity to profile.
RELU_FAMILIES = sorted(name for name, fam in FAMILIES.items() if fam.mlp is not None)


def relu_family(model: torch.nn.Module) -> Family:
    """The family entry of a (possibly PEFT-wrapped) model with a ReLU MLP; an error names the others."""
    kind = getattr(getattr(base_model(model), "config", None), "model_type", None)
    if kind not in RELU_FAMILIES:
        raise ValueError(f"profiling supports model types {RELU_FAMILIES} (ReLU OPT family), got {kind!r}")
    return FAMILIES[kind]


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers of a (possibly PEFT-wrapped) supported model."""
    return list(base_model(model).get_submodule(relu_family(model).layers))


def layer_part(model: torch.nn.Module, layer: torch.nn.Module, part: str, *, base: bool = True) -> Any:
    """A named part (`fc1`, `fc2`, `act`, `q`, `k`, `attn`) of one decoder layer.

    With `base` (default), a peft LoRA layer is unwrapped to its frozen base layer (the weights the
    operators and predictors read); `base=False` keeps the wrapper (whose output includes LoRA).
    """
    fam = relu_family(model)
    path = {"fc1": fam.mlp.fc1, "fc2": fam.mlp.fc2, "act": fam.mlp.act, "q": fam.q, "k": fam.k, "attn": fam.attn}[part]
    obj: Any = layer
    for name in path.split("."):
        obj = getattr(obj, name)
    return getattr(obj, "base_layer", obj) if base else obj


def num_heads(model: torch.nn.Module) -> int:
    return int(base_model(model).config.num_attention_heads)


@dataclass
class LayerCapture:
    """What one decoder layer's operators saw in one forward pass (tensors on the model's device).

    mlp_in (B, S, d) fc1 input; mlp_act (B, S, ffn) ReLU output; attn_in (B, S, d) q_proj input;
    q, k (B, H, S, D) per-head queries and keys (unscaled).
    """

    mlp_in: Tensor | None = None
    mlp_act: Tensor | None = None
    attn_in: Tensor | None = None
    q: Tensor | None = None
    k: Tensor | None = None
    extra: dict[str, Tensor] = field(default_factory=dict)


@torch.no_grad()
def capture(
    model: torch.nn.Module, input_ids: Tensor, *, mlp: bool = True, attention: bool = True
) -> list[LayerCapture]:
    """One forward pass of `input_ids` (B, S) recording every layer's operator inputs (see LayerCapture)."""
    layers = decoder_layers(model)
    heads = num_heads(model)
    bsz, seq = input_ids.shape
    caps = [LayerCapture() for _ in layers]
    handles = []

    def split_heads(t: Tensor) -> Tensor:
        b, s, hd = t.shape
        return t.view(b, s, heads, hd // heads).transpose(1, 2)

    for cap, layer in zip(caps, layers, strict=True):
        if mlp:
            act_fn = layer_part(model, layer, "act")

            def fc1_hook(mod, args, out, cap=cap, act_fn=act_fn):  # noqa: ANN001
                cap.mlp_in = args[0].detach().reshape(bsz, seq, -1)  # OPT flattens tokens before fc1
                cap.mlp_act = act_fn(out.detach().float()).reshape(bsz, seq, -1)

            handles.append(layer_part(model, layer, "fc1", base=False).register_forward_hook(fc1_hook))
        if attention:

            def q_hook(mod, args, out, cap=cap):  # noqa: ANN001
                cap.attn_in = args[0].detach().reshape(bsz, seq, -1)
                cap.q = split_heads(out.detach().float().reshape(bsz, seq, -1))

            def k_hook(mod, args, out, cap=cap):  # noqa: ANN001
                cap.k = split_heads(out.detach().float().reshape(bsz, seq, -1))

            handles.append(layer_part(model, layer, "q", base=False).register_forward_hook(q_hook))
            handles.append(layer_part(model, layer, "k", base=False).register_forward_hook(k_hook))
    was_training = model.training
    model.eval()
    try:
        model(input_ids=input_ids)
    finally:
        for hnd in handles:
            hnd.remove()
        model.train(was_training)
    return caps


def capture_mlp(model: torch.nn.Module, input_ids: Tensor) -> list[Tensor]:
    """Per layer, the ReLU output (B, S, ffn) for `input_ids`."""
    return [c.mlp_act for c in capture(model, input_ids, attention=False)]  # type: ignore[misc]


# ------------------------------------------------------------------------------------------- Fig. 4
def per_token_vs_sequence(act: Tensor) -> dict[str, float]:
    """Fraction of neurons silent: per token, over each whole sequence, and over the whole batch.

    Args:
        act: (B, S, ffn) ReLU outputs.
    """
    active = act > 0
    return {
        "per_token_sparsity": 1.0 - active.float().mean().item(),
        "per_sequence_sparsity": 1.0 - active.any(1).float().mean().item(),
        "per_batch_sparsity": 1.0 - active.flatten(0, 1).any(0).float().mean().item(),
    }


# ------------------------------------------------------------------------------------------ Fig. 9
@dataclass
class PolicySpec:
    """A named policy for a profile table: registry name, target, parameters, and a label."""

    name: str
    target: str
    params: dict[str, Any] = field(default_factory=dict)
    label: str | None = None

    def build(self) -> MlpExposer | AttentionExposer:
        return make_exposer(self.name, self.target, **self.params)

    @property
    def title(self) -> str:
        if self.label:
            return self.label
        extra = ",".join(f"{k}={v}" for k, v in self.params.items() if k not in ("block", "block_size"))
        return f"{self.name}({extra})" if extra else self.name


def mlp_row(policy: MlpExposer, act: Tensor) -> dict[str, float]:
    """density (kept neuron-blocks / all), sparsity, mass kept, for one layer's (..., ffn) activations."""
    mask = policy.block_mask(act)
    _, mass = block_stats(act, policy.block_size)
    density = mask.float().mean().item()
    return {
        "density": density,
        "sparsity": 1.0 - density,
        "mass_kept": float(mass[mask].sum() / mass.sum().clamp_min(1e-12)),
    }


def attention_row(policy: AttentionExposer, mass: Tensor) -> dict[str, float]:
    """density (kept causal blocks / causal blocks), its full-grid form, sparsity, mass kept."""
    mask = policy.block_mask(mass)
    dens = attention_density(mask).mean().item()
    n = mass.shape[-1]
    return {
        "density": dens,
        "density_full_grid": dens * (n + 1) / (2 * n),
        "sparsity": 1.0 - dens,
        "mass_kept": attention_mass_kept(mass, mask).mean().item(),
    }


def profile_layers(
    caps: Sequence[LayerCapture], policies: Iterable[PolicySpec], *, attn_block: int
) -> list[dict[str, Any]]:
    """One row per (layer, policy): layer, target, policy, density, sparsity, mass_kept."""
    policies = list(policies)
    built = [(p, p.build()) for p in policies]
    rows = []
    for li, cap in enumerate(caps):
        mass = None
        if cap.q is not None and any(p.target == "attention" for p in policies):
            mass = attention_block_mass(cap.q, cap.k, attn_block)  # type: ignore[arg-type]
        for spec, pol in built:
            if spec.target == "mlp" and cap.mlp_act is not None:
                rows.append({"layer": li, "target": "mlp", "policy": spec.title, **mlp_row(pol, cap.mlp_act)})
            elif spec.target == "attention" and mass is not None:
                rows.append({"layer": li, "target": "attention", "policy": spec.title, **attention_row(pol, mass)})
        if cap.mlp_act is not None:
            rows.append({"layer": li, "target": "mlp-fig4", "policy": "relu", **per_token_vs_sequence(cap.mlp_act)})
    return rows


def default_policies(
    *, mlp_block: int = 64, attn_block: int = 64, thetas: Sequence[float] = (0.05, 0.1, 0.2), tau: float = 0.95
) -> list[PolicySpec]:
    """Every registered policy at Fig. 9's settings: theta sweep for `threshold`, snapped and raw long-exposure."""
    specs = [
        PolicySpec("dense", "mlp", {"block_size": mlp_block}),
        PolicySpec("shadowy", "mlp", {"block_size": 1}, label="shadowy"),
        *[PolicySpec("threshold", "mlp", {"block_size": mlp_block, "theta": t}) for t in thetas],
        PolicySpec("dense", "attention", {"block": attn_block}),
        PolicySpec("shadowy", "attention", {"block": attn_block}),
        PolicySpec("longformer", "attention", {"block": attn_block}),
        PolicySpec("bigbird", "attention", {"block": attn_block}),
        PolicySpec("long-exposure", "attention", {"block": attn_block, "tau": tau}),
        PolicySpec("long-exposure", "attention", {"block": attn_block, "tau": tau, "snap": False}),
    ]
    return specs


def density_at_mass(mass: Tensor, target: float = 0.9) -> float:
    """Fewest blocks (sorted by mass) keeping >= target of the total, as a fraction of all blocks."""
    vals = mass.flatten().double().sort(descending=True).values
    cum = vals.cumsum(0) / vals.sum().clamp_min(1e-30)
    return (int((cum < target - 1e-12).sum()) + 1) / vals.numel()
