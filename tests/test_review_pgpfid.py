"""
Answers of the card's OpenPGP application (vsc.protocol.openpgp) that an
adversarial review found to differ from a YubiKey 5's (firmware 5.4.3, as
vsc's PIV application reports) in a way ykman/yubikit or GnuPG detects or
mis-handles, each with the source for the YubiKey's answer and how vsc
answered; they hold since the fix.
"""

from __future__ import annotations

import pytest

from tests.test_openpgp import FakeCard
from vsc.wire import openpgp as wire
from vsc.wire import tlv


@pytest.fixture
def card() -> FakeCard:
    c = FakeCard()
    assert c.select() == 0x9000
    return c


# ================================================================ 1. GET VERSION (INS F1)


def test_get_version_answers_the_firmware_version_in_bcd(card):
    """
    A YubiKey's OpenPGP application answers the vendor command GET VERSION
    ``00 F1 00 00`` with its firmware version, three BCD bytes (Yubico's
    ykneo-openpgp OpenPGPApplet.java: "returned by vendor specific command
    f1"; yubikit/openpgp.py ``OpenPgpSession._read_version`` sends it in the
    constructor of every session and decodes each byte with ``_bcd``;
    ykman's OpenPgpController does the same). vsc answered 6D00, so every
    ``ykman openpgp ...`` command failed at once with an ApduError. It must
    be the version vsc's PIV application reports (INS FD): 5.4.3.
    """
    assert card.send(0xF1) == (b"\x05\x04\x03", 0x9000)
    piv = FakeCard()
    assert piv.send(0xA4, 0x04, 0x00, bytes.fromhex("a000000308"))[1] == 0x9000
    assert piv.send(0xFD)[0] == b"\x05\x04\x03"  # the same firmware version through PIV
    assert wire.firmware_version((5, 7, 10)) == b"\x05\x07\x10"  # BCD, not binary: yubikit reads 10 back


# ================================================================ 2. constructed DOs answered with their own tag


@pytest.mark.parametrize("tag", [0x6E, 0x65, 0x7A])
def test_constructed_data_objects_carry_their_own_tag(card, tag):
    """
    GET DATA of a constructed DO — 6E application related data, 65
    cardholder related data, 7A security support template — answers the DO
    itself, tag and length included: Yubico's ykneo-openpgp writes
    ``6E 81 len``, ``65 len``, ``7A 05 93 03 ...`` (OpenPGPApplet.java
    getData), and yubikit parses exactly that: ApplicationRelatedData.parse
    is ``Tlv.unpack(DO.APPLICATION_RELATED_DATA, ...)``,
    SecuritySupportTemplate.parse ``Tlv.unpack(0x7A, ...)``,
    CardholderRelatedData.parse ``Tlv.unpack(0x65, ...)``; GnuPG's find_tlv
    descends into the outer tag. vsc answered the contents alone
    (``4F 10 ...``, ``93 03 ...``, ``5B ...``), so yubikit raised "Wrong tag"
    in the constructor of every OpenPgpSession (it reads 6E) and in
    get_signature_counter.
    """
    body, sw = card.get_data(tag)
    assert sw == 0x9000
    inner = tlv.to_dict(tlv.decode_one(body, tag))  # exactly one TLV, this tag, nothing after it
    first = {0x6E: 0x4F, 0x65: 0x5B, 0x7A: 0x93}[tag]
    assert first in inner
    if tag == 0x6E:
        assert 0xC4 in tlv.to_dict(inner[0x73])
    if tag == 0x7A:
        assert inner[0x93] == b"\x00\x00\x00"


# ================================================================ 3. key information (DE) and touch policies (D6-D8)


def _discretionary(card) -> dict[int, bytes]:
    body, sw = card.get_data(0x6E)
    assert sw == 0x9000
    return tlv.to_dict(tlv.to_dict(tlv.decode_one(body, 0x6E))[0x73])


def _key_information(raw: bytes) -> dict[int, int]:
    """yubikit's _parse_key_information: key reference, status (00 none, 01 generated, 02 imported) pairs."""
    return {raw[i]: raw[i + 1] for i in range(0, len(raw), 2)}


def test_key_information_and_touch_policies_as_ykman_openpgp_info_reads_them(card):
    """
    ``ykman openpgp info`` (ykman/openpgp.py get_openpgp_info) on a card
    reporting firmware 5.2 or later looks up each key's status in the key
    information DO DE of 73 (``discretionary.key_information[ref]``,
    yubikit parses DE as key-reference/status pairs: 00 no key, 01
    generated, 02 imported; OpenPGP card spec 3.4 4.4.3.11) and shows each
    key's touch policy from UIF D6/D7/D8; older ykman reads them with GET
    DATA D6-D8 (OpenPgpSession.get_uif: any status but 6B00 raises). A
    YubiKey 5 has both (UIF ``00 20``: off, button). vsc (now answering
    GET VERSION 5.4.3) had neither: DE missing made ykman's info a
    KeyError, GET DATA D6 answered 6A88, so the older get_uif raised.
    """
    d = _discretionary(card)
    assert _key_information(d[0xDE]) == {1: 0, 2: 0, 3: 0}
    assert d[0xD6] == d[0xD7] == d[0xD8] == b"\x00\x20"
    for tag in (0xD6, 0xD7, 0xD8):
        assert card.get_data(tag) == (b"\x00\x20", 0x9000)

    card.verify(0x83, b"12345678")
    assert card.generate(0xB6)[1] == 0x9000  # the signature key generated on the card
    assert _key_information(_discretionary(card)[0xDE]) == {1: 1, 2: 0, 3: 0}
    # the decryption key imported (P-256, the extended header list), then the authentication key generated
    from tests.test_openpgp import EC_KEY
    assert card.send(0xDA, 0x00, 0xC2, wire.ec_attributes(wire.ALGO_ECDH, wire.OID_P256))[1] == 0x9000
    scalar = EC_KEY.private_numbers().private_value.to_bytes(32, "big")
    body = tlv.encode_many([(0xB8, b""), (0x7F48, bytes.fromhex("9220")), (0x5F48, scalar)])
    assert card.send(0xDB, 0x3F, 0xFF, tlv.encode(0x4D, body))[1] == 0x9000
    assert card.generate(0xA4)[1] == 0x9000
    assert _key_information(_discretionary(card)[0xDE]) == {1: 1, 2: 2, 3: 1}
    # generated over an imported key: generated again
    assert card.generate(0xB8)[1] == 0x9000
    assert _key_information(_discretionary(card)[0xDE]) == {1: 1, 2: 1, 3: 1}


# ================================================================ 4. algorithm information (FA)

RSA2048_YK = bytes.fromhex("010800001100")  # yubikit RsaAttributes.create(RSA2048): e length 17
ECDSA_P256 = b"\x13" + wire.OID_P256
ECDH_P256 = b"\x12" + wire.OID_P256
EDDSA_ED25519 = b"\x16" + wire.OID_ED25519
ECDH_X25519 = b"\x12" + wire.OID_CV25519
EDDSA_X25519 = b"\x16" + wire.OID_CV25519  # firmware before 5.6.1 lists X25519 under EdDSA (yubikit removes it)


def _yubikit_algorithm_information(body: bytes) -> dict[int, list[bytes]]:
    """
    What yubikit's OpenPgpSession.get_algorithm_information does with GET DATA FA on firmware 5.2-5.6.0: unpack
    FA, group the attributes by C1/C2/C3/DA, then list.remove() the entries those firmwares list wrongly (a
    ValueError or KeyError if one is missing) and add ECDH X25519 to the decryption key if it is not there.
    """
    data: dict[int, list[bytes]] = {}
    for item in tlv.decode(tlv.decode_one(body, 0xFA)):
        data.setdefault(item.tag, []).append(item.value)
    for values in data.values():
        values.remove(EDDSA_X25519)
    if ECDH_X25519 not in data[0xC2]:
        data[0xC2].append(ECDH_X25519)
    data[0xC2].remove(EDDSA_ED25519)
    data[0xDA].remove(EDDSA_ED25519)
    return data


def test_algorithm_information_lets_yubikit_generate_and_import(card):
    """
    yubikit's generate_rsa_key, generate_ec_key and put_key (``ykman
    openpgp keys import``, every tool built on yubikit) first call
    set_algorithm_attributes, which on firmware 5.2 or later reads the
    algorithm information DO FA (OpenPGP card spec 3.4 4.4.3.11: the
    attributes each key may take, as C1/C2/C3/DA entries) and refuses
    attributes not listed there. For firmware before 5.6.1 it also
    removes the entries a YubiKey of that age lists wrongly — X25519 under
    EdDSA in every list, Ed25519 in the decryption and attestation lists —
    with list.remove, so a card reporting 5.4.3 must list them as such a
    YubiKey does. vsc answered 6A88: every yubikit key generation and
    import failed with an ApduError. FA now lists what the card does
    (RSA-2048 as yubikit writes it, P-256, Curve25519) plus those entries,
    and each listed attribute the card does is accepted by PUT DATA.
    """
    body, sw = card.get_data(0xFA)
    assert sw == 0x9000
    info = _yubikit_algorithm_information(body)
    assert info[0xC1] == info[0xC3] == [RSA2048_YK, ECDSA_P256, EDDSA_ED25519]
    assert info[0xC2] == [RSA2048_YK, ECDH_P256, ECDH_X25519]
    card.verify(0x83, b"12345678")
    for tag in (0xC1, 0xC2, 0xC3):
        for attributes in info[tag]:
            assert card.send(0xDA, 0x00, tag, attributes)[1] == 0x9000, (hex(tag), attributes.hex())


# ================================================================ 5. SELECT DATA: three cardholder certificates

SELECT_CERT = bytes.fromhex("60045c027f21")  # 60 { 5C 7F21 }: the DO whose occurrence is selected


@pytest.mark.parametrize("quirk", [b"", b"\x06"])
def test_select_data_picks_the_certificate_of_each_key(card, quirk):
    """
    A YubiKey 5.2+ keeps a cardholder certificate 7F21 per key; SELECT
    DATA ``00 A5 occurrence 04 {60 {5C 7F21}}`` (spec 3.4 7.2.5:
    occurrence 00 the authentication key's, 01 decryption, 02 signature)
    picks the one GET DATA / PUT DATA 7F21 then read and write. yubikit's
    get_certificate / put_certificate (``ykman openpgp certificates
    export|import``) send it for every key on 5.2+, firmware up to 5.4.3
    with a non-standard leading length byte 06 (yubikit
    _select_certificate). vsc answered 6D00, so yubikit failed for every
    key, the authentication key's too; and one 7F21 served all three.
    The selection is volatile: SELECT of the application resets it to 00.
    """
    card.verify(0x83, b"12345678")
    for occurrence in (0, 1, 2):
        assert card.send(0xA5, occurrence, 0x04, quirk + SELECT_CERT) == (b"", 0x9000)
        assert card.send(0xDA, 0x7F, 0x21, b"cert %d" % occurrence)[1] == 0x9000
    for occurrence in (2, 0, 1):
        assert card.send(0xA5, occurrence, 0x04, quirk + SELECT_CERT)[1] == 0x9000
        assert card.get_data(0x7F21) == (b"cert %d" % occurrence, 0x9000)
    assert card.select() == 0x9000  # the application selected again: occurrence 00, the authentication key's
    assert card.get_data(0x7F21) == (b"cert 0", 0x9000)
    assert card.send(0xA5, 0x03, 0x04, quirk + SELECT_CERT)[1] == 0x6A88  # no fourth certificate
    assert card.send(0xA5, 0x00, 0x00, quirk + SELECT_CERT)[1] == 0x6A86  # P2 is 04: incorrect P1-P2
    assert card.send(0xA5, 0x00, 0x04, quirk + bytes.fromhex("60045c02005b"))[1] == 0x6A88  # only 7F21 repeats


# ================================================================ 6. new algorithm attributes delete the key


def test_changing_a_keys_algorithm_attributes_deletes_its_key(card):
    """
    On a YubiKey, PUT DATA of other algorithm attributes (C1-C3) deletes
    the key of that role (yubikit set_algorithm_attributes: "WARNING: This
    will delete any key already stored in the slot if the attributes are
    changed!"; delete_key relies on it). vsc stored the attributes and
    kept the old key: 6E then said ECDSA P-256 while 47 81 answered the
    RSA key's 7F49 {81 82} (yubikit's get_public_key parses it by the
    attributes: KeyError 0x86), DE said "generated", and PSO:CDS made an
    RSA signature for a key the card calls ECDSA. Attributes naming the
    same algorithm keep the key (yubikit sets them before every generate
    and import).
    """
    card.verify(0x83, b"12345678")
    assert card.generate(0xB6)[1] == 0x9000 and card.generate(0xB8)[1] == 0x9000  # RSA-2048
    assert card.send(0xDA, 0x00, 0xC2, bytes.fromhex("010800001100"))[1] == 0x9000  # RSA-2048 again: kept
    assert card.send(0xDA, 0x00, 0xC1, b"\x13" + wire.OID_P256)[1] == 0x9000  # ECDSA P-256: the RSA key goes
    assert card.send(0x47, 0x81, 0x00, b"\xb6\x00")[1] == 0x6A88
    assert card.get_all(0x47, 0x81, 0x00, b"\xb8\x00")[1] == 0x9000
    assert _key_information(_discretionary(card)[0xDE]) == {1: 0, 2: 1, 3: 0}
    card.verify(0x81, b"123456")
    assert card.send(0x2A, 0x9E, 0x9A, bytes(32))[1] == 0x6A88  # no signature key: nothing signs
    tlv.decode_one(card.generate(0xB6)[0], 0x7F49)  # a new P-256 key: 7F49 { 86 point }
    assert 0x86 in tlv.to_dict(tlv.decode_one(card.get_all(0x47, 0x81, 0x00, b"\xb6\x00")[0], 0x7F49))
