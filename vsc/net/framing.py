"""
The Twisted side of vsc framing: a Protocol that feeds its bytes to the one
frame splitter, ``vsc.wire.codec.Deframer`` (8-byte header, then the body),
and hands on whole frames. ``MAX_LENGTH`` is the Deframer's ``max_body``,
read before each frame, so an owner may change it between two frames of one
chunk (the channel does when its handshake completes).

The splitting itself lives in vsc.wire so the sans-IO channel
(``Channel.receive_bytes``, vsc.protocol) and this protocol share it: vsc.protocol
may not import Twisted glue, and a second splitter would be a second set of
rules to keep equal.
"""

from __future__ import annotations

from twisted.internet.protocol import Protocol

from vsc.wire import MAX_FRAME_BODY, Deframer, WireError


class FrameReceiver(Protocol):
    """
    Calls ``frameReceived(frame)`` with each whole frame (header included).
    A header that does not parse (MALFORMED, PROTOCOL_VERSION), or a length
    above ``MAX_LENGTH`` (FRAME_TOO_LARGE, as soon as the header is in),
    calls ``frameError(WireError)`` once and stops delivering.
    """

    _deframer: Deframer | None = None
    _broken = False

    @property
    def deframer(self) -> Deframer:
        if self._deframer is None:
            self._deframer = Deframer(MAX_FRAME_BODY)
        return self._deframer

    @property
    def MAX_LENGTH(self) -> int:  # noqa: N802 - IntNStringReceiver's name
        return self.deframer.max_body

    @MAX_LENGTH.setter
    def MAX_LENGTH(self, value: int) -> None:  # noqa: N802
        self.deframer.max_body = value

    def dataReceived(self, data: bytes) -> None:
        if self._broken:
            return
        deframer = self.deframer
        frame = deframer.whole(data)
        if frame is not None:  # the common case, one whole frame in one read: no buffer, no generator
            self.frameReceived(frame)
            return
        frames = deframer.feed(data)
        while not self._broken:
            try:
                frame = next(frames)
            except StopIteration:
                return
            except WireError as e:  # from the splitter only, never from frameReceived
                self._broken = True
                self._deframer = Deframer(0)  # drop what was buffered
                self.frameError(e)
                return
            self.frameReceived(frame)

    def frameReceived(self, frame: bytes) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def frameError(self, error: WireError) -> None:
        self.transport.loseConnection()
