"""
Elliptic curves: X25519 (the channel's forward secrecy, keyfiles sealed to a
card) and P-256 / P-384 ECDSA / ECDH with card keys.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec as _ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, decode_dss_signature
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from vsc.crypto.errors import CryptoError
from vsc.crypto.random import RandomBytes

if TYPE_CHECKING:
    from vsc.crypto.keys import PrivateKeyHandle

# ---------------------------------------------------------------- X25519


class X25519Ephemeral:
    """An ephemeral X25519 key pair for the forward-secret handshake variant."""

    def __init__(self, rand: RandomBytes):
        self._key = X25519PrivateKey.from_private_bytes(rand(32))
        self.public = self._key.public_key().public_bytes_raw()  # Raw/Raw's bytes without the format arguments

    def exchange(self, peer_public: bytes) -> bytes:
        try:
            return self._key.exchange(X25519PublicKey.from_public_bytes(peer_public))
        except ValueError as e:
            # all-zero output: a small-order peer key (RFC 7748 section 6.1)
            raise CryptoError("X25519 exchange with an invalid public key") from e


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


# ---------------------------------------------------------------- ECDSA and ECDH with card keys


def ecdsa_sign(key: _ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    """ECDSA over SHA-256 of ``data``, DER (what ``openssl dgst -sha256 -sign`` gives)."""
    return key.sign(data, _ec.ECDSA(hashes.SHA256()))


def ecdsa_sign_sha256_digest(key: _ec.EllipticCurvePrivateKey, digest: bytes) -> bytes:
    return key.sign(digest, _ec.ECDSA(Prehashed(hashes.SHA256())))


def ecdsa_sign_sha384_digest(key: _ec.EllipticCurvePrivateKey, digest: bytes) -> bytes:
    return key.sign(digest, _ec.ECDSA(Prehashed(hashes.SHA384())))


def ecdh(key: _ec.EllipticCurvePrivateKey, peer_point: bytes) -> bytes:
    """ECDH with an uncompressed peer point on the key's curve; CryptoError for a point not on it."""
    try:
        peer = _ec.EllipticCurvePublicKey.from_encoded_point(key.curve, peer_point)
        return key.exchange(_ec.ECDH(), peer)
    except ValueError as e:
        raise CryptoError("the peer point is not on the key's curve") from e


def ecdsa_sign_hash(handle: "PrivateKeyHandle", digest: bytes) -> bytes:
    """
    ECDSA (P-256, P-384) over a hash of any length, as a PIV card signs what
    the host sends: the leftmost 256 (384) bits are used (FIPS 186-4 6.4), a
    shorter hash is taken as its integer value (left-padded with zeros, the
    same number). Returns the DER ECDSA-Sig-Value.
    """
    key = handle.openssl_key
    if not isinstance(key, _ec.EllipticCurvePrivateKey):
        raise CryptoError("ECDSA needs an EC key")
    size = (key.curve.key_size + 7) // 8
    if not digest:
        raise CryptoError("nothing to sign")
    digest = bytes(digest[:size]).rjust(size, b"\x00")
    algorithm = {32: hashes.SHA256(), 48: hashes.SHA384()}.get(size)
    if algorithm is None:
        raise CryptoError(f"unsupported curve size {size}")
    return key.sign(digest, _ec.ECDSA(Prehashed(algorithm)))


def ecdsa_der_to_rs(signature: bytes) -> tuple[int, int]:
    """A DER ECDSA signature (as ``sign_digest`` gives) -> (r, s)."""
    try:
        return decode_dss_signature(signature)
    except ValueError as e:
        raise CryptoError("not a DER ECDSA signature") from e


def _private_der_from_scalar(scalar: bytes, curve: _ec.EllipticCurve, name: str) -> bytes:
    try:
        key = _ec.derive_private_key(int.from_bytes(bytes(scalar), "big"), curve)
    except ValueError as e:
        raise CryptoError(f"not a {name} private scalar") from e
    return key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def p256_private_der_from_scalar(scalar: bytes) -> bytes:
    """PKCS#8 DER of a P-256 key imported as its private scalar (OpenPGP key import, tag 92; PIV import, tag 06)."""
    return _private_der_from_scalar(scalar, _ec.SECP256R1(), "P-256")


def p384_private_der_from_scalar(scalar: bytes) -> bytes:
    """PKCS#8 DER of a P-384 key imported as its private scalar (PIV import, tag 06); CryptoError for 0 or >= n."""
    return _private_der_from_scalar(scalar, _ec.SECP384R1(), "P-384")
