"""
Rules of the crypto package (vsc.crypto) and of its callers' use of it that
an adversarial review found broken, each with how it was broken; they hold
since the fix.
"""

from __future__ import annotations

import pytest

from vsc import crypto
from vsc.crypto import rsa as crypto_rsa

# ================================================================ 1. RSA key import: the size is bounded before any arithmetic


def test_rsa_import_refuses_a_modulus_of_another_size_before_any_arithmetic(monkeypatch):
    """
    The OpenPGP applet imports an RSA-2048 key as (e, p, q) straight from the
    host's PUT DATA (00 DB 3F FF; PW3, public by default, is all it needs),
    and ``rsa_private_der_from_parts`` turned whatever it was given into
    Python integers, inverted e modulo (p-1)(q-1) and had OpenSSL build and
    check the key (primality tests whose cost grows with the cube of the
    size) before the applet looked at the size. One extended APDU carries
    up to 64 KiB: p and q of 16,000 bytes each took 4 s of the card daemon as
    composites (measured), and real primes of that size would take OpenSSL's
    check far longer, for a key the applet then refused as "not rsa2048".
    Here: parts of 3,842 bytes reached RSAPrivateNumbers as a 61,472-bit
    modulus. The import now refuses a modulus that is not the requested size
    (2048 bits) before computing anything with it.
    """
    seen: list[int] = []
    real = crypto_rsa._rsa.RSAPrivateNumbers

    def spy(p, q, *rest):
        seen.append((p * q).bit_length())
        return real(p, q, *rest)

    monkeypatch.setattr(crypto_rsa._rsa, "RSAPrivateNumbers", spy)
    big = bytes([0xC3]) + bytes(range(256)) * 15 + b"\x01"  # 3,842 bytes, odd
    other = bytes([0xC5]) + bytes(range(255, -1, -1)) * 15 + b"\x03"
    with pytest.raises(crypto.CryptoError):
        crypto.rsa_private_der_from_parts(b"\x01\x00\x01", big, other)
    assert seen == [], f"RSA arithmetic ran on a {seen[0]}-bit modulus"


def test_rsa_import_still_takes_an_rsa2048_key():
    """The positive control: a real RSA-2048 key imported as (e, p, q) comes back as the same key."""
    from cryptography.hazmat.primitives import serialization

    der = crypto.generate_private_der(crypto.KEY_RSA2048)
    nums = serialization.load_der_private_key(der, password=None).private_numbers()
    parts = [x.to_bytes((x.bit_length() + 7) // 8, "big") for x in (nums.public_numbers.e, nums.p, nums.q)]
    assert crypto.public_der_of(crypto.rsa_private_der_from_parts(*parts)) == crypto.public_der_of(der)
    with pytest.raises(crypto.CryptoError):  # a key of the right size but not RSA (p = q)
        crypto.rsa_private_der_from_parts(parts[0], parts[1], parts[1])
