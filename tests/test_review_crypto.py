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


# ================================================================ 2. scrypt parameters from the server are bounded


def test_the_card_refuses_scrypt_parameters_beyond_its_work_before_deriving(monkeypatch):
    """
    The card takes its scrypt parameters (N, r, p; a byte each) from every
    AUTH_CHALLENGE, and check_kdf only had a floor: a server could ask a card
    enrolled at scrypt:15 for N = 2^17, r = 8, p = 255 (128 MiB, 1,020 times
    the default work: over a minute of the card's CPU per insert, and any
    time it liked) and the card derived it. It now refuses, before deriving
    anything, parameters beyond 256 MiB (128·r·N) or 32 times the default
    work (N·r·p), as it refuses weaker ones.
    """
    from vsc.card import ops
    from vsc.wire.ops import AuthChallenge, AuthItem, AuthMethod, KdfAlg, KdfParams

    monkeypatch.setattr(ops, "derive_keys", lambda *a: pytest.fail("derived keys for a costly KDF"))
    for log2_n, r, p in ((17, 8, 255), (15, 255, 1), (19, 8, 1)):
        costly = KdfParams(alg=KdfAlg.SCRYPT, salt=b"s" * 16, log2_n=log2_n, r=r, p=p)
        for floor in ("scrypt:15", ""):
            with pytest.raises(ops.WeakKdfRefused, match="does not do"):
                ops.check_kdf(costly, floor)
        challenge = AuthChallenge(kdf=costly.encode(), challenges=(AuthItem(AuthMethod.PASSWORD),))
        with pytest.raises(ops.WeakKdfRefused):
            ops.answer(challenge, "card-1", "pw", b"m" * 32, lambda n: b"\0" * n,
                       creds=ops.Credentials(kdf_floor="scrypt:15"))
    ops.check_kdf(KdfParams(alg=KdfAlg.SCRYPT, salt=b"s" * 16, log2_n=18), "scrypt:15")  # 256 MiB: still done
    ops.check_kdf(KdfParams(alg=KdfAlg.SCRYPT, salt=b"s" * 16, log2_n=15, p=32), "scrypt:15")  # 32 times


def test_scrypt_gives_openssl_the_memory_its_accepted_parameters_need(monkeypatch):
    """
    docs/protocol.md said the card derives log2(N) 10..22, and crypto.scrypt
    accepted them, but it passed OpenSSL maxmem = 256 MiB while N = 2^18
    with r = 8 needs 128·r·(N + 2) + 128·r·p bytes (a little more): every
    N from 2^18 up failed inside OpenSSL with "memory limit exceeded" (a
    card enrolled with --scrypt-log2n 18 could not be enrolled). Every
    parameter set scrypt accepts now gets the memory it needs, and those it
    cannot afford are refused by name (scrypt_refusal).
    """
    from vsc.crypto import kdf

    seen = {}

    def fake(password, *, salt, n, r, p, maxmem, dklen):
        seen.update(n=n, r=r, p=p, maxmem=maxmem)
        return bytes(dklen)

    monkeypatch.setattr(kdf.hashlib, "scrypt", fake)
    crypto.scrypt(b"pw", b"s" * 16, 18, 8, 1, 64)
    assert seen["maxmem"] >= 128 * 8 * ((1 << 18) + 2 + 1), seen
    assert crypto.scrypt_refusal(18, 8, 1) is None
    for bad in ((19, 8, 1), (15, 8, 33), (9, 8, 1), (15, 0, 1)):
        assert crypto.scrypt_refusal(*bad)
        with pytest.raises(ValueError):
            crypto.scrypt(b"pw", b"s" * 16, *bad, 64)


# ================================================================ 3. a card's X25519 seal key is checked like any peer key


def test_registrar_refuses_a_small_order_seal_key_as_a_refusal_not_a_server_fault():
    """
    The server seals a card's keyfile to the X25519 seal key the card
    registered at enrolment. crypto.x25519_shared refuses a small-order key
    (the all-zero shared secret, RFC 7748 6.1) with CryptoError, and the
    Registrar let it through. The server's glue (ServerProtocol
    _material_refused) maps an ImplAuthError to a BAD_REQUEST refusal
    counted for its source; anything else it logs as "database call failed"
    with a traceback and feeds the operation machine a store failure, which
    it does not expect while issuing material (so the enroller's channel was
    closed as a protocol violation, nothing counted). A registration whose
    seal key is small-order (0 or 1 here) is now an ImplAuthError, as a
    malformed one is.
    """
    from tests.test_implauth import SERIAL, registrar
    from vsc.protocol import implauth
    from vsc.wire.implauth import Registration
    from vsc.wire.ops import AuthMethod

    for seal_key in (bytes(32), b"\x01" + bytes(31)):
        with pytest.raises(implauth.ImplAuthError, match="seal key"):
            registrar().enrol(SERIAL, Registration(card_key=b"K", seal_key=seal_key).encode(), [AuthMethod.KEYFILE])
