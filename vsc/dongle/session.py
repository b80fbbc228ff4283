"""
A card inserted from a dongle (claim 10, [0104]-[0110]). Insert: the token
answers a random entry of the challenge table (Figure 14), then the
protected information is read from the token and decrypted with the
owner's password key into locked memory under a fresh temporary key. In use
is recorded nowhere but in this process. Every modification is written to
the token before it is acknowledged; the check repeats every
``dongle_poll`` seconds and a failed check or a missing token removes the
card (state idle, [0106]). Remove writes the protected information back and
erases everything.
"""

from __future__ import annotations

from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThread

from vsc import crypto
from vsc.card import ops
from vsc.card.protected import CardMemory, rewrap
from vsc.card.session import CardError, CardSession
from vsc.dongle.token import KDF_LABEL, PROTECTED_LABEL, Token, TokenError, TokenRef
from vsc.wire.dongle import ChallengeTable
from vsc.wire.ops import KdfParams


def token_check(ref: TokenRef, table: ChallengeTable, pick: int) -> bool:
    """Figure 14, 1206-1209: one random table entry, answered by the token, compared."""
    challenge, expected = table.entries[pick % len(table.entries)]
    with Token(ref) as tok:
        answer = tok.respond(challenge)
    return crypto.constant_time_equal(answer, expected)


def read_card(ref: TokenRef) -> tuple[bytes, bytes]:
    with Token(ref) as tok:
        envelope = tok.read(PROTECTED_LABEL)
        kdf = tok.read(KDF_LABEL)
    if envelope is None or kdf is None:
        raise TokenError("the token holds no card (provision and enrol it first)")
    return envelope, kdf


def bound_key(ref: TokenRef, protection_key: bytes, kdf: KdfParams) -> bytes:
    """
    The key the token's copy of the card is wrapped under: the owner's
    protection key mixed with the token's answer (DongleKey) to a challenge
    fixed by the card's salt. Without the token — a copied table, copied data
    objects and the password are not enough — the card does not open.
    """
    challenge = crypto.sha256(b"vsc1 dongle bind" + kdf.salt)[:16]
    with Token(ref) as tok:
        answer = tok.respond(challenge)
    return crypto.hkdf_extract_expand(b"vsc1 dongle bind", protection_key + answer, b"vsc1 dongle wrap", 32)


def write_card(ref: TokenRef, envelope: bytes) -> None:
    with Token(ref, rw=True) as tok:
        tok.write(PROTECTED_LABEL, envelope)


class DongleSession(CardSession):
    def __init__(self, config, reactor, token: TokenRef, table: ChallengeTable, poll: float, **kw):
        super().__init__(config, reactor, master=b"", **kw)
        self.token = token
        self.table = table
        self.dongle_poll = poll
        self._dongle_loop: LoopingCall | None = None

    def _pick(self) -> int:
        return int.from_bytes(self.rand(4), "big")

    async def _check(self) -> None:
        try:
            ok = await deferToThread(token_check, self.token, self.table, self._pick())
        except TokenError as e:
            raise CardError(f"dongle check failed: {e}") from None
        except Exception as e:  # noqa: BLE001 - any other PKCS#11 error (token pulled mid-session) fails the check too
            raise CardError(f"dongle check failed: the token failed: {e.__class__.__name__}") from None
        if not ok:
            raise CardError("dongle check failed: the token's answer does not match the challenge table")

    async def insert(self, password: str) -> None:
        if self.state != "idle":
            raise CardError(f"the card is {self.state}")
        self.lock.acquire()
        try:
            self.muk = self._muk_fn()
            self.pid = self._pid_fn()
            await self._check()
            try:
                envelope, kdf = await deferToThread(read_card, self.token)
            except TokenError as e:
                raise CardError(str(e)) from None
            params = KdfParams.decode(kdf)
            keys = ops.derive_keys(password, params)
            try:
                bound = await deferToThread(bound_key, self.token, keys.protection_key, params)
            except TokenError as e:
                raise CardError(f"dongle check failed: {e}") from None
            try:
                self.memory = CardMemory.load(self.config.serial, envelope, bound, self.rand)
            except crypto.CryptoError:
                # a card just restored by `vsc dongle replace` is wrapped under the password key
                # alone (the issuer cannot bind it without the password): open it, then bind it
                try:
                    self.memory = CardMemory.load(self.config.serial, envelope, keys.protection_key, self.rand)
                except crypto.CryptoError:
                    raise CardError("refused: the password does not open the card on this token") from None
                rebound = rewrap(self.config.serial, envelope, keys.protection_key, bound, self.rand)
                await deferToThread(write_card, self.token, rebound)
                self.memory.adopt_wrap(rebound)
                self.log.info("card {serial} bound to the token {token}", serial=self.config.serial,
                              token=self.token.token_label)
            del keys, bound
        except BaseException:
            self.lock.release()
            raise
        self.state = "in-use"
        self.inserted_at = self.reactor.seconds()
        self.log.info("card {serial} inserted from the token {token}", serial=self.config.serial,
                      token=self.token.token_label)
        self._start_polling()

    async def _store(self, envelope: bytes) -> None:
        try:
            await deferToThread(write_card, self.token, envelope)
        except TokenError as e:
            raise CardError(f"could not write the change to the token: {e}") from None
        except Exception as e:  # noqa: BLE001 - PKCS#11 errors
            raise CardError(f"could not write the change to the token: {e.__class__.__name__}") from None
        self.version += 1

    async def _checkin(self, envelope: bytes) -> None:
        await self._store(envelope)

    async def remove(self, reason: str = "requested") -> None:
        """
        Figure 11 on the token: write back, erase, idle. Every change was
        written to the token before it was acknowledged, so if the write-back
        fails (the token was pulled between two checks) nothing is lost: the
        card is erased and idle anyway, and the process exits non-zero, rather
        than staying in use with its token check stopped.
        """
        try:
            await super().remove(reason)
        except Exception as e:  # noqa: BLE001 - the token failed the write-back
            if self.state != "in-use":
                raise
            why = f"{e}; the card was removed anyway (every change was already on the token)"
            self.log.warn("{why}", why=why)
            self.state = "removing"
            self._wipe()
            self.state = "idle"
            self.reactor.callLater(0, self.on_exit, 5, why)  # after the refusal has been answered
            raise CardError(why) from None

    def _start_polling(self) -> None:
        super()._start_polling()
        if self.dongle_poll and self.dongle_poll > 0:
            self._dongle_loop = LoopingCall(self.poll_dongle)
            self._dongle_loop.clock = self.reactor
            self._dongle_loop.start(self.dongle_poll, now=False)
            self._pollers.append(self._dongle_loop)

    def poll_dongle(self):
        """Repeat the Figure 14 check; a failed check or a missing token removes the card."""
        if self.state != "in-use":
            return None
        from twisted.internet.defer import ensureDeferred

        async def run():
            try:
                await self._check()
            except Exception as e:  # noqa: BLE001 - fail closed: anything but a good answer removes the card
                if self.state != "in-use":
                    return  # removed (or removing) while the check ran: nothing left to stop
                why = str(e) if isinstance(e, CardError) else f"dongle check failed: {e.__class__.__name__}"
                self.log.warn("{why}: removing the card", why=why)
                self.state = "removing"
                self._stop_polling()
                self._wipe()  # the token is gone or false: nothing can be written; every change was already on it
                self.state = "idle"
                self.on_exit(5, f"{why}; the card was removed")

        return ensureDeferred(run())

    def status(self) -> dict:
        d = super().status()
        d.update(mode="dongle", token=self.token.token_label, server=None)
        return d
