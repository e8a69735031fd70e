"""Offline evaluation: full-sort ranking and top-k metrics."""
