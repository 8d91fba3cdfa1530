"""Sylva: sparse embedded adapters (filled by issue 7)."""
