"""
The server's Twisted glue: one ServerProtocol per card connection runs the
sans-IO channel (vsc.protocol.channel) and, once established, the sans-IO
operations machine (vsc.protocol.server_ops). Store calls run on a thread
pool — the database is never touched on the reactor thread, and neither is
the signing of enrolment material.
"""

from __future__ import annotations

import collections
from typing import Callable

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from vsc import crypto
from vsc.net.channel import ChannelFactory, ChannelProtocol, peer_of, peer_uid
from vsc.net.transport import Refusal, close_now, write_now
from vsc.protocol.channel import ChannelInfo, private_decrypt, server_channel
from vsc.server.admission import Admission, AdmissionLimits, Refused
from vsc.protocol import implauth, serials
from vsc.protocol.cardstore import STORE_CALLS, CheckOut, LoadCard
from vsc.protocol.implauth import Registrar
from vsc.protocol.lockout import SourceLimits, site_of, source_of
from vsc.protocol.server_ops import (
    Authenticated,
    CancelDeadline,
    IssueMaterial,
    Logged,
    OpsPolicy,
    ProtocolViolation,
    Reply,
    ServerOps,
    StartDeadline,
)
from vsc.protocol.suites import ChannelConfig

from vsc.wire import MAX_FRAME_BODY, ErrorCode, Message, encode_frame
from vsc.wire.messages import Alert
from vsc.wire.messages import EchoReply
from vsc.wire.ops import Status


class Backend:
    """The card store behind a thread pool, as Deferreds. ``store`` may be None (channel-only server)."""

    def __init__(self, reactor, store, pool: ThreadPool | None):
        self.reactor = reactor
        self.store = store
        self.pool = pool

    def run(self, effect) -> Deferred:
        """Carry out one typed store effect on a worker thread (dispatch by its type)."""
        call = STORE_CALLS[type(effect)]
        return deferToThreadPool(self.reactor, self.pool, call, self.store, effect)

    def work(self, fn: Callable, *args) -> Deferred:
        """CPU work that must not run on the reactor thread (signing enrolment material)."""
        return deferToThreadPool(self.reactor, self.pool, fn, *args)


_BUSY_ALERT = encode_frame(Alert(ErrorCode.SERVER_BUSY))


class ServerProtocol(ChannelProtocol):
    log = Logger()

    ops: ServerOps | None = None
    _deadline: IDelayedCall | None = None
    _counted = False  # admitted, and still counted as unauthenticated
    _serials: frozenset = frozenset()  # the serials an operation on this channel passed its authority for
    source = ""

    # -- admission (vsc.server.admission)

    def connectionMade(self) -> None:
        admission: Admission | None = self.factory.admission
        self.peer, self.peer_host = peer_of(self.transport)  # once: ChannelProtocol.connectionMade keeps them
        if self.peer_host:
            self.source = source_of(self.peer_host)
        else:
            self._local_source()
            if admission is not None and not admission.handshake_allowed(self.source):
                self._refuse()  # (buildProtocol could not tell this local user from another: see there)
                return
        if admission is not None:
            if not admission.opened(self.source) and not self._make_room(admission):
                self.log.debug("{source}: connection refused: too many unauthenticated connections",
                               source=self.source)
                self._refuse()
                return
            self._counted = True
            self.factory.unauthenticated.setdefault(site_of(self.source), {})[id(self)] = self
        super().connectionMade()

    def _local_source(self) -> None:
        """
        A peer without an address (a UNIX socket): its source is its user id
        (SO_PEERCRED), so that one local user's connections, handshakes and
        failures are not every local user's; "local" where it cannot be read.
        The peer name (logs, history) says the same.
        """
        uid = peer_uid(self.transport)
        self.source = f"uid {uid}" if uid is not None else "local"
        self.peer = self.source if self.peer in ("None", "", "?") else f"{self.peer} {self.source}"

    def _refuse(self) -> None:
        """Refused at accept: the SERVER_BUSY alert (a few bytes, no key material) and close; nothing else is spent."""
        write_now(self.transport, _BUSY_ALERT)
        close_now(self.transport)

    def _make_room(self, admission: Admission) -> bool:
        """
        At the overall cap: close the oldest unauthenticated connection of
        the most crowded source of the most crowded site, if any.
        """
        crowded = admission.crowded(self.source)
        held = self.factory.unauthenticated.get(crowded) if crowded else None
        if not held:
            return False
        # in that site, the oldest connection of its most crowded source (a site may be shared: a /48 of
        # customers' /64s), never the site's oldest as such, which may be the owner's one beside a stranger's many
        counts = collections.Counter(p.source for p in held.values())
        most = max(counts, key=counts.__getitem__)
        victim = next(p for p in held.values() if p.source == most)
        self.log.debug("{source}: closing an unauthenticated connection to make room for {new}", source=crowded,
                       new=self.source)
        if victim._uncount():
            admission.closed(victim.source, True)
        victim.transport.abortConnection()
        return admission.opened(self.source)

    def _uncount(self) -> bool:
        if not self._counted:
            return False
        self._counted = False
        site = site_of(self.source)
        held = self.factory.unauthenticated.get(site, {})
        held.pop(id(self), None)
        if not held:
            self.factory.unauthenticated.pop(site, None)
        return True

    def connectionLost(self, reason=None) -> None:
        if self._uncount():
            self.factory.admission.closed(self.source, True)
        self._let_go()
        super().connectionLost(reason)

    def runDecrypt(self, ciphertext: bytes) -> None:
        admission: Admission | None = self.factory.admission
        if admission is None:
            return super().runDecrypt(ciphertext)
        key = self.channel._core.private_key
        d = admission.decrypt(self.source, lambda: private_decrypt(key, ciphertext))

        def decrypted(plaintext) -> None:
            if not self.channel.closed:
                self._run(self.channel.decrypted(plaintext))

        def refused(failure: Failure) -> None:
            failure.trap(Refused)
            self.log.debug("{peer}: handshake refused: {why}", peer=self.peer, why=failure.getErrorMessage())
            if not self.channel.closed:
                self._run(self.channel.close(ErrorCode.SERVER_BUSY))

        def failed(failure: Failure) -> None:  # a fault of this server's (in decrypted, or the decryption)
            self.log.failure("handshake decryption for {peer}", failure, peer=self.peer)
            if not self.channel.closed:
                self._run(self.channel.close(ErrorCode.INTERNAL_ERROR))

        d.addCallbacks(decrypted, refused).addErrback(failed)

    def _authenticated(self, serial: str) -> None:
        if self._uncount():
            self.factory.admission.authenticated(self.source)
        if self.factory.admission is not None:
            self._hold(serial, self.factory.admission.limits.max_channels_per_card)
        limits = self.factory.admission.limits if self.factory.admission is not None else None
        idle = limits.idle_timeout if limits is not None else 0.0
        self._run(self.channel.raise_limits(MAX_FRAME_BODY, idle))  # restarts the idle timer with the new time
        self.MAX_LENGTH = self.channel.max_frame_body()

    def _hold(self, serial: str, cap: int) -> None:
        """
        Count this channel among ``serial``'s authenticated ones (newest
        last); past ``cap`` close the oldest. A card uses one channel at a
        time: without this, whoever holds its insert secret could open and
        ATTACH connections without bound, each out of the unauthenticated
        count, until the server had no descriptor left for anyone.
        """
        held = self.factory.authenticated.setdefault(serial, {})
        held.pop(id(self), None)
        held[id(self)] = self
        self._serials = self._serials | {serial}
        while len(held) > cap:
            victim = held.pop(next(iter(held)))
            self.log.info("{peer}: {serial}: closing its oldest channel ({old}): at most {cap} per card",
                          peer=self.peer, serial=serials.for_log(serial), old=victim.peer, cap=cap)
            if not victim.channel.closed:
                victim.closeChannel(ErrorCode.CLOSE_NOTIFY)

    def _let_go(self) -> None:
        """This channel no longer counts among its serials' authenticated channels."""
        for serial in self._serials:
            held = self.factory.authenticated.get(serial)
            if held is not None and held.get(id(self)) is self:
                del held[id(self)]
                if not held:
                    del self.factory.authenticated[serial]
        self._serials = frozenset()

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
                limits=f.limits,
                source=self.source,
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
        self._let_go()
        if self.ops is not None:
            self._effects(self.ops.connection_lost())

    # -- carrying out the operations machine's effects

    def _effects(self, effects: list) -> None:
        backend: Backend = self.factory.backend
        for e in effects:
            if isinstance(e, Reply):
                if not self.channel.closed:
                    self.sendMessage(e.message)
            elif isinstance(e, LoadCard):
                self._then(backend.run(e), lambda card: self._effects(self.ops.loaded(card)))
            elif isinstance(e, CheckOut) and e.reissue:
                self._then(backend.work(self._check_out_reissuing, e),
                           lambda outcome: self._effects(self.ops.stored(outcome)))
            elif type(e) in STORE_CALLS:
                self._then(backend.run(e), lambda outcome: self._effects(self.ops.stored(outcome)))
            elif isinstance(e, IssueMaterial):
                self._then(backend.work(self._enrol_material, e),
                           lambda material: self._effects(self.ops.material(material)), self._material_refused)
            elif isinstance(e, StartDeadline):
                self._cancel_deadline()
                self._deadline = self.clock.callLater(e.seconds, self._deadline_passed)
            elif isinstance(e, CancelDeadline):
                self._cancel_deadline()
            elif isinstance(e, Authenticated):
                self._authenticated(e.serial)
            elif isinstance(e, Logged):
                self.log.info("{peer}: {serial}: {event} ({detail})", peer=self.peer, serial=serials.for_log(e.serial),
                              event=e.event, detail=e.detail)
            elif isinstance(e, ProtocolViolation):
                self.log.info("{peer} broke the operation protocol: {reason}", peer=self.peer, reason=e.reason)
                if not self.channel.closed:
                    self.closeChannel(ErrorCode.UNEXPECTED_MESSAGE)

    def _then(self, d: Deferred, on_result: Callable, on_failure: Callable | None = None) -> None:
        """
        Hand a store call's (or worker's) outcome to the operation machine,
        exactly once: its result to ``on_result``, its failure to
        ``on_failure`` (default ``_store_error``). An exception raised while
        either runs (the machine taking the outcome, or its effects carried
        out) is this server's fault, not the store's: it is logged and the
        channel closed with INTERNAL_ERROR (``_guard``), so the card's request
        fails now instead of waiting for an answer that would never come —
        with ``addCallbacks(cb, eb)`` such an exception reached no handler.
        """
        on_failure = on_failure or self._store_error
        d.addCallbacks(lambda result: self._guard(lambda: on_result(result)),
                       lambda failure: self._guard(lambda: on_failure(failure)))

    def _enrol_material(self, e: IssueMaterial) -> implauth.EnrolMaterial:
        """
        In a database thread: the material an enrolment needs (a keyfile: one RSA signature), made only for a
        request that may enrol (a plain read); for any other, none (its EnrolCard is refused), so a made-up
        code, or a guessed verifier, costs the server no private-key operation.
        """
        if not self.factory.backend.store.may_enrol(e.serial, e.code_hash, e.verifier, e.kdf, e.protected,
                                                    e.registration):
            return implauth.EnrolMaterial({}, b"")
        return self.factory.registrar.enrol(e.serial, e.registration, e.methods)

    def _check_out_reissuing(self, e: CheckOut):
        """
        In a database thread: make the material the insert re-issues (a keyfile:
        one RSA signature), then check the card out and store the material in
        one transaction; the result carries it to the card. Material that
        cannot be made fails the insert (INTERNAL, nothing changed): the card
        was let in without that method only to be given it.
        """
        from vsc.protocol.cardstore import Outcome

        backend: Backend = self.factory.backend
        try:
            material = self.factory.registrar.enrol(e.serial, e.registration, e.reissue, sealed_as=e.registered_as)
        except implauth.ImplAuthError as why:
            self.log.error("{serial}: cannot re-issue implementation-authentication material: {why}",
                           serial=e.serial, why=str(why))
            return Outcome(Status.INTERNAL)
        outcome = backend.store.check_out(attrs.evolve(e, auth_extra=dict(material.auth_info)))
        if outcome.status is Status.OK:
            return attrs.evolve(outcome, registration=material.reply)
        return outcome

    def _store_error(self, failure: Failure) -> None:
        from vsc.server.store import StorageFull

        if failure.check(StorageFull):
            self.log.error("{peer}: the database cannot store: {why}", peer=self.peer, why=failure.getErrorMessage())
            self._effects(self.ops.store_failed(failure.getErrorMessage(), True))
            return
        self.log.failure("database call failed for {peer}", failure, peer=self.peer)
        self._effects(self.ops.store_failed(failure.getErrorMessage()))

    def _material_refused(self, failure: Failure) -> None:
        if failure.check(implauth.ImplAuthError):
            self._effects(self.ops.material_refused(failure.getErrorMessage()))
        else:
            self._store_error(failure)

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
        admission: Admission | None = None,
    ):
        if admission is not None:
            # unauthenticated channels: small frames, a short idle time; the decryption runs on the pool
            lim = admission.limits
            config = attrs.evolve(config, max_body=lim.max_unauthenticated_body, idle_timeout=lim.unauthenticated_idle)
        super().__init__(lambda: server_channel(config, key, rand, inline=admission is None), clock, ServerProtocol)
        self.admission = admission
        #: unauthenticated connections by site (an IPv6 /48, else the source: vsc.protocol.lockout.site_of),
        #: oldest first (admission's room-making closes the oldest of the most crowded site)
        self.unauthenticated: dict[str, dict[int, ServerProtocol]] = {}
        #: authenticated channels by serial, oldest first (at most ``max_channels_per_card`` each)
        self.authenticated: dict[str, dict[int, ServerProtocol]] = {}
        self.backend = backend
        self.ops_policy = ops_policy
        self.master = master
        self.rand = rand
        # a per-server secret for decoy KDF parameters of serials that do not exist
        self.decoy_secret = crypto.hkdf_extract_expand(b"vsc decoy", key.to_pem(), b"decoy", 32)
        # enrolment material for implementation authentication: keyfiles signed with this server's key
        self.registrar = Registrar(lambda data: crypto.rsa_pss_sign(key, data), key.public_key().spki_der, rand,
                                   clock.seconds)
        # guessing limits per source address, in this process's memory (vsc.protocol.lockout)
        self.limits = SourceLimits(ops_policy.lockout, clock.seconds)


    def buildProtocol(self, addr):
        # a source over its handshake rate is refused before a channel is even built (issue 11: a flood of
        # handshakes must cost the server next to nothing per refusal)
        # (a peer without an address, a UNIX socket, is told by its user id: its token is taken in connectionMade)
        host = getattr(addr, "host", "")
        if host and self.admission is not None and not self.admission.handshake_allowed(source_of(host)):
            return Refusal(_BUSY_ALERT)
        return super().buildProtocol(addr)


def server_factory(
    config: ChannelConfig,
    key: crypto.RSAPrivateKey,
    clock: IReactorTime,
    rand: crypto.RandomBytes = crypto.system_random,
    backend: Backend | None = None,
    ops_policy: OpsPolicy = OpsPolicy(),
    master: bytes = b"",
    admission: Admission | None = None,
) -> ServerFactory:
    return ServerFactory(config, key, clock, backend, ops_policy, master, rand, admission)
