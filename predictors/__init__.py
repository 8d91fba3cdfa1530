"""Sequence-oriented sparsity predictors and their offline training."""
