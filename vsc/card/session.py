"""
An inserted Virtual Smart Card: insert (Figure 6), the services it offers
while in use, sync of every modification before it is acknowledged, polling
([0031]-[0033]), reconnection with the per-insert secret, and remove
(Figure 11).
"""

from __future__ import annotations

import os
from typing import Callable

from twisted.internet.defer import DeferredLock, ensureDeferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from vsc import crypto
from vsc.card import ops
from vsc.card.config import CardConfig
from vsc.card.connect import connect
from vsc.card.machine import MachineLock, MachineLockHeld, compute_muk
from vsc.card.protected import CardMemory
from vsc.protocol import auth, implauth
from vsc.net.channel import ChannelClosedError
from vsc.wire.ops import Status
from vsc.wire.protected import ItemKind, KeyAlg, decode_counter, encode_counter

SLOTS = ("9a", "9c", "9d", "9e")
MAX_DATA = 60000
LICENCE_PREFIX = "lic:"


class CardError(Exception):
    """A refusal to report to the user as one line."""


REFUSAL_TEXT = {
    Status.REFUSED: "refused: wrong password, unknown serial, locked out, or this card build is not accepted",
    Status.BUSY: "the server is busy with another operation on this card; try again",
    Status.IN_USE: "the card is in use on another machine (remove it there, or recover it from that machine)",
    Status.DESTROYED: "the card has been destroyed",
    Status.NOT_IN_USE: "the card is not in use",
    Status.MUK_MISMATCH: "recover refused: this is not the machine the card was last inserted on",
    Status.TIMEOUT: "the server timed out waiting for the answer",
    Status.VERSION_CONFLICT: "the server holds a newer version of the protected information",
    Status.INTERNAL: "the server failed; nothing was changed",
    Status.BAD_REQUEST: "the server did not understand the request",
}


def explain(e: Exception) -> str:
    if isinstance(e, ops.OperationRefused):
        text = REFUSAL_TEXT.get(e.status, e.status.name)
        if getattr(e, "notes", ()):
            text += " (this card could not answer: " + "; ".join(e.notes) + ")"
        return text
    if isinstance(e, (MachineLockHeld, CardError, ops.WeakKdfRefused)):
        return str(e)
    from vsc.net.errors import describe

    return describe(e) or " ".join(str(e).split()) or "internal error (see the card daemon's log)"


class CardSession:
    log = Logger()

    def __init__(
        self,
        config: CardConfig,
        reactor,
        master: bytes,
        rand: crypto.RandomBytes = crypto.system_random,
        muk: Callable[[], bytes] = compute_muk,
        pid: Callable[[], int] = os.getpid,
        lock: MachineLock | None = None,
        on_exit: Callable[[int, str], None] = lambda code, why: None,
        totp: Callable[[], str] | None = None,
    ):
        self.config = config
        self.totp = totp  # where TOTP codes come from, when the server asks for one
        self.kdf = None  # the KdfParams of this insert (a password change derives the old keys with them)
        self.reactor = reactor
        self.master = master
        self.rand = rand
        self._muk_fn = muk
        self._pid_fn = pid
        self.lock = lock or MachineLock()
        self.on_exit = on_exit
        self.state = "idle"
        self.memory: CardMemory | None = None
        self.version = 0
        self.muk = b""
        self.pid = 0
        self._secret = b""
        self._proto = None
        self._oplock = DeferredLock()
        self._pollers: list[LoopingCall] = []
        self._last_clock = 0.0
        self.inserted_at = 0.0

    # ------------------------------------------------------------ connection

    async def _channel(self):
        """The live channel, or a fresh one (reconnect after a drop: no password needed)."""
        if self._proto is not None and not self._proto.channel.closed:
            return self._proto
        last: Exception | None = None
        for attempt in range(max(1, self.config.reconnect_attempts)):
            try:
                self._proto = await connect(
                    self.reactor, self.config.server, self.config.server_key, self.config.channel, self.rand
                )
                if attempt or self.state == "in-use":
                    self.log.info("reconnected to the server ({suite})", suite=self._proto.info.suite.label)
                return self._proto
            except Exception as e:  # noqa: BLE001 - retried, then reported
                last = e
                from twisted.internet.task import deferLater

                await deferLater(self.reactor, min(0.2 * 2**attempt, 5.0), lambda: None)
        raise last if last else CardError("cannot connect")

    # ------------------------------------------------------------ insert

    async def insert(self, password: str) -> None:
        """Figure 6: channel 301, authentication 302, MUK 303, machine lock 304, mediation 305, download 308."""
        if self.state != "idle":
            raise CardError(f"the card is {self.state}")
        self.lock.acquire()  # 304 first: a second card process on this machine stops here
        try:
            self.muk = self._muk_fn()
            self.pid = self._pid_fn()
            self._secret = self.rand(32)
            proto = await self._channel()
            creds = self.credentials()
            result, keys = await ops.insert(proto, self.config.serial, password, self.muk, self._secret, self.master,
                                            self.rand, creds=creds)
            try:
                self.memory = CardMemory.load(self.config.serial, result.protected, keys.protection_key, self.rand)
            except crypto.CryptoError:
                raise CardError("the protected information does not decrypt with this password's key")
            self.kdf = keys.kdf
            del keys
            self._settle_keyfile(creds)
            self.version = result.version
        except BaseException:
            self.lock.release()
            raise
        self.state = "in-use"
        self.inserted_at = self.reactor.seconds()
        self.log.info("card {serial} inserted (version {version})", serial=self.config.serial, version=self.version)
        self._start_polling()

    def credentials(self) -> ops.Credentials:
        """The keyfile(s) in HOME, the pinned server key, and the TOTP source, for implementation challenges."""
        from vsc.card.config import load_keyfiles

        return ops.Credentials(keyfiles=load_keyfiles(self.config.home), server_key=self.config.server_key,
                               totp=self.totp, kdf_floor=self.config.settings.get("kdf_floor", ""))

    def _settle_keyfile(self, creds: ops.Credentials) -> None:
        """After an interrupted password change, keep the keyfile that opened with the password the server accepted."""
        from vsc.card import config as cc

        pending = cc.keyfile_path(self.config.home, pending=True)
        if creds.keyfile_used is None or not pending.exists():
            return
        if creds.keyfiles[creds.keyfile_used] == pending.read_bytes():
            cc.commit_pending_keyfile(self.config.home)
            self.log.info("finished an interrupted password change: the re-sealed keyfile is now the keyfile")
        else:
            cc.discard_pending_keyfile(self.config.home)
            self.log.info("discarded the keyfile of a password change the server never stored")

    # ------------------------------------------------------------ services

    def _require_in_use(self) -> CardMemory:
        if self.state != "in-use" or self.memory is None:
            raise CardError("the card is not inserted")
        return self.memory

    def status(self) -> dict:
        slots = {}
        counters = []
        data = []
        if self.memory is not None and not self.memory.wiped:
            for kind, name, alg, public in self.memory.items():
                if kind is ItemKind.KEY:
                    slots[name] = {"algorithm": alg.name.lower(), "public_key_sha256": crypto.sha256(public).hex()}
                elif kind is ItemKind.COUNTER:
                    counters.append(name)
                elif kind is ItemKind.DATA:
                    data.append(name)
        return {
            "state": self.state,
            "serial": self.config.serial,
            "server": self.config.server,
            "version": self.version,
            "slots": slots,
            "counters": sorted(counters),
            "data": sorted(data),
            "memory_locked": bool(self.memory and self.memory.locked),
            "suite": self._proto.info.suite.label if self._proto is not None and self._proto.info else None,
            "inserted_at": self.inserted_at or None,
        }

    def public_key(self, slot: str) -> bytes:
        mem = self._require_in_use()
        for kind, name, alg, public in mem.items():
            if kind is ItemKind.KEY and name == slot:
                return crypto.public_pem(public)
        raise CardError(f"no key in slot {slot}")

    async def _locked(self, fn):
        await self._oplock.acquire()
        try:
            return await fn()
        finally:
            self._oplock.release()

    async def sign_digest(self, slot: str, digest: bytes) -> bytes:
        """
        Sign a SHA-256 digest (PKCS#1 v1.5 or ECDSA): the signature
        ``openssl dgst -sha256 -sign`` gives over the data it came from.
        """

        async def run():
            mem = self._require_in_use()
            if not mem.has(ItemKind.KEY, slot):
                raise CardError(f"no key in slot {slot}")
            with mem.open(ItemKind.KEY, slot) as der, crypto.PrivateKeyHandle(der) as key:
                try:
                    return key.sign_digest(digest)
                except crypto.CryptoError as e:
                    raise CardError(str(e)) from None

        return await self._locked(run)

    async def decrypt(self, slot: str, ciphertext: bytes, padding: str = "pkcs1") -> bytes:
        async def run():
            mem = self._require_in_use()
            if not mem.has(ItemKind.KEY, slot):
                raise CardError(f"no key in slot {slot}")
            with mem.open(ItemKind.KEY, slot) as der, crypto.PrivateKeyHandle(der) as key:
                try:
                    return key.decrypt(ciphertext, padding)
                except crypto.CryptoError as e:
                    raise CardError(f"decryption failed: {e}") from None

        return await self._locked(run)

    async def with_key(self, slot: str, fn):
        """Run ``fn(PrivateKeyHandle)`` on one slot's key (PIV, ssh-agent)."""

        async def run():
            mem = self._require_in_use()
            if not mem.has(ItemKind.KEY, slot):
                raise CardError(f"no key in slot {slot}")
            with mem.open(ItemKind.KEY, slot) as der, crypto.PrivateKeyHandle(der) as key:
                return fn(key)

        return await self._locked(run)

    async def counter(self, name: str, delta: int = 0) -> int:
        """Read, or step and sync, a counter. Refuses to go below zero (rental counters)."""

        async def run():
            mem = self._require_in_use()
            exists = mem.has(ItemKind.COUNTER, name)
            value = 0
            if exists:
                with mem.open(ItemKind.COUNTER, name) as v:
                    value = decode_counter(v)
            if delta == 0:
                if not exists:
                    raise CardError(f"no counter {name!r}")
                return value
            if delta > 0 and name.startswith(LICENCE_PREFIX):
                raise CardError(f"licence counters are funded by keyfiles only; {name!r} cannot be increased")
            new = value + delta
            if new < 0:
                raise CardError(f"counter {name!r} is {value}; it cannot go below zero")
            await self._modify(ItemKind.COUNTER, name, encode_counter(new))
            return new

        return await self._locked(run)

    async def fund_counter(self, keyfile_text: str, vendor_pem: bytes) -> tuple[str, int]:
        """
        A rental keyfile funds its counter once: the card checks the vendor's
        signature and that the keyfile names one of its own keys, and creates
        the counter (name and units from the signed keyfile) if it is absent.
        Never topped up. Returns (counter name, current value).
        """
        from vsc.protocol import licence

        async def run():
            mem = self._require_in_use()
            own = {name: public for kind, name, alg, public in mem.items() if kind is ItemKind.KEY}
            try:
                name, amount = licence.fund_request(keyfile_text, vendor_pem, own)
            except licence.LicenseError as e:
                raise CardError(str(e)) from None
            if mem.has(ItemKind.COUNTER, name):
                with mem.open(ItemKind.COUNTER, name) as v:
                    return name, decode_counter(v)
            await self._modify(ItemKind.COUNTER, name, encode_counter(amount))
            return name, amount

        return await self._locked(run)

    async def data_put(self, name: str, value: bytes) -> None:
        if len(value) > MAX_DATA:
            raise CardError(f"a data object holds at most {MAX_DATA} bytes")

        async def run():
            await self._modify(ItemKind.DATA, name, value)

        await self._locked(run)

    async def data_get(self, name: str) -> bytes:
        async def run():
            mem = self._require_in_use()
            if not mem.has(ItemKind.DATA, name):
                raise CardError(f"no data object {name!r}")
            with mem.open(ItemKind.DATA, name) as v:
                return bytes(v)

        return await self._locked(run)

    async def put_item(self, kind: ItemKind, name: str, value, alg: KeyAlg = KeyAlg.NONE, public: bytes = b"") -> None:
        """Any modification (keys, PIN state): synced before it is acknowledged."""

        async def run():
            await self._modify(kind, name, value, alg, public)

        await self._locked(run)

    async def _modify(self, kind: ItemKind, name: str, value, alg: KeyAlg = KeyAlg.NONE, public: bytes = b"") -> None:
        """Change one item, sync it, and only then acknowledge; on failure the change is undone."""
        mem = self._require_in_use()
        old = mem.put(kind, name, value, alg, public)
        try:
            await self._sync()
        except BaseException:
            mem.revert(kind, name, old)
            raise
        mem.discard(old)

    async def _sync(self) -> None:
        assert self.memory is not None
        envelope = self.memory.export()
        last: Exception | None = None
        await self._store(envelope)

    async def _store(self, envelope: bytes) -> None:
        """Where a modification goes before it is acknowledged: the VSC Server (a dongle overrides this)."""
        last: Exception | None = None
        for _ in range(2):  # once on the live channel, once more on a fresh one
            try:
                proto = await self._channel()
                result = await ops.sync(proto, self.config.serial, self._secret, self.version, envelope)
                self.version = result.version
                return
            except ChannelClosedError as e:
                last = e
                self._proto = None
            except ops.OperationRefused as e:
                raise CardError(f"sync refused: {explain(e)}") from None
        raise CardError(f"could not store the change on the server: {explain(last)}")

    # ------------------------------------------------------------ password change

    async def change_password(self, old: str, new: str) -> int:
        """
        Change the owner's password while in use: check the old one by
        unwrapping the data key, derive new keys with a fresh salt, re-wrap
        only the data key (the items are untouched), re-seal the keyfile, and
        have the server store the new verifier, KDF parameters and protected
        information atomically (Op.PASSWORD). Neither password leaves this
        process. Returns the new version.
        """
        from vsc.card import config as cc
        from vsc.card.protected import rewrap
        from vsc.wire.ops import KdfAlg

        if not new:
            raise CardError("the new password is empty")

        async def run():
            mem = self._require_in_use()
            if self.kdf is None:
                raise CardError("a password change is not available for this card")
            old_keys = ops.derive_keys(old, self.kdf)
            legacy = self.kdf.alg is KdfAlg.LEGACY_MD5
            new_kdf = ops.new_kdf(self.rand, legacy=legacy, log2_n=self.kdf.log2_n if not legacy else 15)
            new_keys = ops.derive_keys(new, new_kdf)
            try:
                envelope = rewrap(self.config.serial, mem.export(), old_keys.protection_key, new_keys.protection_key,
                                  self.rand)
            except crypto.CryptoError:
                raise CardError("the current password is wrong") from None
            resealed = False
            keyfiles = cc.load_keyfiles(self.config.home)
            if keyfiles:
                try:
                    sealed = implauth.reseal_keyfile(keyfiles[0], self.config.serial, old_keys.protection_key,
                                                     new_keys.protection_key, self.rand)
                except implauth.KeyfileError as e:
                    raise CardError(f"cannot re-seal the keyfile for the new password: {e}") from None
                cc.save_keyfile(self.config.home, sealed, pending=True)
                resealed = True
            verifier = auth.verifier_for(new_keys.auth_key, new_kdf.alg)
            del old_keys, new_keys
            try:
                result = await self._send_password_change(verifier, new_kdf, envelope)
            except ops.OperationRefused as e:
                # refused: nothing changed on the server; the old password stays
                if resealed:
                    cc.discard_pending_keyfile(self.config.home)
                raise CardError(f"password change refused: {explain(e)}") from None
            except Exception as e:  # noqa: BLE001 - the connection failed: reported as one line
                # unknown whether the server stored it: keep both keyfiles (the next insert keeps the one
                # that opens with the password the server accepts) and the old wrap (a stale upload is
                # refused as a version conflict, never stored over the new password)
                raise CardError(
                    f"the connection failed during the password change ({explain(e)}); it may or may not have "
                    f"been stored: remove the card (if remove is refused, recover it on this machine), then "
                    f"insert it with the new password, or the old one if the new one is refused"
                ) from None
            mem.adopt_wrap(envelope)
            self.kdf = new_kdf
            self.version = result.version
            if resealed:
                cc.commit_pending_keyfile(self.config.home)
            self.log.info("password of card {serial} changed (version {version})", serial=self.config.serial,
                          version=self.version)
            return self.version

        return await self._locked(run)

    async def _send_password_change(self, verifier: bytes, kdf, envelope: bytes):
        """Once on the live channel, once more on a fresh one (the server answers the identical retry "ok")."""
        for attempt in range(2):
            try:
                proto = await self._channel()
                return await ops.change_password(proto, self.config.serial, self._secret, self.version, verifier, kdf,
                                                 envelope)
            except ChannelClosedError:
                self._proto = None
                if attempt:
                    raise

    # ------------------------------------------------------------ remove

    async def remove(self, reason: str = "requested") -> None:
        """Figure 11: disable 801, encrypt and upload 803-804, release the lock 805, set idle 806."""
        if self.state != "in-use":
            raise CardError(f"the card is {self.state}")
        self.state = "removing"  # 801: refuse every other service from now on
        self._stop_polling()

        async def run():
            assert self.memory is not None
            await self._checkin(self.memory.export())

        try:
            await self._oplock.run(lambda: ensureDeferred(run()))
        except Exception:
            self.state = "in-use"
            raise
        self._wipe()
        self.state = "idle"
        self.log.info("card {serial} removed ({reason})", serial=self.config.serial, reason=reason)
        if self._proto is not None and not self._proto.channel.closed:
            self._proto.closeChannel()

    async def _checkin(self, envelope: bytes) -> None:
        """Remove's upload 804 and set-idle 806 (a dongle overrides this)."""
        proto = await self._channel()
        result = await ops.remove(proto, self.config.serial, self._secret, self.version, envelope)
        self.version = result.version

    def _wipe(self) -> None:
        if self.memory is not None:
            self.memory.wipe()
            self.memory = None
        self._secret = b""
        self.lock.release()

    def abort(self, why: str) -> None:
        """Exit without remove (MUK or process id changed): wipe and leave the card in use."""
        self.log.error("card exits: {why}", why=why)
        self._stop_polling()
        self._wipe()
        self.state = "exited"
        self.on_exit(3, why)

    # ------------------------------------------------------------ polling [0031]-[0033]

    def _start_polling(self) -> None:
        self._last_clock = self.reactor.seconds()
        for interval, fn in ((self.config.muk_poll, self.poll_machine), (self.config.clock_poll, self.poll_clock)):
            if interval and interval > 0:
                lc = LoopingCall(fn)
                lc.clock = self.reactor
                lc.start(interval, now=False)
                self._pollers.append(lc)

    def _stop_polling(self) -> None:
        for lc in self._pollers:
            if lc.running:
                lc.stop()
        self._pollers = []

    def poll_machine(self) -> None:
        """MUK changed → exit ([0031]); process id changed → exit ([0032])."""
        if self.state != "in-use":
            return
        if self._pid_fn() != self.pid:
            self.abort("the process id changed (the card was copied to another process)")
        elif self._muk_fn() != self.muk:
            self.abort("the machine unique key changed (the card was moved to another machine)")

    def poll_clock(self) -> None:
        """The time of day must advance about as expected; otherwise remove ([0033])."""
        if self.state != "in-use":
            return
        now = self.reactor.seconds()
        elapsed = now - self._last_clock
        self._last_clock = now
        if elapsed > self.config.clock_tolerance or elapsed < 0:
            self.log.warn("clock check failed: {elapsed:.0f} s between polls; removing the card", elapsed=elapsed)
            d = ensureDeferred(self.remove("clock check failed"))
            d.addErrback(lambda f: self.log.failure("remove after the clock check failed", f))
            d.addBoth(lambda _: self.on_exit(4, "clock check failed: the card was removed"))
