"""X.509: subjects, self-signed certificates for card keys, certificate and certification-request forms."""

from __future__ import annotations

import datetime as _dt

from cryptography import x509 as _x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa as _rsa
from cryptography.x509.oid import NameOID as _NameOID

from vsc.crypto.errors import CryptoError
from vsc.crypto.random import RandomBytes

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
