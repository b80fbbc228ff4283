"""
The card's per-APDU codecs read and write by index (vsc.wire.apdu
parse_command / build_response / encode_vpcd, vsc.wire.tlv encode /
encode_many / decode): they must agree with the construct schemas that
define the formats (``*_schema``), value for value and refusal for refusal,
so the fast path cannot drift from the schema (issue 15).
"""

from __future__ import annotations

import random

import pytest

from vsc.wire import apdu, tlv
from vsc.wire.errors import WireError

CASES = [b"", b"\x00", b"\x00\xa4", b"\x00\xa4\x04", b"\x00\xa4\x04\x00", b"\x00\xc0\x00\x00\x00",
         b"\x00\x87\x07\x9a\x00\x00\x00", b"\x00\x87\x07\x9a\x00\x00", b"\x00\x87\x07\x9a\x00\x00\x01\xff",
         b"\x00\x87\x07\x9a\x00\x00\x00\x00", b"\x10\x20\x00\x80\x08" + b"1" * 8]


def _outcome(fn, raw):
    try:
        return fn(raw)
    except apdu.ApduError as e:
        return ("sw", e.sw)


def _commands(rng: random.Random):
    """Well-formed APDUs of every case, short and extended, and random mutations and truncations of them."""
    for _ in range(400):
        data = rng.randbytes(rng.choice((0, 1, 5, 255, 256, 300, 1000)))
        le = rng.choice((None, 1, 255, 256, 257, 65536))
        try:
            raw = apdu.command(rng.randrange(256), rng.randrange(256), rng.randrange(256), rng.randrange(256), data,
                               le, extended=rng.random() < 0.3)
        except WireError:
            continue
        yield raw
        yield raw[:rng.randrange(len(raw) + 1)]
        mutated = bytearray(raw)
        mutated[rng.randrange(len(raw))] = rng.randrange(256)
        yield bytes(mutated)
        yield raw + rng.randbytes(rng.randint(1, 3))


def test_parse_command_agrees_with_the_schema():
    """On fixed edge cases and random APDUs (cut, mutated, extended), parse_command == parse_command_schema, refusals included."""
    rng = random.Random(0x15)
    for raw in [*CASES, *_commands(rng)]:
        assert _outcome(apdu.parse_command, raw) == _outcome(apdu.parse_command_schema, raw), raw.hex()


def test_responses_and_vpcd_frames_agree_with_the_schema():
    """build_response and encode_vpcd write the schemas' bytes for empty, short and long bodies and every kind of SW."""
    rng = random.Random(7)
    for n in (0, 1, 2, 255, 256, 264, 4096):
        data = rng.randbytes(n)
        for sw in (0x9000, 0x6108, 0x6100, 0x6A82, 0x0000, 0xFFFF):
            assert apdu.build_response(data, sw) == apdu.build_response_schema(data, sw)
        assert apdu.encode_vpcd(data) == apdu.VpcdFrame.build(data)
    with pytest.raises(WireError):
        apdu.build_response(b"", 0x10000)
    with pytest.raises(WireError):
        apdu.encode_vpcd(bytes(apdu.VPCD_MAX + 1))


TAGS = [0x01, 0x53, 0x5C, 0x7C, 0x7E, 0x80, 0x81, 0x82, 0x9F1F, 0x5FC102, 0x7F49, 0x5FC123]


def _tlv_outcome(fn, data):
    try:
        return fn(data)
    except WireError:
        return "malformed"


def test_tlv_codec_agrees_with_the_schema():
    """encode / encode_many build the schema's bytes; decode equals the schema's decode on random, cut and mutated TLVs."""
    rng = random.Random(73)
    for _ in range(300):
        items = [(rng.choice(TAGS), rng.randbytes(rng.choice((0, 1, 127, 128, 255, 256, 70000 if rng.random() < 0.05
                                                               else 3))))
                 for _ in range(rng.randint(0, 4))]
        built = tlv.encode_many(items)
        assert built == tlv.encode_many_schema(items)
        for tag, value in items:
            assert tlv.encode(tag, value) == tlv.encode_schema(tag, value)
        for data in (built, built[:rng.randrange(len(built) + 1)],
                     bytes(b ^ (rng.randrange(256) if i == rng.randrange(max(1, len(built))) else 0)
                           for i, b in enumerate(built)) if built else b"\x80",
                     built + b"\x5c", b"\x5f\xff\xff\x01\x00", b"\x53\x80", b"\x53\x84\x00\x00\x00\x01\x00",
                     b"\x53\x82\x01"):
            assert _tlv_outcome(tlv.decode, data) == _tlv_outcome(tlv.decode_schema, data), data[:40].hex()


def test_tlv_encode_refuses_what_the_schema_refuses():
    """Tags valid or not (out of range, a short form 1F, a continuation bit wrong) get the same bytes or refusal from both; the invalid ones are refused."""
    invalid = (0x1F, 0x3F, 0x5F80, -1, 0x1000000, 0x0100, 0x5F01FF)
    for tag in (*invalid, 0x5F7F, 0x9F8001, *TAGS):
        assert _tlv_outcome(lambda t: tlv.encode(t, b"x"), tag) == _tlv_outcome(lambda t: tlv.encode_schema(t, b"x"), tag)
    for tag in invalid:
        with pytest.raises(WireError):
            tlv.encode(tag, b"x")


def test_parse_tag_agrees_with_the_schema():
    """A tag alone: every 1-3 byte string (sampled) and the PIV object tags parse, or are refused, alike."""
    rng = random.Random(5)
    samples = [b"", b"\x7e", b"\x5f\xc1\x05", b"\x5f\xc1", b"\x5f\xc1\x05\x00", b"\x9f\x81\x81\x01", b"\x1f"]
    samples += [rng.randbytes(rng.randint(1, 4)) for _ in range(3000)]
    for data in samples:
        assert _tlv_outcome(tlv.parse_tag, data) == _tlv_outcome(tlv.parse_tag_schema, data), data.hex()
