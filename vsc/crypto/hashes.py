"""
Hashes, HMAC and constant-time comparison, through ``hashlib``/``hmac``
(OpenSSL underneath). This module imports nothing heavier, so the CLI can
hash what it asks the card to sign without loading ``cryptography``.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac


def sha256(data) -> bytes:
    return hashlib.sha256(data).digest()


def sha384(data) -> bytes:
    """SHA-384: the hash of P-384 signatures (ecdsa-sha2-nistp384, RFC 5656 6.2.1; vsc card sign --sha384)."""
    return hashlib.sha384(data).digest()


def md5(data) -> bytes:
    """MD5, only for the patent's legacy constructions (Figure 9, [0078])."""
    return hashlib.md5(data, usedforsecurity=False).digest()


def hmac_sha256(key: bytes, data: bytes) -> bytes:
    return hmac.digest(key, data, "sha256")  # one call into OpenSSL (hmac.new(...).digest() builds an HMAC object)


def constant_time_equal(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)


def fingerprint(spki_der: bytes) -> str:
    """The pin of a public key: ``SHA256:`` + unpadded base64 of its SubjectPublicKeyInfo, as OpenSSH prints."""
    return "SHA256:" + binascii.b2a_base64(sha256(spki_der), newline=False).decode("ascii").rstrip("=")


_B64 = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")


def is_fingerprint(text: str) -> bool:
    """Whether ``text`` has the form ``fingerprint`` gives (``SHA256:`` and 43 base64 characters of 32 bytes)."""
    if not text.startswith("SHA256:") or len(text) != 50 or not set(text[7:]) <= _B64:
        return False
    try:
        return len(binascii.a2b_base64(text[7:] + "=")) == 32
    except binascii.Error:
        return False
