"""The card's side of the channel: connect to a server endpoint and handshake."""

from __future__ import annotations

from twisted.internet.defer import Deferred, inlineCallbacks

from vsc import crypto
from vsc.net import endpoints
from vsc.net.channel import ChannelFactory, ChannelProtocol
from vsc.protocol.channel import card_channel
from vsc.protocol.suites import ChannelConfig
from vsc.wire import ErrorCode, Message
from vsc.wire.messages import EchoReply, EchoRequest


#: messages the server may send ahead of the card's asking for them; one more is a protocol violation
#: (the protocol is request / response), and the channel is closed rather than keep what a malicious
#: server pushes (each message can be half a megabyte)
MAX_UNCLAIMED = 4


class CardProtocol(ChannelProtocol):
    """A card-side channel that hands received messages to waiting requests, in order."""

    #: seconds a request waits for the server's answer; then the channel is closed (IDLE_TIMEOUT) and the
    #: request fails, so a server that stopped answering (a stuck database, a connection that died silently
    #: while the machine slept) never holds the card's operations for ever. The card's own work (scrypt) is
    #: never inside this wait: it runs between one answer and the next request
    answerTimeout = 60.0

    def __init__(self, channel, clock):
        super().__init__(channel, clock)
        self._waiting: list[Deferred] = []
        self._unclaimed: list[Message] = []
        self._echoes = 0  # ECHO_REQUESTs sent whose ECHO_REPLY has not come yet
        self._answer_timer = None

    def messageReceived(self, msg: Message) -> None:
        if isinstance(msg, EchoReply):
            if not self._echoes:  # one the card did not ask for: ignored, never an answer to a request (§5.8)
                self.log.debug("ignored an ECHO_REPLY this card did not ask for")
                return
            self._echoes -= 1
        if self._waiting:
            d = self._waiting.pop(0)
            self._wait_for_answer()
            d.callback(msg)
        elif len(self._unclaimed) < MAX_UNCLAIMED:
            self._unclaimed.append(msg)
        else:
            self.log.warn("the server sent {n} messages the card did not ask for: channel closed",
                          n=len(self._unclaimed) + 1)
            self._unclaimed.clear()
            self.closeChannel(ErrorCode.UNEXPECTED_MESSAGE)

    def channelClosed(self, code, reason, byPeer) -> None:
        from vsc.net.channel import ChannelClosedError

        self._stop_answer_timer()
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.errback(ChannelClosedError(code, reason))

    def _wait_for_answer(self) -> None:
        """The answer timer runs while a request waits (restarted by each answer), and only then."""
        self._stop_answer_timer()
        if self._waiting and self.answerTimeout and not self.channel.closed:
            self._answer_timer = self.clock.callLater(self.answerTimeout, self._no_answer)

    def _stop_answer_timer(self) -> None:
        if self._answer_timer is not None and self._answer_timer.active():
            self._answer_timer.cancel()
        self._answer_timer = None

    def _no_answer(self) -> None:
        from vsc.net.channel import ChannelClosedError

        self._answer_timer = None
        why = f"the server did not answer within {self.answerTimeout:g} s"
        self.log.warn("{peer}: {why}: channel closed", peer=self.peer, why=why)
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.errback(ChannelClosedError(ErrorCode.IDLE_TIMEOUT, why))
        if not self.channel.closed:
            self.closeChannel(ErrorCode.IDLE_TIMEOUT)

    def nextMessage(self) -> Deferred:
        """Fires with the next inner message the server sends."""
        if self._unclaimed:
            from twisted.internet.defer import succeed

            return succeed(self._unclaimed.pop(0))
        if self.channel.closed:
            from twisted.internet.defer import fail
            from vsc.net.channel import ChannelClosedError

            return fail(ChannelClosedError(self.closeCode, self.closeReason))
        d: Deferred = Deferred()
        self._waiting.append(d)
        return d

    def request(self, msg: Message) -> Deferred:
        """Send ``msg`` and fire with the server's next message (a closed channel: ChannelClosedError, unsent)."""
        d = self.nextMessage()
        if not self.channel.closed:
            self.sendMessage(msg)
            if isinstance(msg, EchoRequest):
                self._echoes += 1
            if self._answer_timer is None:
                self._wait_for_answer()
        return d


@inlineCallbacks
def connect(
    reactor,
    endpoint: str,
    server_fingerprint: str,
    config: ChannelConfig = ChannelConfig(),
    rand: crypto.RandomBytes = crypto.system_random,
):
    """Connect and complete the handshake; fires with the established CardProtocol."""
    factory = ChannelFactory(lambda: card_channel(config, server_fingerprint, rand), reactor, CardProtocol)
    proto = yield endpoints.client(reactor, endpoint, "the server").connect(factory)
    yield proto.whenEstablished()
    return proto
