"""Tasks for the peer systems Sylva and SP-LoRA (filled by issue 7)."""
