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
    start = _dt.datetime.fromtimestamp(int(now), _dt.timezone.utc)
    serial = int.from_bytes(rand(16), "big") >> 1 or 1
    is_rsa = isinstance(key, _rsa.RSAPrivateKey)
    return _self_signed(key, common_name, serial, start - _dt.timedelta(minutes=5), start + _dt.timedelta(days=days),
                        ca=False, usage=dict(digital_signature=True, key_encipherment=is_rsa, key_agreement=not is_rsa))


def _self_signed(key, common_name: str, serial: int, not_before, not_after, ca: bool, usage: dict) -> bytes:
    """A self-signed certificate (DER): subject = issuer = CN ``common_name``, basic constraints and key usage
    (the ``usage`` flags set, every other off) critical, signed with SHA-256 (RSA: PKCS#1 v1.5, EC: ECDSA)."""
    name = _x509.Name([_x509.NameAttribute(_NameOID.COMMON_NAME, common_name)])
    flags = dict(digital_signature=False, content_commitment=False, key_encipherment=False, data_encipherment=False,
                 key_agreement=False, key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False)
    flags.update(usage)
    cert = (
        _x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(_x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
        .add_extension(_x509.KeyUsage(**flags), critical=True)
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


#: the validity of a YubiKey's factory attestation certificate in slot F9 (Yubico PIV Attestation: 2016-03-14 to
#: 2052-04-17); vsc's own F9 certificate uses the same fixed dates, so issuing it needs no clock
ATTESTATION_NOT_BEFORE = _dt.datetime(2016, 3, 14, tzinfo=_dt.timezone.utc)
ATTESTATION_NOT_AFTER = _dt.datetime(2052, 4, 17, tzinfo=_dt.timezone.utc)


def attestation_ca_certificate(private_key, common_name: str, serial: int) -> bytes:
    """
    The self-signed certificate of a card's attestation key (PIV slot F9, object 5FFF01): subject = issuer =
    ``common_name``, the fixed validity of ATTESTATION_NOT_BEFORE..AFTER, CA (basic constraints, critical) with
    keyCertSign. ``private_key``: the key's handle (vsc.crypto.PrivateKeyHandle) or a ``cryptography`` key.
    """
    key = getattr(private_key, "openssl_key", private_key)
    # RSA: SHA256-PKCS#1 v1.5, EC: ECDSA-SHA256, as a YubiKey signs attestations
    return _self_signed(key, common_name, serial, ATTESTATION_NOT_BEFORE, ATTESTATION_NOT_AFTER,
                        ca=True, usage=dict(key_cert_sign=True))


def attestation_certificate(private_key, issuer_der: bytes, public_der: bytes, common_name: str, serial: int,
                            extensions: tuple[tuple[str, bytes], ...]) -> bytes:
    """
    A YubiKey-style PIV attestation certificate (developers.yubico.com/PIV/Introduction/PIV_attestation.html, and
    a YubiKey 5's answer in Yubico.NET.SDK apdu/attest.md): the attested ``public_der``, subject ``common_name``
    ("YubiKey PIV Attestation 9a"), issuer and validity copied from the attesting certificate ``issuer_der`` (the
    F9 certificate), serial ``serial``, the ``extensions`` (OID text, raw extnValue) non-critical and in the given
    order and no others, signed by ``private_key`` (the F9 key) with SHA-256. CryptoError for an issuer
    certificate that does not parse.
    """
    key = getattr(private_key, "openssl_key", private_key)
    try:
        issuer = _x509.load_der_x509_certificate(bytes(issuer_der))
        subject_key = serialization.load_der_public_key(bytes(public_der))
    except ValueError as e:
        raise CryptoError(f"attestation: {e}") from None
    builder = (
        _x509.CertificateBuilder()
        .subject_name(_x509.Name([_x509.NameAttribute(_NameOID.COMMON_NAME, common_name)]))
        .issuer_name(issuer.subject)
        .public_key(subject_key)
        .serial_number(serial)
        .not_valid_before(issuer.not_valid_before_utc)
        .not_valid_after(issuer.not_valid_after_utc)
    )
    for oid, value in extensions:
        builder = builder.add_extension(_x509.UnrecognizedExtension(_x509.ObjectIdentifier(oid), bytes(value)),
                                        critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)
