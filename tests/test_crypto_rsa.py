"""
The PIV raw RSA private operation (vsc.crypto.rsa_private_block): PKCS#1
v1.5 signature blocks through ``cryptography``, everything else through the
libcrypto binding (vsc.crypto._libcrypto), checked against the mathematics
(``pow`` here, in the test only), against ``cryptography``'s own signatures
and decryptions, and against every way a block or a key can be wrong.
"""

from __future__ import annotations

import hashlib
import os
import random
import sys

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from tests import rsa_blocks
from vsc import crypto
from vsc.card.memory import LockedBuffer
from vsc.crypto import _libcrypto

DATA = b"the PIV host pads, the card exponentiates"


def _pkcs8(key) -> bytes:
    return key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pkcs1(key) -> bytes:
    return key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


@pytest.fixture(scope="module")
def keys() -> list[rsa.RSAPrivateKey]:
    """Fresh random keys of every size a card or host might use (and a small one for many blocks)."""
    return [rsa.generate_private_key(65537, bits) for bits in (1024, 2048, 2048, 3072, 4096)]


@pytest.fixture(scope="module")
def key2048(keys) -> rsa.RSAPrivateKey:
    return keys[1]


def _math(key: rsa.RSAPrivateKey, block: bytes) -> bytes:
    """m^d mod n, the textbook definition (TEST ONLY: Python integers of the private key)."""
    nums = key.private_numbers()
    n = nums.public_numbers.n
    return pow(int.from_bytes(block, "big"), nums.d, n).to_bytes((n.bit_length() + 7) // 8, "big")


def _op(der, block: bytes) -> bytes:
    with crypto.PrivateKeyHandle(der) as handle:
        return crypto.rsa_private_block(handle, block)


@pytest.fixture
def no_cryptography_load(monkeypatch):
    """The libcrypto path must not load the key through cryptography at all."""
    def refuse(self):
        raise AssertionError("the key was loaded through cryptography on the raw path")
    monkeypatch.setattr(crypto.PrivateKeyHandle, "openssl_key", property(refuse))


@pytest.fixture
def no_libcrypto(monkeypatch):
    """The PKCS#1 v1.5 path must not reach the libcrypto binding."""
    def refuse(der, block):
        raise AssertionError("a PKCS#1 v1.5 signature block reached libcrypto")
    monkeypatch.setattr(_libcrypto, "rsa_private_no_padding", refuse)


@pytest.fixture
def libcrypto_calls(monkeypatch) -> list[bytes]:
    """Records each block the binding is asked to exponentiate (and still runs it)."""
    calls: list[bytes] = []
    real = _libcrypto.rsa_private_no_padding

    def recording(der, block):
        calls.append(bytes(block))
        return real(der, block)
    monkeypatch.setattr(_libcrypto, "rsa_private_no_padding", recording)
    return calls


# ---------------------------------------------------------------- the mathematics


def test_raw_blocks_give_m_to_the_d_mod_n_on_random_keys(keys, no_cryptography_load, libcrypto_calls):
    """For random keys of 1024-4096 bits (PKCS#8 and PKCS#1 DER), random blocks and the edges 0, 1, n-1 give exactly m^d mod n, all through libcrypto."""
    rng = random.Random(20260501)
    sent = 0
    for key in keys:
        n = key.public_key().public_numbers().n
        k = rsa_blocks.size_of(key.public_key())
        blocks = [0, 1, n - 1] + [rng.randrange(2, n - 1) for _ in range(12)]
        for der in (_pkcs8(key), _pkcs1(key)):
            for m in blocks:
                block = m.to_bytes(k, "big")
                assert _op(der, block) == _math(key, block), (key.key_size, m)
                sent += 1
    assert len(libcrypto_calls) == sent


def test_pkcs1_v15_blocks_for_every_hash_are_cryptographys_own_signatures(keys, no_libcrypto):
    """A PKCS#1 v1.5 block over SHA-1/224/256/384/512 is signed through cryptography: the result is cryptography's own signature of the data and m^d mod n."""
    for key in keys:
        k = rsa_blocks.size_of(key.public_key())
        for name, algorithm in rsa_blocks.HASHES.items():
            block = rsa_blocks.pkcs1_v15_block(k, name, DATA)
            got = _op(_pkcs8(key), block)
            assert got == key.sign(DATA, padding.PKCS1v15(), algorithm()), (key.key_size, name)
            assert got == _math(key, block)
            key.public_key().verify(got, DATA, padding.PKCS1v15(), algorithm())


def test_the_two_paths_give_identical_bytes(key2048):
    """The same PKCS#1 v1.5 block through cryptography and through libcrypto without padding: the same bytes."""
    der = _pkcs8(key2048)
    for name in rsa_blocks.HASHES:
        block = rsa_blocks.pkcs1_v15_block(256, name, DATA)
        assert _op(der, block) == _libcrypto.rsa_private_no_padding(der, block)


def test_pss_blocks_give_signatures_cryptography_verifies(keys, no_cryptography_load, libcrypto_calls):
    """EMSA-PSS blocks (SHA-256/384/512) go to libcrypto and come back as the signature, which cryptography's PSS verification accepts."""
    for key in keys[1:]:
        for name in ("sha256", "sha384", "sha512"):
            block, expected = rsa_blocks.pss_block(key, DATA, name)
            got = _op(_pkcs8(key), block)
            assert got == expected
            rsa_blocks.pss_verify(key.public_key(), DATA, got, name)
    assert len(libcrypto_calls) == 3 * len(keys[1:])


@pytest.mark.parametrize("payload", [
    "tls-md5-sha1",    # TLS 1.0/1.1 client authentication: 36 bytes, no DigestInfo
    "no-null-params",  # DigestInfo of SHA-256 without the NULL parameters
    "md5-digestinfo",  # a hash the card does not recognise
    "short-digest",    # SHA-256 DigestInfo with a 31-byte digest
    "trailing-byte",   # SHA-256 DigestInfo with a byte after the digest
])
def test_other_type1_blocks_go_to_libcrypto_and_equal_the_mathematics(key2048, payload, no_cryptography_load,
                                                                       libcrypto_calls):
    """Type-1 blocks that are not a recognised PKCS#1 v1.5 signature are exponentiated as they are (libcrypto), giving m^d mod n."""
    sha256 = hashlib.sha256(DATA).digest()
    info = {
        "tls-md5-sha1": os.urandom(16) + os.urandom(20),
        "no-null-params": bytes.fromhex("302f300b0609608648016503040201") + b"\x04\x20" + sha256,
        "md5-digestinfo": bytes.fromhex("3020300c06082a864886f70d020505000410") + os.urandom(16),
        "short-digest": rsa_blocks.DIGEST_INFO["sha256"] + sha256[:31],
        "trailing-byte": rsa_blocks.DIGEST_INFO["sha256"] + sha256 + b"\x00",
    }[payload]
    block = rsa_blocks.type1_block(256, info)
    assert len(block) == 256
    assert crypto.pkcs1_signature_hash(block) is None
    assert _op(_pkcs8(key2048), block) == _math(key2048, block)
    assert libcrypto_calls == [block]


def test_pkcs1_signature_hash_recognises_exactly_the_canonical_encoding():
    """Recognised: 00 01 FF(>=8) 00 DigestInfo(hash) digest, nothing more; a non-FF padding byte, a missing separator, a wrong block type are not."""
    digest = bytes(range(32))
    good = rsa_blocks.type1_block(256, rsa_blocks.DIGEST_INFO["sha256"] + digest)
    algorithm, got = crypto.pkcs1_signature_hash(good)
    assert isinstance(algorithm, hashes.SHA256) and got == digest
    assert crypto.pkcs1_signature_hash(rsa_blocks.type1_block(0, rsa_blocks.DIGEST_INFO["sha256"] + digest, 8))
    bad = [
        good[:20] + b"\xfe" + good[21:],                   # a padding byte that is not FF
        b"\x00\x02" + good[2:],                            # block type 2
        b"\x01" + good[1:],                                # no leading zero
        b"\x00\x01" + b"\xff" * 254,                       # no separator
        rsa_blocks.type1_block(0, rsa_blocks.DIGEST_INFO["sha256"] + digest, 7),
        b"",
    ]
    for block in bad:
        assert crypto.pkcs1_signature_hash(block) is None, block[:24].hex()


# ---------------------------------------------------------------- decipher


@pytest.mark.parametrize("scheme", ["pkcs1", "oaep-sha256", "oaep-sha1"])
def test_decipher_returns_the_padded_plaintext(keys, scheme, no_cryptography_load):
    """A ciphertext cryptography made (PKCS#1 v1.5, OAEP-SHA256, OAEP-SHA1) comes back as its EME block, which decodes to the message."""
    message = os.urandom(32)
    for key in keys[1:]:
        public = key.public_key()
        if scheme == "pkcs1":
            ct = public.encrypt(message, padding.PKCS1v15())
        else:
            h = hashes.SHA256() if scheme == "oaep-sha256" else hashes.SHA1()
            ct = public.encrypt(message, padding.OAEP(mgf=padding.MGF1(h), algorithm=h, label=None))
        em = _op(_pkcs8(key), ct)
        assert em == _math(key, ct)
        if scheme == "pkcs1":
            assert rsa_blocks.eme_pkcs1_v15_decode(em) == message
        else:
            assert rsa_blocks.eme_oaep_decode(em, "sha256" if scheme == "oaep-sha256" else "sha1") == message


# ---------------------------------------------------------------- refusals


def _assert_plain(e: crypto.CryptoError, *words: str) -> None:
    text = str(e)
    assert "\n" not in text and "Error" not in text and "Exception" not in text, text
    for w in words:
        assert w in text, text


def test_blocks_of_the_wrong_length_are_refused(key2048):
    """255, 257, 1 and 0 bytes are refused with one plain line, on both paths (a PKCS#1-looking block and a raw one)."""
    der = _pkcs8(key2048)
    for k in (255, 257, 1, 0):
        raw = os.urandom(k)[:k].rjust(k, b"\x00")
        if k:
            raw = b"\x00" + raw[1:]
        with pytest.raises(crypto.CryptoError) as e:
            _op(der, raw)
        _assert_plain(e.value, "256 bytes")
    for k in (255, 257):
        block = rsa_blocks.pkcs1_v15_block(k, "sha256", DATA)
        assert crypto.pkcs1_signature_hash(block) is not None
        with pytest.raises(crypto.CryptoError) as e:
            _op(der, block)
        _assert_plain(e.value, "256 bytes")


def test_blocks_not_below_the_modulus_are_refused(key2048):
    """m = n, n + 1 and FF..FF are refused; m = n - 1 is exponentiated."""
    der = _pkcs8(key2048)
    n = key2048.public_key().public_numbers().n
    for m in (n, n + 1, (1 << 2048) - 1):
        with pytest.raises(crypto.CryptoError) as e:
            _op(der, m.to_bytes(256, "big"))
        _assert_plain(e.value, "not smaller than the modulus")
    block = (n - 1).to_bytes(256, "big")
    assert _op(der, block) == _math(key2048, block)


@pytest.mark.parametrize("make", [lambda: ec.generate_private_key(ec.SECP256R1()),
                                  lambda: ed25519.Ed25519PrivateKey.generate()], ids=["p256", "ed25519"])
def test_a_key_that_is_not_rsa_is_refused(make):
    """An EC or Ed25519 key is refused on both paths with a plain line."""
    der = _pkcs8(make())
    for block in (os.urandom(256), rsa_blocks.pkcs1_v15_block(256, "sha256", DATA)):
        with pytest.raises(crypto.CryptoError) as e:
            _op(der, block)
        _assert_plain(e.value, "RSA key")


def test_key_der_that_does_not_parse_is_refused_and_leaves_no_openssl_error(key2048):
    """Empty, garbage, truncated and over-long key DER are refused with a plain line; OpenSSL's error queue is empty afterwards."""
    good, good1 = _pkcs8(key2048), _pkcs1(key2048)
    lib = _libcrypto._LIBRARY.get()
    block = os.urandom(256)
    block = b"\x00" + block[1:]
    for der in (b"", b"\x30\x00", b"\x30", os.urandom(1200), good[:-1], good[:600], good + b"\x00",
                good1 + b"\x00\x00", good1[:-3]):
        with pytest.raises(crypto.CryptoError) as e:
            _libcrypto.rsa_private_no_padding(der, block)
        _assert_plain(e.value, "key")
        assert lib.ERR_get_error() == 0
    with pytest.raises(crypto.CryptoError) as e:  # the PKCS#1 path: cryptography refuses it, same kind of line
        _op(os.urandom(1200), rsa_blocks.pkcs1_v15_block(256, "sha256", DATA))
    _assert_plain(e.value, "does not parse")


def test_key_buffers_the_binding_reads_in_place(key2048):
    """bytes, bytearray and a memoryview of a locked buffer are read in place; a read-only view of a copy is refused (no silent copy); the locked buffer frees cleanly after a success and after a refusal."""
    der = _pkcs8(key2048)
    block = rsa_blocks.pss_block(key2048, DATA)[0]
    expected = _math(key2048, block)
    assert _libcrypto.rsa_private_no_padding(der, block) == expected
    assert _libcrypto.rsa_private_no_padding(bytearray(der), block) == expected
    with pytest.raises(TypeError):
        _libcrypto.rsa_private_no_padding(memoryview(bytearray(der)).toreadonly(), block)
    buf = LockedBuffer(len(der))
    buf.view[:] = der
    assert _op(buf.view, block) == expected
    with pytest.raises(crypto.CryptoError):
        _op(buf.view, block[:-1])
    buf.free()  # a lingering buffer export would raise BufferError here
    assert buf._mm is None


# ---------------------------------------------------------------- no Python integers of the private key


def test_no_python_integer_of_the_private_key_is_made(key2048, monkeypatch):
    """
    On every path (PKCS#1 v1.5 block, PSS block, decipher) nothing asks for
    the private numbers (cryptography's ``private_numbers`` raises for the
    test), and no ``pow``, ``int.from_bytes`` or ``int.to_bytes`` runs: the
    profiler sees every C call made, and does see the libcrypto binding and
    cryptography's sign being called.
    """
    der = _pkcs8(key2048)
    signing = rsa_blocks.pkcs1_v15_block(256, "sha256", DATA)
    pss = rsa_blocks.pss_block(key2048, DATA)[0]
    ct = key2048.public_key().encrypt(b"secret", padding.PKCS1v15())
    expected = [_math(key2048, b) for b in (signing, pss, ct)]
    rust_rsa = type(key2048)

    def refuse(self):
        raise AssertionError("private_numbers() was called on the PIV path")
    monkeypatch.setattr(rust_rsa, "private_numbers", refuse)

    seen_python: set[str] = set()
    seen_c: set[str] = set()

    def profile(frame, event, arg):
        if event == "call":
            seen_python.add(frame.f_code.co_name)
        elif event == "c_call":
            seen_c.add(getattr(arg, "__name__", repr(arg)))

    sys.setprofile(profile)
    try:
        got = [_op(der, b) for b in (signing, pss, ct)]
    finally:
        sys.setprofile(None)
    assert got == expected
    assert "rsa_private_no_padding" in seen_python and "sign" in seen_c  # the profiler saw both paths
    assert not seen_c & {"private_numbers", "pow", "from_bytes", "to_bytes"}, seen_c
    with pytest.raises(AssertionError):
        key2048.private_numbers()  # the monkeypatch was in force
