"""Built-in exposers (filled by the issue that builds them)."""
