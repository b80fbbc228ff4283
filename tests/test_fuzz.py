"""
Property tests (hypothesis): random and mutated bytes thrown at the codec
and at live sans-IO channels in every stage. The codec may only raise
WireError (and anything it accepts re-encodes to the same bytes); a channel
never raises, only emits the documented effects, closes at most once, and is
inert once closed.

Bounded and reproducible: derandomized, no example database, max_examples
per property below. The last test checks (and reports) how many inputs were
actually tried.
"""

from __future__ import annotations

import collections

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vsc.protocol.channel import CancelTimer, Received
from vsc.wire import Deframer, ErrorCode, WireError, decode_frame, decode_inner, encode_frame, encode_inner
from vsc.wire.messages import Alert, ClientFinished, Close, EchoReply, EchoRequest, Hello, KeyTransport, Record, ServerFinished, Suite

from tests.vectors.support import EFFECT_TYPES, Pair, closes, fixed_key, sends

MAX_EXAMPLES = 300
FUZZ = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

#: inputs actually run, per property (reported by the last test)
TRIED: collections.Counter = collections.Counter()

SEED = b"fuzz"


# ---------------------------------------------------------------- corpus


def _corpus() -> dict[str, list[bytes]]:
    """Valid frames from one seeded session (every fresh seeded Pair reproduces them) plus codec samples."""
    p = Pair(seed=SEED)
    hs = p.handshake()
    (c2s0,) = sends(p.card.send(EchoRequest(b"fuzz request 0")))
    (s2c0,) = sends(p.server.receive_frame(c2s0))  # the echo reply, server seq 0
    (c2s1,) = sends(p.card.send(EchoReply(b"fuzz unsolicited 1")))
    (s2c1,) = sends(p.server.send(Close()))
    spki = fixed_key().public_key().spki_der
    samples = [
        encode_frame(Alert(code)) for code in (ErrorCode.CLOSE_NOTIFY, ErrorCode.HANDSHAKE_FAILED, ErrorCode.INTERNAL_ERROR)
    ] + [
        encode_frame(Hello(r1=bytes(32), server_key=spki)),
        encode_frame(KeyTransport(r2=bytes(32), suites=list(Suite), fs_public=bytes(range(32)), ciphertext=b"\x01" * 256)),
        encode_frame(ServerFinished(suite=Suite.DES_CBC_MD5, forward_secret=False, mac=bytes(32))),
        encode_frame(ClientFinished(mac=bytes(32))),
        encode_frame(Record(seq=5, sealed=b"\x00" * 40)),
    ]
    inner = [encode_inner(m) for m in (Close(), Close(ErrorCode.BAD_RECORD), EchoRequest(b"abc"), EchoReply(b""))]
    return {
        "handshake": list(hs.values()),
        "records": [c2s0, s2c0, c2s1, s2c1],
        "samples": samples,
        "inner": inner,
    }


CORPUS = _corpus()
FRAMES = CORPUS["handshake"] + CORPUS["records"] + CORPUS["samples"]


@st.composite
def mutated(draw, pool: list[bytes]) -> bytes:
    """A valid frame with 1-4 random edits; usually with its length field made consistent again."""
    data = bytearray(draw(st.sampled_from(pool)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "extend"]))
        if op in ("flip", "set", "delete") and not data:
            continue
        if op == "flip":
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.sampled_from([0x00, 0x01, 0x7F, 0x80, 0xFF, 0x20, 0x21]))
        elif op == "insert":
            i = draw(st.integers(0, len(data)))
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            i = draw(st.integers(0, len(data) - 1))
            del data[i : i + draw(st.integers(1, 8))]
        elif op == "truncate":
            del data[draw(st.integers(0, len(data))) :]
        else:
            data += draw(st.binary(min_size=1, max_size=16))
    if len(data) >= 8 and draw(st.booleans()):
        data[4:8] = (len(data) - 8).to_bytes(4, "big")  # reach the body parser, not just the length check
    return bytes(data)


@st.composite
def mutated_inner(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(CORPUS["inner"])))
    for _ in range(draw(st.integers(1, 3))):
        if data and draw(st.booleans()):
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
        else:
            i = draw(st.integers(0, len(data)))
            if draw(st.booleans()):
                data[i:i] = draw(st.binary(min_size=1, max_size=4))
            else:
                del data[i:]
    return bytes(data)


SUITE_BYTES = st.one_of(st.sampled_from([int(x) for x in Suite]), st.integers(0, 255))
FS_KEYS = st.one_of(st.sampled_from([b"", bytes(range(32)), bytes(32)]), st.binary(max_size=40))


@st.composite
def structured(draw) -> bytes:
    """
    A frame built field by field for a random message type, each field
    usually plausible but sometimes out of range: odd lengths (fs_public of
    31/33 bytes), unknown suites and codes, flag bytes other than 0/1,
    length prefixes that lie, trailing or missing bytes.
    """

    def prefixed(width: int, content: bytes) -> bytes:
        n = len(content) if draw(st.integers(0, 9)) else draw(st.integers(0, (1 << (8 * width)) - 1))
        return n.to_bytes(width, "big") + content

    mtype = draw(st.sampled_from([0x01, 0x02, 0x03, 0x04, 0x05, 0x10, 0x20, 0x21, 0x22]))
    r = draw(st.binary(min_size=32, max_size=32))
    if mtype == 0x01:
        key = draw(st.one_of(st.just(fixed_key().public_key().spki_der), st.binary(max_size=64)))
        body = r + prefixed(2, key) + prefixed(1, draw(FS_KEYS))
    elif mtype == 0x02:
        suites = draw(st.lists(SUITE_BYTES, max_size=10))
        ct = draw(st.one_of(st.binary(min_size=256, max_size=256), st.binary(max_size=8)))
        body = r + prefixed(1, bytes(suites)) + prefixed(1, draw(FS_KEYS)) + prefixed(2, ct)
    elif mtype == 0x03:
        body = bytes([draw(SUITE_BYTES), draw(st.integers(0, 255))]) + draw(st.binary(min_size=30, max_size=34))
    elif mtype == 0x04:
        body = draw(st.binary(min_size=30, max_size=34))
    elif mtype in (0x05, 0x20):
        code = draw(st.one_of(st.sampled_from([int(c) for c in ErrorCode]), st.integers(0, 0xFFFF)))
        body = code.to_bytes(2, "big")
    elif mtype == 0x10:
        body = draw(st.integers(0, 3)).to_bytes(8, "big") + draw(st.binary(max_size=80))
    else:
        body = prefixed(4, draw(st.binary(max_size=40)))
    edit = draw(st.sampled_from(["none", "none", "append", "cut"]))
    if edit == "append":
        body += draw(st.binary(min_size=1, max_size=4))
    elif edit == "cut" and body:
        body = body[: draw(st.integers(0, len(body) - 1))]
    return b"VS\x01" + bytes([mtype]) + len(body).to_bytes(4, "big") + body


any_frame_bytes = st.one_of(st.binary(max_size=400), mutated(FRAMES), structured())


# ---------------------------------------------------------------- the codec


def _decode_frame_only_wire_errors(data: bytes) -> None:
    try:
        msg = decode_frame(data)
    except WireError as e:
        assert isinstance(e.code, ErrorCode) and e.message
        return
    assert encode_frame(msg) == data, "an accepted frame must have exactly one encoding"


@FUZZ
@given(st.binary(max_size=600))
def test_decode_frame_random_bytes(data):
    """decode_frame on random bytes raises only WireError; anything it accepts re-encodes to the same bytes."""
    TRIED["decode_frame random"] += 1
    _decode_frame_only_wire_errors(data)


@FUZZ
@given(mutated(FRAMES))
def test_decode_frame_mutated_frames(data):
    """decode_frame on mutated valid frames raises only WireError; anything it accepts re-encodes identically."""
    TRIED["decode_frame mutated"] += 1
    _decode_frame_only_wire_errors(data)


@FUZZ
@given(structured())
def test_decode_frame_structured_frames(data):
    """decode_frame on field-by-field generated frames (odd field sizes, unknown enum values, bad flags) raises only WireError; accepted frames re-encode identically."""
    TRIED["decode_frame structured"] += 1
    _decode_frame_only_wire_errors(data)
    if data[3] in (0x20, 0x21, 0x22):
        # the same bodies as record plaintexts
        try:
            msg = decode_inner(bytes([data[3]]) + data[8:])
        except WireError:
            return
        assert encode_inner(msg) == bytes([data[3]]) + data[8:]


@FUZZ
@given(st.one_of(st.binary(max_size=200), mutated_inner()))
def test_decode_inner_random_and_mutated(data):
    """decode_inner on random or mutated record plaintexts raises only WireError; accepted input re-encodes identically."""
    TRIED["decode_inner"] += 1
    try:
        msg = decode_inner(data)
    except WireError as e:
        assert isinstance(e.code, ErrorCode)
        return
    assert encode_inner(msg) == data


@FUZZ
@given(st.lists(any_frame_bytes, min_size=1, max_size=4), st.lists(st.integers(0, 2000), max_size=6), st.integers(8, 5000))
def test_deframer_random_streams(pieces, cuts, max_body):
    """The Deframer, fed any stream in any chunking, raises only WireError and yields only exact, consecutive prefixes of the stream."""
    TRIED["deframer"] += 1
    stream = b"".join(pieces)
    points = sorted({min(c, len(stream)) for c in cuts} | {0, len(stream)})
    d = Deframer(max_body=max_body)
    out = []
    try:
        for a, b in zip(points, points[1:]):
            out += list(d.feed(stream[a:b]))
    except WireError as e:
        assert isinstance(e.code, ErrorCode)
    joined = b"".join(out)
    assert stream.startswith(joined)
    for frame in out:
        assert len(frame) >= 8 and int.from_bytes(frame[4:8], "big") == len(frame) - 8 <= max_body


# ---------------------------------------------------------------- live channels


STAGES = [
    "server awaiting key transport",
    "server awaiting client finished",
    "server established",
    "card awaiting hello",
    "card awaiting server finished",
    "card established",
]


def _at_stage(stage: str):
    """A fresh seeded pair advanced to ``stage``; returns the channel under test."""
    p = Pair(seed=SEED)
    side = stage.split()[0]
    if stage == "card awaiting hello":
        p.card.start()
        return p.card
    hello = p.start()
    if stage == "server awaiting key transport":
        return p.server
    (kt,) = sends(p.card.receive_frame(hello))
    if stage == "card awaiting server finished":
        return p.card
    (sf,) = sends(p.server.receive_frame(kt))
    if stage == "server awaiting client finished":
        return p.server
    (cf,) = sends(p.card.receive_frame(sf))
    p.server.receive_frame(cf)
    return p.server if side == "server" else p.card


def _check_effects(channel, effects: list, closed_before: bool) -> bool:
    """The invariants of one input's effects; returns whether the channel closed."""
    assert all(isinstance(e, EFFECT_TYPES) for e in effects), effects
    closed = closes(effects)
    if closed_before:
        assert effects == [], "a closed channel must ignore everything"
        return True
    assert len(closed) <= 1
    if closed:
        assert effects[-1] is closed[0], "nothing may follow Closed"
        assert channel.closed and not channel.established
        assert isinstance(closed[0].code, ErrorCode)
        # the close sequence: [the Alert or sealed Close, if any], CancelTimer, Closed
        assert isinstance(effects[-2], CancelTimer), effects
        return True
    assert not channel.closed
    for e in effects:
        if isinstance(e, Received):
            assert channel.established
    return False


@st.composite
def channel_inputs(draw):
    items = draw(
        st.lists(
            st.one_of(
                mutated(FRAMES),
                st.sampled_from(FRAMES),
                structured(),
                st.binary(max_size=300),
            ),
            min_size=1,
            max_size=4,
        )
    )
    how = draw(st.sampled_from(["frames", "stream", "chunks"]))
    return items, how, draw(st.integers(1, 64))


def _drive(channel, items, how, chunk) -> None:
    closed = False
    for item in items:
        if how == "frames":
            calls = [lambda item=item: channel.receive_frame(item)]
        elif how == "stream":
            calls = [lambda item=item: channel.receive_bytes(item)]
        else:
            calls = [lambda part=item[i : i + chunk]: channel.receive_bytes(part) for i in range(0, len(item), chunk)]
        for call in calls:
            closed = _check_effects(channel, call(), closed)
    # the channel is still sound afterwards: a timeout, a close, or a lost connection never raise
    for call in (channel.timeout, channel.close, channel.connection_lost):
        closed = _check_effects(channel, call(), closed)
    assert channel.closed
    assert channel.receive_bytes(FRAMES[0]) == [] and channel.receive_frame(FRAMES[-1]) == []


@FUZZ
@given(st.sampled_from(STAGES), channel_inputs())
def test_live_channel_survives_mutated_and_random_frames(stage, inputs):
    """
    A server or card channel at any handshake stage or established, fed
    random bytes, valid frames from the same seeded session, or mutations of
    them (as whole frames, one stream write, or small chunks), never raises,
    emits only Send/Established/Received/SetTimer/CancelTimer/Closed, closes
    at most once with nothing after it, and ignores everything once closed.
    """
    TRIED[f"channel: {stage}"] += 1
    TRIED["channel"] += 1
    channel = _at_stage(stage)
    items, how, chunk = inputs
    _drive(channel, items, how, chunk)


@FUZZ
@given(st.sampled_from(STAGES), st.sampled_from(FRAMES), st.integers(0, 10_000), st.integers(0, 7))
def test_live_channel_single_bit_flips(stage, frame, position, bit):
    """Any single bit flipped in any frame of the session, delivered at any stage, is handled without an exception."""
    TRIED["channel bit flips"] += 1
    data = bytearray(frame)
    data[position % len(data)] ^= 1 << bit
    channel = _at_stage(stage)
    closed = _check_effects(channel, channel.receive_bytes(bytes(data)), False)
    if not closed:
        # a flip that still parsed and was accepted (it cannot be: every byte is authenticated or checked) or
        # a flip in the length field that left the frame incomplete: the channel is waiting for more bytes
        assert not channel.closed
    _check_effects(channel, channel.connection_lost(), closed)
    assert channel.closed


def test_seeded_sessions_reproduce_the_corpus():
    """The live-channel properties rely on every seeded Pair reproducing the corpus frames exactly."""
    assert _corpus() == CORPUS
    for stage in STAGES:
        ch = _at_stage(stage)
        assert not ch.closed and ch.established == stage.endswith("established")


def test_zz_fuzz_volume(record_property):
    """Reports how many inputs each property tried in this session, and that each ran its full budget."""
    assert TRIED, "run the whole file: this test reports the volume of the fuzz properties above it"
    for name, n in sorted(TRIED.items()):
        record_property(f"hypothesis inputs: {name}", n)
        print(f"hypothesis inputs: {name}: {n}")
    for name in ("decode_frame random", "decode_frame mutated", "decode_frame structured", "decode_inner", "deframer",
                 "channel", "channel bit flips"):
        if name in TRIED:
            assert TRIED[name] >= MAX_EXAMPLES, (name, TRIED[name])
    if "channel" in TRIED:
        assert all(TRIED[f"channel: {s}"] > 0 for s in STAGES), TRIED
