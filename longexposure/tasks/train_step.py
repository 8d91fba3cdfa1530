"""Task module train_step (filled by the issue that builds it)."""
