"""Model families: per architecture, where its modules are and what each part of the project touches.

One entry per family (adding one, e.g. another LLaMA-like decoder, is one entry here): the decoder layers,
the attention module and its q / k projections, the MLP when it is a plain ReLU MLP that Long Exposure's
neuron-block operator fits (fc1, fc2, activation; None otherwise), the output projections Houlsby adapters
follow, peft's default LoRA targets, the layer norms, and every block linear projection (Sylva, the K-FAC
pruner, SP-LoRA, magnitude / Wanda pruning).

Torch-free at import; the functions take a (possibly PEFT-wrapped) HF causal LM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ReluMlp:
    """A plain ReLU MLP: its up projection, down projection and activation, as attribute names in a layer."""

    fc1: str
    fc2: str
    act: str


@dataclass(frozen=True)
class Family:
    """One architecture's module names (dotted paths: `layers` from the base model, the rest from a layer).

    Attributes:
        layers: the decoder layer list. attn: a layer's attention module; q, k: its query / key projections
            (None where one fused projection makes both).
        mlp: the ReLU MLP Long Exposure patches and profiles (None: the MLP is not one, only attention is exposed).
        attn_out, mlp_out: output projections (suffixes) where Houlsby adapters go. lora: peft's default LoRA
        targets. norms: the layer norms an adapter run also trains. projections: every block linear projection.
    """

    layers: str
    attn: str
    q: str | None
    k: str | None
    mlp: ReluMlp | None
    attn_out: tuple[str, ...]
    mlp_out: tuple[str, ...]
    lora: tuple[str, ...]
    norms: tuple[str, ...]
    projections: tuple[str, ...]


FAMILIES: dict[str, Family] = {
    "opt": Family(
        layers="model.decoder.layers",
        attn="self_attn", q="self_attn.q_proj", k="self_attn.k_proj",
        mlp=ReluMlp(fc1="fc1", fc2="fc2", act="activation_fn"),
        attn_out=("self_attn.out_proj",), mlp_out=("fc2",), lora=("q_proj", "v_proj"),
        norms=("self_attn_layer_norm", "final_layer_norm"),
        projections=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"),
    ),
    "gpt2": Family(
        layers="transformer.h",
        attn="attn", q=None, k=None,  # one fused c_attn
        mlp=None,
        attn_out=("attn.c_proj",), mlp_out=("mlp.c_proj",), lora=("c_attn",), norms=("ln_1", "ln_2"),
        projections=("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
    ),
    "llama": Family(
        layers="model.layers",
        attn="self_attn", q="self_attn.q_proj", k="self_attn.k_proj",
        mlp=None,
        attn_out=("self_attn.o_proj",), mlp_out=("mlp.down_proj",), lora=("q_proj", "v_proj"),
        norms=("input_layernorm", "post_attention_layernorm"),
        projections=(
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
        ),
    ),
}  # fmt: skip


def family_of(model: Any) -> str:
    """`opt`, `gpt2` or `llama` for a (possibly PEFT-wrapped) HF model; an error names other types."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(
            f"unsupported model type {model_type!r} ({type(model).__name__}); supported: {sorted(FAMILIES)}"
        )
    return model_type


def family(model: Any) -> Family:
    """The `Family` entry of a (possibly PEFT-wrapped) HF model."""
    return FAMILIES[family_of(model)]


def base_model(model: Any) -> Any:
    """The HF model inside a peft wrapper (the model itself when it is not wrapped)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def resolve(root: Any, dotted: str) -> Any:
    """The attribute at a dotted path below `root`."""
    for part in dotted.split("."):
        root = getattr(root, part)
    return root


def decoder_layers(model: Any) -> list[Any]:
    """The decoder layers of a (possibly PEFT-wrapped) HF causal LM of a known family."""
    return list(resolve(base_model(model), family(model).layers))
