"""Benchmark and reproduction tasks: each suite names one task; a task times or measures one case."""
