"""Composition of the daemons above the library packages (layer L5): which pieces a process is built from."""
