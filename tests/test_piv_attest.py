"""
PIV attestation (YubiKey INS F9, firmware 4.3+) on the applet: ``00 F9 slot 00`` answers an X.509 certificate
for a key generated on the card, signed by the card's attestation key in slot F9, whose self-signed certificate
is object 5FFF01. What a YubiKey 5 answers: developers.yubico.com/PIV/Introduction/PIV_attestation.html and the
5.x example in Yubico.NET.SDK docs/users-manual/application-piv/apdu/attest.md (subject "YubiKey PIV Attestation
9c", issuer and dates of the F9 certificate, a 16-byte serial, extensions 3.3 = 05 02 04, 3.7 = 02 04 <serial>,
3.8 = <PIN policy> <touch policy>, 3.9 = <form factor>, nothing else); refusals: Yubico.NET.SDK issue 9 (6A80 for
an empty slot and for an imported key). vsc cannot hold Yubico's CA key: the chain ends at the card's own F9 key.
"""

from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding

from tests.test_piv import EC_KEY
from tests.test_review_fidelity import SealingCard, _import_data
from vsc import crypto
from vsc.protocol import piv
from vsc.wire import tlv
from vsc.wire.protected import ItemKind

YUBICO = "1.3.6.1.4.1.41482.3."


class AttestingCard(SealingCard):
    """FakeCard that performs Certify as vsc.card.vpcd does: the signer slot's key issues the certificate."""

    def perform(self, effect):
        if isinstance(effect, piv.Certify):
            self.ops += 1
            der = self.items[(ItemKind.KEY, effect.signer)][0]
            with crypto.PrivateKeyHandle(bytearray(der)) as key:
                if not effect.issuer:
                    return crypto.attestation_ca_certificate(key, effect.subject, effect.serial)
                return crypto.attestation_certificate(key, effect.issuer, effect.public, effect.subject,
                                                      effect.serial, effect.extensions)
        return super().perform(effect)


@pytest.fixture
def card() -> AttestingCard:
    c = AttestingCard()
    assert c.select()[1] == 0x9000
    return c


def _attest(card, slot: int) -> tuple[bytes, int]:
    return card.get_all(0xF9, slot, 0x00)


def _f9_certificate(card) -> x509.Certificate:
    body, sw = card.get_data(piv.TAG_ATTEST_CERT)
    assert sw == 0x9000
    return x509.load_der_x509_certificate(tlv.to_dict(tlv.decode_one(body, 0x53))[0x70])


def test_attest_a_generated_key_as_a_yubikey_5_does(card):
    """
    ATTEST 9A after GENERATE (no PIN, no management key for the attestation itself): a DER certificate whose public
    key is 9A's, subject CN "YubiKey PIV Attestation 9a", issuer and validity those of the F9 certificate read from
    5FFF01, a 16-byte serial, exactly the four Yubico extensions, non-critical, with a YubiKey 5.4.3's encodings
    (3.3 = 05 04 03; 3.7 = DER INTEGER of GET SERIAL's number; 3.8 = the slot's PIN policy (here always, 03, set
    with GENERATE's AA), touch never (01); 3.9 = one byte), signed by the F9 key (SHA256-PKCS#1 v1.5, RSA-2048 as a YubiKey's attestation key).
    """
    card.mgmt_auth()
    template = tlv.encode(0xAC, tlv.encode(0x80, b"\x11") + tlv.encode(0xAA, b"\x03"))  # --pin-policy=always
    assert card.get_all(0x47, 0x00, 0x9A, template)[1] == 0x9000
    card.applet.reset()
    card.select()
    body, sw = _attest(card, 0x9A)
    assert sw == 0x9000
    cert = x509.load_der_x509_certificate(body)
    ca = _f9_certificate(card)
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert spki == card.items[(ItemKind.KEY, "9a")][2]
    assert cert.subject.rfc4514_string() == "CN=YubiKey PIV Attestation 9a"
    assert cert.issuer == ca.subject and ca.subject == ca.issuer  # the card's own, self-signed F9 certificate
    assert ca.subject.rfc4514_string() == f"CN=vsc PIV Attestation {card.applet.serial}"
    assert (cert.not_valid_before_utc, cert.not_valid_after_utc) == (ca.not_valid_before_utc, ca.not_valid_after_utc)
    assert cert.version is x509.Version.v3 and 2 ** 120 <= cert.serial_number < 2 ** 128
    exts = [(e.oid.dotted_string, e.critical, e.value.value) for e in cert.extensions]
    serial = card.applet.serial_number()
    assert exts == [
        (YUBICO + "3", False, bytes([5, 4, 3])),
        (YUBICO + "7", False, b"\x02" + bytes([len(serial.to_bytes(serial.bit_length() // 8 + 1, "big"))])
         + serial.to_bytes(serial.bit_length() // 8 + 1, "big")),
        (YUBICO + "8", False, b"\x03\x01"),  # the slot's PIN policy (always, chosen at GENERATE), touch never
        (YUBICO + "9", False, b"\x00"),
    ]


def test_the_f9_key_is_made_once_sealed_and_synced(card):
    """
    The first ATTEST makes the card's attestation key (stored as key "f9" through the ordinary Store path the glue
    seals and syncs) and writes its self-signed certificate to 5FFF01 (a synced Store) before answering; later
    attestations store nothing and are signed by the same key; the F9 certificate is a CA (basic constraints) and
    verifies under its own key.
    """
    first, sw = _attest(card, 0x9C)
    assert sw == 0x9000
    assert (ItemKind.KEY, "f9") in card.items
    stored = [(s.kind, s.name) for s in card.stores]
    assert stored == [(ItemKind.DATA, "piv-5fff01")]  # (the key itself came through Generate, stored by the glue)
    f9 = card.items[(ItemKind.KEY, "f9")][2]
    ca = _f9_certificate(card)
    ca_pub = ca.public_key()
    assert ca_pub.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) == f9
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    ca_pub.verify(ca.signature, ca.tbs_certificate_bytes, padding.PKCS1v15(), hashes.SHA256())
    card.stores.clear()
    second, sw = _attest(card, 0x9C)
    assert sw == 0x9000 and card.stores == [] and second != first  # a fresh serial each time
    for der in (first, second):
        cert = x509.load_der_x509_certificate(der)
        ca_pub.verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(), hashes.SHA256())
        # 9C under FakeCard's policy (no policy item: LEGACY, 9C once)
        assert cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(YUBICO + "8")).value.value == b"\x02\x01"


def test_attest_refusals(card):
    """
    A YubiKey attests only keys generated on it: an imported key (IMPORT ASYMMETRIC KEY) and an empty slot answer
    6A80 (Yubico.NET.SDK issue 9, go-piv's Attest); nothing is generated or stored for them. A P1 that is no key
    slot (F9 itself, 9B, 96) or P2 other than 00 answers 6A86. Before SELECT: 6D00.
    """
    card.mgmt_auth()
    assert card.send(0xFE, 0x11, 0x9E, _import_data(EC_KEY)) == (b"", 0x9000)
    card.stores.clear()
    assert _attest(card, 0x9E) == (b"", 0x6A80)
    assert _attest(card, 0x82) == (b"", 0x6A80)  # a retired slot without a key
    for p1 in (0xF9, 0x9B, 0x96, 0x80):
        assert _attest(card, p1) == (b"", 0x6A86), hex(p1)
    assert card.send(0xF9, 0x9A, 0x01) == (b"", 0x6A86)
    assert card.stores == [] and (ItemKind.KEY, "f9") not in card.items
    assert AttestingCard().send(0xF9, 0x9A, 0x00) == (b"", 0x6D00)


def test_attest_under_a_certificate_the_holder_put_into_5fff01(card):
    """
    A YubiKey issues attestations under whatever certificate 5FFF01 holds ("Issuer will be the subject of the
    attesting certificate; dates will be copied from it"): after PUT DATA 5FFF01 (behind the management key) with a
    certificate of the F9 key from another CA, the attestation's issuer and dates follow it. A 5FFF01 that is no
    certificate object answers 6A80 rather than attesting under nothing.
    """
    assert _attest(card, 0x9A)[1] == 0x9000  # makes the F9 key
    f9_der = card.items[(ItemKind.KEY, "f9")][0]
    with crypto.PrivateKeyHandle(bytearray(f9_der)) as key:
        other = crypto.attestation_ca_certificate(key, "Example Attestation CA", 7)
    card.mgmt_auth()
    put = tlv.encode(0x5C, tlv.tag_bytes(0x5FFF01)) + tlv.encode(0x53, tlv.encode_many([(0x70, other),
                                                                                        (0x71, b"\x00")]))
    assert card.send(0xDB, 0x3F, 0xFF, put) == (b"", 0x9000)
    cert = x509.load_der_x509_certificate(_attest(card, 0x9A)[0])
    assert cert.issuer.rfc4514_string() == "CN=Example Attestation CA"
    bad = tlv.encode(0x5C, tlv.tag_bytes(0x5FFF01)) + tlv.encode(0x53, b"\x01\x02\x03")
    assert card.send(0xDB, 0x3F, 0xFF, bad) == (b"", 0x9000)
    assert _attest(card, 0x9A) == (b"", 0x6A80)


def test_the_attestation_key_is_no_signing_slot(card):
    """
    F9 signs attestations only: GENERAL AUTHENTICATE with F9, GENERATE into F9 and GET METADATA of F9 stay 6A88
    (a local program must not make the card's attestation key sign what it chooses).
    """
    assert _attest(card, 0x9A)[1] == 0x9000
    assert card.verify(b"123456") == 0x9000
    assert card.general_authenticate(0x07, 0xF9, 0x81, b"\x00\x01" + b"\xff" * 254)[1] == 0x6A88
    card.mgmt_auth()
    assert card.send(0x47, 0x00, 0xF9, tlv.encode(0xAC, tlv.encode(0x80, b"\x07")))[1] == 0x6A88
    assert card.send(0xF7, 0x00, 0xF9) == (b"", 0x6A88)
