"""
Authenticated encryption: the channel's record ciphers, AES-256-GCM one-shot
(keyfiles, the one-time agent) and AES-256-GCM in place (locked memory).

Record ciphers keep their keys for the life of the channel; only the
per-record nonce or IV changes. The AEAD ciphers' OpenSSL objects (about
2.5 KiB each: cryptography prepares an encryption and a decryption context
with the key schedule) come from a small cache shared by all channels
(``_aead``): a busy channel finds its own there every time, while a server
holding thousands of idle channels (cards in use, polling every few seconds)
does not hold two per channel — it builds one for a record now and then,
about a microsecond.
"""

from __future__ import annotations

import functools
import hashlib
import hmac

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from vsc.crypto.block import des_cbc_decrypt, des_cbc_encrypt
from vsc.crypto.errors import CryptoError
from vsc.crypto.hashes import constant_time_equal, md5
from vsc.crypto.random import RandomBytes

GCM_NONCE = 12
GCM_TAG = 16


class RecordCipher:
    """One direction's record protection; ``open`` raises CryptoError."""

    def overhead(self, plaintext_length: int) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def seal(self, seq: bytes, plaintext: bytes, aad: bytes) -> bytes:  # pragma: no cover
        raise NotImplementedError

    def open(self, seq: bytes, sealed: bytes, aad: bytes) -> bytes:  # pragma: no cover
        raise NotImplementedError


_AEADS = {"aes256-gcm": AESGCM, "chacha20-poly1305": ChaCha20Poly1305}


@functools.lru_cache(maxsize=256)
def _aead(algorithm: str, key: bytes):
    """The OpenSSL AEAD object for ``key`` (shared: at most 256 kept, the least recently used dropped)."""
    return _AEADS[algorithm](key)


class AEADRecordCipher(RecordCipher):
    """AES-256-GCM or ChaCha20-Poly1305; nonce = iv XOR (0^4 || seq64)."""

    TAG = 16

    def __init__(self, algorithm: str, key: bytes, iv: bytes):
        if algorithm not in _AEADS:
            raise ValueError(algorithm)
        key = bytes(key)
        _aead(algorithm, key)  # checks the key now (its length), and the first seal or open finds it built
        self._algorithm, self._key = algorithm, key
        if len(iv) != 12:
            raise ValueError("AEAD IV must be 12 bytes")
        self._iv_head = iv[:4]
        self._iv_tail = int.from_bytes(iv[4:], "big")

    def _nonce(self, seq: bytes) -> bytes:
        if len(seq) != 8:
            raise ValueError("a record sequence number is 8 bytes")
        return self._iv_head + (self._iv_tail ^ int.from_bytes(seq, "big")).to_bytes(8, "big")

    def overhead(self, plaintext_length: int) -> int:
        return self.TAG

    def seal(self, seq: bytes, plaintext: bytes, aad: bytes) -> bytes:
        return _aead(self._algorithm, self._key).encrypt(self._nonce(seq), plaintext, aad)

    def open(self, seq: bytes, sealed: bytes, aad: bytes) -> bytes:
        try:
            return _aead(self._algorithm, self._key).decrypt(self._nonce(seq), sealed, aad)
        except InvalidTag as e:
            raise CryptoError("record authentication tag mismatch") from e


class CBCHMACRecordCipher(RecordCipher):
    """AES-256-CBC + HMAC-SHA256, encrypt-then-MAC over aad || iv || ct."""

    def __init__(self, enc_key: bytes, mac_key: bytes, rand: RandomBytes):
        self._alg = algorithms.AES(enc_key)
        self._mac = hmac.new(mac_key, digestmod=hashlib.sha256)  # keyed once, copied per record
        self._rand = rand

    def _tag(self, aad: bytes, iv: bytes, ct: bytes) -> bytes:
        mac = self._mac.copy()
        mac.update(aad)
        mac.update(iv)
        mac.update(ct)
        return mac.digest()

    def overhead(self, plaintext_length: int) -> int:
        padded = (plaintext_length // 16 + 1) * 16
        return 16 + (padded - plaintext_length) + 32

    def seal(self, seq: bytes, plaintext: bytes, aad: bytes) -> bytes:
        iv = self._rand(16)
        padder = padding.PKCS7(128).padder()
        data = padder.update(plaintext) + padder.finalize()
        enc = Cipher(self._alg, modes.CBC(iv)).encryptor()
        ct = enc.update(data) + enc.finalize()
        return iv + ct + self._tag(aad, iv, ct)

    def open(self, seq: bytes, sealed: bytes, aad: bytes) -> bytes:
        if len(sealed) < 16 + 16 + 32 or (len(sealed) - 48) % 16:
            raise CryptoError("record has an impossible CBC length")
        iv, ct, tag = sealed[:16], sealed[16:-32], sealed[-32:]
        if not constant_time_equal(self._tag(aad, iv, ct), tag):
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
        ct = des_cbc_encrypt(self._key, iv, plaintext + bytes([pad]) * pad)
        return iv + ct + md5(self._s2 + aad + iv + ct)

    def open(self, seq: bytes, sealed: bytes, aad: bytes) -> bytes:
        if len(sealed) < 8 + 8 + 16 or (len(sealed) - 24) % 8:
            raise CryptoError("record has an impossible DES-CBC length")
        iv, ct, tag = sealed[:8], sealed[8:-16], sealed[-16:]
        if not constant_time_equal(md5(self._s2 + aad + iv + ct), tag):
            raise CryptoError("record MD5 keyed hash mismatch")
        data = des_cbc_decrypt(self._key, iv, ct)
        pad = data[-1]
        if not 1 <= pad <= 8 or data[-pad:] != bytes([pad]) * pad:
            raise CryptoError("record padding invalid")
        return data[:-pad]


# ---------------------------------------------------------------- AES-256-GCM one-shot


def aes_gcm_seal(key: bytes, nonce: bytes, plaintext: bytes, aad: bytes = b"") -> bytes:
    """AES-256-GCM: ciphertext || 16-byte tag."""
    return AESGCM(key).encrypt(nonce, plaintext, aad)


def aes_gcm_open(key: bytes, nonce: bytes, sealed: bytes, aad: bytes = b"") -> bytes:
    """AES-256-GCM decryption; CryptoError (never swallowed) on a bad tag."""
    try:
        return AESGCM(key).decrypt(nonce, sealed, aad)
    except InvalidTag as e:
        raise CryptoError("AES-GCM authentication failed (wrong key or tampered)") from e


# ---------------------------------------------------------------- AES-256-GCM in place (locked memory)


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


def gcm_seal_joined_into(key, nonce: bytes, plaintext, out, aad: bytes = b"") -> None:
    """
    AES-256-GCM encrypt ``plaintext`` into ``out``, exactly len(plaintext) +
    16 bytes: the ciphertext and then the tag, joined as
    ``gcm_open_joined_into`` reads them. ``key`` may be a memoryview into
    locked memory: as with ``gcm_seal_into`` OpenSSL gets the key for this
    one call (its context, cleansed when freed) and nothing is copied onto
    the Python heap; one call into the library instead of the five objects
    of the Cipher interface (about 2 us against 6 for an RSA key's item).
    """
    AESGCM(key).encrypt_into(nonce, plaintext, aad, out)


def gcm_open_joined_into(key, nonce: bytes, sealed, out, aad: bytes = b"") -> int:
    """
    AES-256-GCM decrypt ``sealed`` (ciphertext and then its 16-byte tag, as
    ``gcm_seal_joined_into`` writes them) into ``out``, exactly len(sealed) -
    16 bytes; CryptoError (never swallowed) on a bad tag.
    """
    try:
        return AESGCM(key).decrypt_into(nonce, sealed, aad, out)
    except InvalidTag as e:
        raise CryptoError("protected information failed authentication (wrong key or tampered)") from e


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
