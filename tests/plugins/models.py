"""Fixtures (filled in by its owner)."""
