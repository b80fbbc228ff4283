"""A software vendor's Ed25519 key, which signs licence keyfiles (vsc license keygen / sign / verify)."""

from __future__ import annotations

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from vsc.crypto.errors import CryptoError


def vendor_keygen() -> tuple[bytes, bytes]:
    """A software vendor's Ed25519 signing key: (private PKCS#8 PEM, public SPKI PEM)."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, public


def vendor_sign(private_pem: bytes, data: bytes) -> bytes:
    key = serialization.load_pem_private_key(private_pem, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise CryptoError("the vendor key must be an Ed25519 private key (vsc license keygen)")
    return key.sign(data)


def _public(public_pem: bytes) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(public_pem)
    if not isinstance(key, Ed25519PublicKey):
        raise CryptoError("the vendor public key must be Ed25519")
    return key


def vendor_public_der(public_pem: bytes) -> bytes:
    return _public(public_pem).public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def vendor_verify(public_pem: bytes, data: bytes, signature: bytes) -> bool:
    try:
        _public(public_pem).verify(signature, data)
    except InvalidSignature:
        return False
    return True
