"""Model presets: the paper's models from their real configs, and tiny ones of the same code path.

A preset is a config, not weights: `build_model` random-initialises it (no download), or loads
`from_pretrained` weights when the user gives a local path or hub id. `hub_id` names the checkpoint
the preset's config was copied from, for users who have it locally. This module imports no torch, so
`longexposure list model_preset` stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from longexposure.registry import MODEL_PRESETS


@dataclass(frozen=True)
class ModelPreset:
    """An architecture family (`opt`, `gpt2`, `llama`) and its config overrides."""

    name: str
    family: str
    config: dict[str, Any] = field(default_factory=dict)
    hub_id: str | None = None
    description: str = ""


_OPT_VOCAB = {"vocab_size": 50272, "max_position_embeddings": 2048, "activation_function": "relu"}
_GPT2_VOCAB = {"vocab_size": 50257, "n_positions": 1024}


def _preset(name: str, family: str, hub_id: str | None, description: str, **config: Any) -> None:
    help_text = description if hub_id is None else f"{description}, config of {hub_id}"
    MODEL_PRESETS.register(name, ModelPreset(name, family, config, hub_id, description), family=family, help=help_text)


# The paper's models (Table II), from their published configs.
_preset(
    "opt-350m",
    "opt",
    "facebook/opt-350m",
    "OPT-350M",
    **_OPT_VOCAB,
    hidden_size=1024,
    ffn_dim=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    word_embed_proj_dim=512,
    do_layer_norm_before=False,
)
_preset(
    "opt-1.3b",
    "opt",
    "facebook/opt-1.3b",
    "OPT-1.3B",
    **_OPT_VOCAB,
    hidden_size=2048,
    ffn_dim=8192,
    num_hidden_layers=24,
    num_attention_heads=32,
    word_embed_proj_dim=2048,
)
_preset(
    "opt-2.7b",
    "opt",
    "facebook/opt-2.7b",
    "OPT-2.7B",
    **_OPT_VOCAB,
    hidden_size=2560,
    ffn_dim=10240,
    num_hidden_layers=32,
    num_attention_heads=32,
    word_embed_proj_dim=2560,
)
_preset(
    "gpt2-large",
    "gpt2",
    "openai-community/gpt2-large",
    "GPT-2 Large (774M)",
    **_GPT2_VOCAB,
    n_embd=1280,
    n_layer=36,
    n_head=20,
)
_preset(
    "gpt2-xl", "gpt2", "openai-community/gpt2-xl", "GPT-2 XL (1.5B)", **_GPT2_VOCAB, n_embd=1600, n_layer=48, n_head=25
)

# Tiny presets: same code paths, CPU-sized.
_preset(
    "opt-tiny",
    "opt",
    None,
    "OPT architecture, 2 layers, d=64",
    **_OPT_VOCAB,
    hidden_size=64,
    ffn_dim=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    word_embed_proj_dim=64,
)
_preset("gpt2-tiny", "gpt2", None, "GPT-2 architecture, 2 layers, d=64", **_GPT2_VOCAB, n_embd=64, n_layer=2, n_head=4)
_preset(
    "llama-tiny",
    "llama",
    None,
    "LLaMA architecture (SwiGLU), 2 layers, d=64",
    vocab_size=32000,
    hidden_size=64,
    intermediate_size=172,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=2048,
)

# ReLU OPT-architecture models the project pretrains itself (real activation sparsity, no download).
_preset(
    "relu-micro",
    "opt",
    None,
    "OPT-architecture ReLU model for CPU pretraining (4 layers, d=128)",
    **_OPT_VOCAB,
    hidden_size=128,
    ffn_dim=512,
    num_hidden_layers=4,
    num_attention_heads=4,
    word_embed_proj_dim=128,
)
_preset(
    "relu-small",
    "opt",
    None,
    "OPT-architecture ReLU model for GPU pretraining (8 layers, d=512)",
    **_OPT_VOCAB,
    hidden_size=512,
    ffn_dim=2048,
    num_hidden_layers=8,
    num_attention_heads=8,
    word_embed_proj_dim=512,
)
_preset(
    "relu-base",
    "opt",
    None,
    "OPT-1.3B's layer shape (d=2048, ffn 8192, 32 heads) with 8 layers, ReLU, for GPU pretraining (~0.5B)",
    **_OPT_VOCAB,
    hidden_size=2048,
    ffn_dim=8192,
    num_hidden_layers=8,
    num_attention_heads=32,
    word_embed_proj_dim=2048,
)

# LLaMA-architecture shapes for the peer systems' memory tables (random-init).
_preset(
    "llama-3b",
    "llama",
    "openlm-research/open_llama_3b",
    "LLaMA-architecture 3B",
    vocab_size=32000,
    hidden_size=3200,
    intermediate_size=8640,
    num_hidden_layers=26,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=2048,
)
_preset(
    "llama-7b",
    "llama",
    "huggyllama/llama-7b",
    "LLaMA-architecture 7B",
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=4096,
)
