"""
Writing to a TCP transport at once, and closing it at once (issue 15).

Twisted's ``transport.write`` only buffers: it registers the socket for
writing, and the bytes leave on the reactor's next turn (``epoll_ctl`` to
add EPOLLOUT, ``epoll_wait``, ``send``, ``epoll_ctl`` to remove it again);
``loseConnection`` takes such a turn too, with an empty ``send``, before it
closes. The channel is a request/response protocol of small frames, so
nearly every frame is written on a socket with nothing queued: a poll's
answer, a handshake's Hello. ``write_now`` sends such a frame straight
away (one ``send``) and hands Twisted only what the kernel did not take;
``close_now`` closes a connection with nothing left to write without the
extra turn.

Only a plain (not TLS) ``twisted.internet.tcp`` connection with nothing
buffered, no producer but a streaming one that is not paused (the channel's
flow control, vsc.net.channel), open, not closing and not aborted is written to
directly (after ``abortConnection`` Twisted drops every write and closes
abortively on its next turn; so does this, through Twisted); every
other transport (TLS, UNIX sockets behind another class, StringTransport,
iosim) and every other case goes through ``transport.write`` /
``loseConnection`` unchanged. Bytes never overtake bytes already buffered.
A send that fails (EAGAIN: the rest is buffered; a reset or a closed peer:
the data is handed to ``transport.write``, whose own send meets the same
error on the next turn and reports the connection lost exactly as before).

``close_now`` calls the transport's ``connectionLost`` synchronously (what
Twisted's own ``loseConnection`` does once the write side is shut): callers
must expect the protocol's ``connectionLost`` to run before ``close_now``
returns, and touch the transport no more after it.
"""

from __future__ import annotations

from twisted.internet import main, tcp
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer


def _writable_now(transport) -> bool:
    """
    A plain TCP connection, open, not closing or aborted, with nothing buffered in Twisted and no producer
    but a streaming one that is not paused (with nothing buffered, Twisted's own write would neither pause
    nor resume it).
    """
    return (
        isinstance(transport, tcp.Connection)
        and not transport.TLS
        and transport.connected
        and not transport.disconnecting
        and not transport._aborting  # abortConnection sets only this: Twisted then drops every write
        and not transport._writeDisconnected
        and (transport.producer is None or (transport.streamingProducer and not transport.producerPaused))
        and not transport._tempDataLen
        and transport.offset == len(transport.dataBuffer)
    )


def write_now(transport, data: bytes) -> None:
    """Send ``data`` on ``transport`` now if it can go straight to the socket; buffer the rest in Twisted."""
    if not data:
        return
    if not _writable_now(transport):
        transport.write(data)
        return
    try:
        sent = transport.socket.send(data)
    except BlockingIOError:  # the kernel's send buffer is full: all of it waits for the reactor
        sent = 0
    except OSError:
        # reset, or the peer is gone: Twisted's write path meets the same error on its next turn and closes
        # the connection the usual way (connectionLost with the reason), so the glue sees no difference
        transport.write(data)
        return
    if sent < len(data):
        transport.write(data[sent:])


def close_now(transport) -> None:
    """
    Close ``transport`` after what was written: at once (``connectionLost``
    with ConnectionDone before this returns) if nothing is buffered on a
    plain TCP connection, otherwise through ``loseConnection``.
    """
    if not _writable_now(transport):
        transport.loseConnection()
        return
    transport.disconnecting = True
    transport.stopReading()
    transport.stopWriting()
    transport.connectionLost(Failure(main.CONNECTION_DONE))


# ---------------------------------------------------------------- refusing at accept, without a transport


class Refusal(Protocol):
    """
    What a factory's ``buildProtocol`` returns for a connection it refuses at
    accept time (vsc.server: a source over its handshake rate): ``alert``,
    a few bytes, is sent and the connection closed. Behind a port made lean
    (``lean_refusals``) that happens on the accepted socket itself — one
    ``send`` and one ``close``, no Twisted transport built, nothing
    registered with the reactor; behind any other transport (TLS, tests'
    StringTransport) through ``write_now`` / ``close_now``. The peer sees the
    same bytes and the same close either way.
    """

    def __init__(self, alert: bytes):
        self.alert = alert

    def makeConnection(self, transport) -> None:  # noqa: N802 - IProtocol
        self.transport = transport
        if transport is _REFUSED:
            return  # already answered and closed on the socket
        self.connected = 1
        write_now(transport, self.alert)
        close_now(transport)


class _Refused:
    """The stand-in transport of a connection refused on its socket (``lean_refusals``)."""

    connected = False
    disconnecting = True

    def write(self, data: bytes) -> None:
        pass

    def loseConnection(self) -> None:  # noqa: N802
        pass


_REFUSED = _Refused()


def lean_refusals(port):
    """
    Make a listening ``twisted.internet.tcp.Port`` answer a ``Refusal`` on
    the accepted socket (send the alert, close) instead of building a
    transport for it: under a flood of refused handshakes the server's CPU
    per refusal fell from about 75 to about 48 µs here (the rest is the
    kernel's accept and close, and Twisted's accept loop), and the reactor's
    turn that accepted a batch of them ends sooner for the connections it
    serves (issue 11's poll p99 during a flood). A port that is not a
    ``tcp.Port`` (UNIX) is returned unchanged; behind TLS the factory hands
    the port a TLS wrapper, not a ``Refusal``, so every connection there
    keeps its ordinary transport. Returns ``port`` (an endpoint's ``listen``
    callback).
    """
    if not isinstance(port, tcp.Port) or getattr(port, "_vsc_lean", False):
        return port
    make_transport = port.transport

    def transport(skt, protocol, addr, server, sessionno, reactor):
        if isinstance(protocol, Refusal):
            try:
                skt.send(protocol.alert)  # a few bytes into an empty send buffer: never blocks
            except OSError:
                pass  # the peer is gone already
            skt.close()
            return _REFUSED
        return make_transport(skt, protocol, addr, server, sessionno, reactor)

    port.transport = transport  # this port's instance only: Twisted builds each connection's transport through it
    port._vsc_lean = True
    return port


@implementer(IStreamServerEndpoint)
class LeanRefusalsEndpoint:
    """An IStreamServerEndpoint around another whose TCP port answers refusals on the socket (``lean_refusals``)."""

    def __init__(self, inner):
        self.inner = inner

    def listen(self, factory):
        return self.inner.listen(factory).addCallback(lean_refusals)
