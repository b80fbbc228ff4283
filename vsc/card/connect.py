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
from vsc.wire.ops import AuthChallenge, AuthResponse


#: answers the card may hold before it asks for them (a TIMEOUT during its answer's computation); a guard only:
#: what the card holds is bounded by the answers it is owed, and an answer nobody is owed closes the channel
MAX_UNCLAIMED = 4


class CardProtocol(ChannelProtocol):
    """
    A card-side channel that hands each answer to the request it answers (§10.2).

    The card is owed one answer per operation request it sent, and after an
    AUTH_CHALLENGE one more (the operation's OP_RESULT: the AUTH_RESPONSE does
    not add one, and a TIMEOUT may come before it is sent). An operation
    message the card is not owed is a protocol violation: the channel is
    closed (UNEXPECTED_MESSAGE) rather than let it answer a later request.
    ECHO_REPLY goes to the ECHO_REQUEST it answers, and one the card did not
    ask for is ignored (§5.8).
    """

    #: seconds a request waits for the server's answer; then the channel is closed (IDLE_TIMEOUT) and the
    #: request fails, so a server that stopped answering (a stuck database, a connection that died silently
    #: while the machine slept) never holds the card's operations for ever. The card's own work (scrypt) is
    #: never inside this wait: it runs between one answer and the next request
    answerTimeout = 60.0

    def __init__(self, channel, clock):
        super().__init__(channel, clock)
        self._waiting: list[Deferred] = []
        self._unclaimed: list[Message] = []
        self._owed = 0  # operation answers the server owes this card
        self._echo_waiting: list[Deferred] = []  # ECHO_REQUESTs sent whose ECHO_REPLY has not come yet
        self._answer_timer = None

    def messageReceived(self, msg: Message) -> None:
        if isinstance(msg, EchoReply):
            if not self._echo_waiting:  # one the card did not ask for: ignored, never an answer to a request (§5.8)
                self.log.debug("ignored an ECHO_REPLY this card did not ask for")
                return
            d = self._echo_waiting.pop(0)
            self._wait_for_answer()
            d.callback(msg)
            return
        if not self._owed or len(self._unclaimed) >= MAX_UNCLAIMED:
            self.log.warn("the server sent a {type} this card did not ask for: channel closed",
                          type=type(msg).__name__)
            self._unclaimed.clear()
            self.closeChannel(ErrorCode.UNEXPECTED_MESSAGE)
            return
        self._owed -= 1
        if isinstance(msg, AuthChallenge):
            self._owed += 1  # the operation's OP_RESULT follows (a TIMEOUT may come before the AUTH_RESPONSE)
        if self._waiting:
            d = self._waiting.pop(0)
            self._wait_for_answer()
            d.callback(msg)
        else:
            self._unclaimed.append(msg)

    def channelClosed(self, code, reason, byPeer) -> None:
        from vsc.net.channel import ChannelClosedError

        self._stop_answer_timer()
        waiting, self._waiting = self._waiting + self._echo_waiting, []
        self._echo_waiting = []
        self._owed = 0
        for d in waiting:
            d.errback(ChannelClosedError(code, reason))

    def _wait_for_answer(self) -> None:
        """The answer timer runs while a request waits (restarted by each answer), and only then."""
        self._stop_answer_timer()
        if (self._waiting or self._echo_waiting) and self.answerTimeout and not self.channel.closed:
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
        waiting, self._waiting = self._waiting + self._echo_waiting, []
        self._echo_waiting = []
        for d in waiting:
            d.errback(ChannelClosedError(ErrorCode.IDLE_TIMEOUT, why))
        if not self.channel.closed:
            self.closeChannel(ErrorCode.IDLE_TIMEOUT)

    def _failed_closed(self) -> Deferred:
        from twisted.internet.defer import fail
        from vsc.net.channel import ChannelClosedError

        return fail(ChannelClosedError(self.closeCode, self.closeReason))

    def nextMessage(self) -> Deferred:
        """Fires with the next operation message the server sends (one it owes this card)."""
        if self._unclaimed:
            from twisted.internet.defer import succeed

            return succeed(self._unclaimed.pop(0))
        if self.channel.closed:
            return self._failed_closed()
        d: Deferred = Deferred()
        self._waiting.append(d)
        return d

    def request(self, msg: Message) -> Deferred:
        """Send ``msg`` and fire with the server's answer to it (a closed channel: ChannelClosedError, unsent)."""
        if isinstance(msg, EchoRequest):
            if self.channel.closed:
                return self._failed_closed()
            d: Deferred = Deferred()
            self._echo_waiting.append(d)
            self.sendMessage(msg)
        else:
            d = self.nextMessage()
            if self.channel.closed:
                return d
            if not isinstance(msg, AuthResponse):  # the answer to an AUTH_RESPONSE is owed since the challenge
                self._owed += 1
            self.sendMessage(msg)
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
