"""
BER-TLV (ISO/IEC 7816-4 annex D, X.690 definite lengths) as the PIV card
application speaks it, and the few DER structures the card builds itself.

* Tags are 1-3 bytes and are handled as integers (``0x5FC102``, ``0x7F49``).
* Lengths are definite: ``0x00-0x7F``, ``81 xx``, ``82 xxxx``, ``83 xxxxxx``;
  building always picks the shortest form, which is also the DER rule, so
  the same codec builds the DER of a certification request.
* Parsing is strict: a truncated value, an indefinite length (``80``), a tag
  longer than 3 bytes or trailing bytes raise ``WireError(MALFORMED)``.

Values in and out are ``Tlv`` (attrs) or ``(tag, value)`` pairs.
"""

from __future__ import annotations

from typing import Iterable

import attrs
import construct as c

from vsc.wire.errors import ErrorCode, WireError

MAX_TAG_BYTES = 3
MAX_LENGTH = 0xFFFFFF


@attrs.frozen
class Tlv:
    tag: int
    value: bytes = attrs.field(converter=bytes)


class _BerTag(c.Construct):
    """A BER tag: 1 byte, or ``xx11111`` followed by bytes with bit 8 set on all but the last."""

    def _parse(self, stream, context, path):
        first = c.stream_read(stream, 1, path)[0]
        tag = first
        if first & 0x1F != 0x1F:
            return tag
        for n in range(1, MAX_TAG_BYTES):
            b = c.stream_read(stream, 1, path)[0]
            tag = (tag << 8) | b
            if not b & 0x80:
                return tag
        raise c.ValidationError(f"BER tag {tag:#x} is longer than {MAX_TAG_BYTES} bytes", path=path)

    def _build(self, obj, stream, context, path):
        tag = int(obj)
        if not 0 <= tag <= 0xFFFFFF:
            raise c.ValidationError(f"BER tag {tag:#x} out of range", path=path)
        raw = tag.to_bytes(max(1, (tag.bit_length() + 7) // 8), "big")
        # the encoding must be self-consistent: multi-byte iff the first byte says so
        multi = raw[0] & 0x1F == 0x1F
        if multi != (len(raw) > 1) or any(not b & 0x80 for b in raw[1:-1]) or (len(raw) > 1 and raw[-1] & 0x80):
            raise c.ValidationError(f"{tag:#x} is not a valid BER tag", path=path)
        c.stream_write(stream, raw, len(raw), path)
        return obj

    def _sizeof(self, context, path):
        raise c.SizeofError(path=path)


class _BerLength(c.Construct):
    """A definite BER length, shortest form when building (so also DER)."""

    def _parse(self, stream, context, path):
        first = c.stream_read(stream, 1, path)[0]
        if first < 0x80:
            return first
        n = first & 0x7F
        if n == 0:
            raise c.ValidationError("indefinite BER length", path=path)
        if n > 3:
            raise c.ValidationError(f"BER length of {n} bytes", path=path)
        return int.from_bytes(c.stream_read(stream, n, path), "big")

    def _build(self, obj, stream, context, path):
        n = int(obj)
        if not 0 <= n <= MAX_LENGTH:
            raise c.ValidationError(f"BER length {n} out of range", path=path)
        if n < 0x80:
            raw = bytes([n])
        else:
            body = n.to_bytes((n.bit_length() + 7) // 8, "big")
            raw = bytes([0x80 | len(body)]) + body
        c.stream_write(stream, raw, len(raw), path)
        return obj

    def _sizeof(self, context, path):
        raise c.SizeofError(path=path)


BerTag = _BerTag()
BerLength = _BerLength()

TlvSchema = c.Struct("tag" / BerTag, "value" / c.Prefixed(BerLength, c.GreedyBytes))
TlvListSchema = c.Struct("items" / c.GreedyRange(TlvSchema), c.Terminated)


# ---------------------------------------------------------------- the fast path
# The card parses and builds TLVs for every APDU, and construct costs tens of microseconds per call; the
# functions below do the same by index (encode, encode_many, decode use them). The schemas above stay the
# definition: tests/test_apdu_fast.py checks both agree, value for value and error for error.


def _tag_raw(tag: int) -> bytes:
    if not 0 <= tag <= 0xFFFFFF:
        raise WireError(ErrorCode.MALFORMED, f"BER-TLV: BER tag {tag:#x} out of range")
    if tag < 0x100:
        if tag & 0x1F == 0x1F:
            raise WireError(ErrorCode.MALFORMED, f"BER-TLV: {tag:#x} is not a valid BER tag")
        return bytes((tag,))
    raw = tag.to_bytes((tag.bit_length() + 7) // 8, "big")
    if raw[0] & 0x1F != 0x1F or any(not b & 0x80 for b in raw[1:-1]) or raw[-1] & 0x80:
        raise WireError(ErrorCode.MALFORMED, f"BER-TLV: {tag:#x} is not a valid BER tag")
    return raw


def _length_raw(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    if n <= 0xFF:
        return bytes((0x81, n))
    if n <= 0xFFFF:
        return bytes((0x82, n >> 8, n & 0xFF))
    if n <= MAX_LENGTH:
        return bytes((0x83, n >> 16, (n >> 8) & 0xFF, n & 0xFF))
    raise WireError(ErrorCode.MALFORMED, f"BER-TLV: BER length {n} out of range")


def _decode_fast(data: bytes) -> list[Tlv]:
    out, pos, end = [], 0, len(data)
    while pos < end:
        first = data[pos]
        pos += 1
        tag = first
        if first & 0x1F == 0x1F:
            for _ in range(1, MAX_TAG_BYTES):
                if pos >= end:
                    raise WireError(ErrorCode.MALFORMED, "BER-TLV: truncated tag")
                b = data[pos]
                pos += 1
                tag = (tag << 8) | b
                if not b & 0x80:
                    break
            else:
                raise WireError(ErrorCode.MALFORMED, f"BER-TLV: BER tag {tag:#x} is longer than {MAX_TAG_BYTES} bytes")
        if pos >= end:
            raise WireError(ErrorCode.MALFORMED, "BER-TLV: truncated length")
        first = data[pos]
        pos += 1
        if first < 0x80:
            length = first
        else:
            k = first & 0x7F
            if k == 0:
                raise WireError(ErrorCode.MALFORMED, "BER-TLV: indefinite BER length")
            if k > 3:
                raise WireError(ErrorCode.MALFORMED, f"BER-TLV: BER length of {k} bytes")
            if pos + k > end:
                raise WireError(ErrorCode.MALFORMED, "BER-TLV: truncated length")
            length = int.from_bytes(data[pos:pos + k], "big")
            pos += k
        if pos + length > end:
            raise WireError(ErrorCode.MALFORMED, f"BER-TLV: a value of {length} bytes with {end - pos} left")
        out.append(Tlv(tag, data[pos:pos + length]))
        pos += length
    return out


def encode(tag: int, value=b"") -> bytes:
    """One TLV."""
    value = bytes(value)
    return _tag_raw(tag) + _length_raw(len(value)) + value


def encode_schema(tag: int, value=b"") -> bytes:
    """``encode`` through the construct schema (the reference)."""
    try:
        return TlvSchema.build(dict(tag=tag, value=bytes(value)))
    except c.ConstructError as e:
        raise WireError(ErrorCode.MALFORMED, f"BER-TLV: {str(e).strip()}") from None


def encode_many(items: Iterable[Tlv | tuple[int, bytes]]) -> bytes:
    """Several TLVs, concatenated in order."""
    return b"".join(encode(it.tag, it.value) if isinstance(it, Tlv) else encode(it[0], it[1]) for it in items)


def encode_many_schema(items: Iterable[Tlv | tuple[int, bytes]]) -> bytes:
    """``encode_many`` through the construct schema (the reference)."""
    out = []
    for it in items:
        if isinstance(it, Tlv):
            out.append(dict(tag=it.tag, value=it.value))
        else:
            out.append(dict(tag=it[0], value=bytes(it[1])))
    try:
        return c.GreedyRange(TlvSchema).build(out)
    except c.ConstructError as e:
        raise WireError(ErrorCode.MALFORMED, f"BER-TLV: {str(e).strip()}") from None


def decode(data) -> list[Tlv]:
    """Every TLV in ``data``; the whole buffer must be TLVs."""
    return _decode_fast(bytes(data))


def decode_schema(data) -> list[Tlv]:
    """``decode`` through the construct schema (the reference)."""
    try:
        parsed = TlvListSchema.parse(bytes(data))
    except c.ConstructError as e:
        raise WireError(ErrorCode.MALFORMED, f"BER-TLV: {str(e).strip()}") from None
    return [Tlv(i.tag, i.value) for i in parsed["items"]]


def decode_one(data, tag: int | None = None) -> bytes:
    """The value of the single TLV that ``data`` is (checking its tag when given)."""
    items = decode(data)
    if len(items) != 1:
        raise WireError(ErrorCode.MALFORMED, f"BER-TLV: expected one TLV, found {len(items)}")
    if tag is not None and items[0].tag != tag:
        raise WireError(ErrorCode.MALFORMED, f"BER-TLV: expected tag {tag:#x}, found {items[0].tag:#x}")
    return items[0].value


def to_dict(data, allowed: Iterable[int] | None = None) -> dict[int, bytes]:
    """The TLVs of ``data`` by tag; a repeated tag (or one not ``allowed``) is malformed."""
    out: dict[int, bytes] = {}
    allow = set(allowed) if allowed is not None else None
    for it in decode(data):
        if it.tag in out:
            raise WireError(ErrorCode.MALFORMED, f"BER-TLV: tag {it.tag:#x} repeated")
        if allow is not None and it.tag not in allow:
            raise WireError(ErrorCode.MALFORMED, f"BER-TLV: unexpected tag {it.tag:#x}")
        out[it.tag] = it.value
    return out


def tag_bytes(tag: int) -> bytes:
    """The encoding of a tag alone (the ``5C`` tag list of GET DATA / PUT DATA carries these)."""
    try:
        return BerTag.build(tag)
    except c.ConstructError as e:
        raise WireError(ErrorCode.MALFORMED, f"BER-TLV: {str(e).strip()}") from None


def parse_tag(data) -> int:
    """A tag alone (the value of a ``5C`` tag list with one tag): by index, every GET DATA reads one."""
    data = bytes(data)
    if not data:
        raise WireError(ErrorCode.MALFORMED, "BER-TLV tag: no bytes")
    tag, pos = data[0], 1
    if tag & 0x1F == 0x1F:
        for _ in range(1, MAX_TAG_BYTES):
            if pos >= len(data):
                raise WireError(ErrorCode.MALFORMED, "BER-TLV tag: truncated")
            b = data[pos]
            pos += 1
            tag = (tag << 8) | b
            if not b & 0x80:
                break
        else:
            raise WireError(ErrorCode.MALFORMED, f"BER-TLV tag: {tag:#x} is longer than {MAX_TAG_BYTES} bytes")
    if pos != len(data):
        raise WireError(ErrorCode.MALFORMED, "BER-TLV tag: bytes after the tag")
    return tag


_TagAlone = c.Struct("tag" / BerTag, c.Terminated)


def parse_tag_schema(data) -> int:
    """``parse_tag`` through the construct schema (the reference)."""
    try:
        return _TagAlone.parse(bytes(data)).tag
    except c.ConstructError as e:
        raise WireError(ErrorCode.MALFORMED, f"BER-TLV tag: {str(e).strip()}") from None


# ---------------------------------------------------------------- DER for a certification request (RFC 2986)

SEQUENCE = 0x30
INTEGER = 0x02
BIT_STRING = 0x03
NULL = 0x05
OID = 0x06
CONTEXT_0 = 0xA0

#: AlgorithmIdentifier DER: sha256WithRSAEncryption (1.2.840.113549.1.1.11, NULL parameters)
ALG_SHA256_RSA = encode(SEQUENCE, encode(OID, bytes.fromhex("2a864886f70d01010b")) + encode(NULL))
#: AlgorithmIdentifier DER: ecdsa-with-SHA256 (1.2.840.10045.4.3.2, no parameters)
ALG_ECDSA_SHA256 = encode(SEQUENCE, encode(OID, bytes.fromhex("2a8648ce3d040302")))


def csr_info(subject_der: bytes, spki_der: bytes) -> bytes:
    """CertificationRequestInfo: version 0, subject Name, SubjectPublicKeyInfo, no attributes."""
    return encode(SEQUENCE, encode(INTEGER, b"\x00") + subject_der + spki_der + encode(CONTEXT_0))


def csr(info_der: bytes, algorithm_der: bytes, signature: bytes) -> bytes:
    """CertificationRequest: the info, the signature algorithm and the signature as a BIT STRING."""
    return encode(SEQUENCE, info_der + algorithm_der + encode(BIT_STRING, b"\x00" + signature))
