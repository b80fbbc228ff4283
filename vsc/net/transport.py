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
buffered, no producer, open and not closing is written to directly; every
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
from twisted.python.failure import Failure


def _writable_now(transport) -> bool:
    """A plain TCP connection, open, with no producer and nothing buffered in Twisted."""
    return (
        isinstance(transport, tcp.Connection)
        and not transport.TLS
        and transport.connected
        and not transport.disconnecting
        and not transport._writeDisconnected
        and transport.producer is None
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
