"""
Review follow-up: what the card tells tools before any application is
selected, and the YubiKey management application.

* The ATR (vsc.card.vpcd.ATR, built by vsc.wire.apdu.build_atr) is a
  YubiKey 5's over USB CCID. Sources: pcsc-tools' smartcard_list.txt
  ("Yubico YubiKey 5 NFC (PKI)"), OpenSC 0.23 src/libopensc/card-openpgp.c
  (its ATR table: "Yubikey 5 (OpenPGP v3.4)") and card-piv.c
  ``piv_match_card_continued`` (compact-TLV tag 5 holding "YubiKey" makes
  the card a YubiKey). The real tools are in tests/test_pcsc_atr.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vsc.wire import apdu
from vsc.wire.errors import WireError

#: OpenSC card-openpgp.c 0.23, pgp_atrs[]: "3b:fd:13:00:00:81:31:fe:15:80:73:c0:21:c0:57:59:75:62:69:4b:65:79:40"
YUBIKEY5_ATR = bytes.fromhex("3bfd1300008131fe158073c021c057597562694b657940")


def _compact_tlv(hist: bytes) -> dict[int, bytes]:
    """ISO/IEC 7816-4 8.1.1 compact TLV after the category indicator 80 (as OpenSC's sc_compacttlv_find_tag)."""
    assert hist[0] == 0x80
    out, i = {}, 1
    while i < len(hist):
        tag, n = hist[i] >> 4, hist[i] & 0x0F
        out[tag] = hist[i + 1:i + 1 + n]
        i += 1 + n
    return out


def test_the_atr_is_a_yubikey_5s_byte_for_byte():
    """
    The card's ATR is the YubiKey 5's USB ATR exactly (OpenSC's table, pcsc-tools' list), TCK included: no
    tool that compares ATRs can tell it from a YubiKey 5 before selecting an application.
    """
    from vsc.card.vpcd import ATR, HISTORICAL

    assert ATR == YUBIKEY5_ATR
    assert apdu.parse_atr(ATR) == HISTORICAL
    with pytest.raises(WireError):  # vsc's former ATR form is no longer what the card parses as its own
        apdu.parse_atr(bytes.fromhex("3b8d0180") + b"\x67vsc-piv" + bytes.fromhex("730000c0") + b"\x00")


def test_opensc_reads_yubikey_from_the_historical_bytes():
    """
    OpenSC 0.23 card-piv.c: historical bytes starting 80 (compact TLV) whose tag 5 holds exactly the 7 bytes
    "YubiKey" make the card SC_CARD_TYPE_PIV_II_YUBIKEY4 (then GET VERSION and a YubiKey's card_issues); the
    card capabilities (tag 7, 3 bytes) still say command chaining and extended Lc/Le (third byte C0, ISO/IEC
    7816-4 8.1.1.2.7) as the old ATR did.
    """
    from vsc.card.vpcd import HISTORICAL

    tlv = _compact_tlv(HISTORICAL)
    assert tlv[0x5] == b"YubiKey"
    assert tlv[0x7] == bytes.fromhex("c021c0") and tlv[0x7][2] & 0xC0 == 0xC0
    assert b"vsc" not in HISTORICAL


def test_pcsc_tools_names_the_card_a_yubikey_5():
    """pcsc-tools' ATR list (what pcsc_scan prints) names the card's ATR a YubiKey 5, where the list is installed."""
    listing = Path("/usr/share/pcsc/smartcard_list.txt")
    if not listing.exists():
        pytest.skip("pcsc-tools' smartcard_list.txt is not installed")
    from vsc.card.vpcd import ATR

    lines = listing.read_text(errors="replace").splitlines()
    spaced = " ".join(f"{b:02X}" for b in ATR)
    i = lines.index(spaced)
    assert "YubiKey 5" in lines[i + 1]
