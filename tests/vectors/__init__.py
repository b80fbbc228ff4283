"""Deterministic test inputs (fixed RSA key, seeded randomness) and the channel test vectors."""
