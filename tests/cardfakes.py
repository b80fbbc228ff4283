"""
Fakes for unit tests of the card (no network, no token, no threads): a worker
that runs inline or holds its calls, a CardStorage that keeps the protected
information in memory, a VSC Server that answers the card's operations
(vsc.wire.ops messages) over a fake channel, and a helper that inserts a
CardSession through its life cycle.
"""

from __future__ import annotations

from types import SimpleNamespace

from twisted.internet.defer import Deferred, ensureDeferred, fail, maybeDeferred, succeed
from twisted.internet.task import Clock

from vsc.card import ops
from vsc.card.config import CardConfig
from vsc.card.machine import MachineLock
from vsc.card.protected import CardMemory
from vsc.card.session import CardError, CardSession, LifeState
from vsc.protocol import auth
from vsc.wire.ops import (
    AuthChallenge,
    AuthItem,
    AuthMethod,
    AuthResponse,
    ChangePassword,
    KdfAlg,
    KdfParams,
    Op,
    OpRequest,
    OpResult,
    Status,
)


def done(d) -> object:
    """The result of a Deferred/coroutine that must already have fired (everything here is synchronous)."""
    if not isinstance(d, Deferred):
        d = ensureDeferred(d)
    box = []
    d.addBoth(box.append)
    assert box, "did not complete synchronously"
    result = box[0]
    if hasattr(result, "raiseException"):
        result.raiseException()
    return result


def inline_worker(fn, *args, **kwargs) -> Deferred:
    """A worker that runs the call at once, on the caller's thread (deterministic tests)."""
    return maybeDeferred(fn, *args, **kwargs)


class HeldWorker:
    """A worker that only records its calls; the test runs each one when it chooses (``run_next``)."""

    def __init__(self):
        self.calls: list[tuple] = []

    def __call__(self, fn, *args, **kwargs) -> Deferred:
        d: Deferred = Deferred()
        self.calls.append((fn, args, kwargs, d))
        return d

    def run_next(self) -> None:
        fn, args, kwargs, d = self.calls.pop(0)
        maybeDeferred(fn, *args, **kwargs).chainDeferred(d)


class MemoryStorage:
    """
    A CardStorage whose protected information is a sealed envelope in this
    object: ``stored`` records every acknowledged change, ``fail_store``
    makes the next stores fail, ``hold_checkin`` keeps a remove's check-in
    waiting until the test fires it.
    """

    def __init__(self, serial: str, envelope: bytes, protection_key: bytes, rand, checks=()):
        self.serial = serial
        self.envelope = envelope
        self.protection_key = protection_key
        self.rand = rand
        self.version = 1
        self.stored: list[bytes] = []
        self.checked_in: list[bytes] = []
        self.fail_store: str | None = None
        self.fail_checkin: Exception | None = None
        self.remove_anyway: str | None = None
        self.hold_checkin: Deferred | None = None
        self.periodic = tuple(checks)
        self.forgotten = 0

    async def open(self, password: str, muk: bytes) -> CardMemory:
        if password != "pw":
            raise CardError("refused: wrong password")
        return CardMemory.load(self.serial, self.envelope, self.protection_key, self.rand)

    async def store(self, envelope: bytes) -> None:
        if self.fail_store is not None:
            raise CardError(self.fail_store)
        self.stored.append(envelope)
        self.envelope, self.version = envelope, self.version + 1

    async def check_in(self, envelope: bytes) -> None:
        if self.hold_checkin is not None:
            await self.hold_checkin
        if self.fail_checkin is not None:
            raise self.fail_checkin
        self.checked_in.append(envelope)
        self.envelope, self.version = envelope, self.version + 1

    def checkin_failed(self, error: Exception) -> str | None:
        return self.remove_anyway

    def checks(self):
        return self.periodic

    def status(self) -> dict:
        return {"server": None, "suite": None}

    async def change_password(self, memory, old: str, new: str) -> int:
        raise CardError("a password change does not apply to this storage")

    def forget(self) -> None:
        self.forgotten += 1


def in_use_session(config: CardConfig, storage, rand, clock=None, on_exit=None) -> CardSession:
    """A CardSession inserted from ``storage`` through its life cycle (machine lock in the test's HOME)."""
    session = CardSession(config, clock if clock is not None else Clock(), storage, rand=rand,
                          muk=lambda: b"m" * 32, pid=lambda: 4242, lock=MachineLock(str(config.home / "lock")),
                          on_exit=on_exit or (lambda code, why: None))
    done(session.insert("pw"))
    return session


def leave_use(session: CardSession, state: LifeState) -> None:
    """Drive an in-use session out of use: a remove still checking in (MemoryStorage holds it), a finished
    remove, or an abort."""
    if state is LifeState.REMOVING:
        session.storage.hold_checkin = Deferred()
        ensureDeferred(session.remove("test"))
    elif state is LifeState.IDLE:
        done(session.remove("test"))
    else:
        session.abort("test", code=None)
    assert session.life is state


def release(session: CardSession) -> None:
    """Test teardown: wipe whatever memory the session still holds and release its machine lock."""
    if session.memory is not None:
        session.memory.wipe()
    session.lock.release()


SCRYPT_CHEAP = 10  # the lowest cost vsc.crypto accepts: the real derivation, fast enough for unit tests


class FakeServer:
    """
    Stands in for the VSC Server behind a channel: answers insert (one
    password challenge, scrypt parameters), sync, remove and password change
    as the real one does, records the uploads; ``sync_error`` /
    ``remove_error`` make those fail (an exception: the channel broke; a
    Status: the server refused).
    """

    def __init__(self, serial: str, password: str, envelope_for, salt: bytes = b"s" * 16):
        self.serial = serial
        self.kdf = KdfParams(alg=KdfAlg.SCRYPT, salt=salt, log2_n=SCRYPT_CHEAP)
        keys = ops.derive_keys(password, self.kdf)
        self.protection_key = keys.protection_key
        self.verifier = auth.verifier_for(keys.auth_key, self.kdf.alg)
        self.envelope = envelope_for(self.protection_key)
        self.version = 1
        self.secret = b""
        self.syncs: list[bytes] = []
        self.removes: list[bytes] = []
        self.passwords: list[ChangePassword] = []
        self.connects = 0
        self.closed = 0
        self.sync_error: Exception | Status | None = None
        self.remove_error: Exception | Status | None = None
        self.password_error: Exception | Status | None = None

    async def connect(self, *a, **kw):
        self.connects += 1
        proto = SimpleNamespace(channel=SimpleNamespace(closed=False),
                                info=SimpleNamespace(suite=SimpleNamespace(label="fake")))

        def close():
            proto.channel.closed = True
            self.closed += 1

        proto.closeChannel = close
        proto.request = lambda msg: self._answer(msg)
        return proto

    def _answer(self, msg) -> Deferred:
        try:
            return succeed(self.answer(msg))
        except Exception as e:  # noqa: BLE001 - a broken channel fails the request
            return fail(e)

    @staticmethod
    def _failure(error):
        if isinstance(error, Status):
            return OpResult(status=error)
        raise error

    def answer(self, msg):
        if isinstance(msg, OpRequest) and msg.op is Op.INSERT:
            self.secret = msg.insert_secret
            return AuthChallenge(kdf=self.kdf.encode(), challenges=(AuthItem(AuthMethod.PASSWORD, b""),))
        if isinstance(msg, AuthResponse):
            presented = msg.responses[0].data
            if not auth.check_password(self.verifier, presented):
                return OpResult(status=Status.REFUSED)
            return OpResult(status=Status.OK, version=self.version, protected=self.envelope)
        if isinstance(msg, OpRequest) and msg.op is Op.ATTACH:  # a reconnected channel of the current insert
            return OpResult(status=Status.OK if msg.insert_secret == self.secret else Status.REFUSED,
                            version=self.version)
        if isinstance(msg, OpRequest) and msg.op is Op.SYNC:
            if self.sync_error is not None:
                return self._failure(self.sync_error)
            assert msg.version == self.version and msg.insert_secret == self.secret
            self.syncs.append(msg.protected)
            self.envelope, self.version = msg.protected, self.version + 1
            return OpResult(status=Status.OK, version=self.version)
        if isinstance(msg, OpRequest) and msg.op is Op.REMOVE:
            if self.remove_error is not None:
                return self._failure(self.remove_error)
            assert msg.insert_secret == self.secret
            self.removes.append(msg.protected)
            self.envelope, self.version = msg.protected, self.version + 1
            return OpResult(status=Status.OK, version=self.version)
        if isinstance(msg, ChangePassword):
            if self.password_error is not None:
                return self._failure(self.password_error)
            self.passwords.append(msg)
            self.verifier, self.kdf = msg.verifier, KdfParams.decode(msg.kdf)
            self.envelope, self.version = msg.protected, self.version + 1
            return OpResult(status=Status.OK, version=self.version)
        raise AssertionError(f"unexpected {msg!r}")

