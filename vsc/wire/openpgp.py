"""
The OpenPGP card application's own formats (OpenPGP Smart Card Application
3.4, "the spec" below): the data objects whose bytes are fixed layouts rather
than BER-TLV — the AID, the historical bytes, the extended capabilities, the
PW status bytes, algorithm attributes, the extended length information, the
signature counter, fingerprints and generation times — and the two special
forms of key import (the extended header list's "7F48" template: tags and
lengths without values) and of ECDSA signatures (r || s, not DER).

BER-TLV itself is vsc.wire.tlv; command and response APDUs are
vsc.wire.apdu. Parsing is strict: every schema ends in ``Terminated`` and
every construct error becomes one ``WireError(MALFORMED)``.
"""

from __future__ import annotations

import attrs
import construct as c

from vsc.wire import tlv
from vsc.wire.errors import ErrorCode, WireError

U8 = c.Int8ub
U16 = c.Int16ub

#: RID D2 76 00 01 24, application 01 (OpenPGP)
RID_APP = bytes.fromhex("d27600012401")
VERSION = (3, 4)
#: Yubico's manufacturer ID (GnuPG scd/app-openpgp.c get_manufacturer: 0x0006 "Yubico"), as a YubiKey 5's AID
#: carries it: D2 76 00 01 24 01 | 03 04 | 00 06 | serial (BCD) | 00 00
MANUFACTURER = 0x0006
#: the manufacturer of cards whose OpenPGP keys predate the Yubico form: 0xFF00-0xFFFE is the spec's "unmanaged S/N
#: range" (4.2.1). Kept for such a card while it holds a key: GnuPG's key stubs name the card by its full AID
MANUFACTURER_LEGACY = 0xFF56
#: a YubiKey's serial number has at most 8 decimal digits: its AID carries them in BCD (4 bytes)
MAX_BCD_SERIAL = 99_999_999

# the algorithm IDs of the algorithm attributes (spec 4.4.3.9)
ALGO_RSA = 0x01
ALGO_ECDH = 0x12
ALGO_ECDSA = 0x13
ALGO_EDDSA = 0x16
OID_P256 = bytes.fromhex("2a8648ce3d030107")
OID_ED25519 = bytes.fromhex("2b06010401da470f01")  # 1.3.6.1.4.1.11591.15.1
OID_CV25519 = bytes.fromhex("2b060104019755010501")  # 1.3.6.1.4.1.3029.1.5.1


def _wrap(what: str, fn, *args):
    try:
        return fn(*args)
    except c.ConstructError as e:
        raise WireError(ErrorCode.MALFORMED, f"OpenPGP {what}: {str(e).strip()}") from None


# ---------------------------------------------------------------- AID (spec 4.2.1)

AidSchema = c.Struct(
    "rid_app" / c.Const(RID_APP),
    "major" / U8,
    "minor" / U8,
    "manufacturer" / U16,
    "serial" / c.Bytes(4),
    "rfu" / c.Const(b"\x00\x00"),
    c.Terminated,
)


def build_aid(serial4: bytes, manufacturer: int = MANUFACTURER) -> bytes:
    """The full 16-byte AID: RID/application, version 3.4, manufacturer, a 4-byte serial, RFU."""
    return _wrap("AID", AidSchema.build, dict(major=VERSION[0], minor=VERSION[1], manufacturer=manufacturer,
                                              serial=serial4))


def parse_aid(raw: bytes):
    return _wrap("AID", AidSchema.parse, bytes(raw))


#: two decimal digits per byte, high nibble first: 12 34 56 78 is 12345678 (yubikit OpenPgpAid.serial reads
#: int(aid[10:14].hex()); GnuPG scd/app.c app_munge_serialno writes it so)
BcdSerial = c.ExprAdapter(
    c.Array(4, c.ExprAdapter(U8, lambda b, ctx: 10 * (b >> 4) + (b & 0xF), lambda v, ctx: (v // 10) << 4 | v % 10)),
    lambda digits, ctx: int("".join(f"{d:02d}" for d in digits)),
    lambda n, ctx: [n // 10 ** (6 - 2 * i) % 100 for i in range(4)])


def bcd_serial(n: int) -> bytes:
    """A serial number of up to 8 decimal digits as the 4 BCD bytes of a YubiKey's AID: 16019180 -> 16 01 91 80."""
    if not 0 <= n <= MAX_BCD_SERIAL:
        raise WireError(ErrorCode.MALFORMED, f"serial {n}: a YubiKey AID holds 8 decimal digits")
    return _wrap("BCD serial", BcdSerial.build, n)


def parse_bcd_serial(raw: bytes) -> int:
    """The AID's 4 serial bytes as a number; a nibble above 9 is no BCD (MALFORMED)."""
    raw = bytes(raw)
    if len(raw) != 4 or any(b >> 4 > 9 or b & 0xF > 9 for b in raw):
        raise WireError(ErrorCode.MALFORMED, f"BCD serial: {raw.hex()}")
    return _wrap("BCD serial", BcdSerial.parse, raw)


# ---------------------------------------------------------------- GET VERSION (INS F1, YubiKey)

#: the firmware version, one BCD byte per part (ykneo-openpgp's VERSION; yubikit's _read_version decodes _bcd)
FirmwareVersion = c.Array(3, c.ExprAdapter(U8, lambda b, ctx: 10 * (b >> 4) + (b & 0xF),
                                           lambda v, ctx: (v // 10) << 4 | v % 10))


def firmware_version(version: tuple[int, int, int]) -> bytes:
    """5.4.3 -> 05 04 03 (each part 0-99)."""
    if not all(0 <= v <= 99 for v in version):
        raise WireError(ErrorCode.MALFORMED, f"firmware version {version}: each part is 0-99 (BCD)")
    return _wrap("firmware version", FirmwareVersion.build, list(version))


# ---------------------------------------------------------------- historical bytes (spec 6, ISO 7816-4 8.1.1)

HistoricalSchema = c.Struct(
    "category" / c.Const(b"\x00"),
    # compact TLV 73: card capabilities, 3 bytes; the third: command chaining (0x80), extended Lc and Le (0x40),
    # extended length information (0x20, ISO 7816-4 table 118: the card has 7F66)
    "caps_tag" / c.Const(b"\x73"),
    "caps" / c.Bytes(3),
    # status indicator: life cycle 05 (operational, activated), SW 90 00
    "status" / c.Const(b"\x05\x90\x00"),
    c.Terminated,
)


def historical_bytes() -> bytes:
    """00 73 00 00 E0 05 90 00: command chaining, extended Lc/Le and extended length information, activated
    (a YubiKey 5's 5F52)."""
    return HistoricalSchema.build(dict(caps=b"\x00\x00\xe0"))


# ---------------------------------------------------------------- extended capabilities C0 (spec 4.4.3.7)

EXT_GET_CHALLENGE = 0x40
EXT_KEY_IMPORT = 0x20
EXT_PW_STATUS_CHANGE = 0x10
EXT_PRIVATE_DOS = 0x08
EXT_ALGO_ATTR_CHANGE = 0x04
EXT_KDF = 0x01  # the KDF data object F9 exists (spec 4.4.3.7); it may say "no KDF" (81 01 00)

ExtendedCapsSchema = c.Struct(
    "flags" / U8,
    "sm_algorithm" / U8,
    "max_challenge" / U16,
    "max_cardholder_cert" / U16,
    "max_special_do" / U16,
    "pin_block_2" / U8,
    "mse" / U8,
    c.Terminated,
)


def extended_capabilities(flags: int, max_challenge: int, max_cert: int, max_special: int) -> bytes:
    return ExtendedCapsSchema.build(dict(flags=flags, sm_algorithm=0, max_challenge=max_challenge,
                                         max_cardholder_cert=max_cert, max_special_do=max_special,
                                         pin_block_2=0, mse=0))


# ---------------------------------------------------------------- extended length information 7F66 (spec 4.1.3.1)

ExtendedLengthSchema = c.Struct(
    "cmd_tag" / c.Const(b"\x02\x02"),
    "max_command" / U16,
    "rsp_tag" / c.Const(b"\x02\x02"),
    "max_response" / U16,
    c.Terminated,
)


def extended_length_info(max_command: int, max_response: int) -> bytes:
    return ExtendedLengthSchema.build(dict(max_command=max_command, max_response=max_response))


# ---------------------------------------------------------------- PW status bytes C4 (spec 4.4.3.8)


@attrs.frozen
class PwStatus:
    pw1_multiple: bool  # False: PW1 (81) is valid for one PSO:CDS only
    pw1_max: int
    rc_max: int
    pw3_max: int
    pw1_tries: int
    rc_tries: int
    pw3_tries: int


PwStatusSchema = c.Struct(
    "pw1_multiple" / U8,
    "pw1_max" / U8,
    "rc_max" / U8,
    "pw3_max" / U8,
    "pw1_tries" / U8,
    "rc_tries" / U8,
    "pw3_tries" / U8,
    c.Terminated,
)


def build_pw_status(s: PwStatus) -> bytes:
    return _wrap("PW status", PwStatusSchema.build, dict(attrs.asdict(s), pw1_multiple=int(s.pw1_multiple)))


def parse_pw_status(raw: bytes) -> PwStatus:
    p = _wrap("PW status", PwStatusSchema.parse, bytes(raw))
    return PwStatus(bool(p.pw1_multiple), p.pw1_max, p.rc_max, p.pw3_max, p.pw1_tries, p.rc_tries, p.pw3_tries)


#: PUT DATA C4 carries the first byte only (00: one PSO:CDS, 01: several)
Pw1Policy = c.Struct("multiple" / c.OneOf(U8, (0, 1)), c.Terminated)


def parse_pw1_policy(raw: bytes) -> bool:
    return bool(_wrap("PW status byte", Pw1Policy.parse, bytes(raw)).multiple)


# ---------------------------------------------------------------- algorithm attributes C1-C3 (spec 4.4.3.9)

RsaAttributesSchema = c.Struct(
    "algo" / c.Const(ALGO_RSA, U8),
    "n_bits" / U16,
    "e_bits" / U16,
    "import_format" / U8,  # 00: standard (e, p, q)
    c.Terminated,
)
EcAttributesSchema = c.Struct(
    "algo" / c.OneOf(U8, (ALGO_ECDH, ALGO_ECDSA, ALGO_EDDSA)),
    "oid" / c.GreedyBytes,
)


#: the public exponent's length in bits a YubiKey states (yubikit RsaAttributes.create: e_len 17, for e = 65537)
RSA_E_BITS = 17


def rsa_attributes(bits: int = 2048, e_bits: int = RSA_E_BITS) -> bytes:
    return RsaAttributesSchema.build(dict(n_bits=bits, e_bits=e_bits, import_format=0))


def ec_attributes(algo: int, oid: bytes) -> bytes:
    return EcAttributesSchema.build(dict(algo=algo, oid=oid))


def parse_attributes(raw: bytes) -> tuple[int, int | bytes]:
    """(ALGO_RSA, modulus bits) or (algorithm id, curve OID); a trailing 00/FF import format byte of EC is dropped."""
    raw = bytes(raw)
    if not raw:
        raise WireError(ErrorCode.MALFORMED, "OpenPGP algorithm attributes: empty")
    if raw[0] == ALGO_RSA:
        p = _wrap("algorithm attributes", RsaAttributesSchema.parse, raw)
        return ALGO_RSA, p.n_bits
    p = _wrap("algorithm attributes", EcAttributesSchema.parse, raw)
    oid = p.oid[:-1] if p.oid[-1:] in (b"\x00", b"\xff") and len(p.oid) > 1 else p.oid
    return p.algo, bytes(oid)


# ---------------------------------------------------------------- counters, fingerprints, times

SignatureCounter = c.Struct("count" / c.Int24ub, c.Terminated)
MAX_SIGNATURES = 0xFFFFFF
Fingerprint = c.Struct("fpr" / c.Bytes(20), c.Terminated)
Timestamp = c.Struct("time" / c.Int32ub, c.Terminated)


def encode_sig_counter(n: int) -> bytes:
    return SignatureCounter.build(dict(count=min(n, MAX_SIGNATURES)))


def decode_sig_counter(raw) -> int:
    return _wrap("signature counter", SignatureCounter.parse, bytes(raw)).count


def per_key(values: list[bytes], size: int) -> bytes:
    """C5 / C6 / CD: the three keys' fingerprints (20 bytes) or times (4) in a row; an unset one is zeros."""
    fixed = [v if len(v) == size else bytes(size) for v in values]
    return _wrap("per-key list", c.Array(len(fixed), c.Bytes(size)).build, fixed)


def check_fingerprint(raw: bytes) -> bytes:
    return _wrap("fingerprint", Fingerprint.parse, bytes(raw)).fpr


def check_timestamp(raw: bytes) -> bytes:
    _wrap("generation time", Timestamp.parse, bytes(raw))
    return bytes(raw)


# ---------------------------------------------------------------- ECDSA signatures: r || s

def ecdsa_raw(r: int, s: int, size: int = 32) -> bytes:
    """The spec's ECDSA signature form (7.2.10): r and s, each left-padded to the field size."""
    return _wrap("ECDSA signature", c.Struct("r" / c.BytesInteger(size), "s" / c.BytesInteger(size)).build,
                 dict(r=r, s=s))


# ---------------------------------------------------------------- PSO: DECIPHER input (spec 7.2.11)

DecipherRsa = c.Struct("padding" / c.Const(b"\x00"), "cryptogram" / c.GreedyBytes)


def decipher_rsa(data: bytes, size: int | None = None) -> bytes:
    """00 || RSA cryptogram -> the cryptogram, left-padded with zeros to ``size`` (the modulus length) when given:
    GnuPG drops leading zero bytes of the cryptogram (an MPI)."""
    cryptogram = _wrap("PSO:DECIPHER", DecipherRsa.parse, bytes(data)).cryptogram
    if size is None:
        return cryptogram
    if not 1 <= len(cryptogram) <= size:
        raise WireError(ErrorCode.MALFORMED, f"PSO:DECIPHER: a cryptogram of {len(cryptogram)} bytes for {size}")
    return _wrap("PSO:DECIPHER", c.BytesInteger(size).build, int.from_bytes(cryptogram, "big"))


def decipher_ecdh(data: bytes) -> bytes:
    """A6 { 7F49 { 86 public point } } -> the point."""
    inner = tlv.decode_one(tlv.decode_one(data, 0xA6), 0x7F49)
    return tlv.decode_one(inner, 0x86)


X25519Point = c.Select(c.Struct(c.Const(b"\x40"), "u" / c.Bytes(32), c.Terminated),
                       c.Struct("u" / c.Bytes(32), c.Terminated))


def x25519_point(point: bytes) -> bytes:
    """A Curve25519 public key as 32 bytes: GnuPG's native form may carry a 40 prefix."""
    return _wrap("X25519 point", X25519Point.parse, bytes(point)).u


# ---------------------------------------------------------------- key import: the extended header list (spec 4.4.3.12)

#: the 7F48 "private key template": tags and lengths only, the values follow concatenated in 5F48
TemplateEntry = c.Struct("tag" / tlv.BerTag, "length" / tlv.BerLength)
TemplateSchema = c.Struct("entries" / c.GreedyRange(TemplateEntry), c.Terminated)

CRT_TAGS = {0xB6: "sig", 0xB8: "dec", 0xA4: "aut"}


@attrs.frozen
class KeyImport:
    role: str  # "sig", "dec", "aut"
    parts: dict = attrs.field(repr=False)  # 91 e, 92 p, 93 q, ... (RSA); 92 private scalar, 99 public (EC)


def parse_key_import(data: bytes) -> KeyImport:
    """4D { B6|B8|A4 {} 7F48 { tag length ... } 5F48 { values } } -> the key's role and its parts by tag."""
    items = tlv.to_dict(tlv.decode_one(data, 0x4D), allowed=(0xB6, 0xB8, 0xA4, 0x7F48, 0x5F48))
    roles = [CRT_TAGS[t] for t in CRT_TAGS if t in items]
    if len(roles) != 1 or 0x7F48 not in items or 0x5F48 not in items:
        raise WireError(ErrorCode.MALFORMED, "OpenPGP key import: one CRT, 7F48 and 5F48 are needed")
    entries = _wrap("private key template", TemplateSchema.parse, items[0x7F48]).entries
    values = items[0x5F48]
    parts, pos = {}, 0
    for e in entries:
        if e.tag in parts or pos + e.length > len(values):
            raise WireError(ErrorCode.MALFORMED, f"OpenPGP key import: tag {e.tag:#x} repeated or past 5F48")
        parts[e.tag] = values[pos:pos + e.length]
        pos += e.length
    if pos != len(values):
        raise WireError(ErrorCode.MALFORMED, "OpenPGP key import: 5F48 does not match the template")
    return KeyImport(roles[0], parts)
