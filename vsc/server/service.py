"""The server's channel endpoint: one ServerProtocol per card connection."""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from vsc import crypto
from vsc.net.channel import ChannelFactory, ChannelProtocol
from vsc.protocol.channel import server_channel
from vsc.protocol.suites import ChannelConfig
from vsc.wire import ErrorCode, Message


class ServerProtocol(ChannelProtocol):
    log = Logger()

    def messageReceived(self, msg: Message) -> None:
        handler = getattr(self.factory, "handle", None)
        if handler is None:
            self.log.info("unexpected {kind} from {peer}", kind=type(msg).__name__, peer=self.peer)
            self.closeChannel(ErrorCode.UNEXPECTED_MESSAGE)
            return
        handler(self, msg)


def server_factory(
    config: ChannelConfig,
    key: crypto.RSAPrivateKey,
    clock: IReactorTime,
    rand: crypto.RandomBytes = crypto.system_random,
) -> ChannelFactory:
    return ChannelFactory(lambda: server_channel(config, key, rand), clock, ServerProtocol)
