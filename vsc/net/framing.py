"""
An IntNStringReceiver-style frame receiver: splits a TCP stream into whole
vsc frames (8-byte header from vsc.wire, then the body) with an explicit
``MAX_LENGTH``, so the codec only ever sees whole frames.
"""

from __future__ import annotations

from twisted.internet.protocol import Protocol

from vsc.wire import HEADER_SIZE, MAX_FRAME_BODY, WireError
from vsc.wire.codec import parse_header
from vsc.wire.errors import ErrorCode


class FrameReceiver(Protocol):
    """
    Calls ``frameReceived(frame)`` with each whole frame (header included).
    A header that does not parse, or a length above ``MAX_LENGTH``, calls
    ``frameError(WireError)`` once and stops delivering.
    """

    MAX_LENGTH = MAX_FRAME_BODY
    _unprocessed = b""
    _broken = False

    def dataReceived(self, data: bytes) -> None:
        if self._broken:
            return
        alldata = self._unprocessed + data
        offset = 0
        while len(alldata) - offset >= HEADER_SIZE and not self._broken:
            try:
                header = parse_header(alldata[offset : offset + HEADER_SIZE])
            except WireError as e:
                self._fail(e)
                return
            if header.length > self.MAX_LENGTH:
                self._fail(
                    WireError(
                        ErrorCode.FRAME_TOO_LARGE,
                        f"frame body of {header.length} bytes exceeds the limit of {self.MAX_LENGTH}",
                    )
                )
                return
            end = offset + HEADER_SIZE + header.length
            if len(alldata) < end:
                break
            frame = alldata[offset:end]
            offset = end
            self.frameReceived(frame)
        self._unprocessed = alldata[offset:]

    def _fail(self, error: WireError) -> None:
        self._broken = True
        self._unprocessed = b""
        self.frameError(error)

    def frameReceived(self, frame: bytes) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def frameError(self, error: WireError) -> None:
        self.transport.loseConnection()
