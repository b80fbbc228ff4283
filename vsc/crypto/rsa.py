"""
RSA: the server's key pair (OAEP key transport, PSS signatures), card keys'
PKCS#1 v1.5 signatures and decryption, and the PIV raw private operation.

The server's public key is parsed once: ``RSAPrivateKey.public_key()`` is
built on first use and kept (with its SubjectPublicKeyInfo DER and
fingerprint), and ``RSAPublicKey`` keeps the parsed form of the last few
SubjectPublicKeyInfos it saw, so a card that connects to the same server
again does not parse the same bytes again.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from Crypto.Cipher import PKCS1_OAEP as _PyOAEP
from Crypto.Hash import SHA256 as _PySHA256
from Crypto.PublicKey import RSA as _PyRSA
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding as _padding
from cryptography.hazmat.primitives.asymmetric import rsa as _rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from vsc.crypto import _libcrypto
from vsc.crypto.errors import CryptoError
from vsc.crypto.hashes import fingerprint
from vsc.crypto.random import RandomBytes

if TYPE_CHECKING:
    from vsc.crypto.keys import PrivateKeyHandle

_OAEP_SHA256 = _padding.OAEP(mgf=_padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
_PSS_SHA256 = _padding.PSS(mgf=_padding.MGF1(hashes.SHA256()), salt_length=32)


# ---------------------------------------------------------------- the server's key pair


class RSAPrivateKey:
    """A server's RSA key pair, kept as an OpenSSL object."""

    def __init__(self, key: _rsa.RSAPrivateKey):
        self._key = key
        self._public: RSAPublicKey | None = None

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
        """The public half, built once (every handshake's Hello carries its SubjectPublicKeyInfo)."""
        if self._public is None:
            self._public = RSAPublicKey(self._key.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))
        return self._public

    def oaep_decrypt(self, ciphertext: bytes) -> bytes:
        """RSA-OAEP with SHA-256 and MGF1-SHA-256; raises CryptoError."""
        try:
            return self._key.decrypt(ciphertext, _OAEP_SHA256)
        except ValueError as e:
            raise CryptoError("RSA-OAEP decryption failed") from e

    def pss_sign(self, data: bytes) -> bytes:
        """RSA-PSS with SHA-256, MGF1-SHA-256 and a 32-byte salt."""
        return self._key.sign(data, _PSS_SHA256, hashes.SHA256())


@functools.lru_cache(maxsize=32)
def _parse_public(spki_der: bytes) -> _PyRSA.RsaKey:
    """pycryptodome's parse of a SubjectPublicKeyInfo (public data, keyed by its exact bytes)."""
    try:
        key = _PyRSA.import_key(spki_der)
    except (ValueError, IndexError, TypeError) as e:
        raise CryptoError("not an RSA public key") from e
    if key.has_private():
        raise CryptoError("expected a public key")
    if key.size_in_bits() < 2048:
        raise CryptoError("RSA public key shorter than 2048 bits")
    return key


class RSAPublicKey:
    """A public key held as its SubjectPublicKeyInfo DER."""

    def __init__(self, spki_der: bytes):
        spki_der = bytes(spki_der)
        self._py = _parse_public(spki_der)
        self.spki_der = spki_der
        self._fingerprint: str | None = None

    @property
    def bits(self) -> int:
        return self._py.size_in_bits()

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self.spki_der)
        return self._fingerprint

    def oaep_encrypt(self, plaintext: bytes, rand: RandomBytes) -> bytes:
        """RSA-OAEP-SHA256 with the OAEP seed drawn from ``rand``."""
        return _PyOAEP.new(self._py, hashAlgo=_PySHA256, randfunc=rand).encrypt(plaintext)


def rsa_pss_sign(key: RSAPrivateKey, data: bytes) -> bytes:
    """RSA-PSS with SHA-256, MGF1-SHA-256 and a 32-byte salt."""
    return key.pss_sign(data)


def rsa_pss_verify(spki_der: bytes, data: bytes, signature: bytes) -> bool:
    """Verify an RSA-PSS-SHA256 signature; False for a bad signature or a key that is not RSA."""
    try:
        key = serialization.load_der_public_key(spki_der)
    except (ValueError, UnsupportedAlgorithm):
        return False
    if not isinstance(key, _rsa.RSAPublicKey):
        return False
    try:
        key.verify(signature, data, _PSS_SHA256, hashes.SHA256())
    except (InvalidSignature, ValueError):
        return False
    return True


def rsa_encrypt(public_der: bytes, plaintext: bytes, padding_name: str = "pkcs1") -> bytes:
    """Encrypt to an RSA public key (SubjectPublicKeyInfo DER): PKCS#1 v1.5, or ``"oaep"`` (SHA-256)."""
    key = serialization.load_der_public_key(public_der)
    if not isinstance(key, _rsa.RSAPublicKey):
        raise CryptoError("encryption needs an RSA public key")
    return key.encrypt(plaintext, _OAEP_SHA256 if padding_name == "oaep" else _padding.PKCS1v15())


# ---------------------------------------------------------------- card keys (an OpenSSL key object of a PrivateKeyHandle)

_PKCS1_SSH_HASHES = {"sha256": hashes.SHA256, "sha384": hashes.SHA384, "sha512": hashes.SHA512}


def pkcs1_sign(key: _rsa.RSAPrivateKey, data: bytes, hash_name: str = "sha256") -> bytes:
    """
    RSA PKCS#1 v1.5 over ``hash_name`` (sha256, sha384, sha512) of ``data``:
    what ``openssl dgst -sign`` gives, and rsa-sha2-256/512 (RFC 8332).
    SHA-1 is deliberately not offered.
    """
    try:
        algorithm = _PKCS1_SSH_HASHES[hash_name]()
    except KeyError:
        raise CryptoError(f"unsupported PKCS#1 v1.5 hash {hash_name!r}") from None
    return key.sign(data, _padding.PKCS1v15(), algorithm)


def pkcs1_sign_sha256_digest(key: _rsa.RSAPrivateKey, digest: bytes) -> bytes:
    return key.sign(digest, _padding.PKCS1v15(), Prehashed(hashes.SHA256()))


def pkcs1_sign_sha384_digest(key: _rsa.RSAPrivateKey, digest: bytes) -> bytes:
    return key.sign(digest, _padding.PKCS1v15(), Prehashed(hashes.SHA384()))


def decrypt(key: _rsa.RSAPrivateKey, ciphertext: bytes, padding_name: str = "pkcs1") -> bytes:
    """PKCS#1 v1.5 or ``"oaep"`` (SHA-256) decryption; CryptoError if it fails."""
    try:
        return key.decrypt(ciphertext, _OAEP_SHA256 if padding_name == "oaep" else _padding.PKCS1v15())
    except ValueError as e:
        raise CryptoError("decryption failed") from e


# ---------------------------------------------------------------- the PIV raw private operation

#: DER of DigestInfo up to the digest (RFC 8017 section 9.2, note 1) -> the hash
_DIGEST_INFO = {
    bytes.fromhex("3021300906052b0e03021a05000414"): hashes.SHA1,
    bytes.fromhex("302d300d06096086480165030402040500041c"): hashes.SHA224,
    bytes.fromhex("3031300d060960864801650304020105000420"): hashes.SHA256,
    bytes.fromhex("3041300d060960864801650304020205000430"): hashes.SHA384,
    bytes.fromhex("3051300d060960864801650304020305000440"): hashes.SHA512,
}


def pkcs1_signature_hash(block: bytes) -> tuple[hashes.HashAlgorithm, bytes] | None:
    """
    If ``block`` is an EMSA-PKCS1-v1_5 encoded message (RFC 8017 9.2:
    00 01 FF..FF 00 DigestInfo, at least 8 bytes of FF) whose DigestInfo is
    one of SHA-1/224/256/384/512 with its digest and nothing after it,
    return (hash algorithm, digest); else None. The block is public (the
    host sent it).
    """
    if len(block) < 11 or block[0] != 0 or block[1] != 1:
        return None
    end = block.find(b"\x00", 2)
    if end < 10 or block[2:end].count(0xFF) != end - 2:
        return None
    info = block[end + 1:]
    for prefix, algorithm in _DIGEST_INFO.items():
        if info.startswith(prefix) and len(info) == len(prefix) + algorithm.digest_size:
            return algorithm(), info[len(prefix):]
    return None


def rsa_private_block(handle: "PrivateKeyHandle", block: bytes) -> bytes:
    """
    The RSA private operation on an already padded block of the modulus
    length (PIV GENERAL AUTHENTICATE: the host pads), inside OpenSSL.

    A PKCS#1 v1.5 signature block for SHA-1/224/256/384/512 is signed through
    ``cryptography`` (PKCS1v15 over the prehashed digest: the same bytes);
    anything else (PSS, a DigestInfo-less or unknown type-1 block such as
    TLS's MD5+SHA-1, or a ciphertext to decipher) goes to libcrypto's RSA
    without padding, with the key read in place from ``handle.der``. The
    private numbers never become Python integers. CryptoError for a block not
    of the modulus length or not below the modulus, or a key that is not RSA.
    """
    block = bytes(block)
    recognised = pkcs1_signature_hash(block)
    if recognised is None:
        return _libcrypto.rsa_private_no_padding(handle.der, block)
    key = handle.openssl_key
    if not isinstance(key, _rsa.RSAPrivateKey):
        raise CryptoError("raw RSA needs an RSA key")
    size = (key.key_size + 7) // 8
    if len(block) != size:
        raise CryptoError(f"the block must be {size} bytes (the modulus length), not {len(block)}")
    algorithm, digest = recognised
    return key.sign(digest, _padding.PKCS1v15(), Prehashed(algorithm))


def pkcs1_sign_payload(handle: "PrivateKeyHandle", payload: bytes) -> bytes:
    """
    An RSA PKCS#1 v1.5 signature (EMSA-PKCS1-v1_5 block type 1) over a
    payload the host chose, as an OpenPGP card signs: PSO:COMPUTE DIGITAL
    SIGNATURE sends a DigestInfo, INTERNAL AUTHENTICATE whatever the client
    authenticates with (at most 40 % of the modulus, spec 7.2.13). A
    recognised DigestInfo goes through ``cryptography``; anything else
    through libcrypto's raw operation (``rsa_private_block``).
    """
    key = handle.openssl_key
    if not isinstance(key, _rsa.RSAPrivateKey):
        raise CryptoError("an RSA signature needs an RSA key")
    size = (key.key_size + 7) // 8
    payload = bytes(payload)
    if not payload or len(payload) > size - 11:
        raise CryptoError(f"a PKCS#1 v1.5 payload has 1 to {size - 11} bytes, not {len(payload)}")
    block = b"\x00\x01" + b"\xff" * (size - 3 - len(payload)) + b"\x00" + payload
    return rsa_private_block(handle, block)


def rsa_private_der_from_crt(p: bytes, q: bytes, dmp1: bytes, dmq1: bytes, iqmp: bytes) -> bytes:
    """
    PKCS#8 DER of an RSA key imported as its CRT parts (a YubiKey's IMPORT
    ASYMMETRIC KEY: p, q, dP, dQ, qInv big-endian) with the exponent 65537,
    the only one a YubiKey takes: parts that are not those of (p, q, 65537)
    raise CryptoError.
    """
    der = rsa_private_der_from_parts(b"\x01\x00\x01", p, q)
    nums = serialization.load_der_private_key(der, password=None).private_numbers()
    if (nums.dmp1, nums.dmq1, nums.iqmp) != tuple(int.from_bytes(x, "big") for x in (dmp1, dmq1, iqmp)):
        raise CryptoError("the CRT parts are not those of p, q and the exponent 65537")
    return der


def rsa_private_der_from_parts(e: bytes, p: bytes, q: bytes, bits: int = 2048) -> bytes:
    """
    PKCS#8 DER of an RSA key of a ``bits``-bit modulus imported as (e, p, q)
    big-endian (OpenPGP key import, standard format). OpenSSL computes and
    checks the rest; the numbers pass through Python integers once, on
    import only. The parts come from the host: a modulus of any other size
    is refused before any arithmetic with it (the inversion and OpenSSL's
    primality tests grow with the cube of the size), and so is an exponent
    longer than the modulus.
    """
    if len(p.lstrip(b"\x00")) + len(q.lstrip(b"\x00")) > (bits + 7) // 8 + 1 or len(e.lstrip(b"\x00")) > (bits + 7) // 8:
        raise CryptoError(f"not an RSA-{bits} key")
    ei, pi, qi = (int.from_bytes(x, "big") for x in (e, p, q))
    if ei < 3 or pi < 3 or qi < 3 or pi == qi:
        raise CryptoError("not an RSA key")
    n = pi * qi
    if n.bit_length() != bits or ei >= n:
        raise CryptoError(f"not an RSA-{bits} key")
    phi = (pi - 1) * (qi - 1)
    try:
        d = pow(ei, -1, phi)
        numbers = _rsa.RSAPrivateNumbers(pi, qi, d, _rsa.rsa_crt_dmp1(d, pi), _rsa.rsa_crt_dmq1(d, qi),
                                         _rsa.rsa_crt_iqmp(pi, qi), _rsa.RSAPublicNumbers(ei, n))
        key = numbers.private_key()
    except ValueError as exc:
        raise CryptoError("not an RSA key") from exc
    return key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
