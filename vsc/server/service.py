"""
The server's Twisted glue: one ServerProtocol per card connection runs the
sans-IO channel (vsc.protocol.channel) and, once established, the sans-IO
operations machine (vsc.protocol.server_ops). Store calls run on a thread
pool — the database is never touched on the reactor thread.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from vsc import crypto
from vsc.net.channel import ChannelFactory, ChannelProtocol
from vsc.protocol.channel import ChannelInfo, server_channel
from vsc.protocol.implauth import Registrar
from vsc.protocol.server_ops import (
    AcquireLease,
    CancelDeadline,
    LoadCard,
    OpsPolicy,
    ProtocolViolation,
    ReleaseLease,
    Reply,
    ServerOps,
    StartDeadline,
    StoreCall,
)
from vsc.protocol.suites import ChannelConfig
from vsc.wire import ErrorCode, Message
from vsc.wire.messages import EchoReply


class Backend:
    """The store behind a thread pool, as Deferreds. ``store`` may be None (channel-only server)."""

    log = Logger()

    def __init__(self, reactor, store, pool: ThreadPool | None, lease_ttl: float, owner: str):
        self.reactor = reactor
        self.store = store
        self.pool = pool
        self.lease_ttl = lease_ttl
        self.owner = owner

    def call(self, method: str, *args: Any, **kwargs: Any) -> Deferred:
        fn: Callable = getattr(self.store, method)
        return deferToThreadPool(self.reactor, self.pool, fn, *args, **kwargs)

    def release(self, serial: str, since: float, clock: IReactorTime) -> Deferred:
        """
        Give back the lease on ``serial`` taken at ``since`` (never fails). If
        the database cannot be reached (it is restarting), keep trying in the
        background until half the lease TTL after it was taken (it cannot have
        been taken again by then), rather than leave the card BUSY until the
        lease expires.
        """
        return self.call("release", serial, self.owner).addErrback(self._release_failed, serial, since, clock, 0.25)

    def _release_failed(self, failure: Failure, serial: str, since: float, clock: IReactorTime, delay: float) -> None:
        if clock.seconds() + delay > since + self.lease_ttl / 2:
            self.log.failure("releasing the lease on {serial}; it expires on its own", failure, serial=serial)
            return
        self.log.warn("releasing the lease on {serial} failed ({why}); trying again in {delay:g} s",
                      serial=serial, why=failure.getErrorMessage(), delay=delay)

        def again() -> None:
            self.call("release", serial, self.owner).addErrback(self._release_failed, serial, since, clock,
                                                                min(delay * 2, 1.0))

        clock.callLater(delay, again)


class ServerProtocol(ChannelProtocol):
    log = Logger()

    ops: ServerOps | None = None
    _deadline: IDelayedCall | None = None
    _lease_serial: str | None = None
    _lease_since: float = 0.0

    def channelEstablished(self, info: ChannelInfo) -> None:
        f = self.factory
        if f.backend is not None:
            self.ops = ServerOps(
                policy=f.ops_policy,
                master=f.master,
                decoy_secret=f.decoy_secret,
                peer=self.peer,
                suite=info.suite.label,
                now=f.clock.seconds,
                rand=f.rand,
                registrar=f.registrar,
            )

    def messageReceived(self, msg: Message) -> None:
        if isinstance(msg, EchoReply):
            return
        if self.ops is None:
            self.log.info("{peer} sent {kind}, but this server has no card store", peer=self.peer, kind=type(msg).__name__)
            self.closeChannel(ErrorCode.UNEXPECTED_MESSAGE)
            return
        self._effects(self.ops.message(msg))

    def channelClosed(self, code, reason, byPeer) -> None:
        if self.ops is not None:
            self._effects(self.ops.connection_lost())

    # -- carrying out the operations machine's effects

    def _effects(self, effects: list) -> None:
        # The lease goes back BEFORE the card hears the result: a card that starts its next
        # operation as soon as it has the answer (on this channel or another) must not find
        # its own finished operation still holding the serial (a spurious BUSY).
        release = next((e for e in effects if isinstance(e, ReleaseLease)), None)
        if release is not None and any(isinstance(e, Reply) for e in effects):
            rest = [e for e in effects if e is not release]
            self._do_effects([release]).addBoth(lambda _: self._do_effects(rest))
            return
        self._do_effects(effects)

    def _do_effects(self, effects: list) -> Deferred | None:
        """Carry out ``effects`` in order; returns the release's Deferred (never failing) if there is one."""
        backend: Backend = self.factory.backend
        released = None
        for e in effects:
            if isinstance(e, Reply):
                if not self.channel.closed:
                    self.sendMessage(e.message)
                    status = getattr(e.message, "status", None)
                    if status is not None:
                        self.log.debug("{peer}: {status}", peer=self.peer, status=status.name)
            elif isinstance(e, AcquireLease):
                self._lease_serial, self._lease_since = e.serial, self.clock.seconds()
                d = backend.call("acquire", e.serial, backend.owner, backend.lease_ttl)
                d.addCallbacks(lambda granted: self._effects(self.ops.lease(bool(granted))), self._store_error)
            elif isinstance(e, ReleaseLease):
                self._lease_serial = None
                released = backend.release(e.serial, self._lease_since, self.clock)
            elif isinstance(e, LoadCard):
                backend.call("get", e.serial).addCallbacks(lambda card: self._effects(self.ops.loaded(card)), self._store_error)
            elif isinstance(e, StoreCall):
                backend.call(e.method, **e.kwargs).addCallbacks(
                    lambda outcome: self._effects(self.ops.stored(outcome)), self._store_error
                )
            elif isinstance(e, StartDeadline):
                self._cancel_deadline()
                self._deadline = self.clock.callLater(e.seconds, self._deadline_passed)
            elif isinstance(e, CancelDeadline):
                self._cancel_deadline()
            elif isinstance(e, ProtocolViolation):
                self.log.info("{peer} broke the operation protocol: {reason}", peer=self.peer, reason=e.reason)
                if not self.channel.closed:
                    self.closeChannel(ErrorCode.UNEXPECTED_MESSAGE)
        return released

    def _store_error(self, failure: Failure) -> None:
        self.log.failure("database call failed for {peer}", failure, peer=self.peer)
        self._effects(self.ops.store_failed(failure.getErrorMessage()))

    def _deadline_passed(self) -> None:
        self._deadline = None
        self._effects(self.ops.deadline())

    def _cancel_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None


class ServerFactory(ChannelFactory):
    protocol = ServerProtocol

    def __init__(
        self,
        config: ChannelConfig,
        key: crypto.RSAPrivateKey,
        clock: IReactorTime,
        backend: Backend | None = None,
        ops_policy: OpsPolicy = OpsPolicy(),
        master: bytes = b"",
        rand: crypto.RandomBytes = crypto.system_random,
    ):
        super().__init__(lambda: server_channel(config, key, rand), clock, ServerProtocol)
        self.backend = backend
        self.ops_policy = ops_policy
        self.master = master
        self.rand = rand
        # a per-server secret for decoy KDF parameters of serials that do not exist
        self.decoy_secret = crypto.hkdf_extract_expand(b"vsc decoy", key.to_pem(), b"decoy", 32)
        # enrolment material for implementation authentication: keyfiles signed with this server's key
        self.registrar = Registrar(lambda data: crypto.rsa_pss_sign(key, data), key.public_key().spki_der, rand,
                                   clock.seconds)


def server_factory(
    config: ChannelConfig,
    key: crypto.RSAPrivateKey,
    clock: IReactorTime,
    rand: crypto.RandomBytes = crypto.system_random,
    backend: Backend | None = None,
    ops_policy: OpsPolicy = OpsPolicy(),
    master: bytes = b"",
) -> ServerFactory:
    return ServerFactory(config, key, clock, backend, ops_policy, master, rand)
