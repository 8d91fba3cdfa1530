"""Built-in mlp backends (filled by the issue that builds them)."""
