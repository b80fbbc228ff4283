"""
How the card's OpenPGP application identifies itself, next to a YubiKey 5
(firmware 5.4.3, as vsc's PIV application reports): the AID (manufacturer
and serial), the RSA algorithm attributes' exponent length, the historical
bytes, the extended capabilities and length information, the general
feature management DO, the KDF DO and the touch policies.

The YubiKey's answers come from:

* a YubiKey 5 NFC's GET DATA 6E, byte for byte, in the openpgp-card Rust
  crate's test ``test_tlv_yubi5`` (src/tlv.rs, Heiko Schaefer):
  ``4F D2760001240103040006 16019180 0000``, ``5F52 00730000E0059000``,
  ``7F74 810120``, then 73 { ``C0 7D000BFE080000FF0000``,
  ``C1/C2/C3 010800001100``, DA, C4, C5, C6, CD, DE, ``7F66
  02020BFE02020BFE``, D6-D9 ``0020`` };
* yubikit (github Yubico/yubikey-manager, yubikit/openpgp.py):
  ``RsaAttributes.create`` (e_len 17), ``_get_key_template`` (e sent as
  01 00 01), ``OpenPgpAid.serial`` (BCD), ``ApplicationRelatedData.parse``
  (7F66 and 7F74 looked up in 6E's outer level), ``get_kdf`` (F9 read when
  C0 says KDF);
* GnuPG 2.2.40 (Debian 12; github gpg/gnupg tag gnupg-2.2.40):
  scd/app-openpgp.c ``get_manufacturer`` (0x0006 "Yubico"),
  ``build_privkey_template`` (e padded to ``(e_bits + 7) / 8`` bytes),
  ``change_rsa_keyattr`` (writes e length 32 when an ECC key becomes RSA),
  ``pin2hash_if_kdf``; scd/app.c ``app_munge_serialno`` (a YubiKey's
  OpenPGP serial is its decimal serial in BCD); agent/divert-scd.c
  ``ask_for_card`` and agent/learncard.c (key stubs name the card by its
  full AID).
"""

from __future__ import annotations

import hashlib

import pytest

from tests.integration import missing

from tests.test_openpgp import PW1, PW3, RSA_KEY, FakeCard, _der
from vsc import crypto
from vsc.protocol import openpgp, piv, router
from vsc.protocol.applet import Generate, Store
from vsc.wire import openpgp as wire
from vsc.wire import tlv
from vsc.wire.errors import WireError
from vsc.wire.protected import ItemKind, KeyAlg

#: a card serial whose PIV GET SERIAL number has 8 digits (76071752): a YubiKey's range
SERIAL8 = "pgp-serial-4"
YUBIKEY_5_6E = bytes.fromhex(
    "6e8201374f10d27600012401030400061601918000005f520800730000e00590007f740381012073820110c00a7d000bfe080000ff0000"
    "c106010800001100c206010800001100c306010800001100da06010800001100c407ff7f7f7f030003c550" + "00" * 80
    + "c650" + "00" * 80 + "cd10" + "00" * 16 + "de0801000200030081027f660802020bfe02020bfed6020020d7020020d8020020d9020020")


def _yubikey(tag: int) -> bytes:
    """A DO of the YubiKey 5 NFC's 6E (outer level or inside 73)."""
    outer = tlv.decode(tlv.decode_one(YUBIKEY_5_6E, 0x6E))
    inner = tlv.decode(next(i.value for i in outer if i.tag == 0x73))
    return next(bytes(i.value) for i in outer + inner if i.tag == tag)


def _card(serial: str = "pgp-unit-1") -> FakeCard:
    c = FakeCard()
    c.pgp = openpgp.OpenPgpApplet(serial, c.rand)
    c.piv = piv.PivApplet(serial, c.rand)
    c.router = router.AppletRouter([(router.piv_matches, c.piv), (openpgp.matches, c.pgp)])
    return c


def _with_legacy_keys(c: FakeCard) -> FakeCard:
    """A card from before the Yubico AID: an RSA signature key and no stored AID (what such a card holds)."""
    der = _der(RSA_KEY)
    c.items[(ItemKind.KEY, "pgp-sig")] = (der, KeyAlg.RSA2048, crypto.public_der_of(der))
    return c


def _outer_and_inner(c: FakeCard) -> tuple[list[int], list[int], dict[int, bytes]]:
    body, sw = c.get_data(0x6E)
    assert sw == 0x9000
    outer = tlv.decode(tlv.decode_one(body, 0x6E))
    inner = tlv.decode(next(i.value for i in outer if i.tag == 0x73))
    values = {i.tag: bytes(i.value) for i in outer + inner if i.tag != 0x73}
    return [i.tag for i in outer], [i.tag for i in inner], values


# ================================================================ 1. the AID: manufacturer 0006, serial in BCD


def test_a_new_card_answers_a_yubikeys_aid():
    """
    A YubiKey 5's AID is D2 76 00 01 24 01 | 03 04 | 00 06 | serial in BCD |
    00 00 (the YubiKey 5 NFC's 4F: ...0006 16019180 0000). GnuPG names 0006
    "Yubico" (scd/app-openpgp.c get_manufacturer) and shows the serial bytes
    in hex, which for BCD reads as the YubiKey's decimal serial; yubikit's
    OpenPgpAid.serial is ``int(aid[10:14].hex())`` and turns negative when a
    nibble is not a decimal digit. vsc answered manufacturer FF56 ("unmanaged
    S/N range") and 4 hash bytes, which GnuPG showed as such and yubikit read
    as a negative serial. A card without OpenPGP keys now answers the Yubico
    form.
    """
    c = _card(SERIAL8)
    assert c.select() == 0x9000
    aid, sw = c.get_data(0x4F)
    assert sw == 0x9000
    assert aid[:10] == bytes.fromhex("d2760001240103040006") and aid[14:] == b"\x00\x00"
    assert int(aid[10:14].hex()) == 76071752  # yubikit's OpenPgpAid.serial: a positive 8-digit number
    assert wire.parse_aid(_yubikey(0x4F)).manufacturer == wire.parse_aid(aid).manufacturer == 0x0006


def test_the_openpgp_serial_is_the_piv_serial():
    """
    A YubiKey's OpenPGP serial is its serial number (GnuPG scd/app.c
    app_munge_serialno builds the OpenPGP AID of a YubiKey from the serial of
    its management application: manufacturer 0006 and the decimal digits in
    BCD), which its PIV application's GET SERIAL (INS F8) answers too. vsc's
    PIV number can exceed 8 digits; the OpenPGP serial is that number modulo
    10^8, so the two are equal whenever the PIV number has 8 digits or fewer.
    This fails if the PIV derivation changes without the OpenPGP one (cards
    with a key keep their stored AID either way).
    """
    for serial in (SERIAL8, "pgp-serial-0", "pgp-unit-1", "another card"):
        c = _card(serial)
        assert c.send(0xA4, 0x04, 0x00, bytes.fromhex("a000000308"))[1] == 0x9000
        body, sw = c.send(0xF8)
        assert sw == 0x9000
        piv_number = int.from_bytes(body, "big")
        assert c.select() == 0x9000
        pgp_number = wire.parse_bcd_serial(c.get_data(0x4F)[0][10:14])
        assert pgp_number == piv_number % 10 ** 8
        if piv_number < 10 ** 8:
            assert pgp_number == piv_number
    assert openpgp.yubikey_serial("pgp-serial-0") == 511838  # fewer digits: leading zero BCD bytes 00 51 18 38
    assert openpgp.yubico_aid("pgp-serial-0")[10:14] == bytes.fromhex("00511838")


def test_bcd_serial_wire_form():
    """The AID's serial bytes as a YubiKey writes them: 16019180 -> 16 01 91 80 (the YubiKey 5 NFC's AID); more
    than 8 digits, or a nibble above 9, is no YubiKey serial."""
    assert wire.bcd_serial(16019180) == bytes.fromhex("16019180") == _yubikey(0x4F)[10:14]
    assert wire.parse_bcd_serial(bytes.fromhex("16019180")) == 16019180
    assert wire.bcd_serial(0) == bytes(4) and wire.bcd_serial(99_999_999) == bytes.fromhex("99999999")
    for bad in (-1, 100_000_000):
        with pytest.raises(WireError):
            wire.bcd_serial(bad)
    with pytest.raises(WireError):
        wire.parse_bcd_serial(bytes.fromhex("020216c6"))  # the old hash form: not BCD


def test_a_card_holding_keys_from_before_keeps_its_aid():
    """
    GnuPG keeps a stub per card key in private-keys-v1.d naming the card by
    its full AID (shadow info ``(D2760001240103...FF56xxxxxxxx0000
    OPENPGP.1)``); agent/divert-scd.c ask_for_card compares it with the
    card's serial number by strcmp and otherwise asks to "insert the card
    with serial number FF56 ...", and ``gpg --card-status`` does not rewrite
    a stub that exists (agent/learncard.c: ``if (!force &&
    !agent_key_available (grip)) continue;``). A card that already holds an
    OpenPGP key from before therefore keeps the AID it had (FF56 and the hash
    serial): its holder's signing, decryption and ssh keep working. The key
    it generates next does not change that (the AID is then stored).
    """
    c = _with_legacy_keys(_card())
    assert c.select() == 0x9000
    aid = c.get_data(0x4F)[0]
    assert aid == openpgp.legacy_aid("pgp-unit-1")
    assert aid[8:10] == b"\xff\x56" and aid[10:14] == hashlib.sha256(b"vsc openpgp\x00pgp-unit-1").digest()[:4]
    assert c.verify(0x83, PW3) == 0x9000
    assert c.generate(0xB8)[1] == 0x9000
    assert c.items[(ItemKind.DATA, openpgp.AID_ITEM)][0] == aid
    del c.items[(ItemKind.KEY, "pgp-sig")], c.items[(ItemKind.KEY, "pgp-dec")]  # even with no key left
    assert c.select() == 0x9000 and c.get_data(0x4F)[0] == aid


def test_the_aid_is_stored_before_the_first_key_and_never_changes_under_it(monkeypatch):
    """
    The AID a card answered is stored (item "pgp-aid", synced) before its
    first key is generated or imported, so that no key exists whose card
    could later answer another AID: not when the derivation changes (here:
    another Yubico serial), not after remove and insert. If the store fails
    the card answers 6581 and makes no key.
    """
    c = _card()
    order: list[str] = []
    perform = c.perform

    def recording(effect):
        result = perform(effect)  # raises when the store fails: nothing recorded then
        if isinstance(effect, Store) and effect.name == openpgp.AID_ITEM:
            order.append("aid")
        if isinstance(effect, Generate):
            order.append("key")
        return result

    c.perform = recording
    assert c.select() == 0x9000
    aid = c.get_data(0x4F)[0]
    assert c.verify(0x83, PW3) == 0x9000
    c.fail_stores = True
    assert c.generate(0xB6)[1] == 0x6581 and order == [] and (ItemKind.KEY, "pgp-sig") not in c.items
    c.fail_stores = False
    assert c.generate(0xB6)[1] == 0x9000 and order == ["aid", "key"]
    assert c.generate(0xA4)[1] == 0x9000 and order == ["aid", "key", "key"]  # stored once
    monkeypatch.setattr(openpgp, "yubico_aid", lambda serial: wire.build_aid(bytes.fromhex("12345678")))
    again = _card()
    again.items = c.items
    assert again.select() == 0x9000 and again.get_data(0x4F)[0] == aid


def test_key_import_stores_the_aid_too():
    """keytocard (PUT DATA DB 3FFF) on a card without keys: the Yubico AID is stored with the imported key."""
    c = _card()
    assert c.select() == 0x9000
    aid = c.get_data(0x4F)[0]
    assert c.verify(0x83, PW3) == 0x9000
    assert c.send(0xDB, 0x3F, 0xFF, _import_body(b"\x01\x00\x01"), extended=True)[1] == 0x9000
    assert c.items[(ItemKind.DATA, openpgp.AID_ITEM)][0] == aid and aid[8:10] == b"\x00\x06"


def test_factory_reset_moves_a_card_from_before_to_the_yubico_aid():
    """
    The factory reset (TERMINATE DF, ACTIVATE FILE) destroys every OpenPGP
    key, so no stub can name the card any more: from then on the card answers
    the Yubico AID. This is the migration of a card from before; GnuPG then
    needs ``gpg --card-edit`` -> generate (or keytocard) as after any reset.
    """
    c = _with_legacy_keys(_card())
    assert c.select() == 0x9000 and c.get_data(0x4F)[0] == openpgp.legacy_aid("pgp-unit-1")
    assert c.verify(0x83, PW3) == 0x9000
    assert c.send(0xE6)[1] == 0x9000 and c.send(0x44)[1] == 0x9000
    assert c.get_data(0x4F)[0] == openpgp.yubico_aid("pgp-unit-1")
    assert c.select() == 0x9000 and c.get_data(0x4F)[0] == openpgp.yubico_aid("pgp-unit-1")


# ================================================================ 2. RSA algorithm attributes: e length 17


def _import_body(e: bytes) -> bytes:
    """GnuPG's key import (build_privkey_template, standard format): 4D { B6 7F48 {91 e 92 p 93 q} 5F48 }."""
    nums = RSA_KEY.private_numbers()
    p, q = nums.p.to_bytes(128, "big"), nums.q.to_bytes(128, "big")
    template = bytes([0x91, len(e)]) + bytes.fromhex("928180938180")
    return tlv.encode(0x4D, tlv.encode_many([(0xB6, b""), (0x7F48, template), (0x5F48, e + p + q)]))


def test_rsa_attributes_give_an_exponent_of_17_bits():
    """
    A YubiKey 5 answers C1/C2/C3 01 0800 0011 00: RSA, 2048-bit modulus,
    17-bit exponent, standard import format (the YubiKey 5 NFC's 6E; yubikit
    RsaAttributes.create(n_len) is ``cls(0x01, n_len, 17, ...)``, and its
    algorithm information lists RSA that way). vsc answered e length 0x20.
    Attributes a card stored before (01 0800 0020 00) are shown as 0011 too.
    """
    c = _card()
    c.items[(ItemKind.DATA, "pgp-attr-dec")] = (bytes.fromhex("010800002000"), None, None)
    assert c.select() == 0x9000
    for tag in (0xC1, 0xC2, 0xC3):
        assert c.get_data(tag) == (bytes.fromhex("010800001100"), 0x9000)
    _, _, values = _outer_and_inner(c)
    assert values[0xC1] == values[0xC2] == values[0xC3] == _yubikey(0xC1) == bytes.fromhex("010800001100")


def test_put_data_rsa_attributes_with_e_length_32_is_accepted():
    """
    GnuPG's change_rsa_keyattr (scd/app-openpgp.c, key-attr back to RSA from
    ECC) writes ``01 nn nn 00 20 00`` (buf[4] = 32); yubikit writes e length
    17. Both are RSA-2048 and accepted (refusing 0x20 would break GnuPG's
    key-attr on this card); the key of another algorithm in the slot is
    deleted, and the card answers e length 17 afterwards, as for every
    RSA-2048 key.
    """
    c = _card()
    assert c.select() == 0x9000 and c.verify(0x83, PW3) == 0x9000
    p256 = wire.ec_attributes(wire.ALGO_ECDSA, wire.OID_P256)
    assert c.send(0xDA, 0x00, 0xC1, p256)[1] == 0x9000
    assert c.generate(0xB6)[1] == 0x9000 and c.items[(ItemKind.KEY, "pgp-sig")][1] is KeyAlg.P256
    assert c.send(0xDA, 0x00, 0xC1, bytes.fromhex("010800002000"))[1] == 0x9000
    assert (ItemKind.KEY, "pgp-sig") not in c.items
    assert c.get_data(0xC1) == (bytes.fromhex("010800001100"), 0x9000)
    assert c.send(0xDA, 0x00, 0xC1, bytes.fromhex("010800001100"))[1] == 0x9000
    assert c.get_data(0xC1) == (bytes.fromhex("010800001100"), 0x9000)


@pytest.mark.parametrize("e", [b"\x01\x00\x01", b"\x00\x01\x00\x01"], ids=["e-17-bits", "e-32-bits"])
def test_keytocard_pads_e_to_the_attributes_length(e):
    """
    GnuPG's keytocard pads e to ``(e_bits + 7) / 8`` bytes
    (build_privkey_template: ``rsa_e_reqlen``), so with e length 17 it sends
    01 00 01 (3 bytes, as yubikit's _get_key_template always does) and a
    scdaemon that read 0x20 from the card before sends 00 01 00 01. Both
    import the same key.
    """
    c = _card()
    assert c.select() == 0x9000 and c.verify(0x83, PW3) == 0x9000
    assert c.send(0xDB, 0x3F, 0xFF, _import_body(e), extended=True)[1] == 0x9000
    assert c.items[(ItemKind.KEY, "pgp-sig")][2] == crypto.public_der_of(_der(RSA_KEY))
    assert c.verify(0x81, PW1) == 0x9000
    assert c.send(0x2A, 0x9E, 0x9A, b"\x30" * 51, le=256)[1] == 0x9000


# ================================================================ 3. 5F52, C0, 7F66, 7F74, F9, D6-D8, 6E


def test_historical_bytes_state_extended_length_information():
    """
    5F52 is 00 73 00 00 E0 05 90 00 on a YubiKey 5: card capabilities E0 =
    command chaining (80), extended Lc/Le (40) and extended length
    information (20, ISO 7816-4 table 118). vsc answered C0. GnuPG's
    parse_historical reads 80 and 40 only, which stay set.
    """
    c = _card()
    assert c.select() == 0x9000
    assert c.get_data(0x5F52) == (_yubikey(0x5F52), 0x9000)
    assert _yubikey(0x5F52) == bytes.fromhex("00730000e0059000")


def test_extended_capabilities_are_a_yubikey_5s():
    """
    C0 is 7D 00 0B FE 08 00 00 FF 00 00 on a YubiKey 5: GET CHALLENGE, key
    import, PW status changeable, private DOs, attributes changeable and KDF
    (7D); no secure messaging; GET CHALLENGE up to 0x0BFE bytes;
    certificates up to 0x0800; special DOs up to 0xFF; no PIN block 2, no
    MSE. vsc answered 5C 00 04 00 ... (no KDF, challenges up to 1024). GET
    CHALLENGE now gives what C0 promises and no byte more.
    """
    c = _card()
    assert c.select() == 0x9000
    caps = bytes.fromhex("7d000bfe080000ff0000")
    assert _yubikey(0xC0) == caps
    assert c.get_data(0xC0) == (caps, 0x9000)
    assert _outer_and_inner(c)[2][0xC0] == caps
    body, sw = c.send(0x84, le=0x0BFE, extended=True)
    assert sw == 0x9000 and len(body) == 0x0BFE
    assert c.send(0x84, le=0x0BFF, extended=True)[1] == 0x6700


def test_kdf_do_says_no_kdf_and_cannot_be_changed():
    """
    With C0's KDF bit, yubikit's get_kdf reads F9 (Kdf.parse: 81 00 is
    KdfNone) and GnuPG 2.2's gpg --card-status shows "KDF setting ......:
    off" as for a YubiKey; GnuPG's pin2hash_if_kdf hashes a PIN only when F9
    has 90 bytes or more with algorithm 03, so PINs still go as typed. "No
    KDF" is 81 01 00 (GnuPG card-util kdf_setup "off", yubikit KdfNone). PW1
    is the PIV PIN, which PIV tools send as typed, so KDF cannot be turned on:
    PUT DATA F9 answers 6985 (after PW3: 6982 without it), whatever it says -
    on a YubiKey it would also reset PW1 and PW3 to their defaults.
    """
    c = _card()
    assert c.select() == 0x9000
    assert c.get_data(0xF9) == (bytes.fromhex("810100"), 0x9000)
    gnupg_kdf = bytes.fromhex("810103820108830400000400") + bytes(78)  # KDF-ITERSALTED-S2K, 90 bytes
    assert c.send(0xDA, 0x00, 0xF9, gnupg_kdf)[1] == 0x6982
    assert c.verify(0x83, PW3) == 0x9000
    assert c.send(0xDA, 0x00, 0xF9, gnupg_kdf)[1] == 0x6985
    assert c.send(0xDA, 0x00, 0xF9, bytes.fromhex("810100"))[1] == 0x6985
    assert c.get_data(0xF9) == (bytes.fromhex("810100"), 0x9000)
    assert c.verify(0x82, PW1) == 0x9000  # the PIN as typed


def test_application_related_data_has_a_yubikey_5s_layout():
    """
    A YubiKey 5's 6E holds 4F, 5F52, 7F74 (81 01 20: a button) and 73; 7F66
    (02 02 0B FE 02 02 0B FE) is inside 73, after DE. yubikit's
    ApplicationRelatedData.parse looks for 7F66 and 7F74 in the outer level
    only: on a YubiKey it finds GENERAL_FEATURE_MANAGEMENT.BUTTON and no
    extended length information. vsc had 7F66 outside 73 and no 7F74. The
    attestation key's DOs (DA, D9, a fourth fingerprint) are not here: this
    card has no attestation key.
    """
    c = _card()
    assert c.select() == 0x9000
    outer, inner, values = _outer_and_inner(c)
    y_outer = tlv.decode(tlv.decode_one(YUBIKEY_5_6E, 0x6E))
    y_inner = tlv.decode(next(i.value for i in y_outer if i.tag == 0x73))
    assert outer == [i.tag for i in y_outer] == [0x4F, 0x5F52, 0x7F74, 0x73]
    assert inner == [i.tag for i in y_inner if i.tag not in (0xDA, 0xD9)]
    assert values[0x7F74] == _yubikey(0x7F74) == bytes.fromhex("810120")
    assert values[0x7F66] == _yubikey(0x7F66) == bytes.fromhex("02020bfe02020bfe")
    assert c.get_data(0x7F74) == (bytes.fromhex("810120"), 0x9000)
    assert c.get_data(0x7F66) == (bytes.fromhex("02020bfe02020bfe"), 0x9000)


def test_touch_policy_can_be_set_off_only():
    """
    7F74 says "button" (as D6-D8's second byte 20 did), so GnuPG
    (has_button) and ykman offer to set a touch policy: PUT DATA D6-D8 with
    PW3. "Off" (00 20: yubikit UIF.OFF) is what the card does anyway and is
    accepted; on, fixed and cached need a touch this card cannot sense:
    6A80, and the policy stays off.
    """
    c = _card()
    assert c.select() == 0x9000
    assert c.send(0xDA, 0x00, 0xD6, bytes.fromhex("0020"))[1] == 0x6982
    assert c.verify(0x83, PW3) == 0x9000
    for tag in (0xD6, 0xD7, 0xD8):
        assert c.send(0xDA, 0x00, tag, bytes.fromhex("0020"))[1] == 0x9000
        for on in ("0120", "0220", "0320", "0420"):
            assert c.send(0xDA, 0x00, tag, bytes.fromhex(on))[1] == 0x6A80
        assert c.get_data(tag) == (bytes.fromhex("0020"), 0x9000)


# ================================================================ 4. yubikit itself, where it is installed


def test_yubikit_reads_a_yubikey_5():
    """
    yubikit's OpenPgpSession (yubikey-manager, the library behind ``ykman
    openpgp``) over this card: firmware 5.4.3, manufacturer 6 with a positive
    8-digit serial, the YubiKey 5's historical bytes, a button, KDF none, no
    extended length information in 6E's outer level (as on a YubiKey 5), RSA
    e length 17 before and after its own key generation (which first writes
    the attributes with e length 17), and key import. yubikit is not a
    dependency of vsc: ``./quickstart test`` installs yubikey-manager 5.9.2
    (without its dependencies); where it is missing the test skips, or fails
    under VSC_REQUIRE_INTEGRATION=1.
    """
    try:
        import yubikit.openpgp  # noqa: F401
    except ImportError:
        missing("yubikit is not installed (./quickstart test installs yubikey-manager 5.9.2 with --no-deps)")
    from yubikit.core import TRANSPORT
    from yubikit.core.smartcard import SmartCardConnection
    from yubikit.openpgp import KEY_REF, KEY_STATUS, RSA_SIZE, KdfNone, OpenPgpSession

    card = _card(SERIAL8)

    class Connection(SmartCardConnection):
        transport = TRANSPORT.USB

        def close(self) -> None:
            pass

        def send_and_receive(self, data):
            return card.raw(bytes(data))

    session = OpenPgpSession(Connection())
    assert tuple(session.version) == (5, 4, 3)
    data = session.get_application_related_data()
    assert (data.aid.manufacturer, data.aid.serial, data.aid.version) == (6, 76071752, (3, 4))
    assert data.historical == bytes.fromhex("00730000e0059000")
    assert data.general_feature_management == 0x20 and data.extended_length_info is None
    assert data.discretionary.extended_capabilities.challenge_max_length == 0x0BFE
    assert isinstance(session.get_kdf(), KdfNone)
    assert data.discretionary.attributes_sig.e_len == 17
    session.verify_admin("12345678")
    session.generate_rsa_key(KEY_REF.SIG, RSA_SIZE.RSA2048)
    session.put_key(KEY_REF.DEC, RSA_KEY)
    assert session.get_algorithm_attributes(KEY_REF.SIG).e_len == 17
    assert session.get_key_information()[KEY_REF.DEC] == KEY_STATUS.IMPORTED
    assert card.items[(ItemKind.DATA, openpgp.AID_ITEM)][0] == data.aid
