"""
The Twisted glue (vsc.net): FrameReceiver (over vsc.wire's Deframer) and ChannelProtocol carrying out
the sans-IO channel's effects on a transport and a clock. Deterministic:
StringTransport + task.Clock, and iosim's in-memory connections; no sockets.
"""

from __future__ import annotations

from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.test.iosim import FakeTransport, connectedServerAndClient

from vsc.net.channel import ChannelClosedError, ChannelFactory, ChannelProtocol, peer_name
from vsc.net.framing import FrameReceiver
from vsc.protocol.channel import Received, card_channel, server_channel
from vsc.protocol.suites import ChannelConfig
from vsc.wire import MAX_FRAME_BODY, MAX_HANDSHAKE_BODY, ErrorCode, decode_frame, encode_frame
from vsc.wire.codec import build_header
from vsc.wire.messages import Alert, EchoReply, EchoRequest, Hello, Record, Suite

from tests.vectors.support import DRBG, closes, fixed_fingerprint, fixed_key, sends

SERVER_ADDR = IPv4Address("TCP", "127.0.0.1", 7390)
CARD_ADDR = IPv4Address("TCP", "192.0.2.7", 40001)
CARD_PEER = "192.0.2.7:40001"


class Recorder(ChannelProtocol):
    """A ChannelProtocol that records its hooks."""

    def __init__(self, channel, clock):
        super().__init__(channel, clock)
        self.events: list = []

    def channelEstablished(self, info):
        self.events.append(("established", info))

    def messageReceived(self, msg):
        self.events.append(("message", msg))

    def channelClosed(self, code, reason, byPeer):
        self.events.append(("closed", code, byPeer))


def server_factory(clock, config=None, protocol=Recorder, seed=b"net") -> ChannelFactory:
    counter = iter(range(1000))
    return ChannelFactory(
        lambda: server_channel(config or ChannelConfig(), fixed_key(), DRBG(seed + b"/server/%d" % next(counter))),
        clock,
        protocol,
    )


def card_factory(clock, config=None, protocol=Recorder, seed=b"net", pin=None) -> ChannelFactory:
    counter = iter(range(1000))
    return ChannelFactory(
        lambda: card_channel(config or ChannelConfig(), pin or fixed_fingerprint(), DRBG(seed + b"/card/%d" % next(counter))),
        clock,
        protocol,
    )


def connect(sfactory: ChannelFactory, cfactory: ChannelFactory, clock: Clock):
    """An iosim connection between a card and a server protocol, with addresses; returns (card, server, pump)."""
    return connectedServerAndClient(
        lambda: sfactory.buildProtocol(CARD_ADDR),
        lambda: cfactory.buildProtocol(SERVER_ADDR),
        clientTransportFactory=lambda p: FakeTransport(p, isServer=False, hostAddress=CARD_ADDR, peerAddress=SERVER_ADDR),
        serverTransportFactory=lambda p: FakeTransport(p, isServer=True, hostAddress=SERVER_ADDR, peerAddress=CARD_ADDR),
        clock=clock,
    )


def result(d):
    """The result of an already-fired Deferred (a Failure if it failed)."""
    box = []
    d.addBoth(box.append)
    assert box, "Deferred has not fired"
    return box[0]


class Harness:
    """A server ChannelProtocol on a StringTransport, driven by a sans-IO card channel."""

    def __init__(self, server_config=None, card_config=None, protocol=Recorder, seed=b"harness"):
        self.clock = Clock()
        self.factory = server_factory(self.clock, server_config, protocol, seed)
        self.proto = self.factory.buildProtocol(CARD_ADDR)
        self.transport = StringTransport(hostAddress=SERVER_ADDR, peerAddress=CARD_ADDR)
        self.card = card_channel(card_config or ChannelConfig(), fixed_fingerprint(), DRBG(seed + b"/card"))
        self.card_effects: list = []

    def connect(self) -> None:
        self.card_effects += self.card.start()
        self.proto.makeConnection(self.transport)

    def server_output(self) -> bytes:
        data = self.transport.value()
        self.transport.clear()
        return data

    def flush(self) -> None:
        """Carry bytes both ways until quiet."""
        while True:
            data = self.server_output()
            if not data:
                return
            effects = self.card.receive_bytes(data)
            self.card_effects += effects
            for out in sends(effects):
                self.proto.dataReceived(out)

    def card_send(self, msg) -> None:
        effects = self.card.send(msg)
        self.card_effects += effects
        for out in sends(effects):
            self.proto.dataReceived(out)
        self.flush()

    def handshake(self) -> None:
        self.connect()
        self.flush()
        assert self.card.established and self.proto.info is not None


def messages_of(proto) -> list:
    return [e[1] for e in proto.events if e[0] == "message"]


def closed_of(proto) -> list:
    return [e[1:] for e in proto.events if e[0] == "closed"]


def log_text(events) -> str:
    return "\n".join(formatEvent(e) for e in events)


# ---------------------------------------------------------------- StringTransport + Clock


def test_handshake_and_echo_on_a_string_transport():
    """The server protocol sends Hello on connect, completes the handshake, answers a sealed echo, and cancels its timer."""
    h = Harness()
    h.connect()
    assert isinstance(decode_frame(h.transport.value()), Hello)
    assert len(h.clock.getDelayedCalls()) == 1 and h.clock.getDelayedCalls()[0].getTime() == 30.0
    h.flush()
    assert h.proto.info.suite is Suite.AES256_GCM and h.proto.info.forward_secret
    assert ("established", h.proto.info) in h.proto.events
    assert h.clock.getDelayedCalls() == []
    assert h.proto.peer == CARD_PEER
    h.card_send(EchoRequest(b"over a string transport"))
    assert h.card_effects[-1] == Received(EchoReply(b"over a string transport"))
    assert not h.transport.disconnecting


class NoDelayTransport(StringTransport):
    """A StringTransport that records setTcpNoDelay calls, as a TCP transport would take them."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.no_delay: list[bool] = []

    def setTcpNoDelay(self, enabled):  # noqa: N802 - ITCPTransport's name
        self.no_delay.append(enabled)


def test_both_ends_turn_nagle_off():
    """The server's and the card's ChannelProtocol set TCP_NODELAY on their transport as the connection is made."""
    clock = Clock()
    for factory, here, there in ((server_factory(clock), SERVER_ADDR, CARD_ADDR),
                                 (card_factory(clock), CARD_ADDR, SERVER_ADDR)):
        proto = factory.buildProtocol(there)
        transport = NoDelayTransport(hostAddress=here, peerAddress=there)
        proto.makeConnection(transport)
        assert transport.no_delay == [True]


def test_frame_limit_follows_the_channel_state():
    """MAX_LENGTH is the handshake limit until establishment, then the record limit; big records then pass."""
    h = Harness()
    h.connect()
    assert h.proto.MAX_LENGTH == MAX_HANDSHAKE_BODY
    h.flush()
    assert h.proto.MAX_LENGTH == MAX_FRAME_BODY
    h.card_send(EchoRequest(b"B" * 60000))
    assert h.card_effects[-1] == Received(EchoReply(b"B" * 60000))


def test_handshake_timer_fires_on_the_clock():
    """With no KeyTransport, Clock.advance past the handshake timeout sends a HANDSHAKE_TIMEOUT alert, disconnects and logs the peer."""
    h = Harness(server_config=ChannelConfig(handshake_timeout=5))
    with capturedLogs() as events:
        h.connect()
        established = h.proto.whenEstablished()
        closed = h.proto.whenClosed()
        hello = h.server_output()
        assert decode_frame(hello).r1
        h.clock.advance(4.999)
        assert h.transport.value() == b"" and not h.transport.disconnecting
        h.clock.advance(0.001)
    assert h.transport.value() == encode_frame(Alert(ErrorCode.HANDSHAKE_TIMEOUT))
    assert h.transport.disconnecting
    # the handshake timer is gone; only the guard that aborts a transport still open closeGrace later runs
    assert [c.func for c in h.clock.getDelayedCalls()] == [h.proto._abort]
    h.proto.connectionLost(None)
    assert h.clock.getDelayedCalls() == []
    assert closed_of(h.proto) == [(ErrorCode.HANDSHAKE_TIMEOUT, False)]
    failure = result(established)
    assert failure.check(ChannelClosedError) and failure.value.code is ErrorCode.HANDSHAKE_TIMEOUT
    assert result(closed) == (ErrorCode.HANDSHAKE_TIMEOUT, "handshake not finished within 5 s")
    text = log_text(events)
    assert f"channel with {CARD_PEER} closed: HANDSHAKE_TIMEOUT" in text
    assert "within 5 s" in text


def test_card_handshake_timer():
    """A card protocol that never gets a Hello times out on its own clock and alerts the server."""
    clock = Clock()
    proto = card_factory(clock, ChannelConfig(handshake_timeout=2)).buildProtocol(SERVER_ADDR)
    tr = StringTransport(peerAddress=SERVER_ADDR)
    with capturedLogs() as events:
        proto.makeConnection(tr)
        clock.advance(2)
    assert tr.value() == encode_frame(Alert(ErrorCode.HANDSHAKE_TIMEOUT)) and tr.disconnecting
    assert "channel with 127.0.0.1:7390 closed: HANDSHAKE_TIMEOUT" in log_text(events)


def test_oversized_length_header_rejected_before_the_body():
    """A header announcing more than MAX_LENGTH closes the connection at once (FRAME_TOO_LARGE), without reading a body."""
    h = Harness()
    with capturedLogs() as events:
        h.connect()
        h.server_output()
        h.proto.dataReceived(build_header(0x02, MAX_HANDSHAKE_BODY + 1))
    assert h.transport.value() == encode_frame(Alert(ErrorCode.FRAME_TOO_LARGE))
    assert h.transport.disconnecting
    assert closed_of(h.proto) == [(ErrorCode.FRAME_TOO_LARGE, False)]
    assert f"{CARD_PEER} closed: FRAME_TOO_LARGE" in log_text(events)
    # more bytes after the failure are ignored
    h.proto.dataReceived(b"\x00" * 100)
    assert closed_of(h.proto) == [(ErrorCode.FRAME_TOO_LARGE, False)]


def test_oversized_length_header_after_establishment():
    """Once established the limit is MAX_FRAME_BODY: one byte more is FRAME_TOO_LARGE, reported in a sealed Close."""
    h = Harness()
    h.handshake()
    h.proto.dataReceived(b"VS\x01\x10" + (MAX_FRAME_BODY + 1).to_bytes(4, "big"))
    out = h.server_output()
    assert isinstance(decode_frame(out), Record)
    assert h.transport.disconnecting
    (closed,) = closes(h.card.receive_bytes(out))
    assert (closed.code, closed.by_peer) == (ErrorCode.FRAME_TOO_LARGE, True)


def test_bad_header_before_establishment():
    """Garbage instead of a KeyTransport closes with a plaintext MALFORMED alert."""
    h = Harness()
    h.connect()
    h.server_output()
    h.proto.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert h.transport.value() == encode_frame(Alert(ErrorCode.MALFORMED))
    assert h.transport.disconnecting


class Exploding(Recorder):
    def messageReceived(self, msg):
        raise ValueError("handler bug: boom")


class ExplodingOnEstablish(Recorder):
    def channelEstablished(self, info):
        raise RuntimeError("setup bug")


class ExplodingOnClose(Recorder):
    def channelClosed(self, code, reason, byPeer):
        raise KeyError("close bug")


def test_handler_exception_closes_with_internal_error_and_is_logged():
    """An exception in messageReceived is logged with its traceback and the peer, and closes with INTERNAL_ERROR (sealed)."""
    h = Harness(protocol=Exploding)
    h.handshake()
    with capturedLogs() as events:
        effects = h.card.send(EchoReply(b"unsolicited"))
        h.proto.dataReceived(sends(effects)[0])
    out = h.server_output()
    assert h.transport.disconnecting
    (closed,) = closes(h.card.receive_bytes(out))
    assert (closed.code, closed.by_peer) == (ErrorCode.INTERNAL_ERROR, True)
    failures = [e for e in events if "log_failure" in e]
    assert len(failures) == 1
    assert failures[0]["log_failure"].check(ValueError)
    assert failures[0]["log_level"] is LogLevel.critical
    assert f"handler failed on the channel with {CARD_PEER}" in formatEvent(failures[0])
    assert f"{CARD_PEER} closed: INTERNAL_ERROR" in log_text(events)
    assert closed_of(h.proto) == [(ErrorCode.INTERNAL_ERROR, False)]


def test_exception_in_channel_established_closes_with_internal_error():
    """An exception in channelEstablished is logged and closes the new channel with INTERNAL_ERROR."""
    h = Harness(protocol=ExplodingOnEstablish)
    with capturedLogs() as events:
        h.connect()
        h.flush()
    assert h.transport.disconnecting
    (closed,) = closes(h.card_effects)
    assert (closed.code, closed.by_peer) == (ErrorCode.INTERNAL_ERROR, True)
    assert any("log_failure" in e and e["log_failure"].check(RuntimeError) for e in events)


def test_exception_in_channel_closed_is_only_logged():
    """An exception in channelClosed is logged; the close itself still happens once."""
    h = Harness(protocol=ExplodingOnClose)
    h.handshake()
    with capturedLogs() as events:
        h.proto.closeChannel()
    assert h.transport.disconnecting
    assert any("log_failure" in e and e["log_failure"].check(KeyError) for e in events)
    assert result(h.proto.whenClosed()) == (ErrorCode.CLOSE_NOTIFY, "closed locally")


def test_insecure_suite_is_logged_as_a_warning():
    """A des-cbc-md5 channel works but logs a warning naming the peer and the insecure suite."""
    insecure = ChannelConfig(suites=(Suite.DES_CBC_MD5,), allow_insecure=True)
    h = Harness(server_config=insecure, card_config=insecure)
    with capturedLogs() as events:
        h.handshake()
    (warning,) = [e for e in events if e["log_level"] is LogLevel.warn]
    assert f"channel with {CARD_PEER} uses the INSECURE suite des-cbc-md5" in formatEvent(warning)
    h.card_send(EchoRequest(b"legacy"))
    assert h.card_effects[-1] == Received(EchoReply(b"legacy"))


def test_connection_lost_mid_handshake():
    """Losing the transport during the handshake cancels the timer and fails whenEstablished; nothing is written."""
    h = Harness()
    h.connect()
    h.server_output()
    d = h.proto.whenEstablished()
    h.proto.connectionLost(None)
    assert h.clock.getDelayedCalls() == []
    assert h.transport.value() == b""
    assert result(d).value.code is ErrorCode.CLOSE_NOTIFY
    assert closed_of(h.proto) == [(ErrorCode.CLOSE_NOTIFY, True)]
    # after close: whenEstablished fails at once, whenClosed fires at once
    assert result(h.proto.whenEstablished()).check(ChannelClosedError)
    assert result(h.proto.whenClosed())[0] is ErrorCode.CLOSE_NOTIFY


def test_when_established_after_the_fact():
    """whenEstablished on an established channel fires immediately with its ChannelInfo."""
    h = Harness()
    h.handshake()
    assert result(h.proto.whenEstablished()) == h.proto.info


def test_peer_name():
    """peer_name renders host:port, a UNIX socket path, or "?" when the transport has no peer."""

    class NoPeer:
        def getPeer(self):
            raise NotImplementedError

    assert peer_name(StringTransport(peerAddress=CARD_ADDR)) == CARD_PEER
    assert "/run/vsc.sock" in peer_name(StringTransport(peerAddress=UNIXAddress(b"/run/vsc.sock")))
    assert peer_name(NoPeer()) == "?"


# ---------------------------------------------------------------- FrameReceiver alone


class Frames(FrameReceiver):
    def __init__(self, max_length=None):
        self.frames, self.errors = [], []
        if max_length is not None:
            self.MAX_LENGTH = max_length

    def frameReceived(self, frame):
        self.frames.append(frame)

    def frameError(self, error):
        self.errors.append(error)
        super().frameError(error)


STREAM_FRAMES = [
    encode_frame(Alert(ErrorCode.CLOSE_NOTIFY)),
    encode_frame(Record(seq=1, sealed=b"s" * 50)),
    encode_frame(Record(seq=2, sealed=b"")),
]
STREAM = b"".join(STREAM_FRAMES)


def test_frame_receiver_split_at_every_offset():
    """FrameReceiver delivers the same whole frames however the stream is split in two."""
    for i in range(len(STREAM) + 1):
        p = Frames()
        p.makeConnection(StringTransport())
        p.dataReceived(STREAM[:i])
        p.dataReceived(STREAM[i:])
        assert p.frames == STREAM_FRAMES and p.errors == []
        assert p.deframer.buffered == 0


def test_frame_receiver_errors_once_and_stops():
    """A bad header calls frameError once (closing by default); frames before it are delivered, later bytes ignored."""
    p = Frames()
    tr = StringTransport()
    p.makeConnection(tr)
    p.dataReceived(STREAM_FRAMES[0] + b"XY\x01\x05\x00\x00\x00\x02\x00\x00" + STREAM_FRAMES[1])
    assert p.frames == [STREAM_FRAMES[0]]
    assert [e.code for e in p.errors] == [ErrorCode.MALFORMED] and "bad magic" in p.errors[0].message
    assert tr.disconnecting
    p.dataReceived(STREAM)
    assert p.frames == [STREAM_FRAMES[0]] and len(p.errors) == 1


def test_frame_receiver_max_length():
    """A length above MAX_LENGTH is FRAME_TOO_LARGE as soon as the 8-byte header is in; exactly MAX_LENGTH passes."""
    p = Frames(max_length=50)
    p.makeConnection(StringTransport())
    p.dataReceived(STREAM_FRAMES[1][:7])
    assert p.errors == []
    p.dataReceived(STREAM_FRAMES[1][7:8])
    (err,) = p.errors
    assert err.code is ErrorCode.FRAME_TOO_LARGE and "58 bytes exceeds the limit of 50" in err.message
    p = Frames(max_length=58)
    p.makeConnection(StringTransport())
    p.dataReceived(STREAM_FRAMES[1])
    assert p.frames == [STREAM_FRAMES[1]]


def test_frame_receiver_limit_changed_by_a_frame_applies_to_the_next_one_in_the_same_chunk():
    """MAX_LENGTH set inside frameReceived is the limit for the very next frame of the same chunk (FRAME_TOO_LARGE)."""

    class Lowering(Frames):
        def frameReceived(self, frame):
            super().frameReceived(frame)
            self.MAX_LENGTH = 10

    p = Lowering()
    tr = StringTransport()
    p.makeConnection(tr)
    p.dataReceived(STREAM)
    assert p.frames == [STREAM_FRAMES[0]]
    (err,) = p.errors
    assert err.code is ErrorCode.FRAME_TOO_LARGE and "58 bytes exceeds the limit of 10" in err.message
    assert tr.disconnecting and p.deframer.buffered == 0


def test_frame_receiver_wrong_version():
    """A frame header with another protocol version is PROTOCOL_VERSION."""
    p = Frames()
    p.makeConnection(StringTransport())
    p.dataReceived(b"VS\x02\x05\x00\x00\x00\x02\x00\x00")
    assert [e.code for e in p.errors] == [ErrorCode.PROTOCOL_VERSION]


# ---------------------------------------------------------------- iosim


def test_iosim_handshake_echo_and_close():
    """Card and server protocols over iosim: handshake, sealed echo, orderly close, both transports disconnected."""
    clock = Clock()
    card, server, pump = connect(server_factory(clock), card_factory(clock), clock)
    pump.flush()
    assert card.info == server.info and card.info.server_fingerprint == fixed_fingerprint()
    assert card.peer == "127.0.0.1:7390" and server.peer == CARD_PEER
    assert result(card.whenEstablished()) == card.info
    for i in range(3):
        card.sendMessage(EchoRequest(b"ping %d" % i))
    pump.flush()
    assert messages_of(card) == [EchoReply(b"ping %d" % i) for i in range(3)]
    server.sendMessage(EchoRequest(b"from the server"))
    pump.flush()
    assert messages_of(server) == [EchoReply(b"from the server")]
    card.closeChannel()
    pump.flush()
    assert closed_of(card) == [(ErrorCode.CLOSE_NOTIFY, False)]
    assert closed_of(server) == [(ErrorCode.CLOSE_NOTIFY, True)]
    assert card.transport.disconnected and server.transport.disconnected
    assert clock.getDelayedCalls() == []


def test_iosim_bad_header_closes_only_that_connection():
    """Two connections to one server factory: corrupting one closes it alone; the other keeps exchanging records."""
    clock = Clock()
    sfactory, cfactory = server_factory(clock), card_factory(clock)
    card_a, server_a, pump_a = connect(sfactory, cfactory, clock)
    card_b, server_b, pump_b = connect(sfactory, cfactory, clock)
    pump_a.flush()
    pump_b.flush()
    assert card_a.info and card_b.info
    with capturedLogs() as events:
        card_a.transport.write(b"XX\x01\x10\x00\x00\x00\x00")
        pump_a.flush()
    assert closed_of(server_a) == [(ErrorCode.MALFORMED, False)]
    assert closed_of(card_a) == [(ErrorCode.MALFORMED, True)]  # told in a sealed Close
    assert server_a.transport.disconnected
    assert f"{CARD_PEER} closed: MALFORMED" in log_text(events)
    card_b.sendMessage(EchoRequest(b"still here"))
    pump_b.flush()
    assert messages_of(card_b) == [EchoReply(b"still here")]
    assert closed_of(server_b) == [] and not server_b.transport.disconnecting


def test_iosim_wrong_pin_fails_the_card():
    """A card pinning another key closes with SERVER_KEY_MISMATCH and the server learns it from the alert."""
    clock = Clock()
    card, server, pump = connect(server_factory(clock), card_factory(clock, pin="SHA256:" + "B" * 43), clock)
    d = card.whenEstablished()
    pump.flush()
    assert result(d).value.code is ErrorCode.SERVER_KEY_MISMATCH
    assert closed_of(server) == [(ErrorCode.SERVER_KEY_MISMATCH, True)]
    assert card.transport.disconnected and server.transport.disconnected


def test_iosim_handshake_timeout_with_a_silent_card():
    """A peer that connects and says nothing is dropped by the server's timer when the shared clock advances."""
    clock = Clock()

    class Silent(Recorder):
        def connectionMade(self):
            pass  # never starts its channel, never answers

        def dataReceived(self, data):
            pass

    card, server, pump = connect(server_factory(clock, ChannelConfig(handshake_timeout=10)), card_factory(clock, protocol=Silent), clock)
    pump.flush()
    clock.advance(10)
    pump.flush()
    assert closed_of(server) == [(ErrorCode.HANDSHAKE_TIMEOUT, False)]
    assert server.transport.disconnected
