"""
Smart-card bytes: command and response APDUs (ISO/IEC 7816-3/-4, short and
extended lengths), the vpcd link's messages (written here, read by Twisted's
Int16StringReceiver in vsc.card.vpcd), the card's ATR, and the PIV card
application's own formats (FASC-N, the records the card keeps for its PIN,
PUK and management key in the protected information).

Command APDU cases (Lc = data length, Le = expected response length):

    case 1     CLA INS P1 P2
    case 2s    CLA INS P1 P2 Le                     Le 00 = 256
    case 3s    CLA INS P1 P2 Lc data                Lc 01..FF
    case 4s    CLA INS P1 P2 Lc data Le
    case 2e    CLA INS P1 P2 00 Le1 Le2             Le 0000 = 65536
    case 3e    CLA INS P1 P2 00 Lc1 Lc2 data        Lc 0001..FFFF
    case 4e    CLA INS P1 P2 00 Lc1 Lc2 data Le1 Le2

Anything else is a wrong length (SW 6700): ``parse_command`` raises
``ApduError(0x6700)``; the card, not the reader, checks this (vpcd passes
bytes through unchanged).

vpcd link (vsmartcard's virtual reader; the card is the TCP client): every
message both ways is a 2-byte big-endian length and the payload. A 1-byte
payload from vpcd is a control message (00 power off, 01 power on, 02 reset,
04 get ATR); anything else is a command APDU.
"""

from __future__ import annotations

import enum

import attrs
import construct as c

from vsc.wire.errors import ErrorCode, WireError

U8 = c.Int8ub
U16 = c.Int16ub


class ApduError(Exception):
    """A command the card answers with a status word and no data."""

    def __init__(self, sw: int, why: str = ""):
        super().__init__(f"{sw:04X} {why}".strip())
        self.sw = sw
        self.why = why


# ---------------------------------------------------------------- command APDU


@attrs.frozen
class Command:
    cla: int
    ins: int
    p1: int
    p2: int
    data: bytes = attrs.field(default=b"", converter=bytes, repr=lambda d: f"<{len(d)} bytes>")
    le: int | None = None  # None: no Le field; otherwise 1..256 (short) or 1..65536 (extended)
    extended: bool = False

    @property
    def chained(self) -> bool:
        """CLA bit 5 (0x10): more blocks of this command follow."""
        return bool(self.cla & 0x10)


_Header = c.Struct("cla" / U8, "ins" / U8, "p1" / U8, "p2" / U8)

_Case1 = c.Struct("h" / _Header, c.Terminated)
_Case2S = c.Struct("h" / _Header, "le" / U8, c.Terminated)
_Case3S = c.Struct("h" / _Header, "data" / c.Prefixed(U8, c.GreedyBytes), c.Terminated)
_Case4S = c.Struct("h" / _Header, "data" / c.Prefixed(U8, c.GreedyBytes), "le" / U8, c.Terminated)
_Case2E = c.Struct("h" / _Header, c.Const(b"\x00"), "le" / U16, c.Terminated)
_Case3E = c.Struct("h" / _Header, c.Const(b"\x00"), "data" / c.Prefixed(U16, c.GreedyBytes), c.Terminated)
_Case4E = c.Struct("h" / _Header, c.Const(b"\x00"), "data" / c.Prefixed(U16, c.GreedyBytes), "le" / U16, c.Terminated)

SW_OK = 0x9000
SW_WRONG_LENGTH = 0x6700


def _short_le(v: int) -> int:
    return v or 256


def _ext_le(v: int) -> int:
    return v or 65536


def parse_command(raw) -> Command:
    """
    A command APDU; ``ApduError(0x6700)`` if its lengths do not add up.

    This runs for every APDU the card answers, so it reads the few fixed
    fields by index (a few microseconds) instead of through the construct
    schemas above (tens of microseconds each); ``parse_command_schema`` is the
    same function through the schemas, and tests/test_apdu_fast.py checks
    both give the same Command or the same status word on every case.
    """
    raw = bytes(raw)
    n = len(raw)
    if n < 4:
        raise ApduError(SW_WRONG_LENGTH, f"a command APDU has at least 4 bytes, got {n}")
    cla, ins, p1, p2 = raw[0], raw[1], raw[2], raw[3]
    if n == 4:
        return Command(cla, ins, p1, p2)
    b4 = raw[4]
    if n == 5:
        return Command(cla, ins, p1, p2, le=b4 or 256)
    if b4:
        if n == 5 + b4:
            return Command(cla, ins, p1, p2, raw[5:])
        if n == 6 + b4:
            return Command(cla, ins, p1, p2, raw[5:-1], le=raw[-1] or 256)
        raise ApduError(SW_WRONG_LENGTH, f"Lc {b4} does not match {n} bytes")
    if n == 7:
        return Command(cla, ins, p1, p2, le=((raw[5] << 8) | raw[6]) or 65536, extended=True)
    if n < 7:
        raise ApduError(SW_WRONG_LENGTH, f"{n} bytes with an extended length marker")
    lc = (raw[5] << 8) | raw[6]
    if lc == 0:
        raise ApduError(SW_WRONG_LENGTH, "extended Lc of 0")
    if n == 7 + lc:
        return Command(cla, ins, p1, p2, raw[7:], extended=True)
    if n == 9 + lc:
        return Command(cla, ins, p1, p2, raw[7:7 + lc], le=((raw[-2] << 8) | raw[-1]) or 65536, extended=True)
    raise ApduError(SW_WRONG_LENGTH, f"extended Lc {lc} does not match {n} bytes")


def parse_command_schema(raw) -> Command:
    """``parse_command`` through the construct schemas (the reference the fast path is tested against)."""
    raw = bytes(raw)
    n = len(raw)
    try:
        if n < 4:
            raise ApduError(SW_WRONG_LENGTH, f"a command APDU has at least 4 bytes, got {n}")
        if n == 4:
            p = _Case1.parse(raw)
            return Command(p.h.cla, p.h.ins, p.h.p1, p.h.p2)
        if n == 5:
            p = _Case2S.parse(raw)
            return Command(p.h.cla, p.h.ins, p.h.p1, p.h.p2, le=_short_le(p.le))
        b4 = raw[4]
        if b4:
            if n == 5 + b4:
                p = _Case3S.parse(raw)
                return Command(p.h.cla, p.h.ins, p.h.p1, p.h.p2, p.data)
            if n == 6 + b4:
                p = _Case4S.parse(raw)
                return Command(p.h.cla, p.h.ins, p.h.p1, p.h.p2, p.data, le=_short_le(p.le))
            raise ApduError(SW_WRONG_LENGTH, f"Lc {b4} does not match {n} bytes")
        if n == 7:
            p = _Case2E.parse(raw)
            return Command(p.h.cla, p.h.ins, p.h.p1, p.h.p2, le=_ext_le(p.le), extended=True)
        if n < 7:
            raise ApduError(SW_WRONG_LENGTH, f"{n} bytes with an extended length marker")
        lc = (raw[5] << 8) | raw[6]
        if lc == 0:
            raise ApduError(SW_WRONG_LENGTH, "extended Lc of 0")
        if n == 7 + lc:
            p = _Case3E.parse(raw)
            return Command(p.h.cla, p.h.ins, p.h.p1, p.h.p2, p.data, extended=True)
        if n == 9 + lc:
            p = _Case4E.parse(raw)
            return Command(p.h.cla, p.h.ins, p.h.p1, p.h.p2, p.data, le=_ext_le(p.le), extended=True)
        raise ApduError(SW_WRONG_LENGTH, f"extended Lc {lc} does not match {n} bytes")
    except c.ConstructError as e:  # not reachable once the lengths add up; kept as a guard
        raise ApduError(SW_WRONG_LENGTH, str(e).strip()) from None


def build_command(cmd: Command) -> bytes:
    """The shortest encoding of ``cmd`` (extended when asked or when a length needs it)."""
    h = dict(cla=cmd.cla, ins=cmd.ins, p1=cmd.p1, p2=cmd.p2)
    data, le = cmd.data, cmd.le
    ext = cmd.extended or len(data) > 255 or (le is not None and le > 256)
    if len(data) > 65535 or (le is not None and not 1 <= le <= 65536):
        raise WireError(ErrorCode.MALFORMED, "APDU data or Le out of range")
    if not ext:
        if not data and le is None:
            return _Case1.build(dict(h=h))
        if not data:
            return _Case2S.build(dict(h=h, le=le & 0xFF))
        if le is None:
            return _Case3S.build(dict(h=h, data=data))
        return _Case4S.build(dict(h=h, data=data, le=le & 0xFF))
    if not data and le is None:
        return _Case1.build(dict(h=h))
    if not data:
        return _Case2E.build(dict(h=h, le=le & 0xFFFF))
    if le is None:
        return _Case3E.build(dict(h=h, data=data))
    return _Case4E.build(dict(h=h, data=data, le=le & 0xFFFF))


def command(cla: int, ins: int, p1: int, p2: int, data=b"", le: int | None = None, extended: bool = False) -> bytes:
    """Shorthand: build a command APDU."""
    return build_command(Command(cla, ins, p1, p2, data, le, extended))


# ---------------------------------------------------------------- response APDU

_Response = c.Struct("data" / c.Bytes(c.this._.n - 2), "sw" / U16, c.Terminated)


_ResponseBuild = c.Struct("data" / c.GreedyBytes, "sw" / U16)


def build_response(data=b"", sw: int = SW_OK) -> bytes:
    """The response APDU: data, then SW1 SW2 (by hand: every APDU; ``build_response_schema`` is the reference)."""
    if not 0 <= sw <= 0xFFFF:
        raise WireError(ErrorCode.MALFORMED, f"status word {sw} out of range")
    return bytes(data) + sw.to_bytes(2, "big")


def build_response_schema(data=b"", sw: int = SW_OK) -> bytes:
    return _ResponseBuild.build(dict(data=bytes(data), sw=sw)) if data else U16.build(sw)


def parse_response(raw) -> tuple[bytes, int]:
    raw = bytes(raw)
    if len(raw) < 2:
        raise WireError(ErrorCode.MALFORMED, f"a response APDU has at least 2 bytes, got {len(raw)}")
    p = _Response.parse(raw, n=len(raw))
    return p.data, p.sw


# ---------------------------------------------------------------- vpcd link

VPCD_MAX = 0xFFFF
VpcdFrame = c.Prefixed(U16, c.GreedyBytes)


class VpcdControl(enum.IntEnum):
    POWER_OFF = 0x00
    POWER_ON = 0x01
    RESET = 0x02
    GET_ATR = 0x04


def encode_vpcd(payload: bytes) -> bytes:
    """VpcdFrame's bytes (written by hand: every APDU; tests/test_apdu_fast.py compares them)."""
    if len(payload) > VPCD_MAX:
        raise WireError(ErrorCode.FRAME_TOO_LARGE, f"vpcd payload of {len(payload)} bytes")
    return len(payload).to_bytes(2, "big") + bytes(payload)


def split_vpcd(data: bytes) -> tuple[list[bytes], bytes]:
    """
    The payloads of the whole vpcd frames at the start of ``data``, and the
    bytes left over (the beginning of the next frame): the card's reader of
    the vpcd link (vsc.card.vpcd), one call per read and no struct format
    (a 2-byte length cannot exceed VPCD_MAX).
    """
    out = []
    pos, size = 0, len(data)
    while size - pos >= 2:
        end = pos + 2 + (data[pos] << 8 | data[pos + 1])
        if end > size:
            break
        out.append(data[pos + 2:end])
        pos = end
    return out, (data[pos:] if pos else data)


def control_of(payload: bytes) -> VpcdControl | None:
    """The control message a 1-byte payload is, else None (a command APDU)."""
    if len(payload) != 1:
        return None
    try:
        return VpcdControl(payload[0])
    except ValueError:
        return None


# ---------------------------------------------------------------- ATR

#: A YubiKey 5's interface bytes over USB CCID (3B FD 13 00 00 81 31 FE 15 ...): TA1 13 (Fi 372, Di 4), TB1 00,
#: TC1 00, TD1 81 (T=1, TD2 follows), TD2 31 (T=1, TA3 and TB3 follow), TA3 FE (IFSC 254), TB3 15 (BWI 1, CWI 5).
#: T=1 only, so pcscd and OpenSC never fall back to T=0 and its case-4 rewriting.
YUBIKEY_INTERFACE_BYTES = bytes.fromhex("13000081 31FE15".replace(" ", ""))

_Atr = c.Struct(
    "ts" / c.Const(b"\x3b"),
    "t0" / c.Rebuild(U8, lambda ctx: 0xF0 | len(ctx.historical)),
    "interface" / c.Const(YUBIKEY_INTERFACE_BYTES),
    "historical" / c.Bytes(c.this.t0 & 0x0F),
    "tck" / c.Checksum(U8, lambda data: _xor(data), lambda ctx: _tck_input(ctx)),
)


def _xor(data: bytes) -> int:
    x = 0
    for b in data:
        x ^= b
    return x


def _tck_input(ctx) -> bytes:
    return bytes([ctx.t0]) + YUBIKEY_INTERFACE_BYTES + bytes(ctx.historical)


def build_atr(historical: bytes) -> bytes:
    """``3B FK 13 00 00 81 31 FE 15 <K historical bytes> TCK``: a YubiKey 5's interface bytes over USB (T=1 only),
    hence TCK (XOR of T0..the last historical byte, ISO/IEC 7816-3 8.2.5)."""
    if len(historical) > 15:
        raise WireError(ErrorCode.MALFORMED, "at most 15 historical bytes")
    return _Atr.build(dict(historical=historical))


def parse_atr(raw: bytes) -> bytes:
    """The historical bytes of an ATR built by ``build_atr`` (TCK checked)."""
    try:
        return _Atr.parse(raw).historical
    except c.ConstructError as e:
        raise WireError(ErrorCode.MALFORMED, f"ATR: {str(e).strip()}") from None


# ---------------------------------------------------------------- PIV: FASC-N (TIG SCEPACS, 200 bits)

_FASCN_SS, _FASCN_FS, _FASCN_ES = 0b1011, 0b1101, 0b1111  # data bits, least significant first on the wire


def _fascn_char(value: int) -> int:
    """4 data bits (least significant first) and an odd-parity bit, as a 5-bit integer b1 b2 b4 b8 P."""
    bits = [(value >> i) & 1 for i in range(4)]
    parity = 1 - (sum(bits) & 1)
    out = 0
    for b in bits + [parity]:
        out = (out << 1) | b
    return out


def encode_fascn(agency: str, system: str, credential: str, cs: str, ici: str, pi: str, oc: str, oi: str,
                 poa: str) -> bytes:
    """The 25-byte FASC-N: SS agency FS system FS credential FS cs FS ici FS pi oc oi poa ES LRC."""
    fields = [(agency, 4), (system, 4), (credential, 6), (cs, 1), (ici, 1), (pi, 10), (oc, 1), (oi, 4), (poa, 1)]
    for value, size in fields:
        if len(value) != size or not value.isdigit():
            raise WireError(ErrorCode.MALFORMED, f"FASC-N field {value!r} must be {size} digits")
    chars = [_FASCN_SS]
    chars += [int(d) for d in agency] + [_FASCN_FS] + [int(d) for d in system] + [_FASCN_FS]
    chars += [int(d) for d in credential] + [_FASCN_FS] + [int(cs), _FASCN_FS, int(ici), _FASCN_FS]
    chars += [int(d) for d in pi + oc + oi + poa] + [_FASCN_ES]
    lrc = 0
    for ch in chars:
        lrc ^= ch
    chars.append(lrc)
    bits = 0
    for ch in chars:
        bits = (bits << 5) | _fascn_char(ch)
    return c.BytesInteger(25).build(bits)


def decode_fascn(raw: bytes) -> list[int]:
    """The 40 data characters of a FASC-N (parity and LRC checked); 10 = SS, 11 = FS, 15 = ES... as 4-bit values."""
    if len(raw) != 25:
        raise WireError(ErrorCode.MALFORMED, "a FASC-N is 25 bytes")
    bits = c.BytesInteger(25).parse(raw)
    chars = []
    for i in range(40):
        five = (bits >> (5 * (39 - i))) & 0x1F
        data_bits = [(five >> (4 - k)) & 1 for k in range(4)]
        if (sum(data_bits) + (five & 1)) % 2 != 1:
            raise WireError(ErrorCode.MALFORMED, f"FASC-N character {i} has bad parity")
        chars.append(sum(b << k for k, b in enumerate(data_bits)))
    lrc = 0
    for ch in chars[:-1]:
        lrc ^= ch
    if lrc != chars[-1]:
        raise WireError(ErrorCode.MALFORMED, "FASC-N LRC mismatch")
    return chars


# ---------------------------------------------------------------- PIV: records kept in the protected information


@attrs.frozen
class SecretRecord:
    """A PIN or PUK: its reference value (8 bytes, FF-padded), tries left and the retry limit."""

    value: bytes = attrs.field(converter=bytes, repr=False)
    tries_left: int
    max_tries: int


@attrs.frozen
class ManagementKeyRecord:
    """The card management key (9B): its PIV algorithm (03 3DES, 08/0A/0C AES) and key bytes."""

    alg: int
    key: bytes = attrs.field(converter=bytes, repr=False)


_SecretRecord = c.Struct(
    "format" / c.Const(1, U8),
    "tries_left" / U8,
    "max_tries" / U8,
    "value" / c.Prefixed(U8, c.GreedyBytes),
    c.Terminated,
)
_MgmtRecord = c.Struct("format" / c.Const(1, U8), "alg" / U8, "key" / c.Prefixed(U8, c.GreedyBytes), c.Terminated)


def encode_secret(rec: SecretRecord) -> bytes:
    return _SecretRecord.build(dict(tries_left=rec.tries_left, max_tries=rec.max_tries, value=rec.value))


_SecretHead = c.Struct("format" / c.Const(1, U8), "tries_left" / U8, "max_tries" / U8)


def secret_tries(data) -> int:
    """The tries left of a PIN record, read from its header alone (the check before every key operation)."""
    try:
        return _SecretHead.parse(bytes(data[:3])).tries_left
    except c.ConstructError as e:
        raise WireError(ErrorCode.MALFORMED, f"PIN record: {str(e).strip()}") from None


def decode_secret(data) -> SecretRecord:
    try:
        p = _SecretRecord.parse(bytes(data))
    except c.ConstructError as e:
        raise WireError(ErrorCode.MALFORMED, f"PIN record: {str(e).strip()}") from None
    return SecretRecord(p.value, p.tries_left, p.max_tries)


def encode_mgmt(rec: ManagementKeyRecord) -> bytes:
    return _MgmtRecord.build(dict(alg=rec.alg, key=rec.key))


def decode_mgmt(data) -> ManagementKeyRecord:
    try:
        p = _MgmtRecord.parse(bytes(data))
    except c.ConstructError as e:
        raise WireError(ErrorCode.MALFORMED, f"management key record: {str(e).strip()}") from None
    return ManagementKeyRecord(p.alg, p.key)


def pad_pin(pin: bytes) -> bytes:
    """A PIN as VERIFY carries it: 8 bytes, padded with FF."""
    if not 1 <= len(pin) <= 8:
        raise WireError(ErrorCode.MALFORMED, "a PIN has 1 to 8 bytes")
    return c.Struct("pin" / c.GreedyBytes, "pad" / c.GreedyBytes).build(dict(pin=pin, pad=b"\xff" * (8 - len(pin))))


def unpad_pin(block: bytes) -> bytes:
    """The PIN in an 8-byte FF-padded block (an FF inside the PIN is not allowed)."""
    block = bytes(block)
    pin = block.rstrip(b"\xff")
    if len(block) != 8 or b"\xff" in pin:
        raise WireError(ErrorCode.MALFORMED, "not an FF-padded 8-byte PIN block")
    return pin


# ---------------------------------------------------------------- PIV: yubico-style version / serial answers

Version = c.Struct("major" / U8, "minor" / U8, "patch" / U8, c.Terminated)
Serial32 = c.Int32ub
