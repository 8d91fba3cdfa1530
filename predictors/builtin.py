"""Built-in predictors (filled by issue 5)."""
