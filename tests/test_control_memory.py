"""
Data objects cross the card daemon's control socket in locked memory
(issue 15, vsc.card.control): the in-place box codec (vsc.wire.ampbox
locate_box / encode_box_into) against the bytes codec, the protocol's
locked receive buffer, and the LockedServer transport on a real socket
pair (its doRead/doWrite called directly, no reactor running).
tests/test_memory_scan.py measures the result in a real daemon.
"""

from __future__ import annotations

import mmap
import random
import socket

import pytest
from twisted.internet import main
from twisted.internet.testing import StringTransport

from twisted.python.failure import Failure

from vsc.card import control as daemon
from vsc.card.memory import LockedBuffer
from vsc.wire import ampbox
from vsc.wire import control as wc


def test_locate_box_and_encode_box_into_agree_with_the_bytes_codec():
    """For random boxes, locate_box finds each value where decode_box reads it, and encode_box_into writes encode_box's bytes."""
    rng = random.Random(1515)
    for _ in range(200):
        box = {rng.randbytes(rng.randint(1, 12)) + b"k": rng.randbytes(rng.choice((0, 1, 9, 700, 65535)))
               for _ in range(rng.randint(0, 4))}
        data = ampbox.encode_box(box) + b"tail"
        fields, used = ampbox.locate_box(data)
        assert ({key: data[start:end] for key, start, end in fields}, used) == ampbox.decode_box(data)
        out = bytearray(ampbox.box_size(box) + 3)
        n = ampbox.encode_box_into({k: memoryview(v) for k, v in box.items()}, out)
        assert n == ampbox.box_size(box) and bytes(out[:n]) == ampbox.encode_box(box)


def test_locate_box_refuses_what_decode_box_refuses():
    """Every proper prefix is Incomplete; a key given twice and a key over 255 bytes are Malformed."""
    data = ampbox.encode_box({b"_command": b"DataGet", b"name": b"n"})
    for cut in range(len(data)):
        with pytest.raises(ampbox.Incomplete):
            ampbox.locate_box(data[:cut])
    with pytest.raises(ampbox.Malformed, match="twice"):
        ampbox.locate_box(b"\x00\x01a\x00\x00\x00\x01a\x00\x00\x00\x00")
    with pytest.raises(ampbox.Malformed, match="a key of 256 bytes"):
        ampbox.locate_box(b"\x01\x00" + b"k" * 256)


class Session:
    """A CardSession's DataPut/DataGet, recording what kind of buffer the daemon hands over."""

    def __init__(self):
        self.stored: dict[str, bytes] = {}
        self.put_buffers: list = []

    async def data_put(self, name, value):
        self.put_buffers.append(type(value.obj))  # what the view is a view of
        self.stored[name] = bytes(value)

    async def data_get(self, name, into=None):
        if name not in self.stored:
            raise daemon.CardError(f"no data object {name!r}")
        with LockedBuffer(len(self.stored[name])) as held:  # the card opens the item into locked memory
            held.view[:] = self.stored[name]
            return into(held.view)


def _ask(proto, transport, command, ask, **args) -> dict:
    transport.clear()
    proto.dataReceived(ampbox.encode_box(wc.request(command, ask, args)))
    box, _ = ampbox.decode_box(transport.value())
    return wc.answer(command, ask, box)


def test_data_put_hands_the_session_a_locked_buffer_and_the_receive_buffer_is_zeroed():
    """
    DataPut's value reaches the session as a view of an mmap (a LockedBuffer),
    not bytes; after each box the receive buffer holds only zeros; DataGet
    answers with the stored value and a missing name is the card's one-line refusal.
    """
    session = Session()
    proto = daemon.ControlProtocol(session)
    transport = StringTransport()
    proto.makeConnection(transport)
    value = bytes(range(256)) * 200
    assert _ask(proto, transport, wc.DATA_PUT, 1, name="secret", value=value) == {}
    assert session.put_buffers == [mmap.mmap] and session.stored == {"secret": value}
    assert proto._fill == 0 and not any(proto._rx.view)
    assert _ask(proto, transport, wc.DATA_GET, 2, name="secret") == {"value": value}
    assert not any(proto._rx.view)
    with pytest.raises(wc.Refused, match="^no data object 'other'$"):
        _ask(proto, transport, wc.DATA_GET, 3, name="other")


def test_boxes_split_and_pipelined_are_answered_in_order():
    """Two requests arriving byte by byte in one stream are both answered, in order; the buffer ends empty and zeroed."""
    session = Session()
    proto = daemon.ControlProtocol(session)
    transport = StringTransport()
    proto.makeConnection(transport)
    stream = (ampbox.encode_box(wc.request(wc.DATA_PUT, 1, {"name": "a", "value": b"\x01" * 5000}))
              + ampbox.encode_box(wc.request(wc.DATA_GET, 2, {"name": "a"})))
    for i in range(len(stream)):
        proto.dataReceived(stream[i:i + 1])
    answers = transport.value()
    first, used = ampbox.decode_box(answers)
    second, _ = ampbox.decode_box(answers[used:])
    assert wc.answer(wc.DATA_PUT, 1, first) == {} and wc.answer(wc.DATA_GET, 2, second) == {"value": b"\x01" * 5000}
    assert proto._fill == 0 and not any(proto._rx.view)


def test_a_malformed_box_closes_the_connection_with_no_answer():
    """A key given twice is not dispatched: the connection is closed and nothing is written."""
    proto = daemon.ControlProtocol(Session())
    transport = StringTransport()
    proto.makeConnection(transport)
    proto.dataReceived(b"\x00\x01a\x00\x00\x00\x01a\x00\x00\x00\x00")
    assert transport.disconnecting and transport.value() == b""


class StubReactor:
    """What a FileDescriptor asks of its reactor: nothing runs, the registrations are recorded."""

    def __init__(self):
        self.readers, self.writers = set(), set()

    def addReader(self, r):
        self.readers.add(r)

    def removeReader(self, r):
        self.readers.discard(r)

    def addWriter(self, w):
        self.writers.add(w)

    def removeWriter(self, w):
        self.writers.discard(w)

    def callLater(self, *a, **kw):  # pragma: no cover - not reached in these tests
        raise AssertionError("no timers here")


def test_locked_server_reads_into_the_protocols_buffer_and_sends_a_locked_answer():
    """
    On a real socket pair, LockedServer.doRead fills the protocol's locked
    buffer with recv_into and the DataPut is stored and answered at once; a
    DataGet answer too large for the socket's send buffer is queued with its
    LockedBuffer, sent by doWrite as the peer reads, and the buffer is then
    freed (unmapped).
    """
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    ours.setblocking(False)
    theirs.settimeout(5)
    session = Session()
    proto = daemon.ControlProtocol(session)
    reactor = StubReactor()
    server = daemon.LockedServer(ours, proto, "client", None, 1, reactor)
    proto.makeConnection(server)
    try:
        value = b"\xa5" * 40000
        theirs.sendall(ampbox.encode_box(wc.request(wc.DATA_PUT, 1, {"name": "n", "value": value})))
        while not session.stored:
            assert server.doRead() is None
        assert session.stored == {"n": value} and session.put_buffers == [mmap.mmap]
        assert server not in reactor.writers  # the short answer went out at once
        box, _ = ampbox.decode_box(theirs.recv(65536))
        assert wc.answer(wc.DATA_PUT, 1, box) == {}

        sent: list[LockedBuffer] = []
        real = server.write_locked
        server.write_locked = lambda out: (sent.append(out), real(out))
        theirs.sendall(ampbox.encode_box(wc.request(wc.DATA_GET, 2, {"name": "n"})))
        assert server.doRead() is None and len(sent) == 1
        assert server in reactor.writers and sent[0]._mm is not None  # queued: the socket took only part of it
        data = b""
        while True:
            data += theirs.recv(65536)
            assert server.doWrite() is None
            try:
                box, _ = ampbox.decode_box(data)
                break
            except ampbox.Incomplete:
                continue
        assert wc.answer(wc.DATA_GET, 2, box) == {"value": value}
        assert sent[0]._mm is None and server not in reactor.writers  # sent, zeroed and unmapped
    finally:
        theirs.close()
        server.connectionLost(Failure(main.CONNECTION_DONE))
