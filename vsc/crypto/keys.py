"""
Card key pairs: generation, a private key loaded for ONE operation
(``PrivateKeyHandle``), public key forms (PEM, numbers, OpenSSH parts, kind)
and signature checks.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec as _ec
from cryptography.hazmat.primitives.asymmetric import ed25519 as _ed25519
from cryptography.hazmat.primitives.asymmetric import padding as _padding
from cryptography.hazmat.primitives.asymmetric import rsa as _rsa
from cryptography.hazmat.primitives.asymmetric import x25519 as _x25519

from vsc.crypto import ec, rsa
from vsc.crypto.errors import CryptoError

KEY_RSA2048 = "rsa2048"
KEY_P256 = "p256"
KEY_P384 = "p384"
KEY_ED25519 = "ed25519"
KEY_X25519 = "x25519"


def generate_private_der(kind: str) -> bytes:
    """A new key pair as PKCS#8 DER (used by the short-lived enrolment process)."""
    if kind == KEY_RSA2048:
        key = _rsa.generate_private_key(public_exponent=65537, key_size=2048)
    elif kind == KEY_P256:
        key = _ec.generate_private_key(_ec.SECP256R1())
    elif kind == KEY_P384:
        key = _ec.generate_private_key(_ec.SECP384R1())
    elif kind == KEY_ED25519:
        key = _ed25519.Ed25519PrivateKey.generate()
    elif kind == KEY_X25519:
        key = _x25519.X25519PrivateKey.generate()
    else:
        raise ValueError(f"unknown key kind {kind!r}")
    return key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


class PrivateKeyHandle:
    """
    A private key given as its DER buffer (PKCS#8; typically a memoryview of
    locked memory) for ONE operation. Use it as a context manager and drop it
    right after; it never copies the DER into a Python object.

    ``openssl_key`` loads the key into OpenSSL (``cryptography``) on first
    use: OpenSSL cleanses its copy when the key object is freed. The PIV raw
    RSA operation on a non-PKCS#1 block reads ``der`` in libcrypto instead,
    and never loads it here.
    """

    def __init__(self, der_buffer):
        self._der = der_buffer
        self._key = None

    def __enter__(self) -> "PrivateKeyHandle":
        return self

    def __exit__(self, *exc) -> None:
        self._key = None
        self._der = None

    @property
    def der(self):
        if self._der is None:
            raise CryptoError("the key was already put away")
        return self._der

    @property
    def openssl_key(self):
        if self._key is None:
            try:
                # OpenSSL's RSA key check costs 40-100 ms per load (it dominated
                # every RSA signature). These keys were checked when they were
                # generated or imported, and every load comes out of
                # AES-GCM-authenticated storage, so a tampered key cannot reach
                # this point: skip the repeated check.
                self._key = serialization.load_der_private_key(self.der, password=None,
                                                               unsafe_skip_rsa_key_validation=True)
            except (ValueError, TypeError, UnsupportedAlgorithm) as e:
                raise CryptoError("the private key does not parse") from e
        return self._key

    def sign_sha256(self, data: bytes) -> bytes:
        """What ``openssl dgst -sha256 -sign`` gives: PKCS#1 v1.5 for RSA, DER ECDSA for EC."""
        key = self.openssl_key
        if isinstance(key, _rsa.RSAPrivateKey):
            return rsa.pkcs1_sign(key, data, "sha256")
        return ec.ecdsa_sign(key, data)

    def sign_digest(self, digest: bytes) -> bytes:
        """
        Sign a precomputed SHA-256 digest (32 bytes): the same signature
        ``sign_sha256`` gives over the data (PKCS#1 v1.5 for RSA, DER ECDSA
        for EC, P-256 or P-384), i.e. ``openssl dgst -sha256 -sign``. A
        48-byte digest is taken as SHA-384 (``openssl dgst -sha384 -sign``:
        the natural hash of a P-384 key, FIPS 186-4 / SP 800-57's matching
        strength), for RSA and EC keys alike.
        """
        if len(digest) not in (32, 48):
            raise CryptoError("a SHA-256 digest is 32 bytes (SHA-384: 48)")
        key = self.openssl_key
        if isinstance(key, _rsa.RSAPrivateKey):
            if len(digest) == 48:
                return rsa.pkcs1_sign_sha384_digest(key, digest)
            return rsa.pkcs1_sign_sha256_digest(key, digest)
        if not isinstance(key, _ec.EllipticCurvePrivateKey):
            raise CryptoError("signing a digest needs an RSA or EC key")
        if len(digest) == 48:
            return ec.ecdsa_sign_sha384_digest(key, digest)
        return ec.ecdsa_sign_sha256_digest(key, digest)

    def sign_pkcs1(self, data: bytes, hash_name: str) -> bytes:
        """RSA PKCS#1 v1.5 over sha256, sha384 or sha512 of ``data`` (rsa-sha2-256/512, RFC 8332)."""
        key = self.openssl_key
        if not isinstance(key, _rsa.RSAPrivateKey):
            raise CryptoError("PKCS#1 v1.5 signing needs an RSA key")
        return rsa.pkcs1_sign(key, data, hash_name)

    def decrypt(self, ciphertext: bytes, padding_name: str = "pkcs1") -> bytes:
        key = self.openssl_key
        if not isinstance(key, _rsa.RSAPrivateKey):
            raise CryptoError("decryption needs an RSA key")
        return rsa.decrypt(key, ciphertext, padding_name)

    def ecdh(self, peer_point: bytes) -> bytes:
        key = self.openssl_key
        if not isinstance(key, _ec.EllipticCurvePrivateKey):
            raise CryptoError("ECDH needs an EC key")
        return ec.ecdh(key, peer_point)

    def eddsa_sign(self, data: bytes) -> bytes:
        """Ed25519 (RFC 8032, pure) over ``data``: R || S, 64 bytes."""
        key = self.openssl_key
        if not isinstance(key, _ed25519.Ed25519PrivateKey):
            raise CryptoError("EdDSA needs an Ed25519 key")
        return key.sign(bytes(data))

    def x25519(self, peer_public: bytes) -> bytes:
        """X25519 (RFC 7748) with a 32-byte peer public key; CryptoError for a bad or small-order peer key."""
        key = self.openssl_key
        if not isinstance(key, _x25519.X25519PrivateKey):
            raise CryptoError("X25519 needs an X25519 key")
        try:
            return key.exchange(_x25519.X25519PublicKey.from_public_bytes(bytes(peer_public)))
        except ValueError as e:
            raise CryptoError("X25519 with an invalid peer key") from e


# ---------------------------------------------------------------- public keys


def _load_public(public_der: bytes):
    try:
        return serialization.load_der_public_key(public_der)
    except (ValueError, UnsupportedAlgorithm) as e:
        raise CryptoError("not a public key (SubjectPublicKeyInfo DER)") from e


def _spki(key) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def public_der_of(private_der) -> bytes:
    """The SubjectPublicKeyInfo DER of a PKCS#8 private key."""
    return _spki(serialization.load_der_private_key(private_der, password=None).public_key())


def public_pem(public_der: bytes) -> bytes:
    return serialization.load_der_public_key(public_der).public_bytes(serialization.Encoding.PEM,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo)


def public_der_from_pem(pem: bytes) -> bytes:
    return _spki(serialization.load_pem_public_key(pem))


def public_kind(public_der: bytes) -> str:
    key = serialization.load_der_public_key(public_der)
    if isinstance(key, _rsa.RSAPublicKey):
        return f"rsa{key.key_size}"
    if isinstance(key, _ec.EllipticCurvePublicKey):
        return {"secp256r1": KEY_P256, "secp384r1": KEY_P384}.get(key.curve.name, key.curve.name)
    if isinstance(key, _ed25519.Ed25519PublicKey):
        return KEY_ED25519
    if isinstance(key, _x25519.X25519PublicKey):
        return KEY_X25519
    return "unknown"


def public_numbers(public_der: bytes) -> dict:
    """``{"rsa": (modulus, exponent)}`` as big-endian bytes, ``{"ec": uncompressed point}``, or the raw 32 bytes
    of an Ed25519 / X25519 key as ``{"ed25519": ...}`` / ``{"x25519": ...}``."""
    key = serialization.load_der_public_key(public_der)
    if isinstance(key, _rsa.RSAPublicKey):
        nums = key.public_numbers()
        return {"rsa": (nums.n.to_bytes((nums.n.bit_length() + 7) // 8, "big"),
                        nums.e.to_bytes((nums.e.bit_length() + 7) // 8, "big"))}
    if isinstance(key, _ec.EllipticCurvePublicKey):
        return {"ec": key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)}
    if isinstance(key, _ed25519.Ed25519PublicKey):
        return {"ed25519": key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)}
    if isinstance(key, _x25519.X25519PublicKey):
        return {"x25519": key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)}
    raise CryptoError("unsupported public key type")


def ssh_public_parts(public_der: bytes) -> tuple:
    """
    The numbers of an OpenSSH public key blob (RFC 4253 6.6, RFC 5656 3.1):
    ``("rsa", e, n)`` for RSA, ``("nistp256", uncompressed point)`` for
    P-256, ``("nistp384", uncompressed point)`` for P-384.
    """
    key = _load_public(public_der)
    if isinstance(key, _rsa.RSAPublicKey):
        nums = key.public_numbers()
        return ("rsa", nums.e, nums.n)
    curve = {"secp256r1": "nistp256", "secp384r1": "nistp384"}.get(key.curve.name) \
        if isinstance(key, _ec.EllipticCurvePublicKey) else None
    if curve is not None:
        return (curve, key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint))
    raise CryptoError("no OpenSSH form for this public key (RSA, P-256 and P-384 only)")


def verify_sha256(public_der: bytes, data: bytes, signature: bytes) -> bool:
    """
    Check a PKCS#1 v1.5 (RSA) or DER ECDSA (EC) signature over SHA-256 of
    ``data``; False for a bad signature or a key that does not load.
    """
    try:
        key = serialization.load_der_public_key(public_der)
    except (ValueError, UnsupportedAlgorithm):
        return False
    try:
        if isinstance(key, _rsa.RSAPublicKey):
            key.verify(signature, data, _padding.PKCS1v15(), hashes.SHA256())
        elif isinstance(key, _ec.EllipticCurvePublicKey):
            key.verify(signature, data, _ec.ECDSA(hashes.SHA256()))
        else:
            return False
    except (InvalidSignature, ValueError):
        return False
    return True
