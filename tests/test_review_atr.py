"""
Review follow-up: what the card tells tools before any application is
selected, and the YubiKey management application.

* The ATR (vsc.card.vpcd.ATR, built by vsc.wire.apdu.build_atr) is a
  YubiKey 5's over USB CCID. Sources: pcsc-tools' smartcard_list.txt
  ("Yubico YubiKey 5 NFC (PKI)"), OpenSC 0.23 src/libopensc/card-openpgp.c
  (its ATR table: "Yubikey 5 (OpenPGP v3.4)") and card-piv.c
  ``piv_match_card_continued`` (compact-TLV tag 5 holding "YubiKey" makes
  the card a YubiKey). The real tools are in tests/test_pcsc_atr.py.
* The management application (vsc.protocol.management): yubikit
  (yubikey-manager 5.9.2, yubikit/management.py ManagementSession,
  DeviceInfo.parse) drives it in-process; GnuPG 2.2 scd/app.c
  app_new_register's reading of its configuration.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vsc.card.vpcd import build_router
from vsc.protocol import piv
from vsc.protocol.applet import run_sync
from vsc.wire import apdu
from vsc.wire import management as mwire
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
    """pcsc-tools' ATR list (what pcsc_scan prints; ./quickstart test installs pcsc-tools) names the card's ATR a
    YubiKey 5. Without the list the test skips, or fails under VSC_REQUIRE_INTEGRATION=1."""
    listing = Path("/usr/share/pcsc/smartcard_list.txt")
    if not listing.exists():
        from tests.integration import missing
        missing("pcsc-tools' smartcard_list.txt is not installed (apt-get install pcsc-tools)")
    from vsc.card.vpcd import ATR

    lines = listing.read_text(errors="replace").splitlines()
    spaced = " ".join(f"{b:02X}" for b in ATR)
    i = lines.index(spaced)
    assert "YubiKey 5" in lines[i + 1]


# ================================================================ the management application

MGMT_SELECT = bytes.fromhex("00a4040008a000000527471117")
PIV_SELECT = bytes.fromhex("00a4040009a00000030800001000")
SERIALS = ("pcsc-card-1", "mgmt-unit-1", "another card")


class _Drbg:
    def __call__(self, n: int) -> bytes:
        return bytes(n)


def _no_effect(effect):
    raise AssertionError(f"the management application yielded {effect!r}")


class _Card:
    """A card's router (vpcd.build_router, the glue's own) driven synchronously; PIV effects answered as absent."""

    def __init__(self, serial: str, names=("piv", "openpgp")):
        self.router = build_router(serial, list(names), _Drbg())
        self.effects: list = []

    def raw(self, cmd: bytes) -> bytes:
        def perform(effect):
            self.effects.append(effect)
            return None
        return run_sync(self.router.process(bytes(cmd)), perform)

    def sw(self, cmd: bytes) -> tuple[bytes, int]:
        r = self.raw(cmd)
        return r[:-2], int.from_bytes(r[-2:], "big")


def _yubikit_management():
    """yubikit.management (yubikey-manager 5.9.2 and fido2 2.2.1, which ./quickstart test installs with --no-deps)."""
    try:
        import yubikit.management
    except ImportError:
        from tests.integration import missing
        missing("yubikit is not installed (./quickstart test installs yubikey-manager 5.9.2 and fido2 with --no-deps)")
    return yubikit.management


def _session(card: _Card):
    ym = _yubikit_management()
    from yubikit.core import TRANSPORT
    from yubikit.core.smartcard import SmartCardConnection

    class Connection(SmartCardConnection):
        transport = TRANSPORT.USB

        def close(self) -> None:
            pass

        def send_and_receive(self, data):
            r = card.raw(bytes(data))
            return r[:-2], int.from_bytes(r[-2:], "big")

    return ym, ym.ManagementSession(Connection())


def test_yubikit_reads_a_yubikey_5_4_3s_device_info():
    """
    yubikit's ManagementSession (``ykman info``) over the card's router: SELECT answers "5.4.3" (yubikit
    ``Version.from_string``), DeviceInfo (READ CONFIG 00 1D) parses with yubikit's own ``DeviceInfo.parse``:
    serial = the PIV GET SERIAL number (a YubiKey has one serial), firmware 5.4.3, the form factor the PIV
    attestation names, USB supported = enabled = PIV and OpenPGP only (what vsc has: no OTP, FIDO, OATH, HSM
    auth), no NFC, configuration locked. A card enrolled with PIV only shows PIV only.
    """
    from yubikit.core import TRANSPORT

    for serial in SERIALS:
        card = _Card(serial)
        assert card.sw(PIV_SELECT)[1] == 0x9000
        body, sw = card.sw(bytes.fromhex("00f80000"))
        piv_number = int.from_bytes(body, "big")
        ym, session = _session(card)
        assert tuple(session.version) == (5, 4, 3)
        info = session.read_device_info()
        assert info.serial == piv_number
        assert tuple(info.version) == (5, 4, 3) and info.version_name == "5.4.3"
        assert info.form_factor == ym.FORM_FACTOR.from_code(piv.FORM_FACTOR)
        assert info.supported_capabilities == {TRANSPORT.USB: ym.CAPABILITY.PIV | ym.CAPABILITY.OPENPGP}
        assert info.config.enabled_capabilities == {TRANSPORT.USB: ym.CAPABILITY.PIV | ym.CAPABILITY.OPENPGP}
        assert not info.has_transport(TRANSPORT.NFC)
        assert info.is_locked and not info.is_fips and not info.is_sky
    _ym, session = _session(_Card("piv only", ["piv"]))
    assert session.read_device_info().supported_capabilities[TRANSPORT.USB] == ym.CAPABILITY.PIV


def test_gnupg_reads_the_serial_and_version_from_the_config():
    """
    GnuPG 2.2 scd/app.c app_new_register, after SELECT of A0 00 00 05 27 47 11 17 with P2 00: READ CONFIG
    ``00 1D 00 00 00``, skip the first byte (the total length), find tag 02 (serial, at most 4 bytes), 04 (form
    factor, 1 byte) and 05 (version, exactly 3 bytes: cardversion 0x050403, so app_get_dispserialno prints the
    serial as "%lu %03lu %03lu").
    """
    card = _Card(SERIALS[0])
    card.sw(PIV_SELECT)
    number = int.from_bytes(card.sw(bytes.fromhex("00f80000"))[0], "big")
    assert card.sw(MGMT_SELECT[:4] + b"\x08" + mwire.AID) == (b"5.4.3", 0x9000)
    buf, sw = card.sw(bytes.fromhex("001d000000"))
    assert sw == 0x9000 and buf[0] == len(buf) - 1
    tlvs, i = {}, 1
    while i < len(buf):
        tlvs[buf[i]] = buf[i + 2:i + 2 + buf[i + 1]]
        i += 2 + buf[i + 1]
    assert len(tlvs[0x02]) <= 4 and int.from_bytes(tlvs[0x02], "big") == number
    assert tlvs[0x05] == bytes([5, 4, 3]) and len(tlvs[0x04]) == 1


def test_writes_are_refused_as_by_a_locked_yubikey_and_change_nothing():
    """
    A configuration-locked YubiKey refuses WRITE CONFIG and SET MODE without its lock code (yubikit
    ManagementSession.write_device_config / set_mode; Yubico.NET.SDK "Set device info": a lock code set blocks
    every change); vsc answers 6982 with or without a lock code (tag 0B) and changes nothing. DEVICE RESET (1F)
    is a YubiKey Bio command (yubikit device_reset): a YubiKey 5 does not know it, 6D00. DeviceInfo reads the
    same afterwards, and no command of the application ever reaches the protected information (no effect).
    """
    from yubikit.core import TRANSPORT
    from yubikit.core.smartcard import ApduError

    card = _Card(SERIALS[1])
    ym, session = _session(card)
    before = card.sw(bytes.fromhex("001d000000"))
    with pytest.raises(ApduError) as e:
        session.write_device_config(ym.DeviceConfig({TRANSPORT.USB: ym.CAPABILITY.PIV}, None, None, None))
    assert e.value.sw == 0x6982
    with pytest.raises(ApduError) as e:
        session.write_device_config(None, False, bytes(16), bytes(16))  # "clear the lock code" with a guess
    assert e.value.sw == 0x6982
    with pytest.raises(ApduError) as e:
        session.set_mode(ym.Mode(ym.USB_INTERFACE.CCID))
    assert e.value.sw == 0x6982
    with pytest.raises(ApduError) as e:
        session.device_reset()
    assert e.value.sw == 0x6D00
    assert card.sw(bytes.fromhex("001d000000")) == before
    applet = card.router.current
    for ins in range(256):
        for p1p2 in (b"\x00\x00", b"\x11\x00"):
            run_sync(applet.process(bytes([0x00, ins]) + p1p2 + b"\x02\x0b\x00"), _no_effect)
    assert card.sw(bytes.fromhex("001d000000")) == before


def test_selecting_it_deselects_piv_as_on_a_yubikey():
    """
    Selecting another application clears PIV's security status (ISO/IEC 7816-4 7.1.1; on a YubiKey too: OpenSC
    card-piv.c flags every YubiKey CI_OTHER_AID_LOSE_STATE): after SELECT of the management application a PIV
    command is no longer PIV's (GET SERIAL is 6D00 there) until PIV is selected again. PIV stays the application
    current after a reset: the management application is never the default one. A shorter AID (the Yubico RID
    alone) selects nothing: 6A82.
    """
    card = _Card(SERIALS[0])
    assert card.sw(PIV_SELECT)[1] == 0x9000
    assert card.sw(MGMT_SELECT)[1] == 0x9000
    assert card.sw(bytes.fromhex("00f80000"))[1] == 0x6D00
    assert card.sw(bytes.fromhex("00a4040005a000000527"))[1] == 0x6A82
    card.router.reset()
    assert isinstance(card.router.current, piv.PivApplet)
    assert card.sw(bytes.fromhex("001d000000"))[1] == 0x6D00  # PIV's answer, not the management application's
    assert card.sw(PIV_SELECT)[1] == 0x9000 and card.sw(bytes.fromhex("00f80000"))[1] == 0x9000


def test_device_info_schema_round_trips_and_is_strict():
    """vsc.wire.management: DeviceInfo's bytes (yubikit tag numbers and sizes) parse back; a wrong length byte or a
    trailing byte is malformed."""
    info = mwire.DeviceInfo(0x18, 2_000_000_000, 0x18, 0x00, (5, 4, 3))
    raw = mwire.build_device_info(info)
    assert mwire.parse_device_info(raw) == info
    assert raw[:5] == bytes.fromhex("2301020018")
    with pytest.raises(WireError):
        mwire.parse_device_info(raw + b"\x00")
    with pytest.raises(WireError):
        mwire.parse_device_info(bytes([raw[0] + 1]) + raw[1:] + b"\x00")
