"""
vsc.net.transport: write_now sends a frame on an idle TCP connection at
once and leaves Twisted only what the kernel did not take; close_now closes
an idle one without the extra reactor turn. Deterministic: a real
``twisted.internet.tcp.Connection`` over a local socketpair (no network)
with a reactor that only records which descriptors it would watch; nothing
runs a reactor loop.
"""

from __future__ import annotations

import socket

import pytest
from twisted.internet import error, tcp
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from vsc.net.transport import close_now, write_now


class FDSet(Clock):
    """The IReactorFDSet part a tcp.Connection uses, recording instead of polling, and a Clock (abortConnection
    schedules its connectionLost with callLater)."""

    def __init__(self):
        super().__init__()
        self.readers: set = set()
        self.writers: set = set()

    def addReader(self, r):  # noqa: N802 - Twisted's names
        self.readers.add(r)

    def addWriter(self, w):  # noqa: N802
        self.writers.add(w)

    def removeReader(self, r):  # noqa: N802
        self.readers.discard(r)

    def removeWriter(self, w):  # noqa: N802
        self.writers.discard(w)


class Lost(Protocol):
    def __init__(self):
        self.reasons: list = []

    def connectionLost(self, reason=None):  # noqa: N802
        self.reasons.append(reason)


@pytest.fixture
def pair():
    """(transport, protocol, reactor, peer socket): our end a tcp.Connection, the peer a plain socket."""
    ours, peer = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    reactor = FDSet()
    proto = Lost()
    transport = tcp.Connection(ours, proto, reactor)
    transport.connected = 1
    proto.makeConnection(transport)
    transport.startReading()
    yield transport, proto, reactor, peer
    peer.close()
    if hasattr(transport, "socket"):
        transport.socket.close()


def drain(peer: socket.socket) -> bytes:
    peer.setblocking(False)
    out = b""
    while True:
        try:
            chunk = peer.recv(1 << 20)
        except BlockingIOError:
            return out
        if not chunk:
            return out
        out += chunk


def test_a_frame_on_an_idle_connection_is_sent_at_once(pair):
    """The bytes are in the peer's socket when write_now returns; nothing is buffered, no write turn asked for."""
    transport, _, reactor, peer = pair
    write_now(transport, b"hello frame")
    assert drain(peer) == b"hello frame"
    assert transport not in reactor.writers
    assert transport._tempDataLen == 0 and transport.dataBuffer == b""


def test_what_the_kernel_does_not_take_is_buffered_and_sent_by_the_reactor_in_order(pair):
    """A partial send leaves the rest to Twisted; a later frame queues behind it, never before it."""
    transport, _, reactor, peer = pair
    big = bytes(range(256)) * 4096  # 1 MiB: far more than the socket buffers hold
    write_now(transport, big)
    assert transport in reactor.writers  # the rest waits for the reactor
    buffered = transport._tempDataLen
    assert 0 < buffered < len(big)
    write_now(transport, b"next frame")  # must not overtake the buffered bytes
    assert transport._tempDataLen == buffered + len(b"next frame")
    received = b""
    while transport in reactor.writers:  # what the reactor would do on each EPOLLOUT
        received += drain(peer)
        assert transport.doWrite() is None
    received += drain(peer)
    assert received == big + b"next frame"


def test_a_full_socket_buffers_everything(pair):
    """EAGAIN on the first send: the whole frame goes to Twisted's buffer."""
    transport, _, reactor, peer = pair
    transport.socket.setblocking(False)
    try:
        while True:
            transport.socket.send(b"x" * 65536)
    except BlockingIOError:
        pass
    write_now(transport, b"frame")
    assert transport._tempDataLen == len(b"frame")
    assert transport in reactor.writers


def test_a_send_error_is_left_to_twisteds_write_path(pair):
    """A closed peer: write_now does not raise or close; Twisted's own write meets the error and reports it."""
    transport, proto, reactor, peer = pair
    peer.close()
    write_now(transport, b"frame")
    assert proto.reasons == []  # nothing lost synchronously
    assert transport in reactor.writers
    why = transport.doWrite()
    assert isinstance(why, error.ConnectionLost)


def test_other_transports_use_their_own_write():
    """Not a TCP connection (StringTransport, iosim, TLS): transport.write, as before."""
    t = StringTransport()
    write_now(t, b"frame")
    assert t.value() == b"frame"
    close_now(t)
    assert t.disconnecting


def test_a_tls_connection_is_written_through_twisted(pair):
    """TLS wraps the bytes: write_now must not put plaintext on the socket."""
    transport, _, reactor, peer = pair
    written = []
    transport.TLS = True
    transport.protocol.write = written.append  # what _newtls routes a TLS write to
    write_now(transport, b"frame")
    assert written == [b"frame"]
    assert drain(peer) == b""


def test_close_now_closes_an_idle_connection_before_returning(pair):
    """Nothing buffered: the socket is closed and connectionLost(ConnectionDone) has run."""
    transport, proto, reactor, peer = pair
    write_now(transport, b"last frame")
    close_now(transport)
    assert len(proto.reasons) == 1 and proto.reasons[0].check(error.ConnectionDone)
    assert not transport.connected
    assert transport not in reactor.readers and transport not in reactor.writers
    assert drain(peer) == b"last frame"  # the frame, then EOF (drain stops at it)
    assert peer.recv(10) == b""


def test_close_now_with_buffered_bytes_waits_for_them(pair):
    """Bytes still in Twisted's buffer: loseConnection (flush, then close), nothing lost now."""
    transport, proto, reactor, peer = pair
    big = b"y" * (1 << 20)
    write_now(transport, big)
    close_now(transport)
    assert proto.reasons == [] and transport.disconnecting
    received = b""
    why = None
    while why is None:
        received += drain(peer)
        why = transport.doWrite()
    assert isinstance(why, error.ConnectionDone)
    received += drain(peer)
    assert received == big


def test_nothing_is_sent_after_close(pair):
    """A write after the connection is gone is dropped, as transport.write drops it."""
    transport, proto, reactor, peer = pair
    close_now(transport)
    write_now(transport, b"late")
    assert drain(peer) == b""


def test_write_after_abort_connection_sends_nothing_and_the_abort_stands(pair):
    """After abortConnection Twisted drops whatever is written and reports ConnectionAborted on the next turn
    (an abortive close). write_now and close_now keep to that: nothing reaches the peer, and the close does not
    turn into an orderly one (ConnectionDone, at once). Both once sent and closed on the socket of an aborted
    connection, which only sets ``_aborting`` (found by review)."""
    transport, proto, reactor, peer = pair
    transport.abortConnection()
    write_now(transport, b"late frame")
    close_now(transport)
    assert proto.reasons == []  # nothing before the turn the abort scheduled
    reactor.advance(0)
    assert drain(peer) == b""
    assert len(proto.reasons) == 1 and proto.reasons[0].check(error.ConnectionAborted)


def test_a_connection_evicted_to_make_room_gets_nothing_more_on_the_wire():
    """At the cap on unauthenticated connections the server aborts the oldest one of the most crowded source
    (ServerProtocol._make_room). If that connection's handshake decryption comes back from the worker pool
    before the abort's connectionLost runs (a reactor turn runs thread results before timed calls), its
    ServerFinished must not be sent: the connection was aborted. It was sent (found by review)."""
    from tests.vectors.support import DRBG, fixed_fingerprint, fixed_key
    from vsc.protocol.channel import Send, card_channel
    from vsc.protocol.suites import ChannelConfig
    from vsc.server.admission import Admission, AdmissionLimits
    from vsc.server.service import ServerFactory
    from vsc.wire import decode_frame
    from vsc.wire.messages import Hello

    reactor = FDSet()
    admission = Admission(AdmissionLimits(max_unauthenticated=2), reactor.seconds)
    pending: list = []

    def decrypt(source, fn):  # the worker pool: the result comes back later
        d = Deferred()
        pending.append((d, fn))
        return d

    admission.decrypt = decrypt
    factory = ServerFactory(ChannelConfig(), fixed_key(), reactor, admission=admission)
    ours, peer = socket.socketpair()
    transport = tcp.Connection(ours, None, reactor)
    try:
        # the victim: a real TCP connection from 10.0.0.1 that has sent its KeyTransport
        transport.connected = 1
        transport.getPeer = lambda: IPv4Address("TCP", "10.0.0.1", 4000)
        transport.setTcpNoDelay = lambda enabled: None
        victim = factory.buildProtocol(IPv4Address("TCP", "10.0.0.1", 4000))
        transport.protocol = victim
        victim.makeConnection(transport)
        transport.startReading()
        hello = drain(peer)
        assert isinstance(decode_frame(hello), Hello)
        card = card_channel(ChannelConfig(), fixed_fingerprint(), DRBG(b"evicted"))
        card.start()
        victim.dataReceived([e.data for e in card.receive_frame(hello) if isinstance(e, Send)][0])
        assert len(pending) == 1  # its decryption is on the pool

        # a second connection from the same source fills the cap; a newcomer from another source evicts the victim
        other = factory.buildProtocol(IPv4Address("TCP", "10.0.0.1", 4001))
        other.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.1", 4001)))
        newcomer = factory.buildProtocol(IPv4Address("TCP", "10.0.0.2", 5000))
        newcomer.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.2", 5000)))
        assert transport._aborting and newcomer._counted

        d, fn = pending.pop()
        d.callback(fn())  # the pool's result, before the abort's connectionLost
        sent_after_abort = drain(peer)
        reactor.advance(0)
        assert sent_after_abort == b"", f"{len(sent_after_abort)} bytes sent on an aborted connection"
    finally:
        peer.close()
        if hasattr(transport, "socket"):
            transport.socket.close()


def test_the_channel_glue_writes_hello_at_once_and_closes_at_once(pair):
    """ChannelProtocol on a TCP connection: Hello is on the wire after connectionMade; a peer's alert closes now."""
    from vsc.net.channel import ChannelProtocol
    from vsc.protocol.channel import server_channel
    from vsc.protocol.suites import ChannelConfig
    from vsc.wire import ErrorCode, decode_frame, encode_frame
    from vsc.wire.messages import Alert, Hello

    from tests.vectors.support import DRBG, fixed_key

    transport, _, reactor, peer = pair
    lost = []

    class Glue(ChannelProtocol):
        def connectionLost(self, reason=None):
            lost.append(reason)
            super().connectionLost(reason)

    from twisted.internet.task import Clock

    proto = Glue(server_channel(ChannelConfig(), fixed_key(), DRBG(b"transport")), Clock())
    transport.protocol = proto
    transport.setTcpNoDelay = lambda enabled: None  # a UNIX socketpair has no Nagle to turn off
    proto.makeConnection(transport)
    assert isinstance(decode_frame(drain(peer)), Hello)
    assert transport not in reactor.writers
    proto.dataReceived(encode_frame(Alert(ErrorCode.CLOSE_NOTIFY)))
    assert len(lost) == 1 and lost[0].check(error.ConnectionDone)
    assert proto.channel.closed and not transport.connected


def test_a_connection_refused_at_accept_is_answered_and_closed_before_connection_made_returns(pair):
    """A Refusal on an ordinary transport (issue 11's flood path): SERVER_BUSY is on the wire and the socket closed at once."""
    from vsc.net.transport import Refusal
    from vsc.server.service import _BUSY_ALERT
    from vsc.wire import ErrorCode, decode_frame
    from vsc.wire.messages import Alert

    transport, _, reactor, peer = pair
    refused = Refusal(_BUSY_ALERT)
    lost = []
    refused.connectionLost = lost.append
    transport.protocol = refused
    refused.makeConnection(transport)
    assert len(lost) == 1 and lost[0].check(error.ConnectionDone)
    assert not transport.connected and transport not in reactor.readers
    assert decode_frame(drain(peer)) == Alert(ErrorCode.SERVER_BUSY)
    assert peer.recv(10) == b""


def _lean_port():
    """A tcp.Port (not listening: only its per-connection transport factory is used) made lean, and what it built."""
    from twisted.internet.protocol import Factory

    from vsc.net.transport import lean_refusals

    built = []

    class Spy(tcp.Server):
        def __init__(self, *args):
            built.append(self)
            super().__init__(*args)

    port = tcp.Port(0, Factory.forProtocol(Lost), interface="127.0.0.1", reactor=FDSet())
    port.transport = Spy
    assert lean_refusals(port) is port and lean_refusals(port) is port  # twice is once
    return port, built


def test_a_lean_port_answers_a_refusal_on_the_socket_without_a_transport():
    """Behind a lean port a Refusal costs one send and one close: the peer reads the alert, then the end of the
    stream; no Twisted transport is built and nothing is registered with the reactor."""
    from vsc.net.transport import Refusal
    from vsc.server.service import _BUSY_ALERT
    from vsc.wire import ErrorCode, decode_frame
    from vsc.wire.messages import Alert

    port, built = _lean_port()
    ours, peer = socket.socketpair()
    refusal = Refusal(_BUSY_ALERT)
    transport = port.transport(ours, refusal, ("127.0.0.2", 5), port, 1, port.reactor)
    refusal.makeConnection(transport)  # what tcp.Port.doRead does next
    assert built == [] and ours.fileno() == -1
    assert not port.reactor.readers and not port.reactor.writers
    peer.settimeout(5)
    assert decode_frame(peer.recv(100)) == Alert(ErrorCode.SERVER_BUSY)
    assert peer.recv(10) == b""
    peer.close()


def test_a_lean_port_builds_ordinary_transports_for_everything_else():
    """Only a Refusal takes the short path: any other protocol gets the port's own transport class, as before."""
    port, built = _lean_port()
    ours, peer = socket.socketpair()
    proto = Lost()
    transport = port.transport(ours, proto, ("127.0.0.1", 5), port, 1, port.reactor)
    assert built == [transport] and isinstance(transport, tcp.Server)
    transport.socket.close()
    peer.close()


def test_a_refusal_to_a_peer_already_gone_is_quiet():
    """The peer reset before the alert could be sent: the socket is closed all the same and nothing raises."""
    from vsc.net.transport import Refusal

    port, built = _lean_port()
    ours, peer = socket.socketpair()
    peer.close()
    refusal = Refusal(b"\x00" * 8)
    refusal.makeConnection(port.transport(ours, refusal, ("127.0.0.2", 5), port, 1, port.reactor))
    assert built == [] and ours.fileno() == -1


def test_the_server_listens_through_a_lean_endpoint():
    """vsc-server's listening port is wrapped so that refusals take the short path (vsc.server.tap)."""
    from twisted.internet.defer import succeed

    from vsc.net.transport import LeanRefusalsEndpoint

    port, built = _lean_port()
    port.transport = tcp.Server
    del port._vsc_lean

    class Inner:
        def listen(self, factory):
            return succeed(port)

    got = []
    LeanRefusalsEndpoint(Inner()).listen(None).addCallback(got.append)
    assert got == [port] and port.transport is not tcp.Server
