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


# ---------------------------------------------------------------- password KDF


def scrypt(password: bytes, salt: bytes, log2_n: int, r: int, p: int, length: int) -> bytes:
    """scrypt (RFC 7914) through OpenSSL."""
    if not 10 <= log2_n <= 22:
        raise ValueError("scrypt cost log2(N) must be 10..22")
    return hashlib.scrypt(password, salt=salt, n=1 << log2_n, r=r, p=p, maxmem=256 * 1024 * 1024, dklen=length)
