"""Functional operators: pure-torch references and wrappers around kernels/."""
