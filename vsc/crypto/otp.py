"""One-time passwords for the reader-less device [0005]: RFC 4226 HOTP (and RFC 6238 TOTP) with HMAC-SHA1."""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.twofactor.hotp import HOTP


def hotp_sha1(secret: bytes, counter: int, digits: int = 6) -> str:
    """RFC 4226 HOTP with HMAC-SHA1 (TOTP, RFC 6238, uses counter = floor(time / period))."""
    return HOTP(secret, digits, hashes.SHA1()).generate(counter).decode("ascii")
