"""Task module sparsity_profile (filled by the issue that builds it)."""
