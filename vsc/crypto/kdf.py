"""Key derivation: HKDF-SHA256 (RFC 5869, ``cryptography``) and scrypt (RFC 7914, OpenSSL through ``hashlib``)."""

from __future__ import annotations

import hashlib
import hmac

from cryptography.hazmat.primitives import hashes as _hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand

from vsc.crypto.hashes import hmac_sha256


def hkdf_extract_expand(salt: bytes, ikm: bytes, info: bytes, length: int) -> bytes:
    """HKDF-SHA256 (RFC 5869), extract then expand."""
    return HKDF(algorithm=_hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


def hkdf_extract(salt: bytes, ikm: bytes) -> bytes:
    """HKDF-Extract with SHA-256 (RFC 5869 section 2.2): PRK = HMAC-SHA256(salt, IKM)."""
    return hmac_sha256(salt, ikm)


def hkdf_expand(prk: bytes, info: bytes, length: int) -> bytes:
    """
    HKDF-Expand with SHA-256 (RFC 5869 section 2.3). Up to one hash length
    (every key of the channel's key schedule: six per handshake) it is one
    HMAC, T(1) = HMAC-SHA256(PRK, info || 0x01), computed in one call to
    OpenSSL through ``hmac.digest``; longer outputs and anything unusual go
    through ``cryptography``'s HKDFExpand (tests/test_crypto.py checks both
    agree, and the RFC's test vectors).
    """
    if type(prk) is bytes and type(info) is bytes and type(length) is int and 0 < length <= 32:
        return hmac.digest(prk, info + b"\x01", "sha256")[:length]
    return HKDFExpand(algorithm=_hashes.SHA256(), length=length, info=info).derive(prk)


def scrypt(password: bytes, salt: bytes, log2_n: int, r: int, p: int, length: int) -> bytes:
    """scrypt (RFC 7914) through OpenSSL."""
    if not 10 <= log2_n <= 22:
        raise ValueError("scrypt cost log2(N) must be 10..22")
    return hashlib.scrypt(password, salt=salt, n=1 << log2_n, r=r, p=p, maxmem=256 * 1024 * 1024, dklen=length)
