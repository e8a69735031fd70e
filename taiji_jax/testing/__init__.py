"""Helpers shared by the tests (importable, so tests need no sys.path tricks)."""
