"""
The harness's raw client: a TCP connection whose bytes the harness controls
(``_Raw`` splits them into frames with vsc.wire's Deframer and queues them),
driven by a sans-IO card channel (``RawCard``), so a check can send exactly
what it wants — a tampered key transport, a replayed record, a bad header —
and read exactly what the server answers.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.endpoints import clientFromString
from twisted.internet.protocol import Factory, Protocol

from vsc.protocol.channel import Closed, Received, Send, card_channel
from vsc.protocol.suites import ChannelConfig
from vsc.wire import Deframer, ErrorCode, WireError
from vsc.wire.codec import MAX_FRAME_BODY


class Failed(Exception):
    """A check found the implementation wrong; the message says how (one line)."""


def expect(cond: bool, detail: str) -> None:
    if not cond:
        raise Failed(detail)


class _Raw(Protocol):
    def __init__(self):
        self.deframer = Deframer(MAX_FRAME_BODY)
        self.frames: DeferredQueue = DeferredQueue()
        self.lost: Deferred = Deferred()

    def dataReceived(self, data: bytes) -> None:
        try:
            for frame in self.deframer.feed(data):
                self.frames.put(frame)
        except WireError as e:
            self.frames.put(e)

    def connectionLost(self, reason=None) -> None:
        self.frames.put(None)
        if not self.lost.called:
            self.lost.callback(None)


class RawCard:
    """A card-side channel whose bytes the harness controls."""

    def __init__(self, reactor, endpoint: str, fingerprint: str, config: ChannelConfig):
        self.reactor = reactor
        self.endpoint = endpoint
        self.channel = card_channel(config, fingerprint)
        self.proto: _Raw | None = None
        self.closed: Closed | None = None
        self._pushed: list = []  # frames read ahead (the first frame, looked at for SERVER_BUSY)

    async def open(self) -> None:
        self.proto = await clientFromString(self.reactor, self.endpoint).connect(Factory.forProtocol(_Raw))
        self._effects(self.channel.start())

    def _effects(self, effects) -> list[bytes]:
        out = []
        for e in effects:
            if isinstance(e, Send):
                out.append(e.data)
            elif isinstance(e, Closed):
                self.closed = e
        return out

    def write(self, data: bytes) -> None:
        self.proto.transport.write(data)

    async def next_frame(self, timeout: float = 10.0):
        """The next whole frame (bytes), a WireError if the stream did not split, None once the server closed."""
        if self._pushed:
            return self._pushed.pop(0)
        d = self.proto.frames.get()
        timer = self.reactor.callLater(timeout, lambda: d.called or d.errback(Failed(f"no answer within {timeout:g} s")))
        try:
            return await d
        finally:
            if timer.active():
                timer.cancel()

    async def handshake(self, tamper_kt: Callable[[bytes], bytes] | None = None) -> None:
        hello = await self.next_frame()
        expect(isinstance(hello, bytes), f"expected Hello, got {hello!r}")
        sends = self._effects(self.channel.receive_frame(hello))
        expect(len(sends) == 1 and self.closed is None, f"card rejected the Hello: {self.closed}")
        kt = sends[0]
        self.write(tamper_kt(kt) if tamper_kt else kt)
        sf = await self.next_frame()
        if sf is None or isinstance(sf, WireError):
            raise Failed(f"server closed during the handshake: {sf}")
        for data in self._effects(self.channel.receive_frame(sf)):
            self.write(data)

    def push_back(self, frame) -> None:
        """Give a frame back: the next ``next_frame`` returns it first."""
        self._pushed.insert(0, frame)

    def seal(self, msg) -> bytes:
        (data,) = self._effects(self.channel.send(msg))
        return data

    async def receive(self, timeout: float = 10.0):
        """The next inner message the server sends (its channel answers echo requests itself); Failed if it closes."""
        while True:
            frame = await self.next_frame(timeout)
            if frame is None or isinstance(frame, WireError):
                raise Failed(f"server closed the channel instead of answering ({frame or 'connection closed'})")
            effects = self.channel.receive_frame(frame)
            for data in self._effects(effects):
                self.write(data)
            got = [e.message for e in effects if isinstance(e, Received)]
            if got:
                return got[0]
            if self.closed is not None:
                raise Failed(f"server closed the channel with {self.closed.code.name} instead of answering")

    async def request(self, msg, timeout: float = 10.0):
        """Seal and send ``msg``; the server's next inner message."""
        self.write(self.seal(msg))
        return await self.receive(timeout)

    async def expect_silence_then_close(self, timeout: float = 10.0) -> None:
        """The server must close the connection without sending anything more."""
        frame = await self.next_frame(timeout)
        expect(frame is None, f"the server answered with {frame!r} where it must send nothing and close")

    async def expect_close(self, code: ErrorCode, timeout: float = 10.0) -> None:
        """The server must close, telling us ``code`` (alert or sealed close), and must not crash."""
        while True:
            frame = await self.next_frame(timeout)
            if frame is None:
                break
            if isinstance(frame, WireError):
                raise Failed(f"server sent an unparseable frame: {frame}")
            self._effects(self.channel.receive_frame(frame))
            if self.closed is not None:
                break
        expect(self.closed is not None, "server closed the connection without an alert")
        expect(self.closed.code is code, f"expected {code.name}, server said {self.closed.code.name}")

    def close(self) -> None:
        if self.proto is not None and self.proto.transport is not None:
            self.proto.transport.loseConnection()
