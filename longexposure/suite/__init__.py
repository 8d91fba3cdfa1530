"""Declarative suites: validate a YAML file, run its cases, write results, tables and plots."""
