"""Shared fixtures. pytest is the only runner; pytest-twisted supplies a real reactor where needed."""
