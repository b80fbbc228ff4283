"""The one exception every primitive raises for a failed cryptographic check."""

from __future__ import annotations


class CryptoError(Exception):
    """A cryptographic check failed (bad tag, bad MAC, undecryptable key); the message is one plain line."""
