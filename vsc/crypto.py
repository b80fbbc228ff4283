"""
Every cryptographic primitive vsc uses, and the only module that imports a
crypto library.

Two libraries, each where it serves best (figures measured on the project's
2-vCPU machine, ../shared/reference/anchors.md):

* ``cryptography`` (OpenSSL) for private-key operations and for record
  ciphers: RSA-OAEP decryption is ~3x faster than pycryptodome, AES-GCM with a
  reused key object is ~100x faster per small record, and OpenSSL cleanses key
  material when a key object is freed (``OPENSSL_cleanse``), which pure-Python
  key objects cannot do.
* ``pycryptodome`` where an operation must take *injected* randomness (the
  OAEP seed in key transport: ``cryptography`` draws it from OpenSSL's RNG and
  cannot reproduce test vectors), and for single DES, which the patent's
  legacy suite needs and OpenSSL 3 only offers through its legacy provider.

Nothing here invents a primitive: every construction is a standard one
(RSA-OAEP-SHA256, HKDF-SHA256, HMAC-SHA256, AES-GCM, ChaCha20-Poly1305,
AES-CBC + HMAC encrypt-then-MAC, X25519) or the patent's own (DES-CBC + MD5).
"""

from __future__ import annotations

import base64
import hashlib
import hmac as _hmac
import os
from typing import Callable

from Crypto.Cipher import DES as _PyDES
from Crypto.Cipher import PKCS1_OAEP as _PyOAEP
from Crypto.Hash import SHA256 as _PySHA256
from Crypto.PublicKey import RSA as _PyRSA
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, padding, serialization
from cryptography.hazmat.primitives.asymmetric import rsa as _rsa
from cryptography.hazmat.primitives.asymmetric import padding as _apadding
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand

RandomBytes = Callable[[int], bytes]


class CryptoError(Exception):
    """A cryptographic check failed (bad tag, bad MAC, undecryptable key)."""


def system_random(n: int) -> bytes:
    """The default randomness source: the kernel CSPRNG."""
    return os.urandom(n)


# ---------------------------------------------------------------- hashing


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def md5(data: bytes) -> bytes:
    """MD5, only for the patent's legacy constructions (Figure 9, [0078])."""
    return hashlib.md5(data, usedforsecurity=False).digest()


def hmac_sha256(key: bytes, data: bytes) -> bytes:
    return _hmac.new(key, data, hashlib.sha256).digest()


def constant_time_equal(a: bytes, b: bytes) -> bool:
    return _hmac.compare_digest(a, b)


def hkdf_extract_expand(salt: bytes, ikm: bytes, info: bytes, length: int) -> bytes:
    """HKDF-SHA256 (RFC 5869), extract then expand."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


def hkdf_extract(salt: bytes, ikm: bytes) -> bytes:
    """HKDF-Extract with SHA-256: PRK = HMAC-SHA256(salt, IKM)."""
    return hmac_sha256(salt, ikm)


def hkdf_expand(prk: bytes, info: bytes, length: int) -> bytes:
    """HKDF-Expand with SHA-256 (RFC 5869 section 2.3)."""
    return HKDFExpand(algorithm=hashes.SHA256(), length=length, info=info).derive(prk)


# ---------------------------------------------------------------- RSA


class RSAPrivateKey:
    """A server's RSA key pair, kept as an OpenSSL object."""

    def __init__(self, key: _rsa.RSAPrivateKey):
        self._key = key

    @classmethod
    def generate(cls, bits: int = 3072) -> "RSAPrivateKey":
        if bits not in (2048, 3072, 4096):
            raise ValueError(f"unsupported RSA key size {bits}; use 2048, 3072 or 4096")
        return cls(_rsa.generate_private_key(public_exponent=65537, key_size=bits))

    @classmethod
    def from_pem(cls, pem: bytes) -> "RSAPrivateKey":
        key = serialization.load_pem_private_key(pem, password=None)
        if not isinstance(key, _rsa.RSAPrivateKey):
            raise ValueError("not an RSA private key")
        return cls(key)

    def to_pem(self) -> bytes:
        return self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @property
    def bits(self) -> int:
        return self._key.key_size

    def public_key(self) -> "RSAPublicKey":
        return RSAPublicKey(
            self._key.public_key().public_bytes(
                serialization.Encoding.DER,
                serialization.PublicFormat.SubjectPublicKeyInfo,
            )
        )

    def oaep_decrypt(self, ciphertext: bytes) -> bytes:
        """RSA-OAEP with SHA-256 and MGF1-SHA-256; raises CryptoError."""
        try:
            return self._key.decrypt(
                ciphertext,
                _apadding.OAEP(
                    mgf=_apadding.MGF1(algorithm=hashes.SHA256()),
                    algorithm=hashes.SHA256(),
                    label=None,
                ),
            )
        except ValueError as e:
            raise CryptoError("RSA-OAEP decryption failed") from e


class RSAPublicKey:
    """A public key held as its SubjectPublicKeyInfo DER."""

    def __init__(self, spki_der: bytes):
        try:
            self._py = _PyRSA.import_key(spki_der)
        except (ValueError, IndexError, TypeError) as e:
            raise CryptoError("not an RSA public key") from e
        if self._py.has_private():
            raise CryptoError("expected a public key")
        if self._py.size_in_bits() < 2048:
            raise CryptoError("RSA public key shorter than 2048 bits")
        self.spki_der = spki_der

    @property
    def bits(self) -> int:
        return self._py.size_in_bits()

    def fingerprint(self) -> str:
        return fingerprint(self.spki_der)

    def oaep_encrypt(self, plaintext: bytes, rand: RandomBytes) -> bytes:
        """RSA-OAEP-SHA256 with the OAEP seed drawn from ``rand``."""
        cipher = _PyOAEP.new(self._py, hashAlgo=_PySHA256, randfunc=rand)
        return cipher.encrypt(plaintext)


def fingerprint(spki_der: bytes) -> str:
    """The pin of a public key: ``SHA256:`` + unpadded base64, as OpenSSH prints."""
    return "SHA256:" + base64.b64encode(sha256(spki_der)).decode("ascii").rstrip("=")


# ---------------------------------------------------------------- X25519


class X25519Ephemeral:
    """An ephemeral X25519 key pair for the forward-secret handshake variant."""

    def __init__(self, rand: RandomBytes):
        self._key = X25519PrivateKey.from_private_bytes(rand(32))
        self.public = self._key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    def exchange(self, peer_public: bytes) -> bytes:
        try:
            shared = self._key.exchange(X25519PublicKey.from_public_bytes(peer_public))
        except ValueError as e:
            # all-zero output: a small-order peer key (RFC 7748 section 6.1)
            raise CryptoError("X25519 exchange with an invalid public key") from e
        return shared


# ---------------------------------------------------------------- record ciphers


class RecordCipher:
    """One direction's record protection; ``open`` raises CryptoError."""

    def overhead(self, plaintext_length: int) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def seal(self, seq: bytes, plaintext: bytes, aad: bytes) -> bytes:  # pragma: no cover
        raise NotImplementedError

    def open(self, seq: bytes, sealed: bytes, aad: bytes) -> bytes:  # pragma: no cover
        raise NotImplementedError


class AEADRecordCipher(RecordCipher):
    """AES-256-GCM or ChaCha20-Poly1305; nonce = iv XOR (0^4 || seq64)."""

    TAG = 16

    def __init__(self, algorithm: str, key: bytes, iv: bytes):
        if algorithm == "aes256-gcm":
            self._aead = AESGCM(key)
        elif algorithm == "chacha20-poly1305":
            self._aead = ChaCha20Poly1305(key)
        else:
            raise ValueError(algorithm)
        if len(iv) != 12:
            raise ValueError("AEAD IV must be 12 bytes")
        self._iv = iv

    def _nonce(self, seq: bytes) -> bytes:
        padded = bytes(4) + seq
        return bytes(a ^ b for a, b in zip(self._iv, padded))

    def overhead(self, plaintext_length: int) -> int:
        return self.TAG

    def seal(self, seq: bytes, plaintext: bytes, aad: bytes) -> bytes:
        return self._aead.encrypt(self._nonce(seq), plaintext, aad)

    def open(self, seq: bytes, sealed: bytes, aad: bytes) -> bytes:
        try:
            return self._aead.decrypt(self._nonce(seq), sealed, aad)
        except InvalidTag as e:
            raise CryptoError("record authentication tag mismatch") from e


class CBCHMACRecordCipher(RecordCipher):
    """AES-256-CBC + HMAC-SHA256, encrypt-then-MAC over aad || iv || ct."""

    def __init__(self, enc_key: bytes, mac_key: bytes, rand: RandomBytes):
        self._alg = algorithms.AES(enc_key)
        self._mac_key = mac_key
        self._rand = rand

    def overhead(self, plaintext_length: int) -> int:
        padded = (plaintext_length // 16 + 1) * 16
        return 16 + (padded - plaintext_length) + 32

    def seal(self, seq: bytes, plaintext: bytes, aad: bytes) -> bytes:
        iv = self._rand(16)
        padder = padding.PKCS7(128).padder()
        data = padder.update(plaintext) + padder.finalize()
        enc = Cipher(self._alg, modes.CBC(iv)).encryptor()
        ct = enc.update(data) + enc.finalize()
        return iv + ct + hmac_sha256(self._mac_key, aad + iv + ct)

    def open(self, seq: bytes, sealed: bytes, aad: bytes) -> bytes:
        if len(sealed) < 16 + 16 + 32 or (len(sealed) - 48) % 16:
            raise CryptoError("record has an impossible CBC length")
        iv, ct, tag = sealed[:16], sealed[16:-32], sealed[-32:]
        if not constant_time_equal(hmac_sha256(self._mac_key, aad + iv + ct), tag):
            raise CryptoError("record HMAC mismatch")
        dec = Cipher(self._alg, modes.CBC(iv)).decryptor()
        data = dec.update(ct) + dec.finalize()
        unpadder = padding.PKCS7(128).unpadder()
        try:
            return unpadder.update(data) + unpadder.finalize()
        except ValueError as e:  # only reachable with the MAC key: a peer bug
            raise CryptoError("record padding invalid") from e


class LegacyDESMD5RecordCipher(RecordCipher):
    """
    The patent's channel [0078]: DES-CBC under s1, and an MD5 hash of the
    communication together with s2 (here MD5(s2 || aad || iv || ct)).
    Insecure (56-bit DES, a prefix-keyed MD5); kept for conformance only.
    """

    def __init__(self, s1: bytes, s2: bytes, rand: RandomBytes):
        self._key = s1[:8]
        self._s2 = s2
        self._rand = rand

    def overhead(self, plaintext_length: int) -> int:
        padded = (plaintext_length // 8 + 1) * 8
        return 8 + (padded - plaintext_length) + 16

    def seal(self, seq: bytes, plaintext: bytes, aad: bytes) -> bytes:
        iv = self._rand(8)
        pad = 8 - len(plaintext) % 8
        ct = _PyDES.new(self._key, _PyDES.MODE_CBC, iv=iv).encrypt(plaintext + bytes([pad]) * pad)
        return iv + ct + md5(self._s2 + aad + iv + ct)

    def open(self, seq: bytes, sealed: bytes, aad: bytes) -> bytes:
        if len(sealed) < 8 + 8 + 16 or (len(sealed) - 24) % 8:
            raise CryptoError("record has an impossible DES-CBC length")
        iv, ct, tag = sealed[:8], sealed[8:-16], sealed[-16:]
        if not constant_time_equal(md5(self._s2 + aad + iv + ct), tag):
            raise CryptoError("record MD5 keyed hash mismatch")
        data = _PyDES.new(self._key, _PyDES.MODE_CBC, iv=iv).decrypt(ct)
        pad = data[-1]
        if not 1 <= pad <= 8 or data[-pad:] != bytes([pad]) * pad:
            raise CryptoError("record padding invalid")
        return data[:-pad]


# ---------------------------------------------------------------- implementation authentication (vsc.protocol.implauth)
#
# Keyfiles [0044]-[0046]: RSA-PSS-SHA256 signatures by the server key, sealed to
# the card with X25519 + HKDF-SHA256 + AES-256-GCM (the ECIES/HPKE-base pattern,
# here with the ephemeral key drawn from injected randomness). The one-time
# agent [0050]: one-shot AES-256-GCM. The reader-less device [0005]: RFC 4226/6238
# HOTP/TOTP with HMAC-SHA1 (cryptography's implementation).

from cryptography.hazmat.primitives.twofactor.hotp import HOTP as _HOTP  # noqa: E402


def rsa_pss_sign(key: RSAPrivateKey, data: bytes) -> bytes:
    """RSA-PSS with SHA-256, MGF1-SHA-256 and a 32-byte salt."""
    return key._key.sign(
        data, _apadding.PSS(mgf=_apadding.MGF1(hashes.SHA256()), salt_length=32), hashes.SHA256()
    )


def rsa_pss_verify(spki_der: bytes, data: bytes, signature: bytes) -> bool:
    """Verify an RSA-PSS-SHA256 signature; False for a bad signature or a key that is not RSA."""
    try:
        key = serialization.load_der_public_key(spki_der)
    except ValueError:
        return False
    if not isinstance(key, _rsa.RSAPublicKey):
        return False
    try:
        key.verify(signature, data, _apadding.PSS(mgf=_apadding.MGF1(hashes.SHA256()), salt_length=32), hashes.SHA256())
    except Exception:  # noqa: BLE001 - InvalidSignature or a malformed signature
        return False
    return True


def aes_gcm_seal(key: bytes, nonce: bytes, plaintext: bytes, aad: bytes = b"") -> bytes:
    """AES-256-GCM: ciphertext || 16-byte tag."""
    return AESGCM(key).encrypt(nonce, plaintext, aad)


def aes_gcm_open(key: bytes, nonce: bytes, sealed: bytes, aad: bytes = b"") -> bytes:
    """AES-256-GCM decryption; CryptoError (never swallowed) on a bad tag."""
    try:
        return AESGCM(key).decrypt(nonce, sealed, aad)
    except InvalidTag as e:
        raise CryptoError("AES-GCM authentication failed (wrong key or tampered)") from e


def x25519_public(private: bytes) -> bytes:
    """The X25519 public key of a 32-byte private key (RFC 7748 clamping applies)."""
    key = X25519PrivateKey.from_private_bytes(private)
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def x25519_shared(private: bytes, peer_public: bytes) -> bytes:
    """X25519(private, peer_public); CryptoError for a small-order peer key."""
    try:
        return X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as e:
        raise CryptoError("X25519 exchange with an invalid public key") from e


def hotp_sha1(secret: bytes, counter: int, digits: int = 6) -> str:
    """RFC 4226 HOTP with HMAC-SHA1 (TOTP, RFC 6238, uses counter = floor(time / period))."""
    return _HOTP(secret, digits, hashes.SHA1()).generate(counter).decode("ascii")


# ---------------------------------------------------------------- password KDF


def scrypt(password: bytes, salt: bytes, log2_n: int, r: int, p: int, length: int) -> bytes:
    """scrypt (RFC 7914) through OpenSSL."""
    if not 10 <= log2_n <= 22:
        raise ValueError("scrypt cost log2(N) must be 10..22")
    return hashlib.scrypt(password, salt=salt, n=1 << log2_n, r=r, p=p, maxmem=256 * 1024 * 1024, dklen=length)


# ---------------------------------------------------------------- in-place AEAD (for locked memory)

GCM_NONCE = 12
GCM_TAG = 16


def gcm_seal_into(key, nonce: bytes, plaintext, out, aad: bytes = b"") -> bytes:
    """
    AES-256-GCM encrypt ``plaintext`` (any buffer) into the writable buffer
    ``out`` (len(plaintext) + 15 bytes at least); returns the tag. ``key`` may
    be a memoryview into locked memory: no copy of it or of the plaintext is
    made on the Python heap.
    """
    enc = Cipher(algorithms.AES(key), modes.GCM(nonce)).encryptor()
    if aad:
        enc.authenticate_additional_data(aad)
    enc.update_into(plaintext, out)
    enc.finalize()
    return enc.tag


def gcm_open_into(key, nonce: bytes, ciphertext, tag: bytes, out, aad: bytes = b"") -> int:
    """AES-256-GCM decrypt into ``out``; raises CryptoError (never swallowed) on a bad tag."""
    dec = Cipher(algorithms.AES(key), modes.GCM(nonce, tag)).decryptor()
    if aad:
        dec.authenticate_additional_data(aad)
    n = dec.update_into(ciphertext, out)
    try:
        dec.finalize()
    except InvalidTag as e:
        raise CryptoError("protected information failed authentication (wrong key or tampered)") from e
    return n


# ---------------------------------------------------------------- card key pairs

from cryptography.hazmat.primitives.asymmetric import ec as _ec  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import utils as _autils  # noqa: E402

KEY_RSA2048 = "rsa2048"
KEY_P256 = "p256"


def generate_private_der(kind: str) -> bytes:
    """A new key pair as PKCS#8 DER (used by the short-lived enrolment process)."""
    if kind == KEY_RSA2048:
        key = _rsa.generate_private_key(public_exponent=65537, key_size=2048)
    elif kind == KEY_P256:
        key = _ec.generate_private_key(_ec.SECP256R1())
    else:
        raise ValueError(f"unknown key kind {kind!r}")
    return key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def public_der_of(private_der) -> bytes:
    key = serialization.load_der_private_key(private_der, password=None)
    return key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def public_pem(public_der: bytes) -> bytes:
    key = serialization.load_der_public_key(public_der)
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def public_kind(public_der: bytes) -> str:
    key = serialization.load_der_public_key(public_der)
    if isinstance(key, _rsa.RSAPublicKey):
        return f"rsa{key.key_size}"
    if isinstance(key, _ec.EllipticCurvePublicKey):
        return {"secp256r1": KEY_P256}.get(key.curve.name, key.curve.name)
    return "unknown"


class PrivateKeyHandle:
    """
    A private key loaded from a buffer for ONE operation. The key lives in
    OpenSSL memory, which OpenSSL cleanses when this object is freed; use it
    as a context manager and drop it right after.
    """

    def __init__(self, der_buffer):
        # OpenSSL's RSA key check costs 40-100 ms per load (it dominated every
        # RSA signature). These keys were checked when they were generated or
        # imported, and every load comes out of AES-GCM-authenticated storage,
        # so a tampered key cannot reach this point: skip the repeated check.
        self._key = serialization.load_der_private_key(der_buffer, password=None,
                                                       unsafe_skip_rsa_key_validation=True)

    def __enter__(self) -> "PrivateKeyHandle":
        return self

    def __exit__(self, *exc) -> None:
        self._key = None

    def sign_sha256(self, data: bytes) -> bytes:
        """What ``openssl dgst -sha256 -sign`` gives: PKCS#1 v1.5 for RSA, DER ECDSA for EC."""
        if isinstance(self._key, _rsa.RSAPrivateKey):
            return self._key.sign(data, _apadding.PKCS1v15(), hashes.SHA256())
        return self._key.sign(data, _ec.ECDSA(hashes.SHA256()))

    def sign_digest(self, digest: bytes) -> bytes:
        """
        Sign a precomputed SHA-256 digest: the same signature ``sign_sha256``
        gives over the data (PKCS#1 v1.5 for RSA, DER ECDSA for EC).
        """
        if len(digest) != 32:
            raise CryptoError("a SHA-256 digest is 32 bytes")
        if isinstance(self._key, _rsa.RSAPrivateKey):
            return self._key.sign(digest, _apadding.PKCS1v15(), _autils.Prehashed(hashes.SHA256()))
        return self._key.sign(digest, _ec.ECDSA(_autils.Prehashed(hashes.SHA256())))

    def decrypt(self, ciphertext: bytes, padding_name: str = "pkcs1") -> bytes:
        if not isinstance(self._key, _rsa.RSAPrivateKey):
            raise CryptoError("decryption needs an RSA key")
        if padding_name == "oaep":
            pad = _apadding.OAEP(mgf=_apadding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
        else:
            pad = _apadding.PKCS1v15()
        try:
            return self._key.decrypt(ciphertext, pad)
        except ValueError as e:
            raise CryptoError("decryption failed") from e

    def raw_rsa(self, block: bytes) -> bytes:
        """The raw RSA private operation m^d mod n on an already padded block (PIV)."""
        if not isinstance(self._key, _rsa.RSAPrivateKey):
            raise CryptoError("raw RSA needs an RSA key")
        nums = self._key.private_numbers()
        n = nums.public_numbers.n
        m = int.from_bytes(block, "big")
        if m >= n:
            raise CryptoError("block is not smaller than the modulus")
        size = (n.bit_length() + 7) // 8
        return pow(m, nums.d, n).to_bytes(size, "big")

    def ecdh(self, peer_point: bytes) -> bytes:
        if not isinstance(self._key, _ec.EllipticCurvePrivateKey):
            raise CryptoError("ECDH needs an EC key")
        peer = _ec.EllipticCurvePublicKey.from_encoded_point(self._key.curve, peer_point)
        return self._key.exchange(_ec.ECDH(), peer)


def verify_sha256(public_der: bytes, data: bytes, signature: bytes) -> bool:
    key = serialization.load_der_public_key(public_der)
    try:
        if isinstance(key, _rsa.RSAPublicKey):
            key.verify(signature, data, _apadding.PKCS1v15(), hashes.SHA256())
        else:
            key.verify(signature, data, _ec.ECDSA(hashes.SHA256()))
    except Exception:  # noqa: BLE001 - InvalidSignature or a malformed signature
        return False
    return True


def rsa_encrypt(public_der: bytes, plaintext: bytes, padding_name: str = "pkcs1") -> bytes:
    key = serialization.load_der_public_key(public_der)
    if padding_name == "oaep":
        pad = _apadding.OAEP(mgf=_apadding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    else:
        pad = _apadding.PKCS1v15()
    return key.encrypt(plaintext, pad)


# ---------------------------------------------------------------- vendor keys (licence keyfiles)

from cryptography.hazmat.primitives.asymmetric.ed25519 import (  # noqa: E402
    Ed25519PrivateKey as _Ed25519PrivateKey,
    Ed25519PublicKey as _Ed25519PublicKey,
)


def vendor_keygen() -> tuple[bytes, bytes]:
    """A software vendor's Ed25519 signing key: (private PKCS#8 PEM, public SPKI PEM)."""
    key = _Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, public


def vendor_sign(private_pem: bytes, data: bytes) -> bytes:
    key = serialization.load_pem_private_key(private_pem, password=None)
    if not isinstance(key, _Ed25519PrivateKey):
        raise CryptoError("the vendor key must be an Ed25519 private key (vsc license keygen)")
    return key.sign(data)


def vendor_public_der(public_pem: bytes) -> bytes:
    key = serialization.load_pem_public_key(public_pem)
    if not isinstance(key, _Ed25519PublicKey):
        raise CryptoError("the vendor public key must be Ed25519")
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def vendor_verify(public_pem: bytes, data: bytes, signature: bytes) -> bool:
    key = serialization.load_pem_public_key(public_pem)
    if not isinstance(key, _Ed25519PublicKey):
        raise CryptoError("the vendor public key must be Ed25519")
    try:
        key.verify(signature, data)
    except Exception:  # noqa: BLE001 - InvalidSignature
        return False
    return True


def public_der_from_pem(pem: bytes) -> bytes:
    key = serialization.load_pem_public_key(pem)
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


# ---------------------------------------------------------------- ssh-agent (vsc.card.sshagent)

_PKCS1_HASHES = {"sha256": hashes.SHA256, "sha384": hashes.SHA384, "sha512": hashes.SHA512}


def _handle_sign_pkcs1(self: PrivateKeyHandle, data: bytes, hash_name: str) -> bytes:
    """
    RSA PKCS#1 v1.5 over ``hash_name`` (sha256, sha384, sha512) of ``data``:
    rsa-sha2-256 / rsa-sha2-512 (RFC 8332). SHA-1 is deliberately not offered.
    """
    if not isinstance(self._key, _rsa.RSAPrivateKey):
        raise CryptoError("PKCS#1 v1.5 signing needs an RSA key")
    try:
        algorithm = _PKCS1_HASHES[hash_name]()
    except KeyError:
        raise CryptoError(f"unsupported PKCS#1 v1.5 hash {hash_name!r}") from None
    return self._key.sign(data, _apadding.PKCS1v15(), algorithm)


PrivateKeyHandle.sign_pkcs1 = _handle_sign_pkcs1  # type: ignore[attr-defined]


def ecdsa_der_to_rs(signature: bytes) -> tuple[int, int]:
    """A DER ECDSA signature (as ``sign_digest`` gives) → (r, s)."""
    try:
        return _autils.decode_dss_signature(signature)
    except ValueError as e:
        raise CryptoError("not a DER ECDSA signature") from e


def ssh_public_parts(public_der: bytes) -> tuple:
    """
    The numbers of an OpenSSH public key blob (RFC 4253 6.6, RFC 5656 3.1):
    ``("rsa", e, n)`` for RSA, ``("nistp256", uncompressed point)`` for P-256.
    """
    try:
        key = serialization.load_der_public_key(public_der)
    except ValueError as e:
        raise CryptoError("not a public key (SubjectPublicKeyInfo DER)") from e
    if isinstance(key, _rsa.RSAPublicKey):
        nums = key.public_numbers()
        return ("rsa", nums.e, nums.n)
    if isinstance(key, _ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1":
        return ("nistp256", key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint))
    raise CryptoError("no OpenSSH form for this public key (RSA and P-256 only)")


# ---------------------------------------------------------------- PIV card application (vsc.protocol.piv, vsc card cert)

import datetime as _dt  # noqa: E402

from cryptography import x509 as _x509  # noqa: E402
from cryptography.x509.oid import NameOID as _NameOID  # noqa: E402

#: PIV algorithm identifiers of the card management key (SP 800-78-4 table 6-2) and their block ciphers
PIV_MGMT_3DES = 0x03
PIV_MGMT_AES128 = 0x08
PIV_MGMT_AES192 = 0x0A
PIV_MGMT_AES256 = 0x0C
_MGMT_KEY_SIZES = {PIV_MGMT_3DES: 24, PIV_MGMT_AES128: 16, PIV_MGMT_AES192: 24, PIV_MGMT_AES256: 32}


def mgmt_block_size(alg: int) -> int:
    """The challenge size of a management-key algorithm: 8 (3DES) or 16 (AES)."""
    if alg not in _MGMT_KEY_SIZES:
        raise CryptoError(f"unknown management key algorithm {alg:#04x}")
    return 8 if alg == PIV_MGMT_3DES else 16


def mgmt_key_size(alg: int) -> int:
    if alg not in _MGMT_KEY_SIZES:
        raise CryptoError(f"unknown management key algorithm {alg:#04x}")
    return _MGMT_KEY_SIZES[alg]


def mgmt_cipher(alg: int, key, block: bytes, encrypt: bool = True) -> bytes:
    """
    One ECB block under the card management key: 3DES (three-key EDE; the
    PIV default key has K1=K2=K3, which OpenSSL accepts) or AES.
    """
    if len(key) != mgmt_key_size(alg) or len(block) != mgmt_block_size(alg):
        raise CryptoError("management key or block has the wrong size")
    if alg == PIV_MGMT_3DES:
        from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES

        algorithm = TripleDES(bytes(key))
    else:
        algorithm = algorithms.AES(bytes(key))
    ctx = Cipher(algorithm, modes.ECB())
    op = ctx.encryptor() if encrypt else ctx.decryptor()
    return op.update(block) + op.finalize()


def rsa_raw_private(handle: PrivateKeyHandle, block: bytes, rand: RandomBytes) -> bytes:
    """
    The raw RSA private operation (PIV GENERAL AUTHENTICATE: the host sends
    an already padded block) with CRT and base blinding: ~4x faster than
    ``PrivateKeyHandle.raw_rsa`` and the exponentiation does not see the
    attacker's value. Python integers are not constant time; OpenSSL offers
    no unpadded private operation through ``cryptography``.
    """
    key = handle._key
    if not isinstance(key, _rsa.RSAPrivateKey):
        raise CryptoError("raw RSA needs an RSA key")
    nums = key.private_numbers()
    pub = nums.public_numbers
    n, e = pub.n, pub.e
    size = (n.bit_length() + 7) // 8
    if len(block) != size:
        raise CryptoError(f"the block must be {size} bytes")
    m = int.from_bytes(block, "big")
    if m >= n:
        raise CryptoError("block is not smaller than the modulus")
    while True:
        r = int.from_bytes(rand(size), "big") % n
        if r > 1:
            try:
                r_inv = pow(r, -1, n)
            except ValueError:
                continue
            break
    blinded = (m * pow(r, e, n)) % n
    mp = pow(blinded, nums.dmp1, nums.p)
    mq = pow(blinded, nums.dmq1, nums.q)
    h = (nums.iqmp * (mp - mq)) % nums.p
    s = ((mq + h * nums.q) * r_inv) % n
    if pow(s, e, n) != m:  # a fault check: never release a wrong CRT result
        raise CryptoError("RSA private operation failed its check")
    return s.to_bytes(size, "big")


def ecdsa_sign_hash(handle: PrivateKeyHandle, digest: bytes) -> bytes:
    """
    ECDSA (P-256) over a hash of any length, as a PIV card signs what the
    host sends: the leftmost 256 bits are used (FIPS 186-4 6.4), a shorter
    hash is taken as its integer value. Returns the DER ECDSA-Sig-Value.
    """
    key = handle._key
    if not isinstance(key, _ec.EllipticCurvePrivateKey):
        raise CryptoError("ECDSA needs an EC key")
    size = (key.curve.key_size + 7) // 8
    if not digest:
        raise CryptoError("nothing to sign")
    digest = bytes(digest[:size]).rjust(size, b"\x00")
    algorithm = {32: hashes.SHA256(), 48: hashes.SHA384()}.get(size)
    if algorithm is None:
        raise CryptoError(f"unsupported curve size {size}")
    return key.sign(digest, _ec.ECDSA(_autils.Prehashed(algorithm)))


def public_numbers(public_der: bytes) -> dict:
    """``{"rsa": (modulus, exponent)}`` as big-endian bytes, or ``{"ec": uncompressed point}``."""
    key = serialization.load_der_public_key(public_der)
    if isinstance(key, _rsa.RSAPublicKey):
        nums = key.public_numbers()
        return {"rsa": (nums.n.to_bytes((nums.n.bit_length() + 7) // 8, "big"),
                        nums.e.to_bytes((nums.e.bit_length() + 7) // 8, "big"))}
    if isinstance(key, _ec.EllipticCurvePublicKey):
        return {"ec": key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)}
    raise CryptoError("unsupported public key type")


_NAME_ATTRS = {
    "CN": _NameOID.COMMON_NAME, "O": _NameOID.ORGANIZATION_NAME, "OU": _NameOID.ORGANIZATIONAL_UNIT_NAME,
    "C": _NameOID.COUNTRY_NAME, "ST": _NameOID.STATE_OR_PROVINCE_NAME, "L": _NameOID.LOCALITY_NAME,
    "EMAILADDRESS": _NameOID.EMAIL_ADDRESS, "SERIALNUMBER": _NameOID.SERIAL_NUMBER, "DC": _NameOID.DOMAIN_COMPONENT,
    "UID": _NameOID.USER_ID,
}


def parse_subject(subject: str) -> _x509.Name:
    """An OpenSSL-style subject, ``/CN=alice/O=Example`` (``\\/`` for a literal slash)."""
    if not subject.startswith("/"):
        raise ValueError("a subject looks like /CN=name/O=org")
    parts, cur, i = [], "", 1
    while i < len(subject):
        ch = subject[i]
        if ch == "\\" and i + 1 < len(subject):
            cur += subject[i + 1]
            i += 2
            continue
        if ch == "/":
            parts.append(cur)
            cur = ""
        else:
            cur += ch
        i += 1
    parts.append(cur)
    attrs_ = []
    for part in parts:
        if not part:
            continue
        name, sep, value = part.partition("=")
        oid = _NAME_ATTRS.get(name.strip().upper())
        if not sep or oid is None or not value:
            raise ValueError(f"cannot read {part!r} in the subject (known: {', '.join(sorted(_NAME_ATTRS))})")
        attrs_.append(_x509.NameAttribute(oid, value))
    if not attrs_:
        raise ValueError("the subject is empty")
    return _x509.Name(attrs_)


def name_der(subject: str) -> bytes:
    """The DER of an OpenSSL-style subject (for a CSR the card signs)."""
    return parse_subject(subject).public_bytes()


def self_signed_certificate(private_der, common_name: str, now: float, rand: RandomBytes, days: int = 3650) -> bytes:
    """
    A self-signed X.509 certificate (DER) for a card key: subject = issuer =
    CN, SHA-256 signature, validity from ``now`` (injected) for ``days``,
    serial number from ``rand``.
    """
    key = serialization.load_der_private_key(private_der, password=None)
    name = _x509.Name([_x509.NameAttribute(_NameOID.COMMON_NAME, common_name)])
    start = _dt.datetime.fromtimestamp(int(now), _dt.timezone.utc)
    serial = int.from_bytes(rand(16), "big") >> 1 or 1
    is_rsa = isinstance(key, _rsa.RSAPrivateKey)
    usage = _x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=is_rsa, data_encipherment=False,
        key_agreement=not is_rsa, key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False,
    )
    cert = (
        _x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(start - _dt.timedelta(minutes=5))
        .not_valid_after(start + _dt.timedelta(days=days))
        .add_extension(_x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.DER)


def certificate_der(data: bytes) -> bytes:
    """A certificate given as PEM or DER, as DER (raises ValueError if it is neither)."""
    if data.lstrip().startswith(b"-----BEGIN"):
        cert = _x509.load_pem_x509_certificate(data)
    else:
        cert = _x509.load_der_x509_certificate(data)
    return cert.public_bytes(serialization.Encoding.DER)


def certificate_public_der(cert_der: bytes) -> bytes:
    cert = _x509.load_der_x509_certificate(cert_der)
    return cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def certificate_pem(cert_der: bytes) -> bytes:
    return _x509.load_der_x509_certificate(cert_der).public_bytes(serialization.Encoding.PEM)


def certificate_subject(cert_der: bytes) -> str:
    return _x509.load_der_x509_certificate(cert_der).subject.rfc4514_string()


def csr_pem(csr_der: bytes) -> bytes:
    """A CSR as PEM, after checking that it parses and that its signature verifies."""
    req = _x509.load_der_x509_csr(csr_der)
    if not req.is_signature_valid:
        raise CryptoError("the certification request signature does not verify")
    return req.public_bytes(serialization.Encoding.PEM)
