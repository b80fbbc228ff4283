"""
The wire codec (vsc.wire): frames, the channel's messages, inner messages,
strict parsing (trailing bytes, truncation, unknown types and enum values,
field bounds on both encode and decode), the frame header and the Deframer.
"""

from __future__ import annotations

import struct

import pytest

from vsc.wire import (
    HEADER_SIZE,
    MAX_FRAME_BODY,
    PROTOCOL_VERSION,
    Deframer,
    ErrorCode,
    MessageType,
    WireError,
    decode_frame,
    decode_inner,
    encode_frame,
    encode_inner,
    record_aad,
    registry,
    seq_bytes,
)
from vsc.wire import messages as m
from vsc.wire.codec import build_header, decode_body, encode_body, parse_header
from vsc.wire.messages import (
    MAX_ECHO,
    MAX_KEY_TRANSPORT,
    MAX_SPKI,
    MAX_SUITES,
    Alert,
    ClientFinished,
    Close,
    EchoReply,
    EchoRequest,
    Hello,
    KeyTransport,
    Record,
    ServerFinished,
    SessionSecrets,
    Suite,
    finished_input,
    key_info,
)

from tests.vectors.support import fixed_key

SPKI = fixed_key().public_key().spki_der
R = bytes(range(32))
X = bytes(range(100, 132))


def header(mtype: int, length: int, magic: bytes = b"VS", version: int = PROTOCOL_VERSION) -> bytes:
    return struct.pack(">2sBBI", magic, version, mtype, length)


def framed(mtype: int, body: bytes) -> bytes:
    return header(mtype, len(body)) + body


def raises(code: ErrorCode, *fragments: str):
    """Context manager: a WireError with ``code`` whose message contains every fragment."""

    class _Check:
        def __enter__(self):
            self.ctx = pytest.raises(WireError)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *exc):
            handled = self.ctx.__exit__(*exc)
            err = self.info.value
            assert err.code is code, f"expected {code.name}, got {err}"
            for f in fragments:
                assert f in err.message, f"{f!r} not in {err.message!r}"
            assert str(err).startswith(f"{code.name}: ")
            return handled

    return _Check()


FRAME_SAMPLES = [
    Hello(r1=R, server_key=SPKI, fs_public=X),
    Hello(r1=R, server_key=b"\x30"),
    Hello(r1=R, server_key=b"k" * MAX_SPKI, fs_public=X),
    KeyTransport(r2=R, suites=list(Suite), fs_public=X, ciphertext=b"\xaa" * 256),
    KeyTransport(r2=R, suites=(Suite.AES256_GCM,), ciphertext=b"\x01"),
    KeyTransport(r2=R, suites=(Suite.CHACHA20_POLY1305,) * MAX_SUITES, ciphertext=b"\xff" * MAX_KEY_TRANSPORT),
    ServerFinished(suite=Suite.AES256_GCM, forward_secret=True, mac=X),
    ServerFinished(suite=Suite.DES_CBC_MD5, forward_secret=False, mac=R),
    ClientFinished(mac=X),
    *[Alert(code) for code in ErrorCode],
    Record(seq=0, sealed=b""),
    Record(seq=7, sealed=b"sealed bytes"),
    Record(seq=(1 << 64) - 1, sealed=b"\x00" * 1000),
]

INNER_SAMPLES = [
    Close(),
    *[Close(code) for code in ErrorCode],
    EchoRequest(),
    EchoRequest(b"ping"),
    EchoRequest(b"\x00" * MAX_ECHO),
    EchoReply(),
    EchoReply(b"pong" * 100),
    EchoReply(b"\xff" * MAX_ECHO),
]


def sample_id(msg) -> str:
    return type(msg).__name__


# ---------------------------------------------------------------- round trips


def test_samples_cover_every_channel_message_type():
    """The round-trip samples include every message class vsc.wire.messages registers."""
    channel_classes = {cls for cls in registry().values() if cls.__module__ == m.__name__}
    covered = {type(x) for x in FRAME_SAMPLES + INNER_SAMPLES}
    assert channel_classes == covered
    assert {cls.TYPE for cls in channel_classes} == {
        MessageType.HELLO, MessageType.KEY_TRANSPORT, MessageType.SERVER_FINISHED,
        MessageType.CLIENT_FINISHED, MessageType.ALERT, MessageType.RECORD,
        MessageType.CLOSE, MessageType.ECHO_REQUEST, MessageType.ECHO_REPLY,
    }


@pytest.mark.parametrize("msg", FRAME_SAMPLES, ids=sample_id)
def test_frame_round_trip(msg):
    """encode_frame then decode_frame gives the same value, and re-encoding gives the same bytes (canonical)."""
    data = encode_frame(msg)
    magic, version, mtype, length = struct.unpack(">2sBBI", data[:HEADER_SIZE])
    assert (magic, version, mtype, length) == (b"VS", 1, int(msg.TYPE), len(data) - HEADER_SIZE)
    back = decode_frame(data)
    assert back == msg and type(back) is type(msg)
    assert encode_frame(back) == data


@pytest.mark.parametrize("msg", INNER_SAMPLES, ids=sample_id)
def test_inner_round_trip(msg):
    """encode_inner then decode_inner gives the same value; the plaintext is type byte || body."""
    data = encode_inner(msg)
    assert data[0] == msg.TYPE and data[1:] == encode_body(msg)
    back = decode_inner(data)
    assert back == msg and encode_inner(back) == data


def test_known_layouts():
    """A few encodings spelled out byte by byte, as docs/protocol.md describes them."""
    assert encode_frame(Alert(ErrorCode.HANDSHAKE_FAILED)) == b"VS\x01\x05\x00\x00\x00\x02\x00\x06"
    assert encode_frame(ClientFinished(mac=X)) == b"VS\x01\x04\x00\x00\x00\x20" + X
    assert encode_frame(ServerFinished(suite=Suite.AES256_CBC_HMAC_SHA256, forward_secret=True, mac=R)) == (
        b"VS\x01\x03\x00\x00\x00\x22\x03\x01" + R
    )
    assert encode_frame(Hello(r1=R, server_key=b"\x30\x00", fs_public=X)) == (
        b"VS\x01\x01" + struct.pack(">I", 32 + 2 + 2 + 1 + 32) + R + b"\x00\x02\x30\x00\x20" + X
    )
    assert encode_frame(KeyTransport(r2=R, suites=(Suite.CHACHA20_POLY1305, Suite.DES_CBC_MD5), ciphertext=b"\xcc")) == (
        b"VS\x01\x02" + struct.pack(">I", 32 + 3 + 1 + 3) + R + b"\x02\x02\x80\x00\x00\x01\xcc"
    )
    assert encode_frame(Record(seq=258, sealed=b"ab")) == b"VS\x01\x10\x00\x00\x00\x0a" + bytes(6) + b"\x01\x02ab"
    assert encode_inner(Close()) == b"\x20\x00\x00"
    assert encode_inner(EchoRequest(b"hi")) == b"\x21\x00\x00\x00\x02hi"
    assert encode_inner(EchoReply(b"")) == b"\x22\x00\x00\x00\x00"


def test_record_aad_and_sequence_layout():
    """Record AAD is "VS" || version || 0x10 || direction || seq (8 bytes BE); seq_bytes is the 8-byte BE seq."""
    assert record_aad(0, 1) == b"VS\x01\x10\x00" + b"\x00" * 7 + b"\x01"
    assert record_aad(1, (1 << 64) - 1) == b"VS\x01\x10\x01" + b"\xff" * 8
    assert seq_bytes(0x0102030405060708) == bytes(range(1, 9))


def test_key_schedule_input_layouts():
    """key_info and finished_input are the fixed layouts the key schedule documents."""
    th = bytes(range(32))
    assert key_info("c2s key", 1, th) == b"vsc1 \x07c2s key\x01" + th
    assert finished_input("server finished", th, 0x80, True) == b"\x0fserver finished" + th + b"\x80\x01"
    assert finished_input("client finished", th, 2, False) == b"\x0fclient finished" + th + b"\x02\x00"


def test_session_secrets_plaintext():
    """The key-transport plaintext is exactly r1 || r2 || s1 || s2 (128 bytes); any other length is HANDSHAKE_FAILED."""
    s = SessionSecrets(r1=b"\x01" * 32, r2=b"\x02" * 32, s1=b"\x03" * 32, s2=b"\x04" * 32)
    data = s.encode()
    assert data == b"\x01" * 32 + b"\x02" * 32 + b"\x03" * 32 + b"\x04" * 32
    assert SessionSecrets.decode(data) == s
    for bad in (data[:-1], data + b"\x00", b""):
        with raises(ErrorCode.HANDSHAKE_FAILED, "expected 128"):
            SessionSecrets.decode(bad)


# ---------------------------------------------------------------- strictness


@pytest.mark.parametrize("msg", [x for x in FRAME_SAMPLES if not isinstance(x, Record)], ids=sample_id)
def test_trailing_bytes_rejected(msg):
    """A body with bytes after its last field is MALFORMED, even when the header length covers them."""
    body = encode_body(msg) + b"\x00"
    with raises(ErrorCode.MALFORMED, type(msg).__name__, "trailing bytes"):
        decode_frame(framed(msg.TYPE, body))


@pytest.mark.parametrize("msg", [Close(), EchoRequest(b"x"), EchoReply(b"")], ids=sample_id)
def test_inner_trailing_bytes_rejected(msg):
    """Trailing bytes after an inner message inside a record plaintext are MALFORMED."""
    with raises(ErrorCode.MALFORMED, "trailing bytes"):
        decode_inner(encode_inner(msg) + b"!")


@pytest.mark.parametrize("msg", FRAME_SAMPLES[:9] + [FRAME_SAMPLES[-1]], ids=sample_id)
def test_truncated_bodies_rejected(msg):
    """Every proper prefix of a body (with a matching header) is MALFORMED "truncated" (Record: below its 8-byte seq)."""
    body = encode_body(msg)
    cuts = range(8) if isinstance(msg, Record) else range(len(body))
    for n in cuts:
        with raises(ErrorCode.MALFORMED, type(msg).__name__, "truncated", f"({n} bytes)"):
            decode_frame(framed(msg.TYPE, body[:n]))


def test_truncated_inner_rejected():
    """Every proper prefix of an inner message is MALFORMED; the empty plaintext has its own message."""
    data = encode_inner(EchoRequest(b"abcdef"))
    with raises(ErrorCode.MALFORMED, "empty record plaintext"):
        decode_inner(b"")
    for n in range(1, len(data)):
        with raises(ErrorCode.MALFORMED, "truncated"):
            decode_inner(data[:n])


UNREGISTERED = [t for t in range(256) if t not in {int(k) for k in registry()}]


def test_unknown_message_type():
    """A frame or inner type outside the registry is UNKNOWN_TYPE, naming the type in hex."""
    assert 0x00 in UNREGISTERED and 0xFF in UNREGISTERED
    for t in UNREGISTERED:
        with raises(ErrorCode.UNKNOWN_TYPE, f"unknown message type {t:#04x}"):
            decode_frame(framed(t, b""))
        with raises(ErrorCode.UNKNOWN_TYPE, f"{t:#04x}"):
            decode_inner(bytes([t]))


def test_inner_and_outer_types_do_not_mix():
    """Inner messages framed in the clear, and frame messages inside a record, are UNEXPECTED_MESSAGE."""
    for msg in (Close(), EchoRequest(b"x"), EchoReply(b"y")):
        with raises(ErrorCode.UNEXPECTED_MESSAGE, type(msg).__name__, "only valid inside a sealed record"):
            decode_frame(framed(msg.TYPE, encode_body(msg)))
    for msg in (Alert(ErrorCode.CLOSE_NOTIFY), ClientFinished(mac=X), Record(seq=1, sealed=b"")):
        with raises(ErrorCode.UNEXPECTED_MESSAGE, type(msg).__name__, "not valid inside a record"):
            decode_inner(bytes([msg.TYPE]) + encode_body(msg))
        with raises(ErrorCode.UNEXPECTED_MESSAGE, "cannot travel inside a record"):
            encode_inner(msg)


@pytest.mark.parametrize("value", [0x00, 0x04, 0x7F, 0x81, 0xFF])
def test_unknown_suite_rejected(value):
    """A suite byte that is not a Suite is MALFORMED in KeyTransport and ServerFinished, and cannot be encoded."""
    kt = R + bytes([2, Suite.AES256_GCM, value]) + b"\x00" + b"\x00\x01\xcc"
    with raises(ErrorCode.MALFORMED, "KeyTransport", f"unknown Suite value {value:#x}"):
        decode_frame(framed(MessageType.KEY_TRANSPORT, kt))
    sf = bytes([value, 0]) + X
    with raises(ErrorCode.MALFORMED, "ServerFinished", "unknown Suite value"):
        decode_frame(framed(MessageType.SERVER_FINISHED, sf))
    with raises(ErrorCode.MALFORMED, "cannot encode KeyTransport", "unknown Suite value"):
        encode_frame(KeyTransport(r2=R, suites=(value,), ciphertext=b"\x01"))
    with raises(ErrorCode.MALFORMED, "cannot encode ServerFinished", "unknown Suite value"):
        encode_frame(ServerFinished(suite=value, forward_secret=False, mac=X))


@pytest.mark.parametrize("value", [max(ErrorCode) + 1, 63, 999, 0xFFFF])  # the first value past the last code
def test_unknown_error_code_rejected(value):
    """An error code outside ErrorCode is MALFORMED in Alert and Close, and cannot be encoded."""
    body = struct.pack(">H", value)
    with raises(ErrorCode.MALFORMED, "Alert", f"unknown ErrorCode value {value:#x}"):
        decode_frame(framed(MessageType.ALERT, body))
    with raises(ErrorCode.MALFORMED, "Close", "unknown ErrorCode value"):
        decode_inner(bytes([MessageType.CLOSE]) + body)
    with raises(ErrorCode.MALFORMED, "cannot encode Alert", "unknown ErrorCode value"):
        encode_frame(Alert(value))
    with raises(ErrorCode.MALFORMED, "cannot encode Close"):
        encode_inner(Close(value))


def test_flag_byte_must_be_zero_or_one():
    """ServerFinished.forward_secret accepts only 0 and 1, so every value has one encoding."""
    for flag in (0, 1):
        assert decode_frame(framed(MessageType.SERVER_FINISHED, bytes([1, flag]) + X)).forward_secret is bool(flag)
    for flag in (2, 0x80, 0xFF):
        with raises(ErrorCode.MALFORMED, "ServerFinished", "forward_secret", f"{flag:#04x} is neither 0 nor 1"):
            decode_frame(framed(MessageType.SERVER_FINISHED, bytes([1, flag]) + X))
    with raises(ErrorCode.MALFORMED, "flag must be a bool"):
        encode_frame(ServerFinished(suite=Suite.AES256_GCM, forward_secret=2, mac=X))


def hello_body(server_key: bytes = b"\x30", fs: bytes = b"") -> bytes:
    return R + struct.pack(">H", len(server_key)) + server_key + bytes([len(fs)]) + fs


def kt_body(suites=(1,), fs: bytes = b"", ct: bytes = b"\x01") -> bytes:
    return R + bytes([len(suites), *suites]) + bytes([len(fs)]) + fs + struct.pack(">H", len(ct)) + ct


def test_hello_field_bounds_on_decode_and_encode():
    """server_key must be 1..MAX_SPKI bytes and fs_public 0 or 32 bytes, whether parsing or building."""
    assert decode_frame(framed(1, hello_body(b"k" * MAX_SPKI, X))).server_key == b"k" * MAX_SPKI
    for key in (b"", b"k" * (MAX_SPKI + 1)):
        with raises(ErrorCode.MALFORMED, "Hello", "server_key", f"has {len(key)} items/bytes, allowed 1..{MAX_SPKI}"):
            decode_frame(framed(1, hello_body(key)))
        with raises(ErrorCode.MALFORMED, "cannot encode Hello", "server_key"):
            encode_frame(Hello(r1=R, server_key=key))
    for n in (1, 31, 33, 255):
        with raises(ErrorCode.MALFORMED, "Hello", f"fs_public has {n} bytes, allowed 0 or 32"):
            decode_frame(framed(1, hello_body(fs=b"\x09" * n)))
        with raises(ErrorCode.MALFORMED, "cannot encode Hello", "fs_public"):
            encode_frame(Hello(r1=R, server_key=b"\x30", fs_public=b"\x09" * n))
    with pytest.raises(ValueError, match="r1 must be 32 bytes"):
        Hello(r1=b"short", server_key=b"\x30")
    with raises(ErrorCode.MALFORMED, "Hello", "truncated"):
        decode_frame(framed(1, R[:31]))


def test_key_transport_field_bounds_on_decode_and_encode():
    """suites must be 1..MAX_SUITES, fs_public 0 or 32 bytes, ciphertext 1..MAX_KEY_TRANSPORT bytes, both ways."""
    assert len(decode_frame(framed(2, kt_body(suites=(1,) * MAX_SUITES))).suites) == MAX_SUITES
    for suites in ((), (1,) * (MAX_SUITES + 1)):
        with raises(ErrorCode.MALFORMED, "KeyTransport", f"suites has {len(suites)} items/bytes, allowed 1..{MAX_SUITES}"):
            decode_frame(framed(2, kt_body(suites=suites)))
        with raises(ErrorCode.MALFORMED, "cannot encode KeyTransport", "suites"):
            encode_frame(KeyTransport(r2=R, suites=suites, ciphertext=b"\x01"))
    for n in (31, 33):
        with raises(ErrorCode.MALFORMED, "KeyTransport", f"fs_public has {n} bytes, allowed 0 or 32"):
            decode_frame(framed(2, kt_body(fs=b"\x01" * n)))
        with raises(ErrorCode.MALFORMED, "cannot encode KeyTransport", "fs_public"):
            encode_frame(KeyTransport(r2=R, suites=(1,), fs_public=b"\x01" * n, ciphertext=b"\x01"))
    for ct in (b"", b"\x01" * (MAX_KEY_TRANSPORT + 1)):
        with raises(ErrorCode.MALFORMED, "KeyTransport", "ciphertext", f"allowed 1..{MAX_KEY_TRANSPORT}"):
            decode_frame(framed(2, kt_body(ct=ct)))
        with raises(ErrorCode.MALFORMED, "cannot encode KeyTransport", "ciphertext"):
            encode_frame(KeyTransport(r2=R, suites=(1,), ciphertext=ct))


def test_echo_data_bounds_on_decode_and_encode():
    """Echo data above MAX_ECHO is refused when building and when parsing, for request and reply."""
    for cls in (EchoRequest, EchoReply):
        big = b"e" * (MAX_ECHO + 1)
        with raises(ErrorCode.MALFORMED, f"cannot encode {cls.__name__}", "data", f"allowed 0..{MAX_ECHO}"):
            encode_inner(cls(big))
        with raises(ErrorCode.MALFORMED, cls.__name__, f"data has {MAX_ECHO + 1} items/bytes"):
            decode_inner(bytes([cls.TYPE]) + struct.pack(">I", len(big)) + big)
        # a length prefix promising more than is present is truncation, not an allocation
        with raises(ErrorCode.MALFORMED, cls.__name__, "truncated"):
            decode_inner(bytes([cls.TYPE]) + struct.pack(">I", 0xFFFFFFFF) + b"abc")


def test_fixed_size_fields():
    """MACs are exactly 32 bytes: shorter or longer bodies fail to parse, and the attrs validators refuse them."""
    with raises(ErrorCode.MALFORMED, "ClientFinished", "truncated"):
        decode_frame(framed(MessageType.CLIENT_FINISHED, X[:31]))
    with raises(ErrorCode.MALFORMED, "ClientFinished", "trailing"):
        decode_frame(framed(MessageType.CLIENT_FINISHED, X + b"\x00"))
    with pytest.raises(ValueError, match="mac must be 32 bytes"):
        ClientFinished(mac=b"\x00" * 33)
    with pytest.raises(ValueError, match="mac must be 32 bytes"):
        ServerFinished(suite=Suite.AES256_GCM, forward_secret=True, mac=b"")


# ---------------------------------------------------------------- the header


def test_bad_magic():
    """A header not starting with "VS" is MALFORMED, quoting what arrived."""
    for magic in (b"VT", b"\x00\x00", b"SV"):
        with raises(ErrorCode.MALFORMED, "bad magic", repr(magic)):
            decode_frame(header(MessageType.ALERT, 2, magic=magic) + b"\x00\x00")
        with raises(ErrorCode.MALFORMED, "bad magic"):
            parse_header(header(1, 0, magic=magic))


def test_wrong_version():
    """Any version but 1 is PROTOCOL_VERSION, naming both versions."""
    for version in (0, 2, 0xFF):
        with raises(ErrorCode.PROTOCOL_VERSION, f"protocol version {version}", f"speaks {PROTOCOL_VERSION}"):
            decode_frame(header(MessageType.ALERT, 2, version=version) + b"\x00\x00")


def test_length_field_mismatch():
    """A frame whose length field disagrees with its size is MALFORMED, with both numbers."""
    good = encode_frame(Alert(ErrorCode.CLOSE_NOTIFY))
    with raises(ErrorCode.MALFORMED, "length field says 2 body bytes, frame has 3"):
        decode_frame(good + b"\x00")
    with raises(ErrorCode.MALFORMED, "length field says 2 body bytes, frame has 1"):
        decode_frame(good[:-1])
    with raises(ErrorCode.MALFORMED, "frame header needs 8 bytes, got 5"):
        decode_frame(good[:5])
    with raises(ErrorCode.MALFORMED, "frame header needs 8 bytes, got 0"):
        decode_frame(b"")


def test_frame_too_large():
    """Lengths above the limit are FRAME_TOO_LARGE when decoding, building a header, or encoding."""
    frame = encode_frame(Record(seq=1, sealed=b"x" * 100))
    assert decode_frame(frame, max_body=108) == Record(seq=1, sealed=b"x" * 100)
    with raises(ErrorCode.FRAME_TOO_LARGE, "108 bytes exceeds 107"):
        decode_frame(frame, max_body=107)
    with raises(ErrorCode.FRAME_TOO_LARGE, f"exceeds {MAX_FRAME_BODY}"):
        decode_frame(header(MessageType.RECORD, MAX_FRAME_BODY + 1))
    with raises(ErrorCode.FRAME_TOO_LARGE, f"{MAX_FRAME_BODY + 1} bytes"):
        build_header(MessageType.RECORD, MAX_FRAME_BODY + 1)
    with raises(ErrorCode.FRAME_TOO_LARGE):
        encode_frame(Record(seq=0, sealed=b"\x00" * (MAX_FRAME_BODY - 7)))
    assert len(encode_frame(Record(seq=0, sealed=b"\x00" * (MAX_FRAME_BODY - 8)))) == HEADER_SIZE + MAX_FRAME_BODY


def test_decode_body_unknown_type():
    """decode_body refuses a type byte it has no class for, including MessageType gaps."""
    with raises(ErrorCode.UNKNOWN_TYPE, "0x06"):
        decode_body(0x06, b"")


# ---------------------------------------------------------------- the Deframer


STREAM_MESSAGES = [
    Hello(r1=R, server_key=SPKI, fs_public=X),
    Alert(ErrorCode.CLOSE_NOTIFY),
    Record(seq=0, sealed=b""),
    ClientFinished(mac=R),
    Record(seq=1, sealed=b"z" * 40),
]
STREAM_FRAMES = [encode_frame(x) for x in STREAM_MESSAGES]
STREAM = b"".join(STREAM_FRAMES)


def test_deframer_whole_stream():
    """Fed a stream of several frames at once, the Deframer returns each whole frame, in order."""
    d = Deframer()
    assert list(d.feed(STREAM)) == STREAM_FRAMES
    assert d.buffered == 0


def test_deframer_split_at_every_offset():
    """Split into two chunks at every offset, the stream yields exactly the same frames, nothing left over."""
    for i in range(len(STREAM) + 1):
        d = Deframer()
        out = list(d.feed(STREAM[:i])) + list(d.feed(STREAM[i:]))
        assert out == STREAM_FRAMES, f"split at {i}"
        assert d.buffered == 0


def test_deframer_three_chunks_at_every_pair_of_offsets():
    """Split into three chunks at every pair of offsets (over a shorter stream), the frames are the same."""
    frames = STREAM_FRAMES[1:]
    stream = b"".join(frames)
    for i in range(len(stream) + 1):
        for j in range(i, len(stream) + 1):
            d = Deframer()
            out = list(d.feed(stream[:i])) + list(d.feed(stream[i:j])) + list(d.feed(stream[j:]))
            assert out == frames, (i, j)


def test_deframer_byte_at_a_time():
    """One byte per feed call yields each frame exactly when its last byte arrives."""
    d = Deframer()
    ends = {sum(map(len, STREAM_FRAMES[: k + 1])) for k in range(len(STREAM_FRAMES))}
    out = []
    for pos in range(len(STREAM)):
        got = list(d.feed(STREAM[pos : pos + 1]))
        assert bool(got) == (pos + 1 in ends)
        out += got
    assert out == STREAM_FRAMES


def test_deframer_keeps_data_fed_without_iterating():
    """feed() buffers immediately: a caller that does not iterate (no whole frame expected) loses nothing."""
    d = Deframer()
    d.feed(STREAM[:5])  # result deliberately ignored
    assert d.buffered == 5
    assert list(d.feed(STREAM[5:])) == STREAM_FRAMES


def test_deframer_whole_takes_exactly_one_whole_valid_frame_and_nothing_else():
    """``whole`` hands back a piece only when nothing is buffered and the piece is one whole frame with a valid
    header within max_body; every other piece gets None (and ``feed`` then gives the frames or the error)."""
    one = STREAM_FRAMES[4]
    assert Deframer().whole(one) is one
    assert Deframer().whole(encode_frame(Record(seq=0, sealed=b""))) is not None  # an empty sealed part
    refused = {
        "part of a frame": one[:-1],
        "a frame and a byte": one + b"\x00",
        "two frames": one + one,
        "a header alone": one[:HEADER_SIZE],
        "bad magic": b"XS" + one[2:],
        "another version": one[:2] + bytes((PROTOCOL_VERSION + 1,)) + one[3:],
        "nothing": b"",
    }
    for why, piece in refused.items():
        assert Deframer().whole(piece) is None, why
    assert Deframer(max_body=len(one) - HEADER_SIZE - 1).whole(one) is None  # over the limit: feed raises
    d = Deframer()
    assert list(d.feed(one[:3])) == []
    assert d.whole(one[3:]) is None  # something is buffered: the piece belongs after it
    assert list(d.feed(one[3:])) == [one]


def test_deframer_frame_too_large_before_body():
    """A header announcing more than max_body raises FRAME_TOO_LARGE as soon as the header is complete."""
    d = Deframer(max_body=100)
    big = header(MessageType.RECORD, 101)
    assert list(d.feed(big[:7])) == []
    with raises(ErrorCode.FRAME_TOO_LARGE, "101 bytes exceeds the limit of 100"):
        list(d.feed(big[7:]))
    d = Deframer()
    with raises(ErrorCode.FRAME_TOO_LARGE, f"limit of {MAX_FRAME_BODY}"):
        list(d.feed(header(MessageType.RECORD, MAX_FRAME_BODY + 1)))


def test_deframer_limit_may_change_between_frames():
    """The owner can raise max_body between frames of one chunk (e.g. when the handshake completes)."""
    small = encode_frame(Alert(ErrorCode.CLOSE_NOTIFY))
    large = encode_frame(Record(seq=0, sealed=b"L" * 500))
    d = Deframer(max_body=10)
    out = []
    for frame in d.feed(small + large):
        out.append(frame)
        d.max_body = 1000
    assert out == [small, large]


def test_deframer_rejects_bad_headers_mid_stream():
    """Good frames before a bad header are delivered; the bad header raises its own code."""
    d = Deframer()
    it = d.feed(STREAM_FRAMES[1] + header(1, 0, magic=b"XX"))
    assert next(it) == STREAM_FRAMES[1]
    with raises(ErrorCode.MALFORMED, "bad magic"):
        next(it)
    d = Deframer()
    with raises(ErrorCode.PROTOCOL_VERSION):
        list(d.feed(header(1, 0, version=9)))


def test_wire_error_shape():
    """WireError carries a code and a message, and prints as "CODE: message"."""
    e = WireError(ErrorCode.BAD_RECORD, "record 3: tag mismatch")
    assert (e.code, e.message, str(e)) == (ErrorCode.BAD_RECORD, "record 3: tag mismatch", "BAD_RECORD: record 3: tag mismatch")


# ---------------------------------------------------------------- compiled schemas (vsc.wire.codec.Fast)


def _ops_samples() -> list:
    from vsc.wire.ops import (AuthChallenge, AuthItem, AuthMethod, AuthResponse, ChangePassword, EnrolRequest, Op,
                              OpRequest, OpResult, Status)

    item = AuthItem(next(iter(AuthMethod)), b"\x01" * 32)
    return [
        EnrolRequest("s-1", "code", b"v" * 32, b"k" * 40, b"p" * 300, b"r" * 20),
        EnrolRequest("café", "c", b"v" * 8, b"k", b"p"),
        *[OpRequest(op, "serial", b"i" * 32, b"m" * 32, 7, b"x" * 100) for op in Op],
        OpRequest(next(iter(Op)), "s"),
        ChangePassword("s", b"i" * 32, 3, b"v" * 32, b"k" * 10, b"p" * 50),
        AuthChallenge(b"k" * 40, (item,)),
        AuthChallenge(b"k", tuple(AuthItem(meth) for meth in AuthMethod)),
        AuthResponse((item, item), b"m" * 32),
        AuthResponse((item,)),
        *[OpResult(status, 9, b"p" * 64, b"r") for status in Status],
    ]


def _variants(data: bytes):
    """The input, every truncation, a trailing byte, and every single byte set to 0x00, 0x01, 0x80 and 0xFF."""
    yield data
    for n in range(len(data)):
        yield data[:n]
    yield data + b"\x00"
    for i in range(min(len(data), 80)):
        for v in (0x00, 0x01, 0x80, 0xFF):
            yield data[:i] + bytes([v]) + data[i + 1:]


def _outcome(fn, *args):
    try:
        return ("ok", fn(*args))
    except Exception as e:  # noqa: BLE001 - compared, not handled
        return ("error", type(e))


def _public(container) -> dict:
    return {k: v for k, v in container.items() if not k.startswith("_")}


def test_compiled_schemas_agree_with_the_interpreted_ones():
    """
    For every registered message (channel and operations samples) the compiled schema parses exactly the
    inputs the interpreted one parses, to the same values (samples, every truncation, a trailing byte, byte
    mutations), and builds the same bytes; codec.Fast never returns a value the interpreted schema refuses.
    """
    from vsc.wire.codec import _fields, _StrictIO

    samples = FRAME_SAMPLES + INNER_SAMPLES + _ops_samples()
    assert {type(x) for x in samples} == set(registry().values())
    checked = 0
    for msg in samples:
        fast = type(msg)._FAST
        assert fast.compiled is not fast.schema, f"{type(msg).__name__} did not compile"
        assert fast.compiled.build(_fields(msg)) == fast.schema.build(_fields(msg)) == encode_body(msg)
        for data in _variants(encode_body(msg)):
            compiled = _outcome(lambda d: fast.compiled.parse_stream(_StrictIO(d)), data)
            interpreted = _outcome(fast.schema.parse, data)
            if compiled[0] == "ok":
                assert interpreted[0] == "ok" and _public(compiled[1]) == _public(interpreted[1]), (msg, data)
            assert _outcome(fast.parse, data)[0] == interpreted[0]
            checked += 1
    assert checked > 1000


def test_compiled_schemas_refuse_what_the_interpreted_ones_refuse_on_build():
    """Building an out-of-range value through codec.Fast raises the interpreted schema's error (encode_body: MALFORMED)."""
    with raises(ErrorCode.MALFORMED, "EchoRequest"):
        encode_body(EchoRequest(b"x" * (MAX_ECHO + 1)))
    with raises(ErrorCode.MALFORMED, "Record"):
        encode_body(Record(seq=1 << 64, sealed=b""))


def test_the_handshake_and_operation_layouts_compile_and_agree():
    """The key-transport plaintext, key-schedule inputs, KDF parameters and Master-key layouts are compiled (codec.Fast) and parse/build as their interpreted schemas do."""
    from vsc.wire import ops
    from vsc.wire.codec import _StrictIO

    cases = [
        (m._KeyTransportPlaintext, dict(r1=R, r2=R, s1=X, s2=X)),
        (m._KeyInfo, dict(label="key", suite=1, transcript=X)),
        (m._FinishedInput, dict(label="server finished", transcript=X, suite=2, forward_secret=True)),
        (ops._Kdf, dict(alg=ops.KdfAlg.SCRYPT, salt=b"s" * 16, log2_n=15, r=8, p=1)),
        (ops._Master, dict(ri2=X, mac=X)),
        (ops._MasterInput, dict(ri1=X, ri2=X, serial="card-1")),
    ]
    for fast, value in cases:
        assert fast.compiled is not fast.schema
        data = fast.schema.build(value)
        assert fast.compiled.build(value) == data == fast.build(value)
        for variant in _variants(data):
            compiled = _outcome(lambda d: fast.compiled.parse_stream(_StrictIO(d)), variant)
            interpreted = _outcome(fast.schema.parse, variant)
            if compiled[0] == "ok":
                assert interpreted[0] == "ok" and _public(compiled[1]) == _public(interpreted[1])
            assert _outcome(fast.parse, variant)[0] == interpreted[0]


def test_struct_twins_give_the_schemas_bytes():
    """The header, inner-record and AAD/sequence fast paths give exactly the construct schemas' bytes and values."""
    from vsc.wire.codec import FrameHeaderSchema, InnerSchema, RecordAADSchema, record_aad, seq_bytes

    for mtype, length in ((0, 0), (0x10, 5), (0xFF, MAX_FRAME_BODY)):
        data = build_header(mtype, length)
        assert data == FrameHeaderSchema.build(dict(magic=b"VS", version=PROTOCOL_VERSION, type=mtype, length=length))
        h = parse_header(data)
        assert (h.type, h.length, h.version) == (mtype, length, PROTOCOL_VERSION)
    for direction, seq in ((0, 0), (1, 7), (255, (1 << 64) - 1)):
        assert record_aad(direction, seq) == RecordAADSchema.build(dict(direction=direction, seq=seq))
        assert seq_bytes(seq) == struct.pack(">Q", seq)
    for msg in INNER_SAMPLES:
        data = encode_inner(msg)
        assert data == InnerSchema.build(dict(type=msg.TYPE, body=encode_body(msg)))
        assert decode_inner(data) == msg
    with pytest.raises(Exception):
        seq_bytes(1 << 64)
    with pytest.raises(Exception):
        record_aad(256, 0)


def test_record_and_key_schedule_twins_give_the_schemas_bytes():
    """Record's struct twin (both ways) and the key-schedule inputs' builders equal their construct schemas."""
    from construct import Container

    from vsc.wire.messages import FinishedInputSchema, KeyInfoSchema, Record, finished_input, key_info

    for seq, sealed in ((0, b""), (1, b"x"), (7, bytes(range(256)) * 9), ((1 << 64) - 1, b"\0" * 40)):
        msg = Record(seq=seq, sealed=sealed)
        body = encode_body(msg)
        assert body == Record.SCHEMA.build(dict(seq=seq, sealed=sealed))
        assert decode_body(Record.TYPE, body, inner=False) == msg
        assert Record.SCHEMA.parse(body) == Container(seq=seq, sealed=sealed)
    for short in (b"", b"\0" * 7):  # too short for the sequence number: the schema's error, as before
        with pytest.raises(WireError) as e:
            decode_body(Record.TYPE, short, inner=False)
        assert e.value.code is ErrorCode.MALFORMED
    with pytest.raises(WireError):
        encode_body(Record(seq=1 << 64, sealed=b""))
    from vsc.wire.messages import MAX_ECHO, EchoReply, EchoRequest

    for cls in (EchoRequest, EchoReply):
        for data in (b"", b"x", bytes(range(256)) * 4, b"y" * MAX_ECHO):
            body = encode_body(cls(data))
            assert body == cls.SCHEMA.build(dict(data=data))
            assert decode_body(cls.TYPE, body, inner=True) == cls(data)
        for bad in (b"", b"\0\0\0", b"\0\0\0\x02x", b"\0\0\0\x01xy"):  # short, truncated, trailing bytes
            with pytest.raises(WireError) as e:
                decode_body(cls.TYPE, bad, inner=True)
            assert e.value.code is ErrorCode.MALFORMED
        with pytest.raises(WireError):
            encode_body(cls(b"z" * (MAX_ECHO + 1)))
    transcript = bytes(range(32))
    for label in ("c2s key", "server finished", "", "x" * 255):
        for suite in (0, 1, 4, 255):
            assert key_info(label, suite, transcript) == KeyInfoSchema.build(
                dict(label=label, suite=suite, transcript=transcript))
            for fs in (False, True):
                assert finished_input(label, transcript, suite, fs) == FinishedInputSchema.build(
                    dict(label=label, transcript=transcript, suite=suite, forward_secret=fs))
    for bad in (("é", 1, transcript), ("x" * 256, 1, transcript), ("k", 256, transcript)):
        with pytest.raises(Exception):
            key_info(*bad)


def test_compiled_codec_leaves_no_reference_cycles():
    """
    Fast.parse and Fast.build free their contexts and streams by reference
    counting: a sealed record's frame and inner message, encoded and decoded,
    leave nothing for the cycle collector (construct's own top-level context
    refers to itself; a server answering thousands of polls a second ran a
    collection for every few dozen of them).
    """
    import gc

    from vsc.wire.codec import decode_frame, decode_inner, encode_frame, encode_inner
    from vsc.wire.messages import EchoRequest, Record

    frame = encode_frame(Record(seq=7, sealed=b"s" * 40))
    inner = encode_inner(EchoRequest(b"x" * 16))
    decode_frame(frame), decode_inner(inner)  # compiled on first use
    gc.collect()
    was = gc.isenabled()
    gc.disable()
    try:
        for _ in range(50):
            assert decode_frame(encode_frame(Record(seq=7, sealed=b"s" * 40))) == Record(seq=7, sealed=b"s" * 40)
            assert decode_inner(encode_inner(EchoRequest(b"x" * 16))) == EchoRequest(b"x" * 16)
        assert gc.collect() == 0
    finally:
        if was:
            gc.enable()


# ---------------------------------------------------------------- the handshake frames' struct twins


def _twin_variants(data: bytes):
    """The input, every truncation, a trailing byte, and every byte set to 0x00, 0x01, 0x20, 0x80 and 0xFF."""
    yield data
    for n in range(len(data)):
        yield data[:n]
    yield data + b"\x00"
    for i in range(len(data)):
        for v in (0x00, 0x01, 0x20, 0x80, 0xFF):
            if data[i] != v:
                yield data[:i] + bytes([v]) + data[i + 1:]


def _wire_outcome(fn, *args):
    try:
        return ("ok", fn(*args))
    except WireError as e:
        return ("error", e.code, str(e))


from vsc.wire import ops as _ops  # noqa: E402

_TWINNED = (m.Hello, m.KeyTransport, m.ServerFinished, m.ClientFinished, m.Alert, m.Close,
            _ops.OpRequest, _ops.OpResult, _ops.AuthChallenge, _ops.AuthResponse)


def _more_ops_samples() -> list:
    item = _ops.AuthItem(_ops.AuthMethod(max(_ops.AuthMethod)), b"")
    return [
        _ops.OpRequest(_ops.Op(max(_ops.Op)), "café-ß", b"", b"m" * 32, (1 << 32) - 1, b""),
        _ops.OpRequest(next(iter(_ops.Op)), "x" * 64, b"i" * 32, b"", 0, b"\xff" * 3),
        _ops.OpResult(next(iter(_ops.Status))),
        _ops.AuthChallenge(b"k" * 3, (item,) * 8),
        _ops.AuthResponse((item,), b""),
    ]


@pytest.mark.parametrize("cls", _TWINNED, ids=lambda c: c.__name__)
def test_handshake_twins_agree_with_the_schemas(cls, monkeypatch):
    """
    Each handshake frame's struct twin (and Alert's / Close's, and the operation messages' a cycle uses) builds
    the schema's bytes and, on every sample, truncation, trailing byte and one-byte mutation, decodes to exactly
    what the schema decodes, or fails with the schema's own error (code and message).
    """
    samples = [x for x in FRAME_SAMPLES + INNER_SAMPLES + _ops_samples() + _more_ops_samples() if type(x) is cls]
    assert samples and cls._TWIN
    inner = cls.INNER
    bodies = []
    for msg in samples:
        body = encode_body(msg)
        assert cls._TWIN[0](msg) == body == cls.SCHEMA.build({n: getattr(msg, n) for n in cls._NAMES})
        bodies.append(body)
    with_twin = [[_wire_outcome(decode_body, cls.TYPE, v, inner) for v in _twin_variants(b)] for b in bodies]
    monkeypatch.setattr(cls, "_TWIN", None)
    schema_only = [[_wire_outcome(decode_body, cls.TYPE, v, inner) for v in _twin_variants(b)] for b in bodies]
    assert with_twin == schema_only
    assert any(o[0] == "ok" for rows in with_twin for o in rows[1:])  # mutations that stay valid were covered


def test_handshake_twins_leave_out_of_range_values_to_the_schema():
    """Values the twins do not take (wrong types or lengths, unknown enum values, counts) still raise the schema's MALFORMED."""
    bad = [
        m.Hello(r1=R, server_key=b""),
        m.Hello(r1=R, server_key=b"k" * (MAX_SPKI + 1)),
        m.Hello(r1=R, server_key=SPKI, fs_public=b"x" * 31),
        m.KeyTransport(r2=R, suites=(), ciphertext=b"c"),
        m.KeyTransport(r2=R, suites=(Suite.AES256_GCM,) * (MAX_SUITES + 1), ciphertext=b"c"),
        m.KeyTransport(r2=R, suites=(0x7F,), ciphertext=b"c"),
        m.KeyTransport(r2=R, suites=(Suite.AES256_GCM,), ciphertext=b""),
        m.KeyTransport(r2=R, suites=(Suite.AES256_GCM,), ciphertext=b"c" * (MAX_KEY_TRANSPORT + 1)),
        m.ServerFinished(suite=0x7F, forward_secret=True, mac=X),
        m.ServerFinished(suite=Suite.AES256_GCM, forward_secret=2, mac=X),
        m.Alert(code=0xFFFF),
        m.Close(code=0xFFFF),
        _ops.OpRequest(op=0x7F, serial="s"),
        _ops.OpRequest(op=_ops.Op(1), serial=""),
        _ops.OpRequest(op=_ops.Op(1), serial="x" * 65),
        _ops.OpRequest(op=_ops.Op(1), serial="s", insert_secret=b"i" * 33),
        _ops.OpRequest(op=_ops.Op(1), serial="s", version=1 << 32),
        _ops.OpResult(status=0x7F),
        _ops.OpResult(status=_ops.Status(0), version=-1),
        _ops.AuthChallenge(kdf=b"", challenges=(_ops.AuthItem(_ops.AuthMethod(1)),)),
        _ops.AuthChallenge(kdf=b"k", challenges=()),
        _ops.AuthChallenge(kdf=b"k", challenges=(_ops.AuthItem(_ops.AuthMethod(1)),) * 9),
        _ops.AuthResponse(responses=(_ops.AuthItem(0x7F),)),
        _ops.AuthResponse(responses=(_ops.AuthItem(_ops.AuthMethod(1)),), muk=b"m" * 33),
    ]
    for msg in bad:
        assert type(msg)._TWIN[0](msg) is None
        with pytest.raises(WireError) as e:
            encode_body(msg)
        assert e.value.code is ErrorCode.MALFORMED
    # ints equal to a member are built as the schema builds them
    assert encode_body(m.ServerFinished(suite=1, forward_secret=1, mac=X)) == m.ServerFinished.SCHEMA.build(
        dict(suite=1, forward_secret=1, mac=X))
    assert encode_body(m.KeyTransport(r2=R, suites=(1, 2), ciphertext=b"c")) == m.KeyTransport.SCHEMA.build(
        dict(r2=R, suites=[1, 2], fs_public=b"", ciphertext=b"c"))


def test_session_secrets_twin_agrees_with_the_schema():
    """SessionSecrets.encode / decode (a struct twin) give the KeyTransportPlaintext schema's bytes and errors."""
    s = SessionSecrets(r1=R, r2=X, s1=bytes(32), s2=b"\xff" * 32)
    data = s.encode()
    assert data == m.KeyTransportPlaintext.build(dict(r1=R, r2=X, s1=bytes(32), s2=b"\xff" * 32))
    assert SessionSecrets.decode(data) == s
    for bad in (data[:-1], data + b"\0", b""):
        with pytest.raises(WireError) as e:
            SessionSecrets.decode(bad)
        assert e.value.code is ErrorCode.HANDSHAKE_FAILED
    odd = SessionSecrets(r1=R[:31], r2=X, s1=X, s2=X)  # not the twin's: the schema's error (not 127 bytes)
    with pytest.raises(Exception) as e:
        odd.encode()
    with pytest.raises(type(e.value), match="wrong length"):
        m.KeyTransportPlaintext.build(dict(r1=R[:31], r2=X, s1=X, s2=X))


def test_kdf_master_twins_agree_with_the_schemas():
    """KdfParams.decode, MasterResponse.decode and master_input (struct twins) agree with their construct schemas:
    the same bytes built, and on samples, truncations, a trailing byte and one-byte mutations the same value or
    the same error."""
    from vsc.wire import ops

    def schema_decode(fast, cls, data, what):
        return _wire_outcome(ops._decode_struct, fast, cls, data, what)

    kdfs = [ops.KdfParams(ops.KdfAlg.SCRYPT, b"s" * 16, 15, 8, 1), ops.KdfParams(ops.KdfAlg.LEGACY_MD5),
            ops.KdfParams(ops.KdfAlg.SCRYPT, b"\xff" * 64, 22, 255, 0)]
    for kdf in kdfs:
        for v in _twin_variants(kdf.encode()):
            assert _wire_outcome(ops.KdfParams.decode, v) == schema_decode(ops._Kdf, ops.KdfParams, v, "KDF parameters")
    resp = ops.MasterResponse(ri2=R, mac=X)
    for v in _twin_variants(resp.encode()):
        assert _wire_outcome(ops.MasterResponse.decode, v) == schema_decode(ops._Master, ops.MasterResponse, v,
                                                                            "Master-key response")
    for serial in ("card-1", "café", "x" * 64):
        assert ops.master_input(R, X, serial) == ops.MasterInput.build(dict(ri1=R, ri2=X, serial=serial))
    for bad in ("", "x" * 65):
        with pytest.raises(Exception):
            ops.master_input(R, X, bad)


# ---------------------------------------------------------------- regressions found by tests/test_wire_twins_fuzz.py


def test_compiled_builds_refuse_fixed_fields_of_the_wrong_length_or_type():
    """
    codec.Fast's compiled build of ``c.Bytes(n)`` / ``c.GreedyBytes`` wrote whatever it was given (construct
    emits a bare ``io.write``): a 0- or 31-byte r1, mac, transcript or ri1, or a bytearray / memoryview, came out
    as short or non-canonical bytes where the interpreted schema raises. Each now raises the schema's error.
    """
    from construct import StreamError, StringError

    from vsc.wire import ops

    bad = []  # (the attrs validators refuse these lengths: built field by field, as a caller without them could)
    for cls, fields in ((Hello, dict(r1=b"", server_key=b"k", fs_public=b"")),
                        (KeyTransport, dict(r2=R[:31], suites=(1,), fs_public=b"", ciphertext=b"c")),
                        (ServerFinished, dict(suite=Suite.AES256_GCM, forward_secret=True, mac=b"")),
                        (ClientFinished, dict(mac=b"m" * 33)),
                        (Record, dict(seq=1, sealed=memoryview(b"sealed")))):
        msg = object.__new__(cls)
        for k, v in fields.items():
            object.__setattr__(msg, k, v)
        bad.append(msg)
    for msg in bad:
        with raises(ErrorCode.MALFORMED, f"cannot encode {type(msg).__name__}"):
            encode_body(msg)
    with pytest.raises(StreamError, match="wrong length"):
        ops.master_input(b"", X, "card-1")  # the card's Master-key answer to a challenge that is not 32 bytes
    with pytest.raises(StreamError, match="wrong length"):
        ops.master_input(R + b"!", X, "card-1")
    with pytest.raises(StringError):
        ops.master_input(memoryview(R), X, "card-1")
    assert ops.master_input(bytearray(R), X, "c") == ops.master_input(R, X, "c")  # as the schema takes it
    with pytest.raises(StreamError, match="wrong length"):
        key_info("c2s key", 1, X[:31])
    with pytest.raises(StreamError, match="wrong length"):
        finished_input("server finished", X + b"!", 1, True)
    with pytest.raises(StreamError, match="wrong length"):
        SessionSecrets(r1=R, r2=X, s1=X[:31], s2=X + b"!").encode()
    with pytest.raises(StreamError, match="wrong length"):
        ops.MasterResponse(ri2=b"", mac=X).encode()
    # values of the right length and type still take the compiled path, to the schema's bytes (GreedyBytes
    # takes a bytearray, as the interpreted schema does)
    sealed = object.__new__(Record)
    object.__setattr__(sealed, "seq", 1)
    object.__setattr__(sealed, "sealed", bytearray(b"sealed"))
    assert encode_body(sealed) == Record.SCHEMA.build(dict(seq=1, sealed=b"sealed"))
    assert ops.master_input(R, X, "c") == ops.MasterInput.build(dict(ri1=R, ri2=X, serial="c"))
    assert ops.MasterResponse(ri2=R, mac=X).encode() == R + X


def test_record_aad_seq_bytes_and_header_raise_the_schemas_errors():
    """record_aad, seq_bytes and build_header raised struct.error or TypeError (the struct twin, or the schema
    compiled without codec.Fast) for a value out of range or not an int; now the schema's FormatFieldError."""
    from construct import FormatFieldError

    for call in (lambda: record_aad(256, 0), lambda: record_aad(0, 1 << 64), lambda: record_aad(0, -1),
                 lambda: record_aad(1.0, 0), lambda: seq_bytes(1 << 64), lambda: seq_bytes(-1), lambda: seq_bytes(2.0),
                 lambda: build_header(None, 0), lambda: build_header(1.0, 0), lambda: build_header(1, 0.5)):
        with pytest.raises(FormatFieldError):
            call()
    assert record_aad(True, 5) == record_aad(1, 5)  # a bool is built as the schema builds it
    assert seq_bytes(7) == b"\0" * 7 + b"\x07" and build_header(0x10, 3) == b"VS\x01\x10\x00\x00\x00\x03"
