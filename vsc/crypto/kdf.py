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


#: the most memory one scrypt derivation may take, 128·r·N bytes (N = 2^18 with r = 8)
SCRYPT_MAX_MEMORY = 256 * 1024 * 1024
#: the most work one scrypt derivation may take, N·r·p (32 times the default N = 2^15, r = 8, p = 1)
SCRYPT_MAX_WORK = 1 << 23


def scrypt_refusal(log2_n: int, r: int, p: int) -> str | None:
    """
    Why scrypt with these parameters is not derived here (one line), or None.
    The parameters come from the server at every insert: they are bounded in
    memory and in work, so no server can have a card allocate or compute
    without limit (r and p are up to 255 on the wire).
    """
    if not 10 <= log2_n <= 22:
        return "scrypt cost log2(N) must be 10..22"
    if r < 1 or p < 1:
        return "scrypt r and p must be at least 1"
    if 128 * r << log2_n > SCRYPT_MAX_MEMORY:
        return f"scrypt with N = 2^{log2_n} and r = {r} needs more than {SCRYPT_MAX_MEMORY >> 20} MiB"
    if (r * p) << log2_n > SCRYPT_MAX_WORK:
        return f"scrypt with N = 2^{log2_n}, r = {r} and p = {p} is more than {SCRYPT_MAX_WORK >> 18} times the default work"
    return None


def scrypt(password: bytes, salt: bytes, log2_n: int, r: int, p: int, length: int) -> bytes:
    """scrypt (RFC 7914) through OpenSSL; ValueError for parameters ``scrypt_refusal`` refuses."""
    why = scrypt_refusal(log2_n, r, p)
    if why is not None:
        raise ValueError(why)
    # OpenSSL's own limit counts V (128·r·(N+2) bytes) and B (128·r·p): the bound above, exactly
    maxmem = 128 * r * ((1 << log2_n) + 2 + p)
    return hashlib.scrypt(password, salt=salt, n=1 << log2_n, r=r, p=p, maxmem=maxmem, dklen=length)
