"""
The two CardStorage strategies against fakes, run by one CardSession:
ServerStorage (vsc.card.storage) against a fake VSC Server speaking the
operations' messages, TokenStorage (vsc.dongle.storage) against fake PKCS#11
calls. And the rule both keep: the password derivation and every other
CPU-heavy step of insert and password change run on the worker, never on the
reactor — shown with a worker that holds its calls (the session waits, the
reactor goes on) and on the real reactor (a LoopingCall ticks while scrypt
runs).
"""

from __future__ import annotations

import os
import threading

import pytest
import pytest_twisted
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import Clock

from vsc import crypto
from vsc.card import ops
from vsc.card.config import CardConfig
from vsc.card.machine import MachineLock
from vsc.card.protected import CardMemory, PlainItem, seal_envelope
from vsc.card.session import CardError, CardSession, LifeState
from vsc.card.storage import CardStorage, ServerStorage, prepare_password_change
from vsc.dongle.storage import TokenCalls, TokenStorage
from vsc.protocol import auth
from vsc.dongle.token import TokenError, TokenRef
from vsc.wire.dongle import ChallengeTable
from vsc.wire.ops import KdfAlg, KdfParams, Status
from vsc.wire.protected import ItemKind, decode_counter, encode_counter
from tests.cardfakes import SCRYPT_CHEAP, FakeServer, HeldWorker, done, inline_worker, release

SERIAL = "store-1"


def _envelope(key: bytes, runs: int = 3) -> bytes:
    items = [PlainItem(ItemKind.COUNTER, "runs", encode_counter(runs)), PlainItem(ItemKind.DATA, "note", b"n")]
    return seal_envelope(SERIAL, key, items, os.urandom)


def _runs(envelope: bytes, key: bytes) -> int:
    memory = CardMemory.load(SERIAL, envelope, key)
    try:
        with memory.open(ItemKind.COUNTER, "runs") as view:
            return decode_counter(view)
    finally:
        memory.wipe()


def _config(tmp_path, **kw) -> CardConfig:
    kw.setdefault("muk_poll", 0)
    kw.setdefault("clock_poll", 0)
    return CardConfig(home=tmp_path, server="tcp:127.0.0.1:9", server_key="SHA256:x", serial=SERIAL,
                      reconnect_attempts=1, **kw)


def _session(tmp_path, storage: CardStorage, clock=None, exits=None) -> CardSession:
    return CardSession(_config(tmp_path), clock or Clock(), storage, rand=os.urandom, muk=lambda: b"m" * 32,
                       pid=lambda: 1, lock=MachineLock(str(tmp_path / "lock")),
                       on_exit=lambda code, why: (exits if exits is not None else []).append((code, why)))


def test_both_strategies_have_the_whole_interface():
    """ServerStorage and TokenStorage each provide every member of CardStorage."""
    members = [m for m in vars(CardStorage) if not m.startswith("_")] + ["version"]
    for cls in (ServerStorage, TokenStorage):
        missing = [m for m in members if m != "version" and not callable(getattr(cls, m, None))]
        assert missing == [], (cls, missing)


# ---------------------------------------------------------------- ServerStorage


@pytest.fixture
def server():
    return FakeServer(SERIAL, "pw", _envelope)


def _server_storage(tmp_path, server, worker=inline_worker) -> ServerStorage:
    return ServerStorage(_config(tmp_path), Clock(), b"M" * 32, rand=os.urandom, worker=worker,
                         connect=server.connect)


def test_server_insert_answers_the_challenge_on_the_worker(tmp_path, server):
    """The insert's challenge answer (scrypt inside) is handed to the worker, not run inline: while the worker
    holds it the session is inserting, its status answers, the clock runs on and nothing is refused yet;
    once the worker runs it the server checks the password and the card is in use with the downloaded memory."""
    worker = HeldWorker()
    clock = Clock()
    session = _session(tmp_path, _server_storage(tmp_path, server, worker), clock)
    inserting = ensureDeferred(session.insert("pw"))
    assert [call[0] for call in worker.calls] == [ops.answer]
    assert not inserting.called and session.life is LifeState.INSERTING
    assert session.status()["state"] == "inserting" and not session.usable
    clock.advance(3600)
    assert not inserting.called
    worker.run_next()
    done(inserting)
    assert session.life is LifeState.IN_USE and done(session.counter("runs")) == 3
    assert session.status()["server"] == "tcp:127.0.0.1:9" and session.status()["suite"] == "fake"
    release(session)


def test_server_refused_insert_is_idle_and_explained(tmp_path, server):
    """A wrong password: the server refuses (OperationRefused, explained as one line), the card is idle."""
    from vsc.card.session import explain

    session = _session(tmp_path, _server_storage(tmp_path, server))
    with pytest.raises(ops.OperationRefused) as refused:
        done(session.insert("wrong"))
    assert explain(refused.value).startswith("refused: wrong password")
    assert session.life is LifeState.IDLE and not session.lock.held


def test_server_sync_remove_and_version(tmp_path, server):
    """Each change is synced (version +1) before it is acknowledged; remove uploads, closes the channel and
    forgets the insert secret; the uploaded envelope holds the last value."""
    storage = _server_storage(tmp_path, server)
    session = _session(tmp_path, storage)
    done(session.insert("pw"))
    assert done(session.counter("runs", -1)) == 2 and session.version == 2 and len(server.syncs) == 1
    done(session.remove("test"))
    assert session.life is LifeState.IDLE and server.version == 3 and server.closed == 1 and storage._secret == b""
    assert _runs(server.removes[0], server.protection_key) == 2


def test_server_password_change_runs_on_the_worker(tmp_path, server):
    """The password change's derivations and re-wrap are one call on the worker; then the server stores the
    new verifier, scrypt parameters (the card's salt, pinned on every machine; same cost) and the re-wrapped
    protected information, the next
    insert needs the new password, and the items are untouched."""
    worker = HeldWorker()
    storage = _server_storage(tmp_path, server, worker)
    session = _session(tmp_path, storage)
    inserting = ensureDeferred(session.insert("pw"))
    worker.run_next()
    done(inserting)
    changing = ensureDeferred(session.change_password("pw", "new pw"))
    assert [call[0] for call in worker.calls] == [prepare_password_change] and server.passwords == []
    worker.run_next()
    assert done(changing) == 2
    (sent,) = server.passwords
    kdf = KdfParams.decode(sent.kdf)
    assert kdf.alg is KdfAlg.SCRYPT and kdf.log2_n == SCRYPT_CHEAP and kdf.salt == b"s" * 16
    assert sent.verifier != auth.verifier_for(ops.derive_keys("pw", kdf).auth_key, kdf.alg)
    new_key = ops.derive_keys("new pw", kdf).protection_key
    assert _runs(server.envelope, new_key) == 3
    done(session.remove("test"))
    again = _session(tmp_path, _server_storage(tmp_path, server))
    with pytest.raises(ops.OperationRefused):
        done(again.insert("pw"))
    done(again.insert("new pw"))
    assert done(again.counter("runs")) == 3
    release(again)


def test_server_password_change_with_the_wrong_current_password(tmp_path, server):
    """A wrong current password is refused with one line before anything is sent; the card stays in use."""
    session = _session(tmp_path, _server_storage(tmp_path, server))
    done(session.insert("pw"))
    with pytest.raises(CardError, match="^the current password is wrong$"):
        done(session.change_password("not pw", "new"))
    assert server.passwords == [] and session.usable
    release(session)


@pytest.mark.parametrize(("error", "raised"), [(Status.INTERNAL, ops.OperationRefused),
                                               (ConnectionError("the connection broke"), ConnectionError)],
                         ids=["refused", "broken"])
def test_server_failed_checkin_keeps_the_card_in_use(tmp_path, server, error, raised):
    """A refused or failed remove is reported and leaves a server card in use (the server still has it in
    use): its memory still answers."""
    server.remove_error = error
    session = _session(tmp_path, _server_storage(tmp_path, server))
    done(session.insert("pw"))
    with pytest.raises(raised):
        done(session.remove("test"))
    assert session.usable and session.lock.held and done(session.counter("runs")) == 3 and server.removes == []
    release(session)


# ---------------------------------------------------------------- TokenStorage

REF = TokenRef.parse("pkcs11:token=fake;module-path=/nonexistent/libfake.so", "1234")
TABLE = ChallengeTable(serial=SERIAL, entries=((b"c" * 16, b"r" * 16),))
TOKEN_KDF = KdfParams(alg=KdfAlg.SCRYPT, salt=b"t" * 16, log2_n=SCRYPT_CHEAP)


def _bind(ref, protection_key: bytes, kdf) -> bytes:
    return crypto.sha256(b"fake DongleKey" + protection_key)


class FakeToken:
    """The token's objects and answers, behind TokenCalls; ``present`` False makes every call fail."""

    def __init__(self, bound: bool = True):
        key = ops.derive_keys("pw", TOKEN_KDF).protection_key
        self.password_key = key
        self.bound_key = _bind(REF, key, TOKEN_KDF)
        self.envelope = _envelope(self.bound_key if bound else key)
        self.present = True
        self.answer_ok = True
        self.writes: list[bytes] = []
        self.checks = 0

    def _here(self):
        if not self.present:
            raise TokenError("the token 'fake' is not present")

    def check(self, ref, table, pick) -> bool:
        self._here()
        self.checks += 1
        return self.answer_ok

    def read(self, ref):
        self._here()
        return self.envelope, TOKEN_KDF.encode()

    def bind(self, ref, protection_key, kdf):
        self._here()
        return _bind(ref, protection_key, kdf)

    def write(self, ref, envelope):
        self._here()
        self.writes.append(envelope)
        self.envelope = envelope

    def calls(self) -> TokenCalls:
        return TokenCalls(check=self.check, read=self.read, bind=self.bind, write=self.write)


def _token_storage(tmp_path, token: FakeToken, worker=inline_worker, poll: float = 0) -> TokenStorage:
    return TokenStorage(_config(tmp_path), REF, TABLE, poll, rand=os.urandom, worker=worker, calls=token.calls())


def test_token_insert_every_step_on_the_worker(tmp_path):
    """Insert: the Figure 14 check, the read, the password derivation and the DongleKey binding each run on the
    worker, in that order; the card opens with the bound key; status says dongle mode and the token."""
    token, worker = FakeToken(), HeldWorker()
    session = _session(tmp_path, _token_storage(tmp_path, token, worker))
    inserting = ensureDeferred(session.insert("pw"))
    steps = []
    while worker.calls:
        steps.append(worker.calls[0][0])
        worker.run_next()
    assert steps == [token.check, token.read, ops.derive_keys, token.bind]
    done(inserting)
    assert session.usable and done(session.counter("runs")) == 3 and token.writes == []
    status = session.status()
    assert (status["mode"], status["token"], status["server"], status["state"]) == ("dongle", "fake", None, "in-use")
    release(session)


def test_token_binds_a_restored_card_at_its_first_insert(tmp_path):
    """A card restored by `vsc dongle replace` (wrapped under the password key alone) opens, and is re-wrapped
    under the bound key and written to the token at once; its next insert opens with the bound key."""
    token = FakeToken(bound=False)
    session = _session(tmp_path, _token_storage(tmp_path, token))
    done(session.insert("pw"))
    assert len(token.writes) == 1
    with pytest.raises(crypto.CryptoError):
        CardMemory.load(SERIAL, token.envelope, token.password_key)
    assert _runs(token.envelope, token.bound_key) == 3
    assert done(session.counter("runs", -1)) == 2 and _runs(token.envelope, token.bound_key) == 2
    release(session)


def test_token_wrong_password_and_failed_check(tmp_path):
    """A wrong password, and a token that answers wrongly, are refused with one line; the card stays idle."""
    token = FakeToken()
    session = _session(tmp_path, _token_storage(tmp_path, token))
    with pytest.raises(CardError, match="^refused: the password does not open the card on this token$"):
        done(session.insert("wrong"))
    token.answer_ok = False
    with pytest.raises(CardError, match="^dongle check failed: the token's answer does not match"):
        done(session.insert("pw"))
    assert session.life is LifeState.IDLE and not session.lock.held


def test_token_store_is_a_generation_and_a_failed_write_is_undone(tmp_path):
    """Each acknowledged change is one write to the token (version +1); a write that fails is refused with one
    line and the change undone."""
    token = FakeToken()
    session = _session(tmp_path, _token_storage(tmp_path, token))
    done(session.insert("pw"))
    assert done(session.counter("runs", -1)) == 2 and len(token.writes) == 1 and session.version == 1
    token.present = False
    with pytest.raises(CardError, match="^could not write the change to the token: the token 'fake' is not present$"):
        done(session.counter("runs", -1))
    assert done(session.counter("runs")) == 2 and session.version == 1
    release(session)


def test_token_remove_writes_back_or_removes_anyway(tmp_path):
    """Remove writes the card back; if the token is gone, the card is removed anyway (every change is already
    on it): wiped, idle, one line, exit 5 once the refusal is answered."""
    token = FakeToken()
    session = _session(tmp_path, _token_storage(tmp_path, token))
    done(session.insert("pw"))
    done(session.remove("test"))
    assert session.life is LifeState.IDLE and len(token.writes) == 1

    clock, exits = Clock(), []
    session = _session(tmp_path, _token_storage(tmp_path, token), clock, exits)
    done(session.insert("pw"))
    memory = session.memory
    token.present = False
    with pytest.raises(CardError) as refused:
        done(session.remove("test"))
    assert str(refused.value) == ("could not write the change to the token: the token 'fake' is not present; "
                                  "the card was removed anyway (every change was already on the token)")
    assert session.life is LifeState.IDLE and memory.wiped and not session.lock.held
    clock.advance(0)
    assert exits == [(5, str(refused.value))]


def test_token_check_repeats_and_a_missing_token_exits(tmp_path):
    """The Figure 14 check repeats every poll interval while in use; when the token goes the card is wiped and
    the process exits 5 with a "dongle check failed" line."""
    token, clock, exits = FakeToken(), Clock(), []
    session = _session(tmp_path, _token_storage(tmp_path, token, poll=30), clock, exits)
    done(session.insert("pw"))
    clock.advance(30)
    clock.advance(30)
    assert token.checks == 3 and session.usable
    memory = session.memory
    token.present = False
    clock.advance(30)
    assert session.life is LifeState.EXITED and memory.wiped and not session.lock.held
    assert exits == [(5, "dongle check failed: the token 'fake' is not present; the card was removed")]


def test_token_password_change_does_not_apply(tmp_path):
    """A password change of a token card is refused with one line; nothing is written."""
    token = FakeToken()
    session = _session(tmp_path, _token_storage(tmp_path, token))
    done(session.insert("pw"))
    with pytest.raises(CardError, match="^a password change does not apply to a card on a token$"):
        done(session.change_password("pw", "new"))
    assert token.writes == [] and session.usable
    release(session)


# ---------------------------------------------------------------- the real reactor keeps running


@pytest_twisted.ensureDeferred
async def test_the_reactor_ticks_while_scrypt_runs(tmp_path, monkeypatch):
    """
    On the real reactor, with the default worker (a thread): once the insert's scrypt has begun, it starts a
    LoopingCall on the reactor and waits inside the KDF until that has ticked three times; it records the
    thread it ran on. The insert completes, so the reactor ran while the derivation was in progress, and the
    derivation ran off the reactor thread. (Were scrypt on the reactor thread, the ticks could never come: the
    wait would time out and the test fail.)
    """
    from twisted.internet import reactor
    from twisted.internet.task import LoopingCall

    reactor_thread = threading.get_ident()
    ticked = threading.Event()
    ticks = []
    seen = {}
    real_scrypt = crypto.scrypt

    def tick():
        ticks.append(threading.get_ident())
        if len(ticks) == 3:
            ticked.set()

    loop = LoopingCall(tick)

    def slow_scrypt(*args, **kw):
        seen["thread"] = threading.get_ident()
        reactor.callFromThread(loop.start, 0.01, False)
        seen["released"] = ticked.wait(60)
        return real_scrypt(*args, **kw)

    server = FakeServer(SERIAL, "pw", _envelope)
    monkeypatch.setattr(crypto, "scrypt", slow_scrypt)
    storage = ServerStorage(_config(tmp_path), reactor, b"M" * 32, connect=server.connect)
    session = CardSession(_config(tmp_path), reactor, storage, muk=lambda: b"m" * 32, pid=lambda: 1,
                          lock=MachineLock(str(tmp_path / "lock")))
    try:
        await session.insert("pw")
    finally:
        if loop.running:
            loop.stop()
    assert seen["released"] and seen["thread"] != reactor_thread
    assert len(ticks) >= 3 and set(ticks) == {reactor_thread} and session.usable
    release(session)
