"""Task module mlp_operator (filled by the issue that builds it)."""
