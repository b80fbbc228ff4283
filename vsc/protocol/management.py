"""
The YubiKey management application (AID A0 00 00 05 27 47 11 17), read-only:
what yubikit's ManagementSession (``ykman info``) and GnuPG's scdaemon
(scd/app.c ``app_new_register``) read to learn that a card is a YubiKey,
which firmware it runs, its serial number and which applications it has.

* SELECT (00 A4 04 00|0C, the full AID) answers the firmware version as
  ASCII, ``5.4.3`` (yubikit ``_ManagementSmartCardBackend``:
  ``Version.from_string`` of SELECT's answer; GnuPG selects with P2 00).
* READ CONFIG (00 1D page 00) answers DeviceInfo (vsc.wire.management):
  the PIV serial number (GET SERIAL, INS F8, as on a YubiKey, whose serial is
  one number in every application), firmware 5.4.3, the form factor the PIV
  attestation names (vsc.protocol.piv FORM_FACTOR), USB supported = enabled =
  exactly the applications the card carries (PIV 0x10, OpenPGP 0x08: no OTP,
  FIDO, OATH or HSM auth, which vsc does not have), no NFC tags (a YubiKey 5
  without NFC), and the configuration lock set.
* The writes a YubiKey's management application takes — WRITE CONFIG (1C)
  and SET MODE (16) — answer 6982 (security status not satisfied) as a
  configuration-locked YubiKey refuses them without its lock code: this card
  has no lock code that could be right, and nothing is ever changed. DEVICE
  RESET (1F) exists only on a YubiKey Bio (yubikit ``device_reset``): a
  YubiKey 5 does not know the instruction, 6D00. No effect is ever yielded:
  this application reads and writes nothing of the protected information.
"""

from __future__ import annotations

from typing import Any, Generator

from vsc.protocol.applet import SW_CLA, SW_INS, SW_NOT_FOUND, SW_OK, SW_SECURITY, SW_WRONG_P1P2, CommandFront, Effect
from vsc.wire import management as wire
from vsc.wire.apdu import Command

INS_SELECT = 0xA4
INS_SET_MODE = 0x16
INS_WRITE_CONFIG = 0x1C
INS_READ_CONFIG = 0x1D
INS_DEVICE_RESET = 0x1F

#: the application bits of DeviceInfo (yubikit CAPABILITY) for the card's applications (card.ini names)
CAPABILITIES = {"piv": wire.CAP_PIV, "openpgp": wire.CAP_OPENPGP}


def matches(aid: bytes) -> bool:
    """SELECT names the management application by its full AID (yubikit and GnuPG send all 8 bytes)."""
    return aid == wire.AID


class ManagementApplet(CommandFront):
    """One card's management application: answers only what it was made with, keeps no state but the selection."""

    def __init__(self, serial_number: int, applications, version: tuple[int, int, int] = (5, 4, 3),
                 form_factor: int = 0x00):
        caps = 0
        for name in applications:
            caps |= CAPABILITIES.get(name, 0)
        self.version = version
        self.info = wire.DeviceInfo(usb_supported=caps, serial=serial_number, usb_enabled=caps,
                                    form_factor=form_factor, version=version)
        self._static: dict[str, bytes] = {}

    def reset(self) -> None:
        self.interrupted()

    def _dispatch(self, cmd: Command, data: bytes) -> Generator[Effect, Any, tuple[bytes, int]]:
        yield from ()
        if cmd.cla != 0x00:
            return b"", SW_CLA
        if cmd.ins == INS_SELECT:
            if cmd.p1 != 0x04 or cmd.p2 not in (0x00, 0x0C) or not matches(data):
                return b"", SW_NOT_FOUND
            return (b"" if cmd.p2 == 0x0C else wire.version_string(self.version)), SW_OK
        if cmd.ins == INS_READ_CONFIG:
            if cmd.p1 != 0x00 or cmd.p2 != 0x00:
                return b"", SW_WRONG_P1P2
            return self._cached("info", lambda: wire.build_device_info(self.info)), SW_OK
        if cmd.ins in (INS_WRITE_CONFIG, INS_SET_MODE):
            return b"", SW_SECURITY  # configuration locked: nothing changes
        return b"", SW_INS  # DEVICE RESET (YubiKey Bio only) and anything else
