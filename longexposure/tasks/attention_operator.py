"""Task module attention_operator (filled by the issue that builds it)."""
