"""
An inserted Virtual Smart Card: its life cycle (vsc.protocol.card_lifecycle:
insert, in use, remove, exit), the services it offers while in use, every
modification stored before it is acknowledged, and the checks of
[0031]-[0033] while in use. Where the protected information lives — a VSC
Server (vsc.card.storage.ServerStorage) or a token (vsc.dongle.storage) — is
a ``CardStorage`` strategy the session is given; it runs either the same way.

One responsibility (and so one module despite its length): the inserted card's session.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Callable

from twisted.internet.defer import Deferred, DeferredLock, ensureDeferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from vsc import crypto
from vsc.card import ops
from vsc.card.config import applications_of
from vsc.card.machine import MachineKey, MachineKeyError, MachineLock, MachineLockHeld
from vsc.card.memory import LockedBuffer
from vsc.card.freshness import FreshnessStore, RollbackError
from vsc.card.protected import CardMemory
from vsc.net.channel import ChannelClosedError
from vsc.protocol.card_lifecycle import CardError, CardLifecycle, LifeState
from vsc.wire.ops import Status
from vsc.wire.pinpolicy import SLOT_REFS
from vsc.wire.protected import ItemKind, KeyAlg, decode_counter, encode_counter

if TYPE_CHECKING:
    from vsc.card.config import CardConfig
    from vsc.card.storage import CardStorage

__all__ = ["CardError", "CardSession", "LifeState", "explain"]

#: every PIV key slot by name: 9a, 9c, 9d, 9e and the retired 82..95 (vsc.wire.pinpolicy.KEY_SLOTS)
SLOTS = tuple(SLOT_REFS)
MAX_DATA = 60000
LICENCE_PREFIX = "lic:"

#: exit codes of the card process (on_exit): moved to another machine or process, clock check, storage check,
#: stopped (SIGTERM) but its remove failed (the card is still in use on the server)
EXIT_MOVED = 3
EXIT_CLOCK = 4
EXIT_STORAGE = 5
EXIT_REMOVE_FAILED = 6


REFUSAL_TEXT = {
    Status.REFUSED: "refused: wrong password, unknown serial, locked out, or this card build is not accepted",
    Status.BUSY: "the server is busy with another operation on this card; try again",
    Status.IN_USE: "the card is in use on another machine (remove it there, or recover it from that machine)",
    Status.DESTROYED: "the card has been destroyed",
    Status.NOT_IN_USE: "the card is not in use",
    Status.MUK_MISMATCH: "recover refused: this is not the machine the card was last inserted on",
    Status.TIMEOUT: "the server timed out waiting for the answer",
    Status.VERSION_CONFLICT: "the server holds a newer version of the protected information",
    Status.INTERNAL: "the server failed (see its log)",
    Status.STORAGE_FULL: "the server cannot store changes right now (its storage is full); nothing was changed",
    Status.BAD_REQUEST: "the server did not understand the request",
}


def explain(e: Exception) -> str:
    if isinstance(e, ops.OperationRefused):
        text = REFUSAL_TEXT.get(e.status, e.status.name)
        if getattr(e, "notes", ()):
            text += " (this card could not answer: " + "; ".join(e.notes) + ")"
        return text
    if isinstance(e, (MachineLockHeld, MachineKeyError, CardError, ops.WeakKdfRefused)):
        return str(e)
    from vsc.net.errors import describe

    return describe(e) or " ".join(str(e).split()) or "internal error (see the card daemon's log)"


def parse_key_cache(text: str) -> frozenset[str]:
    """The slots of card.ini's ``key_cache`` setting (comma or space separated, e.g. ``9a, 9c``); empty: none."""
    return frozenset(word.strip().lower() for word in text.replace(",", " ").split() if word.strip())


class CardSession:
    """
    One card in this process. Every service asks the life cycle first
    (``require_usable``); every modification goes to the storage before it is
    acknowledged; a modification, a remove and a password change run one at a
    time (the operation lock).
    """

    log = Logger()

    def __init__(
        self,
        config: CardConfig,
        reactor,
        storage: CardStorage,
        rand: crypto.RandomBytes = crypto.system_random,
        muk: Callable[[], bytes] | None = None,
        pid: Callable[[], int] = os.getpid,
        lock: MachineLock | None = None,
        on_exit: Callable[[int, str], None] = lambda code, why: None,
    ):
        self.config = config
        self.reactor = reactor
        self.storage = storage
        self.rand = rand
        self._muk_fn = muk if muk is not None else MachineKey(config.home)  # this machine, this user only
        self._pid_fn = pid
        self.lock = lock or MachineLock()
        self.on_exit = on_exit
        self._life = CardLifecycle()
        #: the highest generation a storage acknowledged, kept in HOME (vsc.card.freshness)
        self.freshness = FreshnessStore(config.home)
        self.muk = b""
        self.pid = 0
        self._oplock = DeferredLock()
        self._pollers: list[LoopingCall] = []
        self._removal: list[Deferred] | None = None  # who waits for the remove under way (``removal``)
        self._last_clock = 0.0
        self.inserted_at = 0.0
        #: the key-cache policy (card.ini ``key_cache = 9a, 9c``; off by default): see ``with_key``
        self.key_cache_slots = parse_key_cache((getattr(config, "settings", None) or {}).get("key_cache", ""))
        self._key_cache: dict[str, tuple[LockedBuffer, crypto.PrivateKeyHandle]] = {}

    # ------------------------------------------------------------ the life cycle: what every service asks

    @property
    def life(self) -> LifeState:
        """Where the card is in its life cycle."""
        return self._life.state

    @property
    def usable(self) -> bool:
        """In use, with its memory present and not wiped."""
        return self._life.usable

    def require_usable(self) -> CardMemory:
        """The card's memory, or the one CardError line every service (PIV, ssh-agent, local API, ...) refuses with."""
        return self._life.require_usable()  # type: ignore[return-value]

    @property
    def memory(self) -> CardMemory | None:
        """The memory while the card holds it (in use, and while removing); None otherwise."""
        return self._life.memory  # type: ignore[return-value]

    @property
    def version(self) -> int:
        """The version of the protected information last stored."""
        return self.storage.version

    # ------------------------------------------------------------ insert

    async def insert(self, password: str) -> None:
        """Figure 6: the machine lock 304 first, then the storage opens the card (for a server: 301-303, 305, 308)."""
        self._life.insert()
        try:
            self.lock.acquire()  # 304 first: a second card process on this machine stops here
        except BaseException:
            self._life.insert_failed()
            raise
        try:
            self.muk = self._muk_fn()
            self.pid = self._pid_fn()
            memory = await self.storage.open(password, self.muk)
            try:
                _record, lowered = self.freshness.check(memory, getattr(self.storage, "source", "the server"))
            except RollbackError as e:
                memory.wipe()
                try:  # idle again on the server, as it was: the next insert needs no recover
                    await self.storage.hand_back()
                except Exception as why:  # noqa: BLE001 - the refusal stands; recover frees the card
                    self.log.warn("could not give the refused copy back ({why}); recover the card from this machine",
                                  why=explain(why))
                raise CardError(str(e)) from None
        except BaseException:
            self.lock.release()
            self._life.insert_failed()
            raise
        if lowered:
            self.log.warn("an older copy was accepted as the owner asked; kept as last stored: {names}",
                          names=", ".join(lowered))
        self._life.inserted(memory)
        self.inserted_at = self.reactor.seconds()
        self.log.info("card {serial} inserted (version {version})", serial=self.config.serial, version=self.version)
        self._start_polling()

    # ------------------------------------------------------------ services

    def status(self) -> dict:
        """What ``vsc card status`` shows: answered in every state."""
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
        status = {
            "state": self.life.value,
            "serial": self.config.serial,
            "version": self.version,
            "slots": slots,
            "counters": sorted(counters),
            "data": sorted(data),
            "memory_locked": bool(self.memory and self.memory.locked),
            "inserted_at": self.inserted_at or None,
            "applications": list(applications_of(self.config)),
        }
        status.update(self.storage.status())  # server and suite; a token card: mode and token
        return status

    def public_key(self, slot: str) -> bytes:
        mem = self.require_usable()
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
        Sign a SHA-256 digest (PKCS#1 v1.5 or ECDSA, P-256 or P-384): the
        signature ``openssl dgst -sha256 -sign`` gives over the data it came
        from; a 48-byte digest is SHA-384 (``openssl dgst -sha384 -sign``).
        """

        _not_openpgp(slot)
        return await self.with_key(slot, _signer(digest))

    def sign_digest_now(self, slot: str, digest: bytes) -> bytes:
        """``sign_digest`` at once, when no other operation holds the card (``busy`` is False)."""
        _not_openpgp(slot)
        return self.with_key_now(slot, _signer(digest))

    async def decrypt(self, slot: str, ciphertext: bytes, padding: str = "pkcs1") -> bytes:
        _not_openpgp(slot)

        def decrypt(key: crypto.PrivateKeyHandle) -> bytes:
            try:
                return key.decrypt(ciphertext, padding)
            except crypto.CryptoError as e:
                raise CardError(f"decryption failed: {e}") from None

        return await self.with_key(slot, decrypt)

    async def with_key(self, slot: str, fn):
        """
        Run ``fn(PrivateKeyHandle)`` on one slot's key (the local API, PIV,
        ssh-agent). By default the key is decrypted for this one operation
        (into locked memory, zeroed right after) and loaded into OpenSSL for
        it alone: the patent's decrypt-on-use ([0027]-[0030]).

        The key-cache policy (card.ini ``key_cache = 9a`` — a list of slots,
        empty by default) keeps those slots' keys decrypted in their own
        locked buffer and loaded in OpenSSL from their first use until the
        key changes or the card is removed: each operation then skips the
        decryption, the key parse and OpenSSL's per-key set-up (about half
        of an RSA-2048 signature's time). The price is that the key is in
        the clear, in locked memory and in OpenSSL's heap, for as long as
        the card is in use — where a memory read of the card process finds it
        (docs/security.md).
        """

        async def run():
            return self._use_key(slot, fn)

        return await self._locked(run)

    @property
    def busy(self) -> bool:
        """Another operation holds the card (its one-at-a-time lock): ``with_key_now`` must wait its turn."""
        return self._oplock.locked

    def with_key_now(self, slot: str, fn):
        """
        ``with_key`` run at once, in this reactor turn, when no other
        operation holds the card (the caller checks ``busy``; the local
        API's hot path, vsc.card.control): the same lock held around the
        same work, without the coroutine and Deferreds that waiting needs.
        """
        if self._oplock.locked:
            raise RuntimeError("with_key_now while another operation holds the card")
        self._oplock.locked = True  # DeferredLock.acquire() when free, without its Deferred
        try:
            return self._use_key(slot, fn)
        finally:
            self._oplock.release()

    def _use_key(self, slot: str, fn):
        mem = self.require_usable()
        if not mem.has(ItemKind.KEY, slot):
            raise CardError(f"no key in slot {slot}")
        if slot in self.key_cache_slots:
            cached = self._key_cache.get(slot)
            if cached is None:
                with mem.open(ItemKind.KEY, slot) as der:
                    buf = LockedBuffer(len(der))
                    buf.view[:] = der
                cached = self._key_cache[slot] = (buf, crypto.PrivateKeyHandle(buf.view))
            return fn(cached[1])
        with mem.open(ItemKind.KEY, slot) as der, crypto.PrivateKeyHandle(der) as key:
            return fn(key)

    def _forget_keys(self, slot: str | None = None) -> None:
        """Drop the cached key of ``slot`` (all slots: None): OpenSSL's copy freed, the locked buffer zeroed."""
        for name in [slot] if slot is not None else list(self._key_cache):
            cached = self._key_cache.pop(name, None)
            if cached is not None:
                buf, handle = cached
                handle.__exit__(None, None, None)
                buf.free()

    async def counter(self, name: str, delta: int = 0) -> int:
        """Read, or step and sync, a counter. Refuses to go below zero (rental counters)."""
        _not_openpgp(name)

        async def run():
            mem = self.require_usable()
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
        the counter (name and units from the signed keyfile) if it is absent,
        recording the vendor's key on it. Never topped up. A counter recorded
        with another vendor key is refused (its name's 48-bit vendor tag alone
        could be ground to collide). Returns (counter name, current value).
        """
        from vsc.protocol import licence

        async def run():
            mem = self.require_usable()
            own = {name: public for kind, name, alg, public in mem.items() if kind is ItemKind.KEY}
            try:
                name, amount = licence.fund_request(keyfile_text, vendor_pem, own)
                vendor = licence.vendor_binding(vendor_pem)
            except licence.LicenseError as e:
                raise CardError(str(e)) from None
            recorded = mem.public_of(ItemKind.COUNTER, name)
            if recorded is not None:
                # b"": funded before counters recorded their vendor key
                if recorded and recorded != vendor:
                    raise CardError(f"counter {name!r} was funded by another vendor key; not used")
                with mem.open(ItemKind.COUNTER, name) as v:
                    return name, decode_counter(v)
            if not amount:
                raise CardError(f"no counter {name!r}")
            await self._modify(ItemKind.COUNTER, name, encode_counter(amount), public=vendor)
            return name, amount

        return await self._locked(run)

    async def data_put(self, name: str, value) -> None:
        """Store a data object; ``value`` may be any buffer (the control socket passes a locked one)."""
        if len(value) > MAX_DATA:
            raise CardError(f"a data object holds at most {MAX_DATA} bytes")

        async def run():
            _not_openpgp(name)
            await self._modify(ItemKind.DATA, name, value)

        await self._locked(run)

    async def data_get(self, name: str, into=None):
        """
        A data object's value as bytes, or, with ``into``, what ``into(view)``
        returns for its value opened in locked memory (zeroed right after):
        the control socket builds its answer there without a bytes copy.
        """

        async def run():
            _not_openpgp(name)
            mem = self.require_usable()
            if not mem.has(ItemKind.DATA, name):
                raise CardError(f"no data object {name!r}")
            with mem.open(ItemKind.DATA, name) as v:
                return bytes(v) if into is None else into(v)

        return await self._locked(run)

    async def put_item(self, kind: ItemKind, name: str, value, alg: KeyAlg = KeyAlg.NONE, public: bytes = b"") -> None:
        """Any modification (keys, PIN state): synced before it is acknowledged."""

        async def run():
            await self._modify(kind, name, value, alg, public)

        await self._locked(run)

    async def clear_items(self, prefix: str) -> int:
        """
        Remove every item whose name starts with ``prefix`` (the OpenPGP application's factory reset: "pgp-"),
        synced before it is acknowledged (undone if the sync fails); the number removed.
        """
        if not prefix:
            raise CardError("no prefix: refusing to clear every item")

        async def run():
            mem = self.require_usable()
            gone = mem.remove_prefix(prefix)
            if not gone:
                return 0
            try:
                await self.storage.store(mem.export())
            except BaseException:
                mem.restore(gone)
                raise
            mem.discard_removed(gone)
            for name in [n for n in self._key_cache if n.startswith(prefix)]:
                self._forget_keys(name)  # a cached key (key_cache) of a removed slot goes with it
            self._stored(mem)
            return len(gone)

        return await self._locked(run)

    async def _modify(self, kind: ItemKind, name: str, value, alg: KeyAlg = KeyAlg.NONE, public: bytes = b"") -> None:
        """Change one item, sync it, and only then acknowledge; on failure the change is undone."""
        mem = self.require_usable()
        if kind is ItemKind.KEY:
            self._forget_keys(name)  # a new key for the slot: the cached one (if any) is gone
        old = mem.put(kind, name, value, alg, public)
        try:
            await self.storage.store(mem.export())
        except BaseException:
            mem.revert(kind, name, old)
            raise
        mem.discard(old)
        self._stored(mem)

    def _stored(self, mem: CardMemory) -> None:
        """The storage acknowledged the last export: remember its generation (and the floors) in HOME."""
        mem.acknowledge()
        try:
            self.freshness.save(mem)
        except (OSError, RollbackError) as e:  # the change is stored; only this machine's rollback check is weaker
            self.log.warn("cannot record the stored generation in {path}: {why}", path=str(self.freshness.path),
                          why=getattr(e, "strerror", None) or str(e))

    # ------------------------------------------------------------ password change

    async def change_password(self, old: str, new: str) -> int:
        """
        Change the owner's password while in use (a server card: see
        ServerStorage.change_password; a token card says it does not apply).
        Neither password leaves this process. Returns the new version.
        """
        if not new:
            raise CardError("the new password is empty")

        async def run():
            mem = self.require_usable()
            version = await self.storage.change_password(mem, old, new)
            self._stored(mem)
            self.log.info("password of card {serial} changed (version {version})", serial=self.config.serial,
                          version=version)
            return version

        return await self._locked(run)

    # ------------------------------------------------------------ remove

    async def remove(self, reason: str = "requested") -> None:
        """
        Figure 11: disable 801, encrypt and check in 803-804, release the lock
        805, set idle 806. A failed check-in leaves the card in use — unless
        the storage says the card is safe without it (a token: every change is
        already on it): then the card is wiped and idle anyway, the refusal
        says so, and the process exits (code 5) once it has been answered.
        """
        self._life.remove()  # 801: every other service is refused from now on
        self._removal = []
        try:
            await self._remove(reason)
        finally:
            waiting, self._removal = self._removal, None
            for d in waiting:
                d.callback(None)

    def removal(self) -> Deferred:
        """Fires once the remove under way (if any) has ended, however it ended; at once when none is."""
        if self._removal is None:
            return succeed(None)
        d: Deferred = Deferred()
        self._removal.append(d)
        return d

    async def _remove(self, reason: str) -> None:
        self._stop_polling()

        async def run():
            mem = self._life.memory
            await self.storage.check_in(mem.export())
            self._stored(mem)

        try:
            await self._oplock.run(lambda: ensureDeferred(run()))
        except Exception as e:
            why = self.storage.checkin_failed(e)
            if why is None:
                self._life.remove_failed()
                self._start_polling()
                raise
            self.log.warn("{why}", why=why)
            self._wipe()
            self._life.removed()
            self.reactor.callLater(0, self.on_exit, EXIT_STORAGE, why)  # after the refusal has been answered
            raise CardError(why) from None
        self._wipe()
        self._life.removed()
        self.log.info("card {serial} removed ({reason})", serial=self.config.serial, reason=reason)

    def _wipe(self) -> None:
        self._forget_keys()
        memory = self._life.memory
        if memory is not None:
            memory.wipe()
        self.storage.forget()
        self.lock.release()

    def abort(self, why: str, code: int | None = EXIT_MOVED) -> None:
        """Exit without remove: stop the checks, wipe, exited; ``on_exit(code, why)`` unless code is None."""
        self.log.error("card exits: {why}", why=why)
        self._stop_polling()
        self._wipe()
        self._life.abort()
        if code is not None:
            self.on_exit(code, why)

    # ------------------------------------------------------------ checks while in use [0031]-[0033], [0106]

    def _start_polling(self) -> None:
        self._last_clock = self.reactor.seconds()
        checks = [(self.config.muk_poll, self.poll_machine), (self.config.clock_poll, self.poll_clock)]
        checks += [(c.interval, lambda c=c: self.poll_storage(c.run)) for c in self.storage.checks()]
        for interval, fn in checks:
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
        if self.life is not LifeState.IN_USE:
            return
        if self._pid_fn() != self.pid:
            self.abort("the process id changed (the card was copied to another process)")
        elif self._muk_fn() != self.muk:
            self.abort("the machine unique key changed (the card was moved to another machine)")

    def poll_clock(self) -> None:
        """The time of day must advance about as expected; otherwise remove ([0033])."""
        if self.life is not LifeState.IN_USE:
            return
        now = self.reactor.seconds()
        elapsed = now - self._last_clock
        self._last_clock = now
        if elapsed > self.config.clock_tolerance or elapsed < 0:
            self.log.warn("clock check failed: {elapsed:.0f} s between polls; removing the card", elapsed=elapsed)
            d = ensureDeferred(self.remove("clock check failed"))
            d.addCallbacks(lambda _: self.on_exit(EXIT_CLOCK, "clock check failed: the card was removed"),
                           self._clock_remove_failed)

    def _clock_remove_failed(self, failure) -> None:
        """The clock check's remove failed: one true line (the card is still in use on the server), no traceback."""
        why = explain(failure.value) if isinstance(failure.value, Exception) else "internal error"
        self.log.warn("remove after the clock check failed: {why}", why=why)
        if self.life is not LifeState.IN_USE:  # removed anyway (a token: every change was already on it)
            self.on_exit(EXIT_CLOCK, "clock check failed: the card was removed")
            return
        self.on_exit(EXIT_CLOCK, f"clock check failed, and its remove failed ({why}): the card is still in use on "
                                 f"the server (remove it again, or recover it from this machine)")

    def poll_storage(self, check):
        """
        The storage's own check (a token: Figure 14 again, [0106]). It fails
        closed: anything but a passed check wipes the card and exits (code 5);
        a check that ends after the card left use does nothing more.
        """
        if self.life is not LifeState.IN_USE:
            return None

        async def run():
            try:
                await check()
            except Exception as e:  # noqa: BLE001 - fail closed
                if self.life is not LifeState.IN_USE:
                    return
                why = str(e) if isinstance(e, CardError) else f"the storage check failed: {e.__class__.__name__}"
                self.abort(f"{why}; the card was removed", code=EXIT_STORAGE)

        return ensureDeferred(run())


OPENPGP_KEY_PREFIX = "pgp-"


def _signer(digest: bytes):
    """The operation ``sign_digest`` runs on a key: its signature, a crypto failure as one CardError line."""

    def sign(key: crypto.PrivateKeyHandle) -> bytes:
        try:
            return key.sign_digest(digest)
        except crypto.CryptoError as e:
            raise CardError(str(e)) from None

    return sign


def _not_openpgp(name: str) -> None:
    """
    The OpenPGP application's items serve only through it, under its own rules (PW1 for its keys, PW3 for its
    data objects, the signature counter): the local API neither uses its keys nor reads or writes its items.
    """
    if name.startswith(OPENPGP_KEY_PREFIX):
        raise CardError(f"{name} belongs to the OpenPGP application: use it through GnuPG")
