"""
The vsc.crypto package: organised by primitive, loaded lazily (PEP 562) so a
caller that only hashes never imports ``cryptography`` or pycryptodome, every
name callers used before the split still there, no import or patching in the
middle of a module; and the hot-path caches of issue 15 (the server's public
key built once, a server key parsed once per distinct SubjectPublicKeyInfo,
record cipher key objects reused).
"""

from __future__ import annotations

import ast
import base64
import hashlib
import hmac
import json
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from vsc import crypto

PACKAGE = Path(crypto.__file__).parent
HEAVY = ("cryptography", "Crypto", "Cryptodome")

#: every name vsc, tests and bench used from vsc.crypto before it became a package (rsa_raw_private, the
#: Python-integer RSA, was replaced by rsa_private_block)
NAMES_BEFORE = """
AEADRecordCipher CBCHMACRecordCipher CryptoError GCM_NONCE GCM_TAG KEY_P256 KEY_RSA2048 LegacyDESMD5RecordCipher
PIV_MGMT_3DES PIV_MGMT_AES128 PIV_MGMT_AES192 PIV_MGMT_AES256 PrivateKeyHandle RSAPrivateKey RSAPublicKey RandomBytes
RecordCipher X25519Ephemeral aes_gcm_open aes_gcm_seal certificate_der certificate_pem certificate_public_der
certificate_subject constant_time_equal csr_pem ecdsa_der_to_rs ecdsa_sign_hash fingerprint gcm_open_into
gcm_seal_into generate_private_der hkdf_expand hkdf_extract hkdf_extract_expand hmac_sha256 hotp_sha1 md5
mgmt_block_size mgmt_cipher mgmt_key_size name_der parse_subject public_der_from_pem public_der_of public_kind
public_numbers public_pem rsa_encrypt rsa_pss_sign rsa_pss_verify scrypt self_signed_certificate sha256
ssh_public_parts system_random vendor_keygen vendor_public_der vendor_sign vendor_verify verify_sha256
x25519_public x25519_shared
""".split()


def _fresh(code: str) -> dict:
    """Run ``code`` in a new interpreter; it prints a JSON object as its last line."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_hashing_through_the_package_imports_no_crypto_library():
    """``from vsc import crypto`` + sha256/fingerprint/compare/random/CryptoError and ``from vsc.crypto import hashes`` load no cryptography or pycryptodome; asking for an RSA name then does (the check can see it)."""
    got = _fresh(f"""
import json, sys
from vsc import crypto
from vsc.crypto import hashes
assert crypto.sha256(b"x") == hashes.sha256(b"x")
crypto.fingerprint(b"spki"); crypto.constant_time_equal(b"a", b"a"); crypto.system_random(4); crypto.CryptoError
crypto.hmac_sha256(b"k", b"d"); crypto.md5(b"d"); crypto.token_urlsafe(8)
before = sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r})
crypto.RSAPrivateKey
after = sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r})
print(json.dumps({{"before": before, "after": after}}))
""")
    assert got["before"] == []
    assert "cryptography" in got["after"] and "Crypto" in got["after"]


def test_every_public_name_resolves_to_its_submodules_object():
    """Each name in __all__ is the object its submodule defines (and is then kept on the package); every name used before the split is there; an unknown name is a plain AttributeError."""
    for name in crypto.__all__:
        value = getattr(crypto, name)
        if name in crypto.SUBMODULES:
            assert value.__name__ == f"vsc.crypto.{name}"
            continue
        module = getattr(crypto, crypto._WHERE[name])
        assert getattr(module, name) is value, name
        assert vars(crypto)[name] is value  # cached: the next lookup is an ordinary attribute
    assert not set(NAMES_BEFORE) - set(crypto.__all__)
    assert set(crypto.__all__) <= set(dir(crypto))
    with pytest.raises(AttributeError, match="no attribute 'rsa_raw_private'"):
        crypto.rsa_raw_private  # noqa: B018 - the Python-integer RSA is gone


def _modules() -> list[Path]:
    return sorted(PACKAGE.glob("*.py"))


def test_the_package_has_one_module_per_primitive_each_explained():
    """vsc/crypto holds the primitives named in the package docstring, each with a docstring of its own."""
    names = {p.stem for p in _modules()}
    assert names == {"__init__", "_libcrypto", *crypto.SUBMODULES}
    for path in _modules():
        tree = ast.parse(path.read_text())
        assert ast.get_docstring(tree), f"{path.name} has no docstring"
        if path.stem not in ("__init__", "_libcrypto"):
            assert f"\n{path.stem} " in crypto.__doc__, f"the package docstring does not list {path.stem}"


def test_no_import_in_the_middle_of_a_module_and_no_monkeypatching():
    """In every vsc/crypto module imports come first (none after code, none inside a function or class), and no module assigns to another object's attribute."""
    for path in _modules():
        tree = ast.parse(path.read_text())
        seen_code = False
        for node in tree.body:
            is_import = isinstance(node, (ast.Import, ast.ImportFrom))
            is_header = (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)) or (
                isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test))
            if is_import:
                assert not seen_code, f"{path.name}:{node.lineno}: import after code"
            elif not is_header:
                seen_code = True
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                for inner in ast.walk(node):
                    assert not isinstance(inner, (ast.Import, ast.ImportFrom)), \
                        f"{path.name}:{inner.lineno}: import inside {node.name}"
        for node in tree.body:
            targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
            for t in targets:
                assert not isinstance(t, ast.Attribute), f"{path.name}:{node.lineno}: module-level attribute assignment"


# ---------------------------------------------------------------- hot-path caches (issue 15)


def test_the_server_public_key_is_built_once():
    """RSAPrivateKey.public_key() is one object for the key's life: its SubjectPublicKeyInfo and fingerprint are computed once."""
    key = crypto.RSAPrivateKey.generate(2048)
    first = key.public_key()
    assert key.public_key() is first
    assert first.fingerprint() is first.fingerprint()
    assert first.fingerprint() == crypto.fingerprint(first.spki_der)


def test_a_server_key_is_parsed_once_per_distinct_spki(monkeypatch):
    """RSAPublicKey(spki) parses with pycryptodome once per distinct SubjectPublicKeyInfo; a bad one is refused every time."""
    from vsc.crypto import rsa

    calls = []
    real = rsa._PyRSA.import_key
    monkeypatch.setattr(rsa._PyRSA, "import_key", lambda der: calls.append(der) or real(der))
    rsa._parse_public.cache_clear()
    a = crypto.RSAPrivateKey.generate(2048).public_key().spki_der
    b = crypto.RSAPrivateKey.generate(2048).public_key().spki_der
    for spki in (a, a, bytearray(a), b, a, b):
        assert crypto.RSAPublicKey(spki).spki_der == bytes(spki)
    assert calls == [a, b]
    for _ in range(2):
        with pytest.raises(crypto.CryptoError, match="not an RSA public key"):
            crypto.RSAPublicKey(b"\x30\x03\x02\x01\x00")
    assert len(calls) == 4


@pytest.mark.parametrize("label, cls", [("aes256-gcm", AESGCM), ("chacha20-poly1305", ChaCha20Poly1305)])
def test_aead_records_use_iv_xor_sequence_with_one_key_object(label, cls):
    """Each record's nonce is iv XOR (0^4 || seq64) under the one key object; a sequence number of another length is refused."""
    key, iv = bytes(range(32)), bytes(range(100, 112))
    cipher = crypto.AEADRecordCipher(label, key, iv)
    for seq in (0, 1, 2**32 + 5, 2**64 - 1):
        seq_bytes = seq.to_bytes(8, "big")
        nonce = bytes(a ^ b for a, b in zip(iv, bytes(4) + seq_bytes))
        sealed = cipher.seal(seq_bytes, b"record", b"aad")
        assert sealed == cls(key).encrypt(nonce, b"record", b"aad")
        assert cipher.open(seq_bytes, sealed, b"aad") == b"record"
    with pytest.raises(ValueError):
        cipher.seal(b"\x00" * 7, b"x", b"")


def test_cbc_hmac_records_mac_each_record_afresh():
    """The keyed HMAC is copied per record: each tag is HMAC-SHA256(mac_key, aad || iv || ct) of that record alone."""
    mac_key = bytes(range(32))
    ivs = iter([bytes([1]) * 16, bytes([2]) * 16])
    cipher = crypto.CBCHMACRecordCipher(bytes(32), mac_key, lambda n: next(ivs))
    for aad, data in ((b"one", b"first record"), (b"two", b"second")):
        sealed = cipher.seal(b"\x00" * 8, data, aad)
        assert sealed[-32:] == hmac.new(mac_key, aad + sealed[:-32], hashlib.sha256).digest()
        assert cipher.open(b"\x00" * 8, sealed, aad) == data


def test_token_urlsafe_is_unpadded_urlsafe_base64_of_the_injected_bytes():
    """token_urlsafe(n, rand) is what secrets.token_urlsafe gives for the same bytes."""
    raw = bytes(range(250, 256)) + bytes(range(18))
    assert crypto.token_urlsafe(24, lambda n: raw[:n]) == base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
    assert len(crypto.token_urlsafe(24)) == 32


def test_hkdf_expand_one_block_agrees_with_cryptography():
    """hkdf_expand's one-HMAC path (outputs up to 32 bytes) gives cryptography's HKDFExpand output; longer ones too."""
    import os

    from cryptography.hazmat.primitives import hashes as _h
    from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

    from vsc.crypto import hkdf_expand

    for prk_len in (16, 32, 64):
        for info_len in (0, 1, 44, 300):
            prk, info = os.urandom(prk_len), os.urandom(info_len)
            for n in (1, 12, 31, 32, 33, 64, 100):
                assert hkdf_expand(prk, info, n) == HKDFExpand(_h.SHA256(), n, info).derive(prk)
    # RFC 5869 test case 1 (SHA-256), first 32 bytes of OKM
    prk = bytes.fromhex("077709362c2e32df0ddc3f0dc47bba6390b6c73bb50f9c3122ec844ad7c2b3e5")
    okm = bytes.fromhex("3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865")
    info = bytes.fromhex("f0f1f2f3f4f5f6f7f8f9")
    assert hkdf_expand(prk, info, 32) == okm[:32]
    assert hkdf_expand(prk, info, 42) == okm


def test_p384_keys_sign_digests_and_agree():
    """
    P-384 card keys (PIV algorithm 14): generated and imported from a scalar
    as PKCS#8; ``sign_digest`` takes a 32-byte digest as SHA-256 and a
    48-byte one as SHA-384 (what ``openssl dgst -sha256|-sha384 -verify``
    checks), for EC and RSA keys alike; ECDH gives cryptography's shared x
    (48 bytes); the OpenSSH form is nistp384 (RFC 5656 3.1); a scalar that
    is 0 or not below the order n is refused.
    """
    from cryptography.hazmat.primitives import hashes as _h
    from cryptography.hazmat.primitives import serialization as _s
    from cryptography.hazmat.primitives.asymmetric import ec as _ec
    from cryptography.hazmat.primitives.asymmetric import padding as _p

    der = crypto.generate_private_der(crypto.KEY_P384)
    public = crypto.public_der_of(der)
    assert crypto.public_kind(public) == crypto.KEY_P384 == "p384"
    key = _s.load_der_public_key(public)
    assert isinstance(key.curve, _ec.SECP384R1)
    data = b"signed by a p-384 key"
    with crypto.PrivateKeyHandle(bytearray(der)) as handle:
        key.verify(handle.sign_digest(hashlib.sha256(data).digest()), data, _ec.ECDSA(_h.SHA256()))
        key.verify(handle.sign_digest(hashlib.sha384(data).digest()), data, _ec.ECDSA(_h.SHA384()))
        with pytest.raises(crypto.CryptoError):
            handle.sign_digest(hashlib.sha512(data).digest())
        peer = _ec.generate_private_key(_ec.SECP384R1())
        point = peer.public_key().public_bytes(_s.Encoding.X962, _s.PublicFormat.UncompressedPoint)
        assert handle.ecdh(point) == peer.exchange(_ec.ECDH(), key)
    kind, q = crypto.ssh_public_parts(public)
    assert kind == "nistp384" and q == key.public_bytes(_s.Encoding.X962, _s.PublicFormat.UncompressedPoint)

    scalar = peer.private_numbers().private_value.to_bytes(48, "big")
    assert crypto.public_der_of(crypto.p384_private_der_from_scalar(scalar)) == peer.public_key().public_bytes(
        _s.Encoding.DER, _s.PublicFormat.SubjectPublicKeyInfo)
    n = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF581A0DB248B0A77AECEC196ACCC52973
    for bad in (bytes(48), n.to_bytes(48, "big")):
        with pytest.raises(crypto.CryptoError):
            crypto.p384_private_der_from_scalar(bad)

    rsa_der = crypto.generate_private_der(crypto.KEY_RSA2048)
    rsa_pub = _s.load_der_public_key(crypto.public_der_of(rsa_der))
    with crypto.PrivateKeyHandle(bytearray(rsa_der)) as handle:
        rsa_pub.verify(handle.sign_digest(hashlib.sha384(data).digest()), data, _p.PKCS1v15(), _h.SHA384())
