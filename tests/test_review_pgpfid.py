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
