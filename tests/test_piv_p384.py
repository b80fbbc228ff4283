"""
ECC P-384 in the PIV application (algorithm 14, SP 800-78-4 table 6-2), as a
YubiKey 4/5 has it: GENERATE, IMPORT ASYMMETRIC KEY (YubiKey FE), GENERAL
AUTHENTICATE (ECDSA sign, ECDH), GET METADATA (YubiKey F7), driven through
tests/test_piv.py's FakeCard (the applet over a dictionary of items) and,
for GENERATE, through the vpcd glue on a real CardMemory.

Sources for the YubiKey's answers: yubikit (yubikey-manager) piv.py —
KEY_TYPE.ECCP384 = 0x14, ``_pad_message`` (an EC hash longer than the field
is truncated to it; a shorter one is sent as it is: its ``rjust(byte_len //
8)`` pads nothing), ``put_key`` (the scalar as exactly byte_len bytes),
``calculate_secret`` (the peer's uncompressed point under tag 85) — and its
device test ``TestCertificateSignatures`` (ECCP384 with SHA-256, SHA-384 and
SHA-512 on a real YubiKey: so a YubiKey signs a 32-byte SHA-256 hash with a
P-384 key, as the integer value of the hash); yubico-piv-tool lib/ykpiv.c
``_general_authenticate`` (ECCP384: key_len 48, a longer input truncated to
48, ECDH only with a 97-byte point); Yubico.NET.SDK apdu/auth-sign.md and
PivSession.KeyAgree (the shared secret is the 48-byte x coordinate).
"""

from __future__ import annotations

import hashlib

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from tests.test_piv import (  # noqa: F401  (session: the glue fixture)
    EC_KEY,
    PIN,
    FakeCard,
    _der,
    _exchange,
    _link,
    session,
)
from tests.test_review_fidelity import SealingCard
from vsc import crypto
from vsc.wire import apdu, tlv
from vsc.wire.protected import ItemKind, KeyAlg

P384_KEY = ec.derive_private_key(int.from_bytes(hashlib.sha384(b"vsc p-384 test key").digest(), "big"),
                                 ec.SECP384R1())
P384_PUBLIC = crypto.public_der_of(_der(P384_KEY))
P384_POINT = P384_KEY.public_key().public_bytes(serialization.Encoding.X962,
                                                serialization.PublicFormat.UncompressedPoint)
N384 = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF581A0DB248B0A77AECEC196ACCC52973


def _scalar(key, size: int = 48) -> bytes:
    return key.private_numbers().private_value.to_bytes(size, "big")


@pytest.fixture
def card() -> FakeCard:
    """SealingCard (stores copied, as the glue seals them) with the P-384 key in 9C and 9E; 9A/9D stay RSA-2048."""
    c = SealingCard(certs=False)
    for slot in ("9c", "9e"):
        c.items[(ItemKind.KEY, slot)] = (_der(P384_KEY), KeyAlg.P384, P384_PUBLIC)
    assert c.select()[1] == 0x9000
    return c


def _verify(signature: bytes, value: bytes, algorithm) -> None:
    P384_KEY.public_key().verify(signature, value, ec.ECDSA(Prehashed(algorithm)))


# ---------------------------------------------------------------- GENERATE


def test_generate_p384_answers_the_97_byte_point(card):
    """
    ``00 47 00 9A  AC 03 80 01 14``: 9000 with 7F49 { 86 61 04 X Y } (the
    uncompressed P-384 point, 97 bytes: yubikit _parse_device_public_key,
    SP 800-73-4 table 23); the slot then holds a P-384 key that signs.
    """
    card.mgmt_auth()
    body, sw = card.get_all(0x47, 0x00, 0x9A, tlv.encode(0xAC, tlv.encode(0x80, b"\x14")))
    assert sw == 0x9000
    assert body[:5] == bytes.fromhex("7f49638661") and len(body) == 5 + 97
    point = tlv.to_dict(tlv.decode_one(body, 0x7F49))[0x86]
    der, alg, public = card.items[(ItemKind.KEY, "9a")]
    assert alg is KeyAlg.P384 and crypto.public_kind(public) == crypto.KEY_P384
    assert crypto.public_numbers(public)["ec"] == point
    assert card.notices[-1].fields["alg"] == "p384"
    card.verify(PIN)
    digest = hashlib.sha384(b"generated").digest()
    sig, sw = card.general_authenticate(0x14, 0x9A, 0x81, digest)
    assert sw == 0x9000
    ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP384R1(), point).verify(
        sig, digest, ec.ECDSA(Prehashed(hashes.SHA384())))


def test_generate_p384_needs_the_management_key(card):
    """As every GENERATE (SP 800-73-4 3.3.2): 6982 without the management key, nothing made."""
    before = dict(card.items)
    assert card.send(0x47, 0x00, 0x9A, tlv.encode(0xAC, tlv.encode(0x80, b"\x14")))[1] == 0x6982
    assert card.items == before


def test_glue_generate_p384_stores_a_p384_key(session):  # noqa: F811
    """Through vsc.card.vpcd: GENERATE 14 seals a P-384 PKCS#8 key (KeyAlg.P384) whose point the answer carries."""
    proto, transport = _link(session)
    applet = proto.card.applet
    applet.selected = True
    applet.mgmt.witness_sent(b"w" * 8)
    applet.mgmt.accept()
    (answer,) = _exchange(proto, transport,
                          apdu.command(0, 0x47, 0, 0x9D, tlv.encode(0xAC, tlv.encode(0x80, b"\x14")), 256))
    body, sw = apdu.parse_response(answer)
    assert sw == 0x9000
    point = tlv.to_dict(tlv.decode_one(body, 0x7F49))[0x86]
    (alg, public), = [(a, p) for k, n, a, p in session.memory.items() if k is ItemKind.KEY and n == "9d"]
    assert alg is KeyAlg.P384 and len(point) == 97 and crypto.public_numbers(public)["ec"] == point


# ---------------------------------------------------------------- GENERAL AUTHENTICATE: sign


@pytest.mark.parametrize("name", ["sha384", "sha256", "sha512", "sha1"])
def test_sign_hash_lengths(card, name):
    """
    What yubikit and yubico-piv-tool send a P-384 key is signed the way a
    YubiKey does (yubikit's device test signs certificates with ECCP384 and
    SHA-256/384/512 and verifies them with ``ECDSA(hash)``): a 48-byte
    SHA-384 hash as it is; a shorter hash (SHA-256, SHA-1: yubikit sends
    it unpadded) as its integer value; the 48 leftmost bytes of a SHA-512
    hash (yubikit truncates; FIPS 186-4 6.4). Each verifies under the public
    key with the hash's own ECDSA, as openssl and yubikit check it.
    """
    card.verify(PIN)
    digest = hashlib.new(name, b"p-384 data").digest()
    sig, sw = card.general_authenticate(0x14, 0x9E, 0x81, digest)
    assert sw == 0x9000 and sig[0] == 0x30
    algorithm = {"sha384": hashes.SHA384(), "sha256": hashes.SHA256(), "sha512": hashes.SHA512(),
                 "sha1": hashes.SHA1()}[name]
    P384_KEY.public_key().verify(sig, b"p-384 data", ec.ECDSA(algorithm))


def test_sign_32_and_49_byte_values(card):
    """
    A 32-byte value is signed as the 384-bit integer it is (left-padded with
    zeros: the same e of FIPS 186-4 6.4), which is what a YubiKey answers a
    SHA-256 hash for its P-384 key (9000, yubikit's device test); a 49-byte
    value, which neither tool sends (both cut the input to 48 first), is
    signed over its 48 leftmost bytes — the last byte changes nothing,
    the first one does.
    """
    short = bytes(range(1, 33))
    sig, sw = card.general_authenticate(0x14, 0x9E, 0x81, short)
    assert sw == 0x9000
    _verify(sig, short.rjust(48, b"\x00"), hashes.SHA384())
    long = bytes(range(100, 149))
    sig, sw = card.general_authenticate(0x14, 0x9E, 0x81, long)
    assert sw == 0x9000
    _verify(sig, long[:48], hashes.SHA384())
    with pytest.raises(Exception):
        _verify(sig, long[1:], hashes.SHA384())


def test_sign_refusals(card):
    """
    Nothing to sign, or more than a SHA-512 hash (64 bytes): 6A80, no key
    operation. The algorithm in P1 must be the slot's: 11 on a P-384 slot,
    14 on a P-256 or RSA slot is 6A86 (yubikit _use_private_key's
    INCORRECT_PARAMETERS), as for P-256.
    """
    assert card.general_authenticate(0x14, 0x9E, 0x81, b"")[1] == 0x6A80
    assert card.general_authenticate(0x14, 0x9E, 0x81, bytes(65))[1] == 0x6A80
    assert card.general_authenticate(0x11, 0x9E, 0x81, bytes(32))[1] == 0x6A86
    assert card.general_authenticate(0x14, 0x9A, 0x81, bytes(48))[1] == 0x6A86
    p256 = FakeCard()
    p256.select()
    assert p256.general_authenticate(0x14, 0x9E, 0x81, bytes(48))[1] == 0x6A86
    assert card.ops == 0 and p256.ops == 0


def test_sign_follows_the_pin_policy(card):
    """
    The PIN policy is the slot's, whatever its key type: FakeCard's 9C (no
    policy stored: once) answers 6982 until a VERIFY, and again after a new
    SELECT (SP 800-73-4 3.2.4; a YubiKey's PIN-once slots); 9E (never) signs
    without it.
    """
    digest = hashlib.sha384(b"x").digest()
    assert card.general_authenticate(0x14, 0x9C, 0x81, digest)[1] == 0x6982
    assert card.ops == 0
    assert card.verify(PIN) == 0x9000
    assert card.general_authenticate(0x14, 0x9C, 0x81, digest)[1] == 0x9000
    assert card.select()[1] == 0x9000
    assert card.general_authenticate(0x14, 0x9C, 0x81, digest)[1] == 0x6982
    assert card.general_authenticate(0x14, 0x9E, 0x81, digest)[1] == 0x9000
    assert card.ops == 2


# ---------------------------------------------------------------- GENERAL AUTHENTICATE: ECDH


def test_ecdh_p384(card):
    """
    ``7C { 82 00, 85 61 04 X Y }`` with algorithm 14: 82 holds the 48-byte
    shared x coordinate (Yubico.NET.SDK KeyAgree; yubikit calculate_secret),
    the same as cryptography's ECDH. A 65-byte (P-256) point, a 96-byte one,
    a compressed one, and a point off the curve are 6A80 (yubico-piv-tool
    refuses any other size before sending).
    """
    card.verify(PIN)
    peer = ec.derive_private_key(987654321, ec.SECP384R1())
    point = peer.public_key().public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    secret, sw = card.general_authenticate(0x14, 0x9E, 0x85, point)
    assert sw == 0x9000 and len(secret) == 48
    assert secret == peer.exchange(ec.ECDH(), P384_KEY.public_key())
    p256_point = EC_KEY.public_key().public_bytes(serialization.Encoding.X962,
                                                  serialization.PublicFormat.UncompressedPoint)
    compressed = peer.public_key().public_bytes(serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint)
    off_curve = point[:-1] + bytes([point[-1] ^ 1])
    for bad in (p256_point, point[:-1], compressed, b"\x02" + point[1:], off_curve):
        assert card.general_authenticate(0x14, 0x9E, 0x85, bad)[1] == 0x6A80, bad.hex()


def test_ecdh_p256_slot_refuses_a_p384_point():
    """A 97-byte point to a P-256 key (algorithm 11): 6A80, no key operation — the length is the slot curve's."""
    c = FakeCard()
    c.select()
    assert c.general_authenticate(0x11, 0x9E, 0x85, P384_POINT)[1] == 0x6A80
    assert c.ops == 0


# ---------------------------------------------------------------- IMPORT ASYMMETRIC KEY and GET METADATA


def test_import_p384_then_metadata(card):
    """
    ``00 FE 14 9A  06 30 <scalar>`` (yubikit put_key: the scalar as exactly
    48 bytes; yubico-piv-tool -a import-key pads it to the element length
    too): 9000, the key signs; GET METADATA answers 01 14, the slot's PIN
    policy, origin 02 (imported) and 04 { 86 61 04 X Y } — what yubikit's
    get_slot_metadata reads as KEY_TYPE.ECCP384 and the public key.
    """
    card.items.pop((ItemKind.KEY, "9a"))
    assert card.send(0xFE, 0x14, 0x9A, tlv.encode(0x06, _scalar(P384_KEY)))[1] == 0x6982
    card.mgmt_auth()
    assert card.send(0xFE, 0x14, 0x9A, tlv.encode(0x06, _scalar(P384_KEY)) + tlv.encode(0xAA, b"\x01")) \
        == (b"", 0x9000)
    der, alg, public = card.items[(ItemKind.KEY, "9a")]
    assert alg is KeyAlg.P384 and public == P384_PUBLIC
    body, sw = card.get_all(0xF7, 0x00, 0x9A)
    assert sw == 0x9000
    d = {item.tag: item.value for item in tlv.decode(body)}
    assert d[0x01] == b"\x14" and d[0x02] == b"\x01\x01" and d[0x03] == b"\x02"
    assert d[0x04] == b"\x86\x61" + P384_POINT
    digest = hashlib.sha384(b"imported").digest()
    sig, sw = card.general_authenticate(0x14, 0x9A, 0x81, digest)  # policy never: no PIN
    assert sw == 0x9000
    _verify(sig, digest, hashes.SHA384())


def test_generated_p384_metadata(card):
    """GET METADATA of a generated P-384 key: 01 14, origin 01, 04 { 86 61 point } (Yubico.NET.SDK metadata.md)."""
    body, sw = card.get_all(0xF7, 0x00, 0x9E)
    assert sw == 0x9000
    assert body == bytes.fromhex("010114 02020101 030101 0463 8661") + P384_POINT


@pytest.mark.parametrize("value", [
    _scalar(P384_KEY)[1:],  # one byte short (a YubiKey tool always sends 48)
    b"\x00" + _scalar(P384_KEY),  # 49 bytes
    bytes(48),  # zero is no key
    N384.to_bytes(48, "big"),  # the group order is no key
    b"\xff" * 48,  # above the order
])
def test_import_p384_refusals(card, value):
    """A scalar that is not 48 bytes, or not in [1, n-1]: 6A80, nothing stored (the slot keeps its key)."""
    card.mgmt_auth()
    before = card.items[(ItemKind.KEY, "9c")]
    assert card.send(0xFE, 0x14, 0x9C, tlv.encode(0x06, value))[1] == 0x6A80
    assert card.items[(ItemKind.KEY, "9c")] == before and card.stores == []


def test_import_algorithm_must_match_the_key(card):
    """A P-256 scalar (32 bytes) under algorithm 14 and a P-384 one under 11 are refused: 6A80, nothing stored."""
    card.mgmt_auth()
    assert card.send(0xFE, 0x14, 0x9A, tlv.encode(0x06, _scalar(EC_KEY, 32)))[1] == 0x6A80
    assert card.send(0xFE, 0x11, 0x9A, tlv.encode(0x06, _scalar(P384_KEY)))[1] == 0x6A80
    assert card.stores == []

