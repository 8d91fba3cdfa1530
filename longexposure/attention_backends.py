"""Built-in attention backends (filled by the issue that builds them)."""
