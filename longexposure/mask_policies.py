"""Built-in mask policies (filled by the issue that builds them)."""
