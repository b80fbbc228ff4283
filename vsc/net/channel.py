"""
Twisted glue around the sans-IO channel (vsc.protocol.channel): carries out
its effects on a transport and a clock, and offers subclasses three hooks:
``channelEstablished``, ``messageReceived`` and ``channelClosed``.
"""

from __future__ import annotations

import socket
import struct
from typing import Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from vsc.net.framing import FrameReceiver
from vsc.net.transport import close_now, write_now
from vsc.protocol.channel import (
    CancelTimer,
    Channel,
    ChannelInfo,
    Closed,
    Decrypt,
    Effect,
    Established,
    Received,
    Send,
    SetTimer,
    private_decrypt,
)
from vsc.wire import ErrorCode, Message, WireError


def peer_host(transport) -> str:
    """The peer's address without the port ("" for transports without one)."""
    return peer_of(transport)[1]


def peer_name(transport) -> str:
    return peer_of(transport)[0]


def peer_of(transport) -> tuple[str, str]:
    """``(peer_name, peer_host)`` from one ``getPeer()`` (each call builds an address object)."""
    try:
        peer = transport.getPeer()
    except Exception:  # noqa: BLE001 - some test transports have no peer
        return "?", ""
    host = getattr(peer, "host", None)
    if host is not None:
        port = getattr(peer, "port", None)
        shown = f"[{host}]" if ":" in str(host) else host  # RFC 5952 §6: 2001:db8::1:4433 is another address
        return f"{shown}:{port}", str(host or "")
    return str(getattr(peer, "name", peer)), ""


def peer_uid(transport) -> int | None:
    """
    The user id of a UNIX-socket peer (SO_PEERCRED, Linux), or None where
    there is none to read (not a UNIX socket, another system, a test
    transport). A UNIX peer has no address: this is what tells one local
    user from another (vsc.server.service: the source of a UNIX peer).
    """
    option = getattr(socket, "SO_PEERCRED", None)
    try:
        handle = transport.getHandle()
        if option is None or getattr(handle, "family", socket.AF_UNIX) != socket.AF_UNIX:
            return None
        _pid, uid, _gid = struct.unpack("3i", handle.getsockopt(socket.SOL_SOCKET, option, struct.calcsize("3i")))
    except Exception:  # noqa: BLE001 - no handle, not a socket, closed: no user to tell
        return None
    return uid


def no_delay(transport) -> None:
    """
    TCP_NODELAY on a TCP transport (no-op on others). The channel is a
    request/response protocol of small frames: with Nagle's algorithm on, a
    frame written while an earlier one is unacknowledged waits for the peer's
    delayed ACK (up to 40 ms on Linux), so both ends turn it off.
    """
    set_no_delay = getattr(transport, "setTcpNoDelay", None)
    if set_no_delay is not None:
        try:
            set_no_delay(True)
        except OSError:  # not a TCP socket after all (a UNIX socket behind the same interface)
            pass


@implementer(IPushProducer)
class ChannelProtocol(FrameReceiver):
    """
    One end of a protected channel over any stream transport.

    It is its transport's streaming producer (flow control): what it writes
    is mostly answers to what it reads (an ECHO_REPLY for every ECHO_REQUEST,
    the channel answers those itself, for anyone who completed a handshake),
    so when the peer leaves them unread and the transport's buffer fills, it
    stops reading from that peer until the buffer has drained. A peer that
    never reads therefore makes it buffer about one read's worth, not
    everything it sends.
    """

    log = Logger()
    #: Emit the per-handshake debug event ("channel ... established"). Off by default: twistd drops debug
    #: events only after building them (a Logger per access, the event, the publisher), which cost about
    #: as much per handshake as the rest of the glue; turn on (on the class) to trace handshakes.
    debug_events = False
    #: once the channel is over, how long the transport may take to send what is queued (its last answers,
    #: the CLOSE) before it is aborted: ``loseConnection`` waits for the peer to read, and a peer that keeps
    #: its receive window shut would hold the connection (and its admission slot) for ever
    closeGrace = 30.0
    _abort_call: IDelayedCall | None = None
    _lost = False

    def __init__(self, channel: Channel, clock: IReactorTime):
        self.channel = channel
        self.clock = clock
        self.info: ChannelInfo | None = None
        self.peer = "?"
        self.peer_host = ""
        self.closeCode: ErrorCode | None = None
        self.closeReason = ""
        self._timer: IDelayedCall | None = None
        self._established: list[Deferred] = []
        self._closed: list[Deferred] = []
        self.MAX_LENGTH = channel.max_frame_body()
        self._limit_settled = False
        self._producing = False  # registered as the transport's producer

    # -- API for subclasses and users
    def whenEstablished(self) -> Deferred:
        """Fires with ChannelInfo once established, or fails if the channel closes first."""
        d: Deferred = Deferred()
        if self.info is not None and not self.channel.closed:
            d.callback(self.info)
        elif self.channel.closed:
            d.errback(ChannelClosedError(self.closeCode or ErrorCode.CLOSE_NOTIFY, self.closeReason))
        else:
            self._established.append(d)
        return d

    def whenClosed(self) -> Deferred:
        """Fires with (code, reason) once the channel is over."""
        d: Deferred = Deferred()
        if self.channel.closed:
            d.callback((self.closeCode, self.closeReason))
        else:
            self._closed.append(d)
        return d

    def sendMessage(self, msg: Message) -> None:
        self._run(self.channel.send(msg))

    def closeChannel(self, code: ErrorCode = ErrorCode.CLOSE_NOTIFY) -> None:
        self._run(self.channel.close(code))

    # -- hooks
    def channelEstablished(self, info: ChannelInfo) -> None:
        pass

    def messageReceived(self, msg: Message) -> None:
        pass

    def channelClosed(self, code: ErrorCode, reason: str, byPeer: bool) -> None:
        pass

    def runDecrypt(self, ciphertext: bytes) -> None:
        """
        Carry out the channel's ``Decrypt`` effect and feed the result back
        (``self._run(self.channel.decrypted(...))``). This default does it at
        once; the server runs it on its worker pool (vsc.server.service).
        """
        self._run(self.channel.decrypted(private_decrypt(self.channel._core.private_key, ciphertext)))

    # -- flow control (IPushProducer, called by the transport)
    def pauseProducing(self) -> None:
        """The transport's buffer is full (the peer is not reading): stop reading from the peer."""
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        """The transport's buffer drained: read again."""
        if not self.channel.closed:
            self.transport.resumeProducing()

    def stopProducing(self) -> None:
        """The transport is going away; connectionLost follows."""
        self._producing = False

    def _register_producer(self) -> None:
        try:
            self.transport.registerProducer(self, True)
        except (AttributeError, RuntimeError):  # no consumer interface, or another producer already
            return
        self._producing = True

    def _unregister_producer(self) -> None:
        if self._producing:
            self._producing = False
            # a transport with a producer would wait for it before finishing loseConnection
            self.transport.unregisterProducer()

    # -- Twisted side
    def connectionMade(self) -> None:
        no_delay(self.transport)
        if not self.peer_host and self.peer == "?":  # a subclass may have asked already (vsc.server: the source)
            self.peer, self.peer_host = peer_of(self.transport)
        self._register_producer()
        self._run(self.channel.start())

    def frameReceived(self, frame: bytes) -> None:
        self._run(self.channel.receive_frame(frame))
        if not self._limit_settled:
            # the frame limit changes with the handshake; once established, only raise_limits changes it,
            # and whoever calls that sets MAX_LENGTH (vsc.server.service)
            self.MAX_LENGTH = self.channel.max_frame_body()
            self._limit_settled = self.channel.established

    def frameError(self, error: WireError) -> None:
        self._run(self.channel.frame_error(error))

    def connectionLost(self, reason: Failure = None) -> None:
        self._lost = True
        self._producing = False
        if self._abort_call is not None and self._abort_call.active():
            self._abort_call.cancel()
        self._abort_call = None
        self._run(self.channel.connection_lost())
        self._cancel_timer()

    def _timeout(self) -> None:
        self._timer = None
        self._run(self.channel.timeout())

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _run(self, effects: list[Effect]) -> None:
        for effect in effects:
            if isinstance(effect, Send):
                write_now(self.transport, effect.data)  # a frame on an idle socket leaves now, not next turn
            elif isinstance(effect, SetTimer):
                if self._timer is not None and self._timer.active():
                    self._timer.reset(effect.seconds)  # cheaper than cancel + callLater on every record
                else:
                    self._timer = self.clock.callLater(effect.seconds, self._timeout)
            elif isinstance(effect, CancelTimer):
                self._cancel_timer()
            elif isinstance(effect, Established):
                self._on_established(effect.info)
            elif isinstance(effect, Received):
                self._deliver(effect.message)
            elif isinstance(effect, Decrypt):
                self.runDecrypt(effect.ciphertext)
            elif isinstance(effect, Closed):
                self._on_closed(effect)

    def _on_established(self, info: ChannelInfo) -> None:
        self.info = info
        if info.insecure:
            self.log.warn(
                "channel with {peer} uses the INSECURE suite {suite} (DES + MD5, patent conformance only)",
                peer=self.peer,
                suite=info.suite.label,
            )
        elif self.debug_events:
            self.log.debug("channel with {peer} established: {suite}", peer=self.peer, suite=info.suite.label)
        waiting, self._established = self._established, []
        for d in waiting:
            d.callback(info)
        self._guard(lambda: self.channelEstablished(info))

    def _deliver(self, msg: Message) -> None:
        self._guard(lambda: self.messageReceived(msg))

    def _guard(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception:
            self.log.failure("handler failed on the channel with {peer}", peer=self.peer)
            if not self.channel.closed:
                self._run(self.channel.close(ErrorCode.INTERNAL_ERROR))

    def _on_closed(self, effect: Closed) -> None:
        self.closeCode, self.closeReason = effect.code, effect.reason
        if effect.code is not ErrorCode.CLOSE_NOTIFY:
            self.log.info(
                "channel with {peer} closed: {code} ({reason}){by}",
                peer=self.peer,
                code=effect.code.name,
                reason=effect.reason,
                by=" reported by the peer" if effect.by_peer else "",
            )
        err = ChannelClosedError(effect.code, effect.reason)
        waiting, self._established = self._established, []
        for d in waiting:
            d.errback(err)
        closed, self._closed = self._closed, []
        for d in closed:
            d.callback((effect.code, effect.reason))
        self._guard(lambda: self.channelClosed(effect.code, effect.reason, effect.by_peer))
        # last: on an idle TCP socket this runs connectionLost before it returns (vsc.net.transport)
        self._unregister_producer()
        close_now(self.transport)
        if not self._lost and self._abort_call is None:
            self._abort_call = self.clock.callLater(self.closeGrace, self._abort)

    def _abort(self) -> None:
        """The peer did not take the channel's last bytes within ``closeGrace``: drop them and the connection."""
        self._abort_call = None
        if not self._lost:
            self.log.info(
                "{peer} left the channel's last bytes unread {seconds:g} s after it closed: connection aborted",
                peer=self.peer,
                seconds=self.closeGrace,
            )
            getattr(self.transport, "abortConnection", self.transport.loseConnection)()


class ChannelClosedError(Exception):
    def __init__(self, code: ErrorCode, reason: str):
        super().__init__(f"{code.name}: {reason}")
        self.code = code
        self.reason = reason


class ChannelFactory(Factory):
    """Builds one ChannelProtocol per connection with a fresh sans-IO channel."""

    protocol = ChannelProtocol
    noisy = False

    def __init__(self, make_channel: Callable[[], Channel], clock: IReactorTime, protocol_class=None):
        self.make_channel = make_channel
        self.clock = clock
        if protocol_class is not None:
            self.protocol = protocol_class

    def buildProtocol(self, addr):
        p = self.protocol(self.make_channel(), self.clock)
        p.factory = self
        return p
