"""
A card whose protected information lives on a dongle (claim 10,
[0104]-[0110]): ``TokenStorage``, the CardStorage strategy a CardSession is
given in dongle mode. Insert: the token answers a random entry of the
challenge table (Figure 14), then the protected information is read from the
token and decrypted with the owner's password key mixed with the token's
DongleKey answer into locked memory under a fresh temporary key. In use is
recorded nowhere but in this process. Every modification is written to the
token (a new generation) before it is acknowledged; the check repeats every
``dongle_poll`` seconds and a failed check or a missing token wipes the card
and the process exits ([0106]). Remove writes the protected information
back; if that write fails, every change is already on the token, so the card
is removed anyway. A password change does not apply.

Every PKCS#11 call and the password derivation run on the worker (a thread),
never on the reactor. The daemon's worker (``detached_worker``) gives each
call a daemon thread of its own that shutdown never waits for: a token call
that hangs, which the check gives up on after CHECK_TIMEOUT, cannot keep the
card process from exiting (the reactor's thread pool joins its threads at
shutdown).
"""

from __future__ import annotations

import threading
from typing import Callable, Sequence

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.defer import TimeoutError as DeferTimeout
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.python.failure import Failure

from vsc import crypto
from vsc.card import ops
from vsc.card.config import CardConfig
from vsc.card.protected import CardMemory, rewrap
from vsc.card.storage import PeriodicCheck, Worker
from vsc.dongle.token import KDF_LABEL, PROTECTED_LABEL, Token, TokenError, TokenRef
from vsc.protocol.card_lifecycle import CardError
from vsc.wire.dongle import ChallengeTable
from vsc.wire.ops import KdfParams


def detached_worker(reactor) -> Worker:
    """
    A Worker that runs each call on a daemon thread of its own and hands the
    result back on the reactor (``callFromThread``). Shutdown does not wait
    for these threads, so a hung PKCS#11 call cannot hold the process after
    the card has given up on it; a result that comes after the caller gave
    up (a cancelled Deferred) is dropped.
    """

    def run(fn: Callable, *args, **kwargs) -> Deferred:
        d: Deferred = Deferred()

        def body() -> None:
            try:
                result = fn(*args, **kwargs)
            except BaseException:  # noqa: BLE001 - handed to the caller's errback
                reactor.callFromThread(d.errback, Failure())
            else:
                reactor.callFromThread(d.callback, result)

        threading.Thread(target=body, name="vsc-token", daemon=True).start()
        return d

    return run


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


@attrs.frozen
class TokenCalls:
    """The blocking PKCS#11 calls a token card makes (each run on the worker); tests give fakes."""

    check: Callable[[TokenRef, ChallengeTable, int], bool] = token_check
    read: Callable[[TokenRef], tuple[bytes, bytes]] = read_card
    bind: Callable[[TokenRef, bytes, KdfParams], bytes] = bound_key
    write: Callable[[TokenRef, bytes], None] = write_card


class TokenStorage:
    """The CardStorage of a card on a token (see the module docstring)."""

    log = Logger()

    #: where an inserted copy comes from, as a refusal names it (vsc.card.freshness)
    source = "the token"

    #: seconds the token has to answer a check; a token that does not (a dropped network token, a hung module)
    #: counts as gone, or a pending check would keep the card in use without the dongle
    CHECK_TIMEOUT = 30.0

    def __init__(self, config: CardConfig, token: TokenRef, table: ChallengeTable, poll: float,
                 rand: crypto.RandomBytes = crypto.system_random, worker: Worker = deferToThread,
                 calls: TokenCalls = TokenCalls(), clock=None):
        self.config = config
        self.token = token
        self.table = table
        self.dongle_poll = poll
        self.rand = rand
        self.worker = worker
        self.calls = calls
        if clock is None:
            from twisted.internet import reactor as clock
        self.clock = clock  # IReactorTime: bounds every check
        self.version = 0  # generations written by this process

    def _pick(self) -> int:
        return int.from_bytes(self.rand(4), "big")

    async def check(self) -> None:
        """Figure 14 once: CardError("dongle check failed: ...") unless the token answers as the table says."""
        try:
            ok = await self.worker(self.calls.check, self.token, self.table, self._pick()).addTimeout(
                self.CHECK_TIMEOUT, self.clock)
        except DeferTimeout:
            raise CardError(f"dongle check failed: the token did not answer within {self.CHECK_TIMEOUT:g} s") from None
        except TokenError as e:
            raise CardError(f"dongle check failed: {e}") from None
        except Exception as e:  # noqa: BLE001 - any other PKCS#11 error (token pulled mid-session) fails the check too
            raise CardError(f"dongle check failed: the token failed: {e.__class__.__name__}") from None
        if not ok:
            raise CardError("dongle check failed: the token's answer does not match the challenge table")

    async def open(self, password: str, muk: bytes) -> CardMemory:
        """Figure 14, then read the card from the token and open it with the password key bound to the DongleKey."""
        await self.check()
        envelope, kdf = await self._on_token("", self.calls.read, self.token)
        params = KdfParams.decode(kdf)
        keys = await self.worker(ops.derive_keys, password, params)
        bound = await self._on_token("dongle check failed: ", self.calls.bind, self.token, keys.protection_key,
                                     params)
        try:
            return CardMemory.load(self.config.serial, envelope, bound, self.rand)
        except crypto.CryptoError:
            pass
        # a card just restored by `vsc dongle replace` is wrapped under the password key
        # alone (the issuer cannot bind it without the password): open it, then bind it
        try:
            memory = CardMemory.load(self.config.serial, envelope, keys.protection_key, self.rand)
        except crypto.CryptoError:
            raise CardError("refused: the password does not open the card on this token") from None
        try:
            rebound = rewrap(self.config.serial, envelope, keys.protection_key, bound, self.rand)
            await self._on_token("could not write the change to the token: ", self.calls.write, self.token,
                                 rebound)
            memory.adopt_wrap(rebound)
        except BaseException:
            memory.wipe()
            raise
        self.log.info("card {serial} bound to the token {token}", serial=self.config.serial,
                      token=self.token.token_label)
        return memory

    async def _on_token(self, prefix: str, fn, *args):
        """One token call on the worker: a TokenError, or any other PKCS#11 error (the token pulled mid-session),
        is a CardError of one line."""
        try:
            return await self.worker(fn, *args)
        except TokenError as e:
            raise CardError(f"{prefix}{e}") from None
        except Exception as e:  # noqa: BLE001 - PKCS#11 errors: DeviceRemoved, TokenNotPresent, ...
            raise CardError(f"{prefix}the token failed: {e.__class__.__name__}") from None

    async def store(self, envelope: bytes) -> None:
        """A new generation of the protected information on the token, before the change is acknowledged."""
        try:
            await self.worker(self.calls.write, self.token, envelope)
        except TokenError as e:
            raise CardError(f"could not write the change to the token: {e}") from None
        except Exception as e:  # noqa: BLE001 - PKCS#11 errors
            raise CardError(f"could not write the change to the token: {e.__class__.__name__}") from None
        self.version += 1

    async def check_in(self, envelope: bytes) -> None:
        await self.store(envelope)

    def checkin_failed(self, error: Exception) -> str | None:
        """The token pulled between two checks: nothing is lost, every change was written before it was acknowledged."""
        return f"{error}; the card was removed anyway (every change was already on the token)"

    def checks(self) -> Sequence[PeriodicCheck]:
        return (PeriodicCheck(self.dongle_poll, self.check),)

    def status(self) -> dict:
        return {"mode": "dongle", "token": self.token.token_label, "server": None, "suite": None}

    async def change_password(self, memory: CardMemory, old: str, new: str) -> int:
        raise CardError("a password change does not apply to a card on a token")

    async def hand_back(self) -> None:
        """A refused (older) copy on the token: nothing was checked out, nothing to give back."""
        self.forget()

    def forget(self) -> None:
        pass  # nothing of this insert is kept outside the card's memory
