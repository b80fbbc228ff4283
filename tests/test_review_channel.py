"""
Rules of the protected channel and its network-facing glue (vsc.protocol.channel,
vsc.net.channel, vsc.net.framing) that an adversarial review found broken, each
with how it was broken; they hold since the fix.
"""

from __future__ import annotations

from twisted.internet.testing import StringTransport

from vsc.protocol.suites import ChannelConfig
from vsc.wire import ErrorCode
from vsc.wire.messages import EchoReply, EchoRequest

from tests.test_net import CARD_ADDR, SERVER_ADDR, Harness, closed_of
from tests.vectors.support import sends


# ================================================================ 1. a peer that does not read its answers


class UnreadTransport(StringTransport):
    """
    A TCP connection whose peer reads nothing: every byte written stays
    queued (``value()``), and, as Twisted's FileDescriptor does, a registered
    streaming producer is paused once more than ``bufferSize`` bytes wait
    and resumed when the queue has drained (``drain``).
    """

    bufferSize = 65536

    def __init__(self):
        super().__init__(hostAddress=SERVER_ADDR, peerAddress=CARD_ADDR)
        self.producer_paused = False

    def write(self, data):
        super().write(data)
        if self.producer is not None and self.streaming and not self.producer_paused \
                and len(self.value()) > self.bufferSize:
            self.producer_paused = True
            self.producer.pauseProducing()

    def drain(self) -> bytes:
        data = self.value()
        self.clear()
        if self.producer is not None and self.producer_paused:
            self.producer_paused = False
            self.producer.resumeProducing()
        return data

    @property
    def reading(self) -> bool:
        """Whether the protocol still reads (it paused the transport, its own producer, to stop)."""
        return self.producerState == "producing"


def test_a_peer_that_never_reads_its_echo_replies_cannot_grow_the_servers_write_buffer():
    """
    Rule: what the server queues for a peer is bounded, whoever the peer is.
    Anyone may complete the handshake (the channel authenticates the server,
    not the card), and the channel itself answers every ECHO_REQUEST with an
    ECHO_REPLY of the same data. Broken: the glue wrote every reply and kept
    reading, with no flow control; a peer that sent 64 KiB echo requests and
    never read the replies made the server's transport buffer 200 × 64 KiB =
    12.5 MiB (and without limit) for one unauthenticated connection: the
    idle timer restarts with every request. Now ChannelProtocol is the
    transport's streaming producer: once the peer's unread answers fill the
    transport's buffer it stops reading from that peer (TCP then pushes back
    on the sender), and reads again once the peer has taken them.
    """
    h = Harness()
    h.transport = UnreadTransport()
    h.handshake()
    sent = 0
    while sent < 200 and h.transport.reading:  # once it stops reading, the rest waits in the kernel
        h.proto.dataReceived(sends(h.card.send(EchoRequest(bytes(60000))))[0])
        sent += 1
    assert not h.proto.channel.closed
    assert len(h.transport.value()) <= 2 * h.transport.bufferSize, len(h.transport.value())
    assert not h.transport.reading

    # the peer reads: the server reads again, and the channel still works
    replies = h.card.receive_bytes(h.transport.drain())
    assert h.transport.reading
    assert all(e.message == EchoReply(bytes(60000)) for e in replies if hasattr(e, "message"))
    h.card_send(EchoRequest(b"still there"))
    assert not h.proto.channel.closed


def test_closing_the_channel_lets_go_of_the_transport():
    """
    Rule: when the channel closes, the transport closes after what was
    written. A transport with a registered producer does not finish a
    ``loseConnection`` until the producer is unregistered (Twisted's
    FileDescriptor), so the glue must unregister itself when it closes.
    """
    h = Harness()
    h.transport = UnreadTransport()
    h.handshake()
    h.proto.closeChannel()
    assert h.transport.producer is None
    assert h.transport.disconnecting


# ================================================================ 2. a closed channel's transport goes, read or not


class NeverDrainsTransport(UnreadTransport):
    """
    A TCP connection whose peer reads nothing: ``loseConnection`` waits for
    the queued bytes to leave, which they never do (a peer that keeps its
    receive window at zero); ``abortConnection`` drops them and the
    connection is lost (TCP does so on the reactor's next turn).
    """

    aborted = False

    def abortConnection(self):
        if not self.aborted:
            self.aborted = True
            self.disconnecting = True
            self.protocol.connectionLost(None)


def test_a_connection_the_server_closed_does_not_linger_when_the_peer_never_reads():
    """
    Rule: when the server ends a channel (here its idle timer: an
    unauthenticated peer that stopped sending), the connection is gone
    soon after, and with it its descriptor, its buffers and its place among
    the unauthenticated connections (vsc.server.admission counts a
    connection until connectionLost). Broken: the glue only called
    ``loseConnection``, which waits until everything queued has been sent;
    a peer that had left answers unread and kept its receive window shut
    held the closed connection for ever (a day in the test), so the idle
    timer "closed" it without ever freeing anything. Now a transport that
    has not gone ``closeGrace`` seconds after the close is aborted.
    """
    h = Harness(ChannelConfig(idle_timeout=60))
    h.transport = NeverDrainsTransport()
    h.transport.protocol = h.proto
    h.handshake()
    for _ in range(20):  # answers the peer never reads
        if not h.transport.reading:
            break
        h.proto.dataReceived(sends(h.card.send(EchoRequest(bytes(60000))))[0])
    h.clock.advance(60)
    assert h.proto.channel.closed and h.transport.disconnecting
    assert closed_of(h.proto) == [(ErrorCode.IDLE_TIMEOUT, False)]
    h.clock.advance(86400)
    assert h.transport.aborted
    assert not h.clock.getDelayedCalls()


def test_a_connection_that_closes_in_time_is_not_aborted():
    """The grace timer goes with the connection: nothing is left scheduled and nothing aborted."""
    h = Harness(ChannelConfig(idle_timeout=60))
    h.transport = NeverDrainsTransport()
    h.transport.protocol = h.proto
    h.handshake()
    h.clock.advance(60)
    assert h.proto.channel.closed
    h.proto.connectionLost(None)  # the peer read the CLOSE; the transport went
    assert not h.clock.getDelayedCalls()
    h.clock.advance(86400)
    assert not h.transport.aborted


def test_a_request_on_a_closed_card_channel_fails_with_channel_closed():
    """
    CardProtocol.request on a channel that has closed failed the Deferred it
    made (ChannelClosedError) and then raised RuntimeError from sendMessage,
    leaving that failed Deferred unhandled. It now returns the failed
    Deferred and sends nothing (left open by the channel review).
    """
    from types import SimpleNamespace

    from twisted.internet.task import Clock

    from vsc.card.connect import CardProtocol
    from vsc.net.channel import ChannelClosedError
    from vsc.wire import ErrorCode
    from vsc.wire.messages import EchoRequest

    proto = CardProtocol.__new__(CardProtocol)
    proto._waiting, proto._unclaimed = [], []
    proto.channel = SimpleNamespace(closed=True)
    proto.clock = Clock()
    proto.closeCode, proto.closeReason = ErrorCode.CLOSE_NOTIFY, "gone"
    sent = []
    proto.sendMessage = sent.append
    failures = []
    proto.request(EchoRequest(b"x")).addErrback(lambda f: failures.append(f.check(ChannelClosedError)))
    assert failures == [ChannelClosedError] and sent == []
