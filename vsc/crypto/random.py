"""
Randomness: the type every component takes, and the default source.

Components take a ``RandomBytes`` callable instead of reading the kernel
themselves, so tests and test vectors can inject a deterministic one.
"""

from __future__ import annotations

import binascii
import os
from typing import Callable

RandomBytes = Callable[[int], bytes]

_URLSAFE = bytes.maketrans(b"+/", b"-_")


def system_random(n: int) -> bytes:
    """The default randomness source: the kernel CSPRNG."""
    return os.urandom(n)


def token_urlsafe(nbytes: int, rand: RandomBytes = system_random) -> str:
    """``nbytes`` random bytes as unpadded URL-safe base64 (what ``secrets.token_urlsafe`` gives)."""
    return binascii.b2a_base64(rand(nbytes), newline=False).translate(_URLSAFE).rstrip(b"=").decode("ascii")
