"""
The YubiKey management application's formats (AID A0 00 00 05 27 47 11 17):
the version string SELECT answers and the DeviceInfo READ CONFIG (INS 1D)
answers. Sources: yubikit (github Yubico/yubikey-manager,
yubikit/management.py: ``_ManagementSmartCardBackend`` reads the version
with ``Version.from_string`` from SELECT's answer, ``DeviceInfo.parse``: one
length byte, then TLVs with one-byte tags and lengths, TAG_USB_SUPPORTED 01,
TAG_SERIAL 02, TAG_USB_ENABLED 03, TAG_FORM_FACTOR 04, TAG_VERSION 05,
TAG_AUTO_EJECT_TIMEOUT 06, TAG_CHALRESP_TIMEOUT 07, TAG_DEVICE_FLAGS 08,
TAG_CONFIG_LOCK 0A); Yubico.NET.SDK users-manual "Get device info" (the
same layout); GnuPG scd/app.c ``app_new_register`` (skips the length byte,
reads 02 serial of up to 4 bytes, 04 form factor, 05 version).

Only these fixed layouts are built here; the applet is
vsc.protocol.management.
"""

from __future__ import annotations

import attrs
import construct as c

from vsc.wire.errors import ErrorCode, WireError

U8 = c.Int8ub
U16 = c.Int16ub
U32 = c.Int32ub

AID = bytes.fromhex("a000000527471117")

# yubikit CAPABILITY
CAP_OTP = 0x01
CAP_U2F = 0x02
CAP_OPENPGP = 0x08
CAP_PIV = 0x10
CAP_OATH = 0x20
CAP_HSMAUTH = 0x100
CAP_FIDO2 = 0x200


def _tlv(tag: int, value) -> c.Struct:
    return c.Struct("tag" / c.Const(bytes([tag])), "len" / c.Const(bytes([value.sizeof()])), "value" / value)


#: DeviceInfo as a YubiKey 5 without NFC answers it, in its tag order
_DeviceInfo = c.FocusedSeq("info", "info" / c.Prefixed(U8, c.Struct(
    "usb_supported" / _tlv(0x01, U16),
    "serial" / _tlv(0x02, U32),
    "usb_enabled" / _tlv(0x03, U16),
    "form_factor" / _tlv(0x04, U8),
    "version" / _tlv(0x05, c.Array(3, U8)),
    "auto_eject_timeout" / _tlv(0x06, U16),
    "chalresp_timeout" / _tlv(0x07, U8),
    "device_flags" / _tlv(0x08, U8),
    "config_lock" / _tlv(0x0A, U8),
    c.Terminated,
)), c.Terminated)


@attrs.frozen
class DeviceInfo:
    usb_supported: int
    serial: int
    usb_enabled: int
    form_factor: int
    version: tuple[int, int, int]
    auto_eject_timeout: int = 0
    chalresp_timeout: int = 15
    device_flags: int = 0
    config_locked: bool = True


def build_device_info(info: DeviceInfo) -> bytes:
    """``len | 01 02 usb-supported | 02 04 serial | 03 02 usb-enabled | 04 01 ff | 05 03 version | 06 02 | 07 01 |
    08 01 | 0A 01 lock``."""
    try:
        return _DeviceInfo.build(dict(
            usb_supported=dict(value=info.usb_supported), serial=dict(value=info.serial),
            usb_enabled=dict(value=info.usb_enabled), form_factor=dict(value=info.form_factor),
            version=dict(value=list(info.version)), auto_eject_timeout=dict(value=info.auto_eject_timeout),
            chalresp_timeout=dict(value=info.chalresp_timeout), device_flags=dict(value=info.device_flags),
            config_lock=dict(value=1 if info.config_locked else 0)))
    except c.ConstructError as e:
        raise WireError(ErrorCode.MALFORMED, f"DeviceInfo: {str(e).strip()}") from None


def parse_device_info(raw: bytes) -> DeviceInfo:
    """The inverse of ``build_device_info`` (strict: this layout only)."""
    try:
        p = _DeviceInfo.parse(raw)
    except c.ConstructError as e:
        raise WireError(ErrorCode.MALFORMED, f"DeviceInfo: {str(e).strip()}") from None
    return DeviceInfo(p.usb_supported.value, p.serial.value, p.usb_enabled.value, p.form_factor.value,
                      tuple(p.version.value), p.auto_eject_timeout.value, p.chalresp_timeout.value,
                      p.device_flags.value, bool(p.config_lock.value))


def version_string(version: tuple[int, int, int]) -> bytes:
    """What SELECT answers: the firmware version in ASCII, ``5.4.3`` (yubikit ``Version.from_string``)."""
    return ".".join(str(v) for v in version).encode("ascii")
