"""Per-architecture module names, as data: which modules each method touches in each family."""

from __future__ import annotations

# attention output projection and MLP output projection (where Houlsby adapters go),
# and the LoRA targets peft uses by default for the family.
TARGETS: dict[str, dict[str, tuple[str, ...]]] = {
    "opt": {
        "attn_out": ("self_attn.out_proj",),
        "mlp_out": ("fc2",),
        "lora": ("q_proj", "v_proj"),
        "norms": ("self_attn_layer_norm", "final_layer_norm"),
    },
    "gpt2": {"attn_out": ("attn.c_proj",), "mlp_out": ("mlp.c_proj",), "lora": ("c_attn",), "norms": ("ln_1", "ln_2")},
    "llama": {
        "attn_out": ("self_attn.o_proj",),
        "mlp_out": ("mlp.down_proj",),
        "lora": ("q_proj", "v_proj"),
        "norms": ("input_layernorm", "post_attention_layernorm"),
    },
}
