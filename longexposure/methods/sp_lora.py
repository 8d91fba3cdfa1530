"""SP-LoRA and SPP (filled by issue 7)."""
