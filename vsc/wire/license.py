"""
Licence keyfiles ([0044]-[0045], [0064]-[0065], claim 8): what a software
vendor's keyfile generator signs. The keyfile binds a product to one
customer card's public key, with limits (expiry, runs, features) and an
optional rental counter.

    -----BEGIN VSC KEYFILE-----   base64 of KeyfileSchema   -----END VSC KEYFILE-----
"""

from __future__ import annotations

import base64
import binascii

import attrs
import construct as c

from vsc.wire.codec import U8, U16, U32, U64, Array, Bytes, Text
from vsc.wire.errors import ErrorCode, WireError

ARMOR_BEGIN = "-----BEGIN VSC KEYFILE-----"
ARMOR_END = "-----END VSC KEYFILE-----"
#: no keyfile's text is longer (the largest, armored, is under 6 KiB): a longer file is refused unread
MAX_KEYFILE_TEXT = 64 * 1024


@attrs.frozen
class License:
    product: str
    license_id: bytes  # 16 random bytes: names this grant (rental counters are per grant)
    card_key: bytes  # the customer card's public key, SubjectPublicKeyInfo DER
    slot: str  # which card slot holds the matching private key
    issued: int  # seconds since the epoch
    expires: int  # 0 = never
    runs: int  # 0 = unlimited; else the grant funds a counter with this many runs
    counter: str  # the card counter each run costs a unit of ("" = none)
    cost: int  # units per run
    features: tuple = attrs.field(converter=tuple, default=())
    vendor: str = ""


_LicenseBody = c.Struct(
    "magic" / c.Const(b"VSCL"),
    "format" / c.Const(1, U8),
    "product" / Text(U8, 128, 1, "product"),
    "license_id" / c.Bytes(16),
    "card_key" / Bytes(U16, 1200, 1, "card_key"),
    "slot" / Text(U8, 8, 1, "slot"),
    "issued" / U64,
    "expires" / U64,
    "runs" / U32,
    "counter" / Text(U8, 64, 0, "counter"),
    "cost" / U32,
    "features" / Array(U8, Text(U8, 64, 1, "feature"), 64, 0, "features"),
    "vendor" / Text(U8, 128, 0, "vendor"),
)

KeyfileSchema = c.Struct(
    "body" / Bytes(U16, 4096, 1, "licence body"),
    "signature" / Bytes(U8, 128, 1, "signature"),
    c.Terminated,
)

ChallengeSchema = c.Struct(
    "label" / c.Const(b"vsc1 licence proof"),
    "product" / Text(U8, 128, 1, "product"),
    "license_id" / c.Bytes(16),
    "nonce" / c.Bytes(32),
)


def _one_line(what: str, e: Exception) -> str:
    """A construct error as one line: "what: field: reason" (user-facing messages are one line)."""
    lines = str(e).strip().splitlines() or ["invalid"]
    path = getattr(e, "path", None) or ""
    field = path.rsplit("->", 1)[-1].strip() if "->" in path else ""
    return f"{what}: {field}: {lines[-1]}" if field else f"{what}: {lines[-1]}"


def encode_body(lic: License) -> bytes:
    """WireError for a licence that does not fit the format (a field too long, a negative number...)."""
    try:
        return _LicenseBody.build(attrs.asdict(lic))
    except (c.ConstructError, ValueError, TypeError) as e:
        raise WireError(ErrorCode.MALFORMED, _one_line("licence", e)) from None


def decode_body(data: bytes) -> License:
    try:
        p = _LicenseBody.parse(data)
    except c.ConstructError as e:
        raise WireError(ErrorCode.MALFORMED, _one_line("licence", e)) from None
    return License(**{f.name: p[f.name] for f in attrs.fields(License)})


def armor(body: bytes, signature: bytes) -> str:
    raw = KeyfileSchema.build(dict(body=body, signature=signature))
    text = base64.b64encode(raw).decode("ascii")
    lines = [text[i : i + 64] for i in range(0, len(text), 64)]
    return "\n".join([ARMOR_BEGIN, *lines, ARMOR_END]) + "\n"


def dearmor(text: str) -> tuple[bytes, bytes]:
    """(signed body, signature); raises WireError for anything that is not a keyfile."""
    lines = [ln.strip() for ln in text.strip().splitlines()]
    if not lines or lines[0] != ARMOR_BEGIN or lines[-1] != ARMOR_END:
        raise WireError(ErrorCode.MALFORMED, "not a vsc keyfile (missing BEGIN/END VSC KEYFILE lines)")
    try:
        payload = "".join(lines[1:-1])
        raw = base64.b64decode(payload, validate=True)
        if base64.b64encode(raw).decode("ascii") != payload:  # canonical only: one keyfile, one text
            raise ValueError("non-canonical base64")
        parsed = KeyfileSchema.parse(raw)
    except (binascii.Error, ValueError):
        raise WireError(ErrorCode.MALFORMED, "keyfile is not valid base64") from None
    except c.ConstructError as e:
        raise WireError(ErrorCode.MALFORMED, _one_line("keyfile", e)) from None
    return parsed.body, parsed.signature


def challenge(product: str, license_id: bytes, nonce: bytes) -> bytes:
    return ChallengeSchema.build(dict(product=product, license_id=license_id, nonce=nonce))
