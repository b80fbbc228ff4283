"""
Where a card's protected information lives: the ``CardStorage`` strategy a
CardSession is given, and ``ServerStorage``, the VSC Server of the patent
(the token card's strategy is vsc.dongle.storage.TokenStorage; the daemon's
composition, vsc.daemon.card_tap, chooses one).

What differs between the two, and nothing else, is in the interface: how
the card is opened at insert, where a modification goes before it is
acknowledged, the check-in at remove and what a failed check-in means, the
storage's own periodic check, its lines in ``vsc card status``, and the
password change. Work that costs CPU — the password derivation (scrypt),
answering the implementation challenges, re-wrapping for a new password —
runs on the ``worker`` (a thread by default), never on the reactor.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable, Protocol, Sequence

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import Logger

from vsc import crypto
from vsc.card import config as cc
from vsc.card import ops
from vsc.card.connect import connect
from vsc.card.protected import CardMemory, rewrap
from vsc.card.session import CardError, explain
from vsc.net.channel import ChannelClosedError
from vsc.protocol import auth, implauth
from vsc.wire.ops import AuthChallenge, AuthMethod, AuthResponse, KdfAlg, KdfParams, Op, OpRequest, OpResult, Status

#: runs ``fn(*args)`` away from the reactor and fires with its result (default: a reactor thread-pool thread)
Worker = Callable[..., Deferred]


@attrs.frozen
class PeriodicCheck:
    """A check the storage repeats while the card is in use; ``run`` raises CardError when it fails."""

    interval: float
    run: Callable[[], Awaitable[None]]


class CardStorage(Protocol):
    """Where the protected information lives while the card is idle, and where every change goes."""

    #: the version of the protected information last stored
    version: int

    async def open(self, password: str, muk: bytes) -> CardMemory:
        """Insert: prove the card may run here, fetch the protected information, open it into locked memory."""

    async def store(self, envelope: bytes) -> None:
        """A modification, stored before it is acknowledged; CardError (one line) if it could not be."""

    async def check_in(self, envelope: bytes) -> None:
        """Remove's write-back (Figure 11, 803-806)."""

    async def hand_back(self) -> None:
        """Insert refused by the card itself (a rollback): give the card back as it was fetched, serving nothing."""

    def checkin_failed(self, error: Exception) -> str | None:
        """After a failed check-in: None keeps the card in use; a line says why it is removed anyway."""

    def checks(self) -> Sequence[PeriodicCheck]:
        """The storage's own checks while the card is in use (a failed one wipes the card and exits)."""

    def status(self) -> dict:
        """The storage's lines in ``vsc card status``."""

    async def change_password(self, memory: CardMemory, old: str, new: str) -> int:
        """Change the owner's password; the new version. CardError where it does not apply."""

    def forget(self) -> None:
        """The card was wiped (removed or exited): drop this insert's secrets."""


@attrs.frozen
class PasswordChange:
    """What a password change sends and keeps, prepared off the reactor."""

    kdf: KdfParams
    verifier: bytes = attrs.field(repr=False)
    envelope: bytes = attrs.field(repr=False)
    keyfile: bytes | None = attrs.field(repr=False)  # the keyfile re-sealed for the new password


def prepare_password_change(serial: str, envelope: bytes, old: str, new: str, old_kdf: KdfParams,
                            new_kdf: KdfParams, keyfile: bytes | None, rand: crypto.RandomBytes) -> PasswordChange:
    """
    The CPU part of a password change (run on the worker): derive both
    password keys, check the old one by unwrapping the data key, re-wrap only
    the data key (the items are untouched), re-seal the keyfile.
    """
    old_keys = ops.derive_keys(old, old_kdf)
    new_keys = ops.derive_keys(new, new_kdf)
    try:
        rewrapped = rewrap(serial, envelope, old_keys.protection_key, new_keys.protection_key, rand)
    except crypto.CryptoError:
        raise CardError("the current password is wrong") from None
    sealed = None
    if keyfile is not None:
        try:
            sealed = implauth.reseal_keyfile(keyfile, serial, old_keys.protection_key, new_keys.protection_key, rand)
        except implauth.KeyfileError as e:
            raise CardError(f"cannot re-seal the keyfile for the new password: {e}") from None
    return PasswordChange(new_kdf, auth.verifier_for(new_keys.auth_key, new_kdf.alg), rewrapped, sealed)


class ServerStorage:
    """
    The card's protected information on a VSC Server: insert is the channel,
    Figure 8 authentication and the download (Figure 6); every change is
    synced; remove uploads and sets the card idle on the server. A dropped
    channel is reconnected with the per-insert secret (no password needed).
    """

    log = Logger()

    def __init__(self, config: cc.CardConfig, reactor, master: bytes,
                 rand: crypto.RandomBytes = crypto.system_random, totp: Callable[[], str] | None = None,
                 worker: Worker = deferToThread, connect: Callable[..., Any] = connect):
        self.config = config
        self.reactor = reactor
        self.master = master
        self.rand = rand
        self.totp = totp  # where TOTP codes come from, when the server asks for one
        self.worker = worker
        self._connect = connect
        self.version = 0
        self._fetched = b""  # the protected information as this insert fetched it (hand_back)
        self.kdf: KdfParams | None = None  # this insert's derivation (a password change derives the old keys with it)
        self._secret = b""
        self._proto = None
        self._in_use = False
        self._totp_asked = False  # this insert's challenge asked for a TOTP code

    # ------------------------------------------------------------ connection

    async def _channel(self):
        """The live channel, or a fresh one (reconnect after a drop: no password needed)."""
        if self._proto is not None and not self._proto.channel.closed:
            return self._proto
        last: Exception | None = None
        for attempt in range(max(1, self.config.reconnect_attempts)):
            try:
                proto = await self._connect(self.reactor, self.config.server, self.config.server_key,
                                            self.config.channel, self.rand)
                if self._in_use:
                    # a new channel of the in-use card: prove it belongs to this insert, so the server lifts
                    # the limits it keeps on channels nothing has authenticated on (large uploads)
                    try:
                        await ops.attach(proto, self.config.serial, self._secret)
                    except BaseException:
                        if not proto.channel.closed:  # not kept: closed now, not left to the server's idle timer
                            proto.closeChannel()
                        raise
                    self.log.info("reconnected to the server ({suite})", suite=proto.info.suite.label)
                self._proto = proto
                return proto
            except ops.OperationRefused as e:
                raise CardError(f"the server no longer knows this insert: {explain(e)}") from None
            except Exception as e:  # noqa: BLE001 - retried, then reported
                last = e
                await deferLater(self.reactor, min(0.2 * 2**attempt, 5.0), lambda: None)
        raise last if last else CardError("cannot connect")

    # ------------------------------------------------------------ insert

    async def open(self, password: str, muk: bytes) -> CardMemory:
        """Figure 6: channel 301, authentication 302 with the MUK 303, mediation 305, download 308."""
        self._secret = self.rand(32)
        try:
            for attempt in range(2):
                proto = await self._channel()
                creds = self.credentials()
                try:
                    result, keys = await self._insert(proto, password, muk, creds)
                    break
                except ops.OperationRefused as e:
                    # INTERNAL: the server's database failed, possibly at the COMMIT of this check-out (the card
                    # may be in use by this very insert): asked once more with the same insert secret and MUK,
                    # the server answers "ok" either way (an identical retry), never IN_USE to its own insert.
                    # Not with a TOTP code: one the server stored as used would be refused (a failure counted)
                    if e.status is not Status.INTERNAL or attempt or self._totp_asked:
                        raise
                    self.log.warn("the server failed (insert); asking once more: it may have checked the card out")
            try:
                memory = CardMemory.load(self.config.serial, result.protected, keys.protection_key, self.rand)
            except crypto.CryptoError:
                raise CardError("the protected information does not decrypt with this password's key") from None
            self.kdf = keys.kdf
            self._pin_derivation(keys.kdf)
            self._settle_keyfile(creds)
            if result.registration:
                self._take_material(result.registration, keys.protection_key, result.protected)
            del keys
        except BaseException:
            self._secret = b""
            raise
        self.version = result.version
        self._fetched = result.protected
        self._in_use = True
        return memory

    async def hand_back(self) -> None:
        """
        The card refused what it fetched (an older copy: vsc.card.freshness):
        check the card in again with the very bytes the server handed out, so
        it is idle for the next insert (after ``vsc card accept-rollback``)
        without a recover. Nothing of the card was served or changed; the
        server only numbers the same bytes one version further.
        """
        fetched, self._fetched = self._fetched, b""
        try:
            if fetched and self._in_use:
                await self.check_in(fetched)
        finally:
            self.forget()

    async def _insert(self, proto, password: str, muk: bytes, creds: ops.Credentials):
        """Op.INSERT and its challenges (Figure 8): the answers — scrypt and all — are computed on the worker."""
        serial = self.config.serial
        first = await proto.request(OpRequest(op=Op.INSERT, serial=serial, insert_secret=self._secret))
        if not isinstance(first, AuthChallenge):
            ops._check(first, "insert")  # refused before authentication (BUSY, ...)
            raise ops.OperationRefused(Status.BAD_REQUEST, "insert: no challenge")
        self._totp_asked = any(item.method is AuthMethod.TOTP for item in first.challenges)
        answers, keys = await self.worker(ops.answer, first, serial, password, self.master, self.rand, None, creds)
        result = await proto.request(AuthResponse(responses=tuple(answers), muk=muk))
        return ops._check(result, "insert", tuple(creds.notes)), keys

    def credentials(self) -> ops.Credentials:
        """The keyfile(s) in HOME, the pinned server key, and the TOTP source, for implementation challenges."""
        return ops.Credentials(keyfiles=cc.load_keyfiles(self.config.home), server_key=self.config.server_key,
                               totp=self.totp, kdf_floor=self.config.settings.get("kdf_floor", ""),
                               kdf_salt=cc.kdf_salt(self.config.settings))

    def _pin_derivation(self, kdf: KdfParams) -> None:
        """
        A card enrolled before card.ini pinned its salt (or its floor) pins
        them at its first insert that the server accepted: trust on first
        use, as an ssh host key. From then on a server that names another
        salt, or a weaker derivation, is refused before anything is derived.
        """
        settings = self.config.settings
        if kdf.alg is not KdfAlg.SCRYPT or (settings.get("kdf_salt") and settings.get("kdf_floor")):
            return
        try:
            added = cc.pin(self.config.home, kdf_salt=kdf.salt.hex(), kdf_floor=f"scrypt:{kdf.log2_n}")
        except (OSError, cc.CardConfigError) as e:
            self.log.warn("could not pin this card's password derivation in card.ini: {why}", why=str(e))
            return
        if added:
            settings.update(added)
            self.log.info("pinned this card's password derivation in card.ini: {what}",
                          what=", ".join(f"{k} = {v}" for k, v in sorted(added.items())))

    def _settle_keyfile(self, creds: ops.Credentials) -> None:
        """After an interrupted password change, keep the keyfile that opened with the password the server accepted."""
        pending = cc.keyfile_path(self.config.home, pending=True)
        if creds.keyfile_used is None or not pending.exists():
            return
        if creds.keyfiles[creds.keyfile_used] == pending.read_bytes():
            cc.commit_pending_keyfile(self.config.home)
            self.log.info("finished an interrupted password change: the re-sealed keyfile is now the keyfile")
        else:
            cc.discard_pending_keyfile(self.config.home)
            self.log.info("discarded the keyfile of a password change the server never stored")

    def _take_material(self, reply: bytes, protection_key: bytes, envelope: bytes) -> None:
        """
        Material the server re-issued with this insert (issue 13): a keyfile, when
        ``impl_auth`` gained ``keyfile`` after this card enrolled, or for a
        duplicate (its old keyfile named the old serial). It is sealed to the key
        registered at enrolment (derived with the serial the card was enrolled
        as); it must open, be signed by the pinned server key and name this
        serial. It is saved in HOME sealed for this serial, like an enrolment's.
        """
        from vsc.wire import WireError
        from vsc.wire.implauth import EnrolReply
        from vsc.wire.protected import envelope_card_id

        serial = self.config.serial
        try:
            keyfile = EnrolReply.decode(reply).keyfile
            if not keyfile:
                return
            signed = None
            for name in dict.fromkeys((serial, envelope_card_id(envelope))):
                try:
                    signed = implauth.unseal_keyfile(keyfile, name, protection_key)
                    break
                except implauth.KeyfileError:
                    continue
            if signed is None:
                raise implauth.KeyfileError("it does not open with this card's keys")
            sealed = implauth.seal_keyfile(signed, serial, implauth.seal_public(protection_key, serial), self.rand)
            implauth.open_keyfile(sealed, serial, protection_key, self.config.server_key)
        except (WireError, implauth.KeyfileError) as e:
            self.log.warn("the server issued this card a keyfile that it cannot use: {why}", why=str(e))
            return
        path = cc.save_keyfile(self.config.home, sealed)
        self.log.info("the server issued this card a new keyfile (implementation authentication): saved as {path}",
                      path=str(path))

    # ------------------------------------------------------------ in use

    async def _send(self, request: Callable[[Any], Awaitable[OpResult]]) -> OpResult:
        """
        ``request(proto)`` (a sync, a remove, a password change) on the live
        channel, and once more, identical, when the first try's outcome is
        unknown: the channel closed before its answer (once more on a fresh
        channel: the live one may be a channel the server closed while the
        machine slept), or the answer was INTERNAL — the server's database
        call failed, possibly at its COMMIT (a PostgreSQL connection that
        drops during the COMMIT), so the change may be stored. Either way the
        server answers the identical retry "ok" (vsc.protocol.lifecycle's
        identical-retry rows), so card and server agree whichever it was.
        """
        for attempt in range(2):
            try:
                proto = await self._channel()
                return await request(proto)
            except ChannelClosedError:
                self._proto = None
                if attempt:
                    raise
            except ops.OperationRefused as e:
                if e.status is not Status.INTERNAL or attempt:
                    raise
                self.log.warn("the server failed ({what}); asking once more: it may have stored it", what=str(e))
        raise AssertionError("unreachable")  # pragma: no cover

    async def store(self, envelope: bytes) -> None:
        """Sync (``_send``: once more, identical, when its outcome is unknown)."""
        try:
            result = await self._send(
                lambda proto: ops.sync(proto, self.config.serial, self._secret, self.version, envelope))
        except ChannelClosedError as e:
            raise CardError(f"could not store the change on the server: {explain(e)}") from None
        except ops.OperationRefused as e:
            raise CardError(f"sync refused: {explain(e)}") from None
        self.version = result.version

    def checks(self) -> Sequence[PeriodicCheck]:
        return ()  # the server watches the card through its syncs and the insert secret

    def status(self) -> dict:
        suite = self._proto.info.suite.label if self._proto is not None and self._proto.info else None
        return {"server": self.config.server, "suite": suite}

    # ------------------------------------------------------------ password change

    async def change_password(self, memory: CardMemory, old: str, new: str) -> int:
        """
        Check the old password by unwrapping the data key, derive new keys
        with the card's own salt, re-wrap only the data key, re-seal the keyfile
        (all on the worker), and have the server store the new verifier, KDF
        parameters and protected information atomically (Op.PASSWORD).
        """
        if self.kdf is None:
            raise CardError("a password change is not available for this card")
        legacy = self.kdf.alg is KdfAlg.LEGACY_MD5
        # the same salt: it is pinned on every machine this card is used from (card.ini kdf_salt)
        new_kdf = ops.new_kdf(self.rand, legacy=legacy, log2_n=self.kdf.log2_n if not legacy else 15,
                              salt=self.kdf.salt if not legacy else b"")
        keyfiles = cc.load_keyfiles(self.config.home)
        change = await self.worker(prepare_password_change, self.config.serial, memory.export(), old, new, self.kdf,
                                   new_kdf, keyfiles[0] if keyfiles else None, self.rand)
        if change.keyfile is not None:
            cc.save_keyfile(self.config.home, change.keyfile, pending=True)
        try:
            result = await self._send_password_change(change)
        except ops.OperationRefused as e:
            if e.status is not Status.INTERNAL:
                # refused: nothing changed on the server; the old password stays
                if change.keyfile is not None:
                    cc.discard_pending_keyfile(self.config.home)
                raise CardError(f"password change refused: {explain(e)}") from None
            unknown: Exception = e  # INTERNAL twice: its database may have stored it (a COMMIT cut off)
        except Exception as e:  # noqa: BLE001 - the connection failed (unknown too): reported as one line
            unknown = e
        else:
            unknown = None
        if unknown is not None:
            # unknown whether the server stored it: keep both keyfiles (the next insert keeps the one
            # that opens with the password the server accepts) and the old wrap (a stale upload is
            # refused as a version conflict, never stored over the new password)
            raise CardError(
                f"the password change failed ({explain(unknown)}); the server may or may not have "
                f"stored it: remove the card (if remove is refused, recover it on this machine), then "
                f"insert it with the new password, or the old one if the new one is refused"
            ) from None
        memory.adopt_wrap(change.envelope)
        self.kdf = change.kdf
        self.version = result.version
        if change.keyfile is not None:
            cc.commit_pending_keyfile(self.config.home)
        return self.version

    async def _send_password_change(self, change: PasswordChange) -> OpResult:
        """``_send``: once more, identical, when the outcome is unknown (the server answers that retry "ok")."""
        return await self._send(lambda proto: ops.change_password(
            proto, self.config.serial, self._secret, self.version, change.verifier, change.kdf, change.envelope))

    # ------------------------------------------------------------ remove

    async def check_in(self, envelope: bytes) -> None:
        """
        Remove's upload 804 and set-idle 806; the channel is closed after it.
        Sent like a sync (``_send``): once more on a fresh channel when the
        live one closed (a channel the server closed while the machine slept,
        its CLOSE never arrived: what the clock check's remove after a
        suspend meets first), once more, identical, after INTERNAL (the check-in
        may be stored: its retry is "ok" and the card is idle on both sides).
        """
        result = await self._send(
            lambda proto: ops.remove(proto, self.config.serial, self._secret, self.version, envelope))
        self.version = result.version
        proto = self._proto
        if proto is not None and not proto.channel.closed:
            proto.closeChannel()

    def checkin_failed(self, error: Exception) -> str | None:
        return None  # the server still has the card in use: it stays in use here (retry, or recover later)

    def forget(self) -> None:
        self._secret = b""
        self._in_use = False
