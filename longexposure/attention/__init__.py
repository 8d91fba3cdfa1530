"""Block-sparse attention layouts: atomic pattern pool and online combination."""
