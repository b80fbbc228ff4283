"""
Answers of the card's PIV and OpenPGP applications (vsc.protocol.piv,
vsc.protocol.openpgp) that an adversarial review found to differ from a
YubiKey 5's in a way a tool (ykman/yubikit, yubico-piv-tool, the Yubico
minidriver, GnuPG) detects or mis-handles, each with the source for the
YubiKey's answer and how vsc answered; they hold since the fix.
"""

from __future__ import annotations

import attrs
import pytest

from tests import test_openpgp as pgp_t
from tests.test_piv import FakeCard, PIN, PUK, _put_data
from vsc.protocol import pins, piv
from vsc.wire import apdu, tlv
from vsc.wire.protected import ItemKind, KeyAlg


@pytest.fixture
def card() -> FakeCard:
    c = FakeCard()
    assert c.select()[1] == 0x9000
    return c


def _block_pin_elsewhere(items: dict) -> None:
    """The card's one user PIN blocked on another path (the ssh-agent, the local API, OpenPGP): its counter at 0."""
    rec = apdu.decode_secret(items[(ItemKind.PIN, pins.USER_PIN)][0]) if (ItemKind.PIN, pins.USER_PIN) in items \
        else apdu.SecretRecord(apdu.pad_pin(PIN), 3, 3)
    items[(ItemKind.PIN, pins.USER_PIN)] = (apdu.encode_secret(attrs.evolve(rec, tries_left=0)), KeyAlg.NONE, b"")


# ================================================================ 1. YubiKey's own data objects


@pytest.mark.parametrize("tag", [0x5FFF00, 0x5FFF01, 0x5FFF10, 0x5FFF11, 0x5FFF15])
def test_put_data_stores_the_yubikey_vendor_objects(card, tag):
    """
    A YubiKey stores and returns its vendor data objects with PUT DATA /
    GET DATA like the PIV ones: ADMIN DATA 5FFF00 (ykman's and the .NET
    SDK's PIN-protected management key: "53 { 80 { 81 01 flags } }",
    Yubico.NET.SDK docs/users-manual/application-piv/pin-only.md), the
    attestation certificate 5FFF01, MSCMAP 5FFF10 and MSROOTS 5FFF11-15
    (the Yubico minidriver, yubico-piv-tool's YKPIV_OBJ_ADMIN_DATA ...
    YKPIV_OBJ_MSROOTS5 in lib/internal.h). vsc's valid_object_tag took
    only 5FC101-5FC123, 7F61 and 7E: PUT DATA answered 6A80, so
    ``ykman piv access change-management-key --protect`` and
    ``yubico-piv-tool -a write-object --id 0x5fff10`` failed after the
    management key was authenticated.
    """
    card.mgmt_auth()
    content = tlv.encode(0x80, tlv.encode(0x81, b"\x02"))
    assert card.get_data(tag) == (b"", 0x6A82)  # absent: 6A82, as on a YubiKey
    assert card.send(0xDB, 0x3F, 0xFF, _put_data(card, tag, content)) == (b"", 0x9000)
    assert card.get_data(tag) == (tlv.encode(0x53, content), 0x9000)


# ================================================================ 2. VERIFY without data on a blocked PIN


def test_piv_verify_status_of_a_pin_blocked_elsewhere_is_6983(card):
    """
    VERIFY without data answers 9000 (verified), 63Cx (x tries left) or
    6983 (blocked) (SP 800-73-4 3.2.1; Yubico.NET.SDK apdu/verify.md: 6983
    whenever no tries remain). The PIN is the card's one user PIN: blocked on
    another path after this session verified it, every PIN slot answers
    6983 (docs/pcsc.md) — but VERIFY's status answered 9000 from the
    session's flag, so yubikit's get_pin_attempts (which falls back to
    VERIFY without data) and yubico-piv-tool -a status reported a verified
    PIN with tries left on a blocked card.
    """
    assert card.verify(PIN) == 0x9000
    _block_pin_elsewhere(card.items)
    assert card.general_authenticate(0x07, 0x9A, 0x81, bytes(256))[1] == 0x6983
    assert card.verify(None) == 0x6983


def test_openpgp_verify_status_of_a_pin_blocked_elsewhere_is_6983():
    """
    The same rule for OpenPGP (spec 3.4 7.2.2: VERIFY without data answers
    9000 only while the verification holds; a blocked PW1 is 6983): PW1
    verified for 81/82, then the shared PIN blocked through PIV or the
    local API — PSO already answered 6983, VERIFY's status still 9000.
    """
    card = pgp_t.FakeCard()
    assert card.select() == 0x9000
    assert card.verify(0x81, pgp_t.PW1) == 0x9000 and card.verify(0x82, pgp_t.PW1) == 0x9000
    _block_pin_elsewhere(card.items)
    assert card.send(0x20, 0x00, 0x81)[1] == 0x6983
    assert card.send(0x20, 0x00, 0x82)[1] == 0x6983


# ================================================================ 3. the PUK / old PIN is checked before the new value


def test_reset_retry_counter_checks_the_puk_before_the_new_pin(card):
    """
    RESET RETRY COUNTER with a wrong PUK answers 63Cx and counts the try,
    whatever the new PIN (Yubico.NET.SDK apdu/reset-retry.md; yubikit's
    PivSession.reset blocks the PUK with ``_change_reference(INS_RESET_RETRY,
    PIN_P2, "", "")`` — 16 bytes of FF — and loops on 63Cx until 6983). vsc
    looked at the new PIN first and answered 6A80 without counting, so
    yubikit's loop raised on 6A80 and a PUK could not be blocked that way.
    """
    for left in (2, 1, 0):
        assert card.send(0x2C, 0x00, 0x80, b"\xff" * 16)[1] == (0x63C0 | left if left else 0x63C0)
        assert card.secret(pins.PUK).tries_left == left
    assert card.send(0x2C, 0x00, 0x80, apdu.pad_pin(PUK) + apdu.pad_pin(b"654321"))[1] == 0x6983


def test_change_reference_checks_the_old_value_before_the_new_one(card):
    """
    CHANGE REFERENCE DATA with a wrong current PIN or PUK answers 63Cx and
    counts the try (Yubico.NET.SDK apdu/change-ref.md), whatever the new
    value: yubikit's _change_reference maps only 63Cx / 6983 to
    InvalidPinError, and an owner blocking the PUK on purpose (PIN-only
    mode, pin-only.md "PUK blocked") types anything as the new value. vsc
    refused a too-short new value first (6A80) and counted nothing. A
    correct current value with a bad new one is still 6A80 and changes
    nothing.
    """
    assert card.send(0x24, 0x00, 0x81, apdu.pad_pin(b"4711") + apdu.pad_pin(b"67567"))[1] == 0x63C2
    assert card.secret(pins.PUK).tries_left == 2
    assert card.send(0x24, 0x00, 0x80, apdu.pad_pin(b"4711") + apdu.pad_pin(b"67567"))[1] == 0x63C2
    assert card.send(0x24, 0x00, 0x81, apdu.pad_pin(PUK) + apdu.pad_pin(b"67567"))[1] == 0x6A80
    assert card.secret(pins.PUK) == apdu.SecretRecord(apdu.pad_pin(PUK), 3, 3)
    assert card.send(0x24, 0x00, 0x81, apdu.pad_pin(PUK) + apdu.pad_pin(b"87654321")) == (b"", 0x9000)


# ================================================================ 4. IMPORT ASYMMETRIC KEY (YubiKey INS FE)


class SealingCard(FakeCard):
    """FakeCard that copies a stored value at once, as the glue seals it (the applet zeroes its key DER after)."""

    def perform(self, effect):
        if isinstance(effect, piv.Store):
            effect = attrs.evolve(effect, value=bytes(effect.value))
        return super().perform(effect)


def _import_data(key) -> bytes:
    """yubikit's PivSession.put_key body: RSA 01 p, 02 q, 03 dP, 04 dQ, 05 qInv (each n/2 bytes); EC 06 scalar."""
    from cryptography.hazmat.primitives.asymmetric import rsa as _rsa
    nums = key.private_numbers()
    if isinstance(key, _rsa.RSAPrivateKey):
        ln = key.key_size // 16
        return tlv.encode_many([(0x01, nums.p.to_bytes(ln, "big")), (0x02, nums.q.to_bytes(ln, "big")),
                                (0x03, nums.dmp1.to_bytes(ln, "big")), (0x04, nums.dmq1.to_bytes(ln, "big")),
                                (0x05, nums.iqmp.to_bytes(ln, "big"))])
    return tlv.encode(0x06, nums.private_value.to_bytes(32, "big"))


def test_import_asymmetric_key_rsa_and_p256(card):
    """
    A YubiKey imports a private key into a slot with its IMPORT ASYMMETRIC
    KEY (00 FE alg slot, RSA CRT parts 01-05 or the EC scalar 06, optional
    PIN policy AA and touch policy AB; behind the management key, 6982
    without it; 9000 and no data) — Yubico.NET.SDK apdu/import-asym.md,
    yubikit PivSession.put_key, used by ``ykman piv keys import`` and
    ``yubico-piv-tool -a import-key``. vsc answered 6D00 (and docs/pcsc.md
    did not list it among the YubiKey commands it lacks), so neither tool
    could put an existing key on the card. The imported key then signs
    like a generated one and keeps the slot's certificate object.
    """
    from tests.test_piv import EC_KEY, RSA_KEY, _pkcs1_block
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
    fresh = SealingCard(certs=False)
    fresh.select()
    for slot in ("9a", "9c"):
        fresh.items.pop((ItemKind.KEY, slot))
    assert fresh.send(0xFE, 0x07, 0x9A, _import_data(RSA_KEY))[1] == 0x6982  # the management key first
    fresh.mgmt_auth()
    assert fresh.send(0xFE, 0x07, 0x9A, _import_data(RSA_KEY) + tlv.encode(0xAA, b"\x01")) == (b"", 0x9000)
    assert fresh.send(0xFE, 0x11, 0x9C, _import_data(EC_KEY)) == (b"", 0x9000)
    digest = bytes(range(32))
    sig, sw = fresh.general_authenticate(0x07, 0x9A, 0x81, _pkcs1_block(digest))  # policy never: no PIN
    assert sw == 0x9000
    assert pow(int.from_bytes(sig, "big"), RSA_KEY.public_key().public_numbers().e,
               RSA_KEY.public_key().public_numbers().n) == int.from_bytes(_pkcs1_block(digest), "big")
    assert fresh.verify(PIN) == 0x9000
    sig, sw = fresh.general_authenticate(0x11, 0x9C, 0x81, digest)
    assert sw == 0x9000
    EC_KEY.public_key().verify(sig, digest, ec.ECDSA(Prehashed(hashes.SHA256())))


def test_import_asymmetric_key_refusals(card):
    """
    Wrong parts for the algorithm, CRT values that do not belong to p and q
    (or an RSA exponent other than 65537, all a YubiKey supports), an
    unknown algorithm or slot: 6A80 / 6A86 / 6A88, nothing stored.
    """
    from tests.test_piv import EC_KEY, RSA_KEY
    card.mgmt_auth()
    rsa_parts = _import_data(RSA_KEY)
    bad = bytearray(rsa_parts)
    bad[-1] ^= 1  # qInv off by one
    assert card.send(0xFE, 0x07, 0x9A, bytes(bad))[1] == 0x6A80
    assert card.send(0xFE, 0x07, 0x9A, _import_data(EC_KEY))[1] == 0x6A80
    assert card.send(0xFE, 0x11, 0x9A, rsa_parts)[1] == 0x6A80
    assert card.send(0xFE, 0x11, 0x9A, tlv.encode(0x06, b"\x00" * 32))[1] == 0x6A80
    assert card.send(0xFE, 0x13, 0x9A, tlv.encode(0x06, b"\x01" * 48))[1] == 0x6A86  # 14 is P-384 (test_piv_p384)
    assert card.send(0xFE, 0x11, 0x9B, _import_data(EC_KEY))[1] == 0x6A88
    assert card.send(0xFE, 0x11, 0x9A, _import_data(EC_KEY) + tlv.encode(0xAA, b"\x07"))[1] == 0x6A80
    assert card.stores == []


# ================================================================ 5. algorithm 00 is 3DES for the management key


def test_mutual_authentication_with_algorithm_00_and_a_3des_key(card):
    """
    SP 800-78-4 table 6-2 names 3DES both 00 and 03, and a YubiKey with a
    3DES management key answers the mutual authentication with P1 00:
    Yubico.NET.SDK apdu/auth-mgmt.md shows ``00 87 00 9B 04 7C 02 80 00``
    answered ``7C 0A 80 08 <witness>`` 9000 (and a wrong second step 6982).
    vsc took only 03 for a 3DES key: the witness request with 00 answered
    6A86. (The one-way request ``81 00`` with 00 stays OpenSC's random
    numbers, leaving the authentication as it was: docs/pcsc.md "Random
    numbers", a documented choice.)
    """
    from tests.test_piv import DEFAULT_MGMT
    from vsc import crypto
    body, sw = card.raw(bytes.fromhex("0087009B047C028000"))
    assert sw == 0x9000
    witness = crypto.mgmt_cipher(0x03, DEFAULT_MGMT, tlv.to_dict(tlv.decode_one(body, 0x7C))[0x80], encrypt=False)
    challenge = bytes(range(8))
    body, sw = card.send(0x87, 0x00, 0x9B, tlv.encode(0x7C, tlv.encode_many([(0x80, witness), (0x81, challenge),
                                                                              (0x82, b"")])), le=256)
    assert sw == 0x9000
    assert tlv.to_dict(tlv.decode_one(body, 0x7C))[0x82] == crypto.mgmt_cipher(0x03, DEFAULT_MGMT, challenge, True)
    assert card.applet.mgmt.authenticated()
    # a wrong witness with 00: 6982, as on the YubiKey
    card.raw(bytes.fromhex("0087009B047C028000"))
    assert card.send(0x87, 0x00, 0x9B, tlv.encode(0x7C, tlv.encode_many([(0x80, bytes(8)), (0x81, challenge)])),
                     le=256)[1] == 0x6982
    # 00 is 3DES only: with an AES key it names another algorithm
    card.mgmt_auth()
    assert card.send(0xFF, 0xFF, 0xFF, bytes([0x08, 0x9B, 16]) + bytes(range(16))) == (b"", 0x9000)
    assert card.raw(bytes.fromhex("0087009B047C028000"))[1] == 0x6A86


# ================================================================ 6. GET METADATA (YubiKey INS F7)

#: yubikit/piv.py at Yubico/yubikey-manager b0dbb7f17b333d7e94cfb5999c00b3f1a1d602aa (PivSession.get_pin_metadata,
#: get_puk_metadata, get_management_key_metadata, get_slot_metadata, _parse_device_public_key), transcribed: yubikit
#: is not installed here. Tlv.parse_dict, then these fields; a missing tag is a KeyError there, as here.
def _yubikit_parse(data: bytes) -> dict[int, bytes]:
    return {item.tag: item.value for item in tlv.decode(data)}


def _yubikit_pin_metadata(data: bytes) -> tuple[bool, int, int]:
    """PinMetadata(default_value, total_attempts, attempts_remaining)."""
    d = _yubikit_parse(data)
    return d[0x05] != b"\0", d[0x06][0], d[0x06][1]


def _yubikit_management_key_metadata(data: bytes) -> tuple[int, bool, int]:
    """ManagementKeyMetadata(key_type = algo or 03, default_value, touch_policy = policy[1])."""
    d = _yubikit_parse(data)
    return d.get(0x01, b"\x03")[0], d[0x05] != b"\0", d[0x02][1]


def _yubikit_slot_metadata(data: bytes) -> tuple[int, int, int, bool, bytes]:
    """SlotMetadata(key_type, pin_policy, touch_policy, generated, public key as SubjectPublicKeyInfo DER)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec as _ec
    from cryptography.hazmat.primitives.asymmetric import rsa as _rsa
    d = _yubikit_parse(data)
    key_type, policy, pub = d[0x01][0], d[0x02], _yubikit_parse(d[0x04])
    if key_type == 0x07:
        key = _rsa.RSAPublicNumbers(int.from_bytes(pub[0x82], "big"), int.from_bytes(pub[0x81], "big")).public_key()
    else:
        assert key_type == 0x11
        key = _ec.EllipticCurvePublicKey.from_encoded_point(_ec.SECP256R1(), pub[0x86])
    spki = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return key_type, policy[0], policy[1], d[0x03][0] == 0x01, spki


def test_get_metadata_pin_and_puk(card):
    """
    ``00 F7 00 80`` / ``00 F7 00 81``: 01 algorithm FF, 05 default, 06
    (retry limit, tries left) — Yubico.NET.SDK apdu/metadata.md table 2 (80,
    81: tags 01, 05, 06); yubikit's get_pin_metadata / get_puk_metadata read
    05 and 06 (``ykman piv info`` warns on a default PIN from 05;
    PivSession.get_pin_attempts and reset read 06). vsc answered 6D00, so
    yubikit fell back to VERIFY's 63Cx and ykman could not tell a default PIN.
    No PIN is needed and nothing is stored or counted.
    """
    assert card.send(0xF7, 0x00, 0x80) == (bytes.fromhex("0101ff 050101 06020303"), 0x9000)
    assert card.send(0xF7, 0x00, 0x81) == (bytes.fromhex("0101ff 050101 06020303"), 0x9000)
    assert card.stores == []
    assert card.verify(b"654321") == 0x63C2
    body, sw = card.send(0xF7, 0x00, 0x80)
    assert sw == 0x9000 and _yubikit_pin_metadata(body) == (True, 3, 2)
    assert card.send(0x24, 0x00, 0x80, apdu.pad_pin(PIN) + apdu.pad_pin(b"246810"))[1] == 0x9000
    assert card.send(0xF7, 0x00, 0x80) == (bytes.fromhex("0101ff 050100 06020303"), 0x9000)
    assert card.send(0x24, 0x00, 0x81, apdu.pad_pin(PUK) + apdu.pad_pin(b"87654321"))[1] == 0x9000
    body, _ = card.send(0xF7, 0x00, 0x81)
    assert _yubikit_pin_metadata(body) == (False, 3, 3)
    _block_pin_elsewhere(card.items)
    body, sw = card.send(0xF7, 0x00, 0x80)
    assert sw == 0x9000 and _yubikit_pin_metadata(body) == (False, 3, 0)  # blocked: 0 left, still 9000


def test_get_metadata_management_key(card):
    """
    ``00 F7 00 9B``: 01 algorithm, 02 policy (touch policy second: 01
    never), 05 default — Yubico.NET.SDK apdu/metadata.md (9B: tags 01, 02,
    05); yubikit's PivSession reads it when it opens (management_key_type)
    and ykman warns on the default key. vsc has no touch: 01. The PIN policy
    byte is 00 (none applies to a management key; yubikit does not read it).
    """
    assert card.send(0xF7, 0x00, 0x9B) == (bytes.fromhex("010103 02020001 050101"), 0x9000)
    card.mgmt_auth()
    assert card.send(0xFF, 0xFF, 0xFF, bytes([0x08, 0x9B, 16]) + bytes(range(16))) == (b"", 0x9000)
    body, sw = card.send(0xF7, 0x00, 0x9B)
    assert (body, sw) == (bytes.fromhex("010108 02020001 050100"), 0x9000)
    assert _yubikit_management_key_metadata(body) == (0x08, False, 0x01)
    # the default key bytes under AES-192 (a YubiKey 5.7's factory key) are still the default value
    card.mgmt_auth(bytes(range(16)), 0x08)
    assert card.send(0xFF, 0xFF, 0xFF, bytes([0x0A, 0x9B, 24]) + bytes.fromhex("0102030405060708" * 3))[1] == 0x9000
    assert _yubikit_management_key_metadata(card.send(0xF7, 0x00, 0x9B)[0]) == (0x0A, True, 0x01)


@pytest.mark.parametrize("slot, alg, policy", [(0x9A, 0x07, 0x02), (0x9C, 0x11, 0x02), (0x9D, 0x07, 0x02),
                                               (0x9E, 0x11, 0x01)])
def test_get_metadata_key_slots(card, slot, alg, policy):
    """
    ``00 F7 00 slot``: 01 algorithm, 02 (PIN policy, touch policy), 03
    origin (01 generated), 04 public key (RSA 81 n 82 e, EC 86 point: what
    yubikit's _parse_device_public_key reads) — Yubico.NET.SDK
    apdu/metadata.md (9A-9E: tags 01, 02, 03, 04). ``ykman piv info`` and
    ``ykman piv keys export`` read the public key from here. The PIN policy
    is the card's (FakeCard has none stored: LEGACY, 9E never, the others
    once).
    """
    from tests.test_piv import PUBLIC
    body, sw = card.get_all(0xF7, 0x00, slot)  # an RSA key's answer is longer than 256 bytes: 61xx, GET RESPONSE
    assert sw == 0x9000
    d = _yubikit_parse(body)
    assert list(d) == [0x01, 0x02, 0x03, 0x04]
    assert (d[0x01], d[0x02], d[0x03]) == (bytes([alg]), bytes([policy, 0x01]), b"\x01")
    assert _yubikit_slot_metadata(body) == (alg, policy, 0x01, True, PUBLIC[f"{slot:02x}"])
    if alg == 0x11:
        assert body[10:14] == bytes.fromhex("04438641") and len(body) == 14 + 65  # 04 43 { 86 41 04 X Y }
    else:  # 04 82 01 09 { 81 82 01 00 n, 82 03 01 00 01 }
        assert body[10:18] == bytes.fromhex("0482010981820100") and body[-5:] == bytes.fromhex("8203010001")
        assert len(body) == 10 + 4 + 0x109


def test_get_metadata_origin_follows_import_and_generate(card):
    """
    A key put with IMPORT ASYMMETRIC KEY is origin 02 (yubikit: generated
    False; ykman piv info "Origin: IMPORTED"), with the PIN policy given there
    (yubikit's device test test_slot_metadata_put); a GENERATE into the slot
    makes it 01 again. vsc records the imported slots in the protected
    information (item ``piv-imported``); every other key is generated (by
    GENERATE, or by vsc card/dongle enroll).
    """
    from tests.test_piv import EC_KEY, PUBLIC
    from tests.test_review_fidelity import _import_data
    card.mgmt_auth()
    assert card.send(0xFE, 0x11, 0x9A, _import_data(EC_KEY) + tlv.encode(0xAA, b"\x03")) == (b"", 0x9000)
    body, sw = card.get_all(0xF7, 0x00, 0x9A)
    assert sw == 0x9000 and _yubikit_slot_metadata(body) == (0x11, 0x03, 0x01, False, PUBLIC["9c"])
    assert card.items[(ItemKind.PIN, piv.ORIGIN_ITEM)][0] == b"\x9a"
    assert _yubikit_parse(card.get_all(0xF7, 0x00, 0x9C)[0])[0x03] == b"\x01"  # the other slots stay generated
    stores = len(card.stores)
    assert card.send(0x47, 0x00, 0x9E, tlv.encode(0xAC, tlv.encode(0x80, b"\x11")))[1] == 0x9000
    assert len(card.stores) == stores  # a slot never imported: no extra store
    assert card.get_all(0x47, 0x00, 0x9A, tlv.encode(0xAC, tlv.encode(0x80, b"\x07")))[1] == 0x9000
    body, _ = card.get_all(0xF7, 0x00, 0x9A)
    key_type, pin_policy, _touch, generated, _spki = _yubikit_slot_metadata(body)
    assert (key_type, pin_policy, generated) == (0x07, 0x03, True)
    assert card.items[(ItemKind.PIN, piv.ORIGIN_ITEM)][0] == b""


def test_get_metadata_refusals(card):
    """
    An empty slot (the retired slots 82-95 before a key is put there) and
    any other reference answer 6A88, as a YubiKey answers
    for an empty slot (yubikit's test_delete_key expects an ApduError from
    get_slot_metadata); P1 other than 00 is 6A86. Before SELECT: 6D00, as
    for every PIV command.
    """
    card.items.pop((ItemKind.KEY, "9d"))
    for ref in (0x9D, 0x82, 0x95, 0xF9, 0x96, 0x00, 0x55):
        assert card.send(0xF7, 0x00, ref) == (b"", 0x6A88), hex(ref)
    assert card.send(0xF7, 0x01, 0x9A) == (b"", 0x6A86)
    assert card.send(0xF7, 0x01, 0x80) == (b"", 0x6A86)
    assert FakeCard().send(0xF7, 0x00, 0x80) == (b"", 0x6D00)
    assert card.stores == []
