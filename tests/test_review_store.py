"""
Rules of the server's database layer (vsc.server.store, the store calls of
vsc.server.service, vsc.cli.admin on a database the server shares) that an
adversarial review found broken, each with how it was broken; they hold
since the fix. A store call's failure must reach the card as its documented
status (docs/protocol.md §10.13: "A database failure anywhere is INTERNAL"),
every change is one transaction that holds across processes (docs/admin.md:
several server processes, and the admin commands, share one database), and a
multi-step administrative change is all or nothing.
"""

from __future__ import annotations

import sqlite3
import threading

import pytest

from vsc.wire.ops import Status


# ---------------------------------------------------------------- 1. a database failure while enrolling


def test_a_database_failure_while_the_enrolment_material_is_made_is_internal_and_the_channel_stays(tmp_path):
    """
    Rule (docs/protocol.md §10.13, the server's operation machine): "A
    database failure anywhere is INTERNAL (STORAGE_FULL when the database
    cannot store for want of space) and changes nothing"; the channel takes
    the next request.

    Under a ``keyfile`` (or ``totp``) policy an enrolment first makes its
    material on the pool, after a plain read of the database
    (``Store.may_enrol``: is the code valid?). Before the fix, when that read
    failed (the database down, locked, a PostgreSQL restart), the glue handed
    the failure to the machine as ``store_failed`` while it was ``issuing``,
    a state with no such transition: the machine took it as a protocol
    violation of the card's, closed the channel with UNEXPECTED_MESSAGE and
    logged that the card "broke the operation protocol". The owner's
    enrolment ended with a dropped connection instead of INTERNAL. Now the
    card is answered INTERNAL, nothing is created, and the same channel
    enrols once the database is back.
    """
    from tests.test_implauth import registration
    from tests.test_review_enrol import keyfile_harness
    from tests.test_server_ops import SERIAL, result_of
    from vsc.card import ops as card_ops
    from vsc.crypto import system_random

    h, code, _ = keyfile_harness(tmp_path)
    client, server, _ = h.connect()
    kdf = card_ops.new_kdf(system_random, log2_n=10)
    keys = card_ops.derive_keys("pw", kdf)
    may_enrol = h.store.may_enrol

    def down(*args):
        raise sqlite3.OperationalError("unable to open database file")

    h.store.may_enrol = down
    d = h.run(card_ops.enrol(client, SERIAL, code, keys, kdf, b"P", registration=registration(keys, SERIAL)))
    with pytest.raises(card_ops.OperationRefused) as e:
        result_of(d)
    assert e.value.status is Status.INTERNAL
    assert not server.channel.closed and h.store.get(SERIAL) is None
    h.store.may_enrol = may_enrol
    result = result_of(h.run(card_ops.enrol(client, SERIAL, code, keys, kdf, b"P",
                                            registration=registration(keys, SERIAL))))
    assert result.status is Status.OK and result.registration


# ---------------------------------------------------------------- 2. new serials across processes


class _Held:
    """Hold ``store``'s next transaction open at its first history row (its changes made, not committed)."""

    def __init__(self, store):
        self.store, self.reached, self.go = store, threading.Event(), threading.Event()
        history = store._history

        def held(*args, **kwargs):
            if not self.reached.is_set():
                self.reached.set()
                assert self.go.wait(20), "the held transaction was never let go"
            return history(*args, **kwargs)

        store._history = held


def _thread(fn) -> tuple[threading.Thread, list]:
    out: list = []

    def run():
        try:
            out.append(fn())
        except Exception as e:  # noqa: BLE001 - the test looks at what it was
            out.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def _enrolment(serial: str):
    from tests.test_store import CODE, KDF, P1, VERIFIER, h
    from vsc.protocol.cardstore import EnrolCard

    return EnrolCard(serial, h(CODE), VERIFIER, KDF, P1, b"", {}, "tcp:10.0.0.1:1")


#: (what the first process does, held open; what a second process does meanwhile, which must be refused)
NEW_SERIAL_RACES = {
    "issue-issue-lookalike": (lambda s: s.issue("alice", b"h" * 32, "{}", 600), lambda s: s.issue("Alice", b"h" * 32, "{}", 600)),
    "duplicate-issue": (lambda s: s.duplicate("card-1", "bob"), lambda s: s.issue("bob", b"h" * 32, "{}", 600)),
    "issue-duplicate": (lambda s: s.issue("bob", b"h" * 32, "{}", 600), lambda s: s.duplicate("card-1", "bob")),
    "duplicate-duplicate-lookalike": (lambda s: s.duplicate("card-1", "bob"), lambda s: s.duplicate("card-1", "B0b")),
    "enrol-issue": (lambda s: s.enrol(_enrolment("carol")), lambda s: s.issue("carol", b"h" * 32, "{}", 600)),
    "enrol-revoke": (lambda s: s.enrol(_enrolment("carol")), lambda s: s.revoke("carol")),
}


@pytest.mark.parametrize("race", sorted(NEW_SERIAL_RACES))
def test_two_processes_cannot_both_claim_one_serial_or_two_lookalikes(database_url, race):
    """
    Rule (docs/admin.md §7 "Serials": issue, duplicate and replace refuse a
    new serial that exists or looks like one that exists, a card or a
    serial with a pending code; vsc.server.store: each operation is one
    transaction whose decision holds "in one process or two"; several
    server processes and the admin commands share one PostgreSQL database).

    Before the fix the checks were reads of rows that did not exist yet: on
    PostgreSQL (READ COMMITTED) nothing locked the absence of a serial, so
    two processes creating new serials at once each found the other's not
    there and both committed: ``alice`` and ``Alice`` issued side by side,
    a duplicate onto ``bob`` beside an enrolment code for ``bob``, two
    look-alike copies; an ``issue`` racing the owner's enrolment left a card
    and a new pending code for one serial, and a ``revoke`` racing it said
    "revoked; it no longer works" (history ``revoke ok``) of a code that had
    just enrolled the card. (SQLite serialised them by its database lock.)
    Now new serials are decided under one lock across processes, an issue
    waits for an enrolment using the code it replaces, and revoke locks the
    code it deletes: the second process is refused.
    """
    from tests.test_store import CODE, LOCKOUT, Clock, h, enrolled
    from vsc.server.store import Store, StoreError

    clock = Clock()
    a, b = Store(database_url, clock, LOCKOUT), Store(database_url, clock, LOCKOUT)
    try:
        a.migrate()
        enrolled(a, "card-1")
        a.issue("carol", h(CODE), "{}", 600)
        first, second = NEW_SERIAL_RACES[race]
        held = _Held(a)
        ta, out_a = _thread(lambda: first(a))
        assert held.reached.wait(10)
        tb, out_b = _thread(lambda: second(b))
        tb.join(1.0)  # refused at once, done (wrongly) at once, or waiting for the first one's lock
        held.go.set()
        ta.join(20)
        tb.join(20)
        assert not ta.is_alive() and not tb.is_alive()
        assert not isinstance(out_a[0], Exception) and getattr(out_a[0], "status", Status.OK) is Status.OK, out_a
        assert isinstance(out_b[0], StoreError), f"the second process was not refused: {out_b}"
        cards = {c.serial for c in a.list_cards()}
        codes = {s for s, _ in a.pending()}
        assert not cards & codes, f"a card and a pending code for one serial: {cards & codes}"
    finally:
        a.close()
        b.close()


# ---------------------------------------------------------------- 3. replace is all or nothing


@pytest.fixture(scope="module")
def _initialised(tmp_path_factory):
    from vsc.cli import parse

    d = tmp_path_factory.mktemp("template") / "server"
    args = parse(["admin", "--data-dir", str(d), "init", "--key-bits", "2048"])
    assert args.func(args) == 0
    return d


def _admin(data_dir, *argv: str) -> int:
    from vsc.cli import parse

    args = parse(["admin", "--data-dir", str(data_dir), *argv])
    return args.func(args)


@pytest.mark.parametrize("policy", ["duplicate", "fresh"])
def test_a_replace_that_fails_half_way_leaves_no_copy_beside_the_live_lost_card(_initialised, tmp_path, monkeypatch,
                                                                               capsys, policy):
    """
    Rule (vsc.server.store: "A crash leaves the old record or the new one,
    never a mix"; docs/admin.md §7 replace: "--policy duplicate copies the
    card to a new serial and destroys the old one, so the copy works with
    the same password and the old serial (perhaps in use on a lost machine)
    is dead"; the admin commands run while the server runs).

    Before the fix ``replace`` was two transactions: the copy committed,
    then the destroy ran on its own. When the destroy failed (the database
    connection dropped, a disk error, a lock timeout while the server was
    busy) the administrator got an error, but the copy was already there
    beside the lost card, which stayed alive and in use on the lost
    machine: the very thing the command exists to stop, with a second live
    card holding the same information; running ``replace`` again then made
    a second copy (``-r2``). Between the two transactions the lost machine
    could also still sync, so the "exact copy" missed what the old card
    last stored. Now the copy and the destroy are one transaction: a
    failure leaves the lost card exactly as it was and no copy, and the
    command can simply be run again. (``--policy fresh`` the same: its
    code, never shown, was left pending for the new serial beside the live
    lost card.)
    """
    import shutil

    from tests.test_store import CHANNEL, CODE, h
    from vsc.cli import CommandError
    from vsc.protocol.cardstore import CheckOut
    from vsc.protocol.lifecycle import Action
    from vsc.server import config
    from vsc.server.store import CardState, Store

    data_dir = tmp_path / "server"
    shutil.copytree(_initialised, data_dir)
    url = config.load(data_dir).database_url
    store = Store(url, lambda: 1_000_000.0)
    store.migrate()
    store.issue("laptop", h(CODE), "{}", 600)
    assert store.enrol(_enrolment("laptop")).status is Status.OK
    assert store.check_out(CheckOut("laptop", b"M" * 32, b"S" * 32, CHANNEL, "thief", b"v" * 32)).status is Status.OK
    before = store.get("laptop")
    store.close()

    carry_out = Store._carry_out

    def wipe_fails(self, cur, card, decision, e, now):
        if decision.action is Action.WIPE:
            raise sqlite3.OperationalError("disk I/O error")
        return carry_out(self, cur, card, decision, e, now)

    monkeypatch.setattr(Store, "_carry_out", wipe_fails)
    with pytest.raises(CommandError, match="disk I/O error"):
        _admin(data_dir, "replace", "laptop", "--policy", policy)
    monkeypatch.undo()
    store = Store(url, lambda: 1_000_000.0)
    try:
        assert store.get("laptop") == before and store.get("laptop").state is CardState.IN_USE
        assert store.get("laptop-r1") is None, "a copy was left beside the lost card, which is still alive"
        assert store.enrolment("laptop-r1") is None, "a code was left pending beside the lost card, still alive"
        assert [e.op for e in store.history("laptop-r1")] == []
        # run again, it does the whole job
        assert _admin(data_dir, "replace", "laptop", "--policy", policy) == 0
        assert store.get("laptop").state is CardState.DESTROYED
        if policy == "duplicate":
            copy = store.get("laptop-r1")
            assert (copy.state, copy.protected, copy.version) == (CardState.IDLE, before.protected, before.version)
        else:
            assert store.get("laptop-r1") is None and store.enrolment("laptop-r1") is not None
    finally:
        store.close()


# ---------------------------------------------------------------- 4. a serial PostgreSQL cannot hold


def test_a_serial_with_a_nul_names_no_card_on_either_backend(database_url):
    """
    Rule (docs/protocol.md §10.3: refusals are uniform, a serial that names
    no card is challenged with a decoy and refused like any other; §10.13:
    INTERNAL means "the server failed"; docs/admin.md §9a: what a stranger
    sends without proving anything counts for its source, and once it is
    throttled its refusals cost a log line only).

    A request's serial is any 1 to 64 bytes of UTF-8 on the wire, NUL
    included. PostgreSQL text cannot hold a NUL: before the fix every query
    naming such a serial raised (psycopg DataError), so on a PostgreSQL
    server a stranger's INSERT, SYNC or ENROL naming ``card\\0-1`` got
    INTERNAL instead of the decoy challenge or REFUSED that SQLite (and any
    other unknown serial) gets, the server logged a database traceback for
    each, and since a failed store call is not a refusal, the requests were
    never counted for the source: no throttle ever stopped them. Now such a
    serial names no card on both backends (no card can have one: the
    alphabet has no control characters) and is answered, counted and
    throttled like any other unknown serial.
    """
    from tests.test_server_ops import AUTH_INFO, KDF, Now, machine, request
    from tests.test_store import LOCKOUT
    from vsc.protocol import auth
    from vsc.protocol.cardstore import STORE_CALLS
    from vsc.protocol.lockout import LockoutPolicy, SourceLimits
    from vsc.protocol.server_ops import Reply
    from vsc.server.store import Store
    from vsc.wire.ops import AuthChallenge, EnrolRequest, Op

    def drive(m, effects: list) -> list:
        """The glue: each store effect on the store, a raised one as store_failed; the replies."""
        replies = []
        for e in effects:
            if isinstance(e, Reply):
                replies.append(e.message)
            elif type(e) in STORE_CALLS:
                try:
                    result = STORE_CALLS[type(e)](store, e)
                except Exception as why:  # noqa: BLE001 - what Backend.run's errback hands the machine
                    replies += drive(m, m.store_failed(str(why)))
                else:
                    replies += drive(m, m.loaded(result) if type(e).__name__ == "LoadCard" else m.stored(result))
        return replies

    def answers(serial: str, peer: str) -> list:
        m = machine(now=now, peer=peer, limits=SourceLimits(LockoutPolicy(), now))
        out = [type(r).__name__ if isinstance(r, AuthChallenge) else r.status
               for r in drive(m, m.message(request(Op.INSERT, serial=serial, insert_secret=b"S" * 32)))]
        m = machine(now=now, peer=peer, limits=SourceLimits(LockoutPolicy(), now))
        out += [r.status for r in drive(m, m.message(request(Op.SYNC, serial=serial, insert_secret=b"S" * 32,
                                                             version=1, protected=b"x")))]
        out += [r.status for r in drive(m, m.message(EnrolRequest(serial=serial, code="CODE-1", verifier=b"V" * 32,
                                                                  kdf=KDF, protected=b"P", registration=b"")))]
        return out

    now = Now()
    store = Store(database_url, now, LOCKOUT)
    try:
        store.migrate()
        store.issue("card-1", auth.code_hash("CODE-1"), AUTH_INFO, 3600)
        unknown = answers("no-such-card", "198.51.100.7:1")
        assert unknown == ["AuthChallenge", Status.REFUSED, Status.REFUSED]
        assert answers("card\x00-1", "198.51.100.8:1") == unknown
        assert store.get("card\x00-1") is None and store.enrolment("card-1") is not None
        # counted for its source: a stranger repeating it is throttled, its refusals no longer written
        policy = LockoutPolicy()
        m = machine(now=now, peer="198.51.100.9:1", limits=SourceLimits(policy, now))
        before = len(store.history())
        for _ in range(3 * policy.source_threshold):
            effects = m.message(request(Op.SYNC, serial="card\x00-1", insert_secret=b"S" * 32, version=1,
                                        protected=b"x"))
            assert [r.status for r in drive(m, effects)] == [Status.REFUSED]
        assert len(store.history()) - before <= policy.source_threshold
    finally:
        store.close()


# ---------------------------------------------------------------- 5. a lock held elsewhere


def test_a_card_locked_by_a_stuck_process_is_answered_internal_not_waited_on_for_ever(database_url):
    """
    Rule (docs/protocol.md §10.13: a database failure is answered INTERNAL,
    nothing changed; vsc.server.store: "nothing is held while a peer
    authenticates", a transaction holds its row for one short decision;
    several server processes share one database).

    SQLite gives up a lock wait after its busy timeout (10 s) and the card
    is answered INTERNAL. On PostgreSQL a store call waited for a row lock
    without any bound: when another process stopped in the middle of a
    transaction holding a card's row (paused, its host cut off from the
    database, which keeps the session and its locks until TCP gives up: by
    default two hours), every request for that card in every other process
    waited with it, each holding one of the process's few database
    threads, until none was left for any card. Now a lock wait has the
    same bound on both backends (``Store.lock_timeout``, 10 s; here 0.5 s):
    the waiting call fails (INTERNAL for the card), its thread is free, and
    the card is served again once the lock is released.
    """
    import time

    from tests.test_store import LOCKOUT, P1, SESSION_A, MUK_A, Clock, enrolled, insert, sync
    from vsc.server.store import Store, StorageFull

    clock = Clock()
    a, b = Store(database_url, clock, LOCKOUT), Store(database_url, clock, LOCKOUT)
    b.lock_timeout = 0.5
    try:
        a.migrate()
        enrolled(a, "card-1")
        assert insert(a, "card-1", MUK_A, SESSION_A).status is Status.OK
        held = _Held(a)
        ta, _ = _thread(lambda: a.unlock("card-1"))  # holds card-1's row (and, on SQLite, the database)
        assert held.reached.wait(10)
        started = time.monotonic()
        tb, out_b = _thread(lambda: sync(b, "card-1", SESSION_A, 1, P1 + b"2"))
        tb.join(8)
        waited = time.monotonic() - started
        held.go.set()
        ta.join(20)
        tb.join(20)
        assert waited < 8, "the store call waited for the lock without a bound"
        assert isinstance(out_b[0], Exception) and not isinstance(out_b[0], StorageFull), out_b
        assert sync(b, "card-1", SESSION_A, 1, P1 + b"2") == (Status.OK, 2)
    finally:
        a.close()
        b.close()


def test_a_process_stopped_inside_a_transaction_does_not_keep_the_card_locked_on_postgresql(pg_database_url):
    """
    Rule (as above; docs/admin.md: several server processes share one
    PostgreSQL database, so one process's fault must not take a card from
    the others).

    A server process cut off from PostgreSQL, or stopped, in the middle of
    a transaction left its session "idle in transaction" on the database,
    holding the card's row lock (and any lock it had taken) until TCP gave
    up on it: hours, during which the card could not be inserted, synced
    or removed from any other process. A store transaction never waits on
    anything outside the database between its statements, so PostgreSQL
    now ends a session idle inside a transaction after
    ``Store.idle_in_transaction`` seconds (60; here 1): the stuck
    transaction is rolled back (nothing of it is stored), its locks are
    released, and the other process serves the card.
    """
    from tests.test_store import LOCKOUT, P1, SESSION_A, MUK_A, Clock, enrolled, insert, sync
    from vsc.protocol.cardstore import CountFailure
    from vsc.protocol.lifecycle import Operation
    from vsc.server.store import Store

    clock = Clock()
    a, b = Store(pg_database_url, clock, LOCKOUT), Store(pg_database_url, clock, LOCKOUT)
    a.idle_in_transaction = 1.0
    try:
        a.migrate()
        enrolled(a, "card-1")
        assert insert(a, "card-1", MUK_A, SESSION_A).status is Status.OK
        a.count_failure(CountFailure("card-1", Operation.INSERT, "p", "bad", None, False))  # for unlock to undo
        held = _Held(a)
        ta, out_a = _thread(lambda: a.unlock("card-1"))  # stops inside its transaction, holding card-1's row
        assert held.reached.wait(10)
        tb, out_b = _thread(lambda: sync(b, "card-1", SESSION_A, 1, P1 + b"2"))
        tb.join(8)
        assert out_b == [(Status.OK, 2)], f"the card stayed locked by the stopped process: {out_b}"
        held.go.set()
        ta.join(20)
        assert isinstance(out_a[0], Exception), out_a  # its transaction was ended: nothing of it stored
        assert b.get("card-1").failures == 1 and [e.op for e in b.history("card-1")][-1] == "sync"
        assert sync(a, "card-1", SESSION_A, 2, P1 + b"3") == (Status.OK, 3)  # and the process carries on
    finally:
        held.go.set()
        a.close()
        b.close()
