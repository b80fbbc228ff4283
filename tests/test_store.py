"""
The card store (vsc.server.store) on BOTH backends: every test takes the
``database_url`` fixture, which runs it once on a SQLite file and once on a
fresh database of the session's private PostgreSQL cluster (tests/pg.py).

The clock is injected: ``Clock`` is a plain mutable number the tests move.
Paragraph numbers are EP 0 936 530's: Figure 4's life cycle is [0074], the
records [0034], per-serial exclusion [0081], duplicates [0102].
"""

from __future__ import annotations

import hashlib
import socket
import subprocess
import sys
import threading

import pytest

from vsc.server.store import (
    SCHEMA_VERSION,
    CardState,
    LockoutPolicy,
    Store,
    StoreError,
)

LOCKOUT = LockoutPolicy(threshold=3, base=10.0, maximum=35.0)
CODE = "ABCDE-FGHIJ"
VERIFIER = b"v" * 32
KDF = b"kdf-params"
P1 = b"protected-1"
MUK_A = b"A" * 32
MUK_B = b"B" * 32
SESSION_A = b"\x01" * 32
SESSION_B = b"\x02" * 32
CHANNEL = {"suite": "aes256-gcm", "peer": "tcp:127.0.0.1:5000"}


def h(code: str) -> bytes:
    return hashlib.sha256(code.encode()).digest()


class Clock:
    """The injected ``now``: a number the test sets and advances."""

    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> float:
        self.t += seconds
        return self.t


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def store(database_url, clock):
    s = Store(database_url, clock, LOCKOUT)
    assert s.migrate() == SCHEMA_VERSION
    yield s
    s.close()


def enrolled(store: Store, serial: str = "card-1", protected: bytes = P1) -> str:
    store.issue(serial, h(CODE), '{"methods": ["password"]}', ttl=600)
    assert store.enrol(serial, h(CODE), VERIFIER, KDF, protected, peer="tcp:10.0.0.1:1") is True
    return serial


def in_state(store: Store, state: CardState, serial: str = "card-1") -> str:
    """A card in ``state``: enrolled (idle), inserted with MUK_A/SESSION_A (in-use), or destroyed."""
    enrolled(store, serial)
    if state is CardState.IN_USE:
        assert store.checkout(serial, MUK_A, SESSION_A, CHANNEL, "peer-a")[0] == "ok"
    elif state is CardState.DESTROYED:
        assert store.destroy(serial, "admin") == "ok"
    assert store.get(serial).state is state
    return serial


def last(store: Store, serial: str):
    return store.history(serial)[-1]


# ---------------------------------------------------------------- schema


def test_migrate_is_idempotent_and_returns_the_version(database_url, clock):
    """migrate() creates the schema once; running it again (same or another Store) keeps the data and returns the version."""
    a = Store(database_url, clock, LOCKOUT)
    try:
        assert a.migrate() == SCHEMA_VERSION
        enrolled(a)
        assert a.migrate() == SCHEMA_VERSION
        b = Store(database_url, clock, LOCKOUT)
        try:
            assert b.migrate() == SCHEMA_VERSION
            assert [c.serial for c in b.list()] == ["card-1"]
            assert b._read("SELECT version FROM schema_version") == [(SCHEMA_VERSION,)]
        finally:
            b.close()
    finally:
        a.close()


def test_newer_schema_is_refused(store):
    """A database written by a newer vsc (higher schema version) is refused with a clear StoreError."""
    with store._txn() as cur:
        store._x(cur, "UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    with pytest.raises(StoreError, match="newer than this vsc"):
        store.migrate()


def test_unsupported_url_is_refused(clock):
    """Only sqlite:/// and postgresql:// URLs are accepted; anything else is a one-line StoreError."""
    with pytest.raises(StoreError, match="unsupported database URL"):
        Store("mysql://localhost/vsc", clock)


# ---------------------------------------------------------------- issue and enrol


def test_enrol_with_the_right_code_creates_an_idle_card_and_consumes_the_code(store, clock):
    """The right code creates the [0034] record idle at version 1 with the issued auth info, and the code is gone."""
    store.issue("card-1", h(CODE), '{"methods": ["password", "master-key"]}', ttl=600)
    assert store.pending() == [("card-1", clock.t + 600)]
    assert store.enrolment("card-1") == (h(CODE), '{"methods": ["password", "master-key"]}', clock.t + 600)
    clock.advance(5)
    assert store.enrol("card-1", h(CODE), VERIFIER, KDF, P1, peer="tcp:10.0.0.1:1", registration=b"\x07\x08")
    card = store.get("card-1")
    assert (card.state, card.version, card.muk, card.protected, card.verifier, card.kdf) == (
        CardState.IDLE, 1, None, P1, VERIFIER, KDF,
    )
    assert card.created == card.updated == clock.t
    assert card.summary(clock.t)["auth"] == ["password", "master-key"]
    assert '"registration": "0708"' in card.auth_info
    assert store.pending() == [] and store.enrolment("card-1") is None
    assert [(e.op, e.result, e.peer) for e in store.history("card-1")] == [
        ("issue", "ok", "admin"), ("enrol", "ok", "tcp:10.0.0.1:1"),
    ]


def test_enrol_with_a_wrong_code_is_refused_and_the_code_stays(store):
    """A wrong code creates nothing, is logged as a refusal, and the right code still works afterwards."""
    store.issue("card-1", h(CODE), "{}", ttl=600)
    assert store.enrol("card-1", h("WRONG"), VERIFIER, KDF, P1, peer="p") is False
    assert store.get("card-1") is None and store.enrolment("card-1") is not None
    assert (last(store, "card-1").op, last(store, "card-1").result) == ("enrol", "refused")
    assert store.enrol("card-1", h(CODE), VERIFIER, KDF, P1, peer="p") is True


def test_enrol_with_an_expired_code_is_refused(store, clock):
    """A code used after its TTL creates nothing."""
    store.issue("card-1", h(CODE), "{}", ttl=60)
    clock.advance(61)
    assert store.enrol("card-1", h(CODE), VERIFIER, KDF, P1, peer="p") is False
    assert store.get("card-1") is None
    assert last(store, "card-1").result == "refused"


def test_a_code_works_once(store):
    """A used code cannot enrol again (the first card is untouched)."""
    enrolled(store)
    assert store.enrol("card-1", h(CODE), b"x" * 32, KDF, b"other", peer="p") is False
    card = store.get("card-1")
    assert card.verifier == VERIFIER and card.protected == P1


def test_unknown_serial_and_no_code_is_refused(store):
    """Enrolling a serial that was never issued is refused and logged."""
    assert store.enrol("nobody", h(CODE), VERIFIER, KDF, P1, peer="p") is False
    assert [(e.op, e.result) for e in store.history("nobody")] == [("enrol", "refused")]


def test_issue_refuses_an_existing_card_and_reissue_replaces_the_code(store):
    """issue() on an enrolled serial is a StoreError; re-issuing a pending serial invalidates the old code."""
    enrolled(store)
    with pytest.raises(StoreError, match="already exists"):
        store.issue("card-1", h("NEW"), "{}", ttl=600)
    store.issue("card-2", h("FIRST"), "{}", ttl=600)
    store.issue("card-2", h("SECOND"), "{}", ttl=600)
    assert store.enrol("card-2", h("FIRST"), VERIFIER, KDF, P1, peer="p") is False
    assert store.enrol("card-2", h("SECOND"), VERIFIER, KDF, P1, peer="p") is True


def test_concurrent_enrolments_with_one_code_create_one_card(store):
    """Many threads presenting the same code at once: exactly one enrols, the others are refused (no crash)."""
    store.issue("card-1", h(CODE), "{}", ttl=600)
    results = run_threads(12, lambda i: store.enrol("card-1", h(CODE), VERIFIER, KDF, b"P%d" % i, peer=f"t{i}"))
    assert sorted(results) == [False] * 11 + [True]
    assert [e.result for e in store.history("card-1")].count("ok") == 2  # issue + one enrol


# ---------------------------------------------------------------- Figure 4 [0074]

STATES = [CardState.IDLE, CardState.IN_USE, CardState.DESTROYED]
OPS = ["insert", "remove", "recover", "destroy", "sync"]

#: (state, operation) -> (result, resulting state), per [0074]: insert only from idle;
#: remove and recover only from in-use; destroy from idle or in-use; destroyed is terminal.
#: sync is not a transition: it stores new information while in use and leaves the state alone.
#: insert/recover/destroy carry the MUK of the card's machine; remove/sync carry SESSION_A.
FIGURE_4 = {
    (CardState.IDLE, "insert"): ("ok", CardState.IN_USE),
    (CardState.IDLE, "remove"): ("refused", CardState.IDLE),
    (CardState.IDLE, "recover"): ("not-in-use", CardState.IDLE),
    (CardState.IDLE, "destroy"): ("ok", CardState.DESTROYED),
    (CardState.IDLE, "sync"): ("refused", CardState.IDLE),
    (CardState.IN_USE, "insert"): ("in-use", CardState.IN_USE),
    (CardState.IN_USE, "remove"): ("ok", CardState.IDLE),
    (CardState.IN_USE, "recover"): ("ok", CardState.IDLE),
    (CardState.IN_USE, "destroy"): ("ok", CardState.DESTROYED),
    (CardState.IN_USE, "sync"): ("ok", CardState.IN_USE),
    (CardState.DESTROYED, "insert"): ("destroyed", CardState.DESTROYED),
    (CardState.DESTROYED, "remove"): ("refused", CardState.DESTROYED),
    (CardState.DESTROYED, "recover"): ("destroyed", CardState.DESTROYED),
    (CardState.DESTROYED, "destroy"): ("destroyed", CardState.DESTROYED),
    (CardState.DESTROYED, "sync"): ("refused", CardState.DESTROYED),
}


def apply(store: Store, serial: str, op: str) -> str:
    """Run ``op`` as the machine that inserted the card would (MUK_A, SESSION_A); return the result word."""
    version = store.get(serial).version
    if op == "insert":
        # an insert from another machine while in use; from idle it is simply the insert
        return store.checkout(serial, MUK_B, SESSION_B, CHANNEL, "peer-b")[0]
    if op == "remove":
        return store.checkin(serial, SESSION_A, version, b"removed", "peer-a")[0]
    if op == "recover":
        return store.recover(serial, MUK_A, "peer-a")
    if op == "destroy":
        return store.destroy(serial, "peer-a", MUK_A)
    if op == "sync":
        return store.sync(serial, SESSION_A, version, b"synced", "peer-a")[0]
    raise AssertionError(op)


def test_figure_4_every_state_and_operation(store, clock):
    """
    Every (state, operation) pair of Figure 4 [0074] gives exactly the
    tabled result and resulting state, and each attempt (done or refused)
    adds one history line for that operation.
    """
    assert set(FIGURE_4) == {(s, o) for s in STATES for o in OPS}
    for n, ((state, op), (result, after)) in enumerate(sorted(FIGURE_4.items(), key=lambda kv: (kv[0][0].value, kv[0][1]))):
        serial = in_state(store, state, f"card-{n}")
        before = store.get(serial)
        lines = len(store.history(serial))
        clock.advance(1)
        assert (op, apply(store, serial, op)) == (op, result), f"{state.value} --{op}-->"
        card = store.get(serial)
        assert card.state is after, f"{state.value} --{op}--> {card.state.value}, expected {after.value}"
        entries = store.history(serial)
        assert len(entries) == lines + 1
        assert (entries[-1].op, entries[-1].result, entries[-1].at) == (op, result, clock.t)
        if result != "ok":
            # a refusal changes nothing at all
            assert card == before, f"refused {op} from {state.value} changed the record"
        if after is CardState.DESTROYED:
            assert card.protected == b"" and card.muk is None
        if after is CardState.IDLE:
            assert card.muk is None and card.channel_info is None
        if (state, op) == (CardState.IDLE, "insert"):
            assert card.muk == MUK_B and card.session_hash == SESSION_B


def test_destroyed_is_terminal(store):
    """After destroy nothing brings the card back: every operation, in any order, is refused and the state stays."""
    serial = in_state(store, CardState.IN_USE)
    assert store.destroy(serial, "admin") == "ok"
    for _ in range(2):
        for op in OPS:
            assert apply(store, serial, op) in ("destroyed", "refused")
            assert store.get(serial).state is CardState.DESTROYED
    with pytest.raises(StoreError, match="destroyed"):
        store.duplicate(serial, "copy")


def test_recover_needs_the_muk_of_the_last_insert(store):
    """Recover from another machine's MUK is refused (muk-mismatch) and the card stays in use; the right MUK recovers."""
    serial = in_state(store, CardState.IN_USE)
    assert store.recover(serial, MUK_B, "peer-b") == "muk-mismatch"
    assert store.get(serial).state is CardState.IN_USE
    e = last(store, serial)
    assert (e.op, e.result, e.muk, e.peer) == ("recover", "muk-mismatch", MUK_B, "peer-b")
    assert store.recover(serial, MUK_A, "peer-a") == "ok"
    assert store.get(serial).state is CardState.IDLE


def test_recover_discards_the_unsynced_insert_and_a_later_insert_uses_the_new_muk(store):
    """After recover the next insert may come from another machine, and then only that MUK recovers."""
    serial = in_state(store, CardState.IN_USE)
    assert store.recover(serial, MUK_A, "peer-a") == "ok"
    assert store.checkout(serial, MUK_B, SESSION_B, CHANNEL, "peer-b")[0] == "ok"
    assert store.recover(serial, MUK_A, "peer-a") == "muk-mismatch"
    assert store.recover(serial, MUK_B, "peer-b") == "ok"


def test_operations_on_an_unknown_serial_are_refused_and_logged(store):
    """Every life-cycle operation on a serial with no record is refused, changes nothing and is logged."""
    assert store.checkout("ghost", MUK_A, SESSION_A, CHANNEL, "p") == ("refused", None)
    assert store.checkin("ghost", SESSION_A, 1, P1, "p") == ("refused", 0)
    assert store.sync("ghost", SESSION_A, 1, P1, "p") == ("refused", 0)
    assert store.recover("ghost", MUK_A, "p") == "refused"
    assert store.destroy("ghost", "p") == "refused"
    assert store.get("ghost") is None
    assert [(e.op, e.result) for e in store.history("ghost")] == [
        ("insert", "refused"), ("remove", "refused"), ("sync", "refused"), ("recover", "refused"), ("destroy", "refused"),
    ]


# ---------------------------------------------------------------- insert retries


def test_repeated_insert_same_session_and_muk_is_a_repeat(store, clock):
    """The same insert retried (same session and MUK) answers 'repeat' with the same check-out; nothing changes."""
    serial = enrolled(store)
    result, first = store.checkout(serial, MUK_A, SESSION_A, CHANNEL, "peer-a")
    assert result == "ok" and first.state is CardState.IN_USE and first.session_hash == SESSION_A
    clock.advance(3)
    result, again = store.checkout(serial, MUK_A, SESSION_A, CHANNEL, "peer-a")
    assert result == "repeat" and again == first
    assert [(e.op, e.result) for e in store.history(serial)][-2:] == [("insert", "ok"), ("insert", "repeat")]
    assert [e.result for e in store.history(serial) if e.op == "insert"].count("ok") == 1


def test_insert_while_in_use_from_another_session_is_in_use(store):
    """Another session (even with the same MUK), or another MUK in the same session, is told 'in-use'; the check-out stays."""
    serial = in_state(store, CardState.IN_USE)
    first = store.get(serial)
    assert store.checkout(serial, MUK_A, SESSION_B, CHANNEL, "peer-a")[0] == "in-use"
    assert store.checkout(serial, MUK_B, SESSION_A, CHANNEL, "peer-b")[0] == "in-use"
    assert store.get(serial) == first


def test_concurrent_inserts_on_one_serial_give_exactly_one_ok(database_url, clock):
    """Many threads inserting one card at once (each its own session and MUK): exactly one 'ok', every other 'in-use'."""
    store = Store(database_url, clock, LOCKOUT)
    try:
        store.migrate()
        serial = enrolled(store)
        n = 16
        results = run_threads(
            n, lambda i: store.checkout(serial, bytes([i]) * 32, bytes([i + 100]) * 32, CHANNEL, f"t{i}")[0]
        )
        assert sorted(results) == ["in-use"] * (n - 1) + ["ok"]
        winner = results.index("ok")
        assert store.get(serial).muk == bytes([winner]) * 32
        inserts = [e for e in store.history(serial) if e.op == "insert"]
        assert sorted(e.result for e in inserts) == ["in-use"] * (n - 1) + ["ok"]
    finally:
        store.close()


def run_threads(n: int, fn) -> list:
    """Run fn(0..n-1) on n threads released together; return the results in index order."""
    barrier = threading.Barrier(n)
    results: list = [None] * n
    errors: list = []

    def work(i):
        try:
            barrier.wait(10)
            results[i] = fn(i)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    return results


# ---------------------------------------------------------------- sync and remove


def test_sync_stores_versions_is_idempotent_and_detects_conflicts(store):
    """sync bumps the version; the same sync retried is 'ok' without a second bump; a stale or other-session sync is refused."""
    serial = in_state(store, CardState.IN_USE)
    assert store.sync(serial, SESSION_A, 1, b"P2", "peer-a") == ("ok", 2)
    assert store.sync(serial, SESSION_A, 1, b"P2", "peer-a") == ("ok", 2)  # retried after a lost reply
    assert last(store, serial).result == "repeat"
    assert store.sync(serial, SESSION_A, 1, b"P2-other", "peer-a") == ("conflict", 2)
    assert store.sync(serial, SESSION_A, 0, b"P0", "peer-a") == ("conflict", 2)
    assert store.sync(serial, SESSION_A, 7, b"P7", "peer-a") == ("conflict", 2)
    assert store.sync(serial, SESSION_B, 2, b"P3", "peer-b") == ("refused", 0)
    card = store.get(serial)
    assert (card.version, card.protected, card.state) == (2, b"P2", CardState.IN_USE)
    assert store.sync(serial, SESSION_A, 2, b"P3", "peer-a") == ("ok", 3)
    assert [e.result for e in store.history(serial) if e.op == "sync"] == [
        "ok", "repeat", "conflict", "conflict", "conflict", "refused", "ok",
    ]


def test_remove_uploads_sets_idle_and_is_idempotent(store):
    """Remove stores the final information at version+1 and sets idle; the identical remove retried is 'ok' again."""
    serial = in_state(store, CardState.IN_USE)
    assert store.checkin(serial, SESSION_A, 1, b"final", "peer-a") == ("ok", 2)
    card = store.get(serial)
    assert (card.state, card.version, card.protected, card.muk, card.channel_info) == (
        CardState.IDLE, 2, b"final", None, None,
    )
    assert store.checkin(serial, SESSION_A, 1, b"final", "peer-a") == ("ok", 2)
    assert (last(store, serial).op, last(store, serial).result) == ("remove", "repeat")
    assert store.get(serial) == card


def test_remove_after_a_sync_retried(store):
    """A remove based on the version before a sync that already stored the same bytes is accepted without a bump."""
    serial = in_state(store, CardState.IN_USE)
    assert store.sync(serial, SESSION_A, 1, b"P2", "peer-a") == ("ok", 2)
    assert store.checkin(serial, SESSION_A, 1, b"P2", "peer-a") == ("ok", 2)
    assert store.get(serial).state is CardState.IDLE


def test_remove_version_conflicts_and_wrong_session(store):
    """A remove based on a stale version (or other bytes for the previous one), or from another session, changes nothing."""
    serial = in_state(store, CardState.IN_USE)
    assert store.sync(serial, SESSION_A, 1, b"P2", "peer-a") == ("ok", 2)
    before = store.get(serial)
    assert store.checkin(serial, SESSION_A, 1, b"other", "peer-a") == ("conflict", 2)
    assert store.checkin(serial, SESSION_A, 0, b"P0", "peer-a") == ("conflict", 2)
    assert store.checkin(serial, SESSION_B, 2, b"P3", "peer-b") == ("refused", 0)
    assert store.get(serial) == before


def test_a_stale_remove_after_recover_is_not_reported_as_stored(store):
    """
    After recover, a late remove from the recovered insert (its bytes were
    never stored) is refused, not answered 'ok': the card must not believe
    its upload was kept.
    """
    serial = in_state(store, CardState.IN_USE)
    assert store.recover(serial, MUK_A, "peer-a") == "ok"
    assert store.checkin(serial, SESSION_A, 1, b"lost-changes", "peer-a") == ("refused", 0)
    assert store.get(serial).protected == P1


def test_a_remove_retry_with_different_bytes_is_refused(store):
    """A 'retry' of a completed remove that carries other bytes is not the same remove: refused, the stored bytes stay."""
    serial = in_state(store, CardState.IN_USE)
    assert store.checkin(serial, SESSION_A, 1, b"final", "peer-a") == ("ok", 2)
    assert store.checkin(serial, SESSION_A, 2, b"more", "peer-a") == ("refused", 0)
    assert store.checkin(serial, SESSION_A, 1, b"changed", "peer-a") == ("refused", 0)
    assert store.get(serial).protected == b"final"


# ---------------------------------------------------------------- lockout


def test_lockout_grows_and_unlock_resets(store, clock):
    """Failures below the threshold do not lock; from it the delay is base*2^k capped at maximum; unlock clears it."""
    serial = enrolled(store)
    expected = {1: 0.0, 2: 0.0, 3: 10.0, 4: 20.0, 5: 35.0, 6: 35.0}  # threshold 3, base 10, maximum 35
    for failures, delay in expected.items():
        store.auth_failed(serial, "insert", "peer-x", "failed: password")
        card = store.get(serial)
        assert card.failures == failures
        if delay:
            assert card.locked_until == clock.t + delay
            assert card.locked_out(clock.t) and not card.locked_out(clock.t + delay)
            assert "locked out" in last(store, serial).detail
        else:
            assert not card.locked_out(clock.t) and card.locked_until == 0
    assert (last(store, serial).op, last(store, serial).result, last(store, serial).peer) == ("insert", "refused", "peer-x")
    store.unlock(serial)
    card = store.get(serial)
    assert (card.failures, card.locked_until, card.locked_out(clock.t)) == (0, 0, False)
    assert (last(store, serial).op, last(store, serial).result, last(store, serial).peer) == ("unlock", "ok", "admin")
    with pytest.raises(StoreError):
        store.unlock("ghost")


def test_lockout_never_shortens_and_a_successful_insert_resets_failures(store, clock):
    """A later, shorter computed delay cannot shorten an existing lock; a successful insert resets the counter."""
    serial = enrolled(store)
    for _ in range(5):
        store.auth_failed(serial, "insert", "p", "bad")
    until = store.get(serial).locked_until
    clock.advance(-100)  # a clock step backwards must not shorten the lock
    store.auth_failed(serial, "insert", "p", "bad")
    assert store.get(serial).locked_until == until
    clock.advance(10_000)
    assert store.checkout(serial, MUK_A, SESSION_A, CHANNEL, "p")[0] == "ok"
    assert (store.get(serial).failures, store.get(serial).locked_until) == (0, 0)


def test_failures_on_an_unknown_serial_are_logged(store):
    """An authentication failure for a serial with no card is logged (no record to count on)."""
    store.auth_failed("ghost", "insert", "p", "no such card")
    assert store.get("ghost") is None
    assert [(e.op, e.result) for e in store.history("ghost")] == [("insert", "refused")]


# ---------------------------------------------------------------- history


def test_every_transition_and_refusal_is_in_history(store, clock):
    """The append-only history records op, result, MUK, peer and time of every transition and refusal, in order."""
    store.issue("card-1", h(CODE), "{}", ttl=600, peer="admin")
    clock.advance(1)
    store.enrol("card-1", h("WRONG"), VERIFIER, KDF, P1, peer="p-enrol")
    clock.advance(1)
    store.enrol("card-1", h(CODE), VERIFIER, KDF, P1, peer="p-enrol")
    clock.advance(1)
    store.checkout("card-1", MUK_A, SESSION_A, CHANNEL, "p-a")
    clock.advance(1)
    store.checkout("card-1", MUK_B, SESSION_B, CHANNEL, "p-b")
    clock.advance(1)
    store.sync("card-1", SESSION_A, 1, b"P2", "p-a")
    clock.advance(1)
    store.recover("card-1", MUK_B, "p-b")
    clock.advance(1)
    store.checkin("card-1", SESSION_A, 2, b"P3", "p-a")
    clock.advance(1)
    store.refused("card-1", "insert", "bad-request", "p-c", MUK_B, "insert needs a MUK")
    clock.advance(1)
    store.checkout("card-1", MUK_B, SESSION_B, CHANNEL, "p-b")
    clock.advance(1)
    store.recover("card-1", MUK_B, "p-b")
    clock.advance(1)
    store.auth_failed("card-1", "destroy", "p-d", "failed: password")
    clock.advance(1)
    store.destroy("card-1", "p-e", MUK_A)
    clock.advance(1)
    store.checkout("card-1", MUK_A, SESSION_A, CHANNEL, "p-a")
    t0 = 1_000_000.0
    got = [(e.op, e.result, e.muk, e.peer, e.at) for e in store.history("card-1")]
    assert got == [
        ("issue", "ok", None, "admin", t0),
        ("enrol", "refused", None, "p-enrol", t0 + 1),
        ("enrol", "ok", None, "p-enrol", t0 + 2),
        ("insert", "ok", MUK_A, "p-a", t0 + 3),
        ("insert", "in-use", MUK_B, "p-b", t0 + 4),
        ("sync", "ok", MUK_A, "p-a", t0 + 5),
        ("recover", "muk-mismatch", MUK_B, "p-b", t0 + 6),
        ("remove", "ok", MUK_A, "p-a", t0 + 7),
        ("insert", "bad-request", MUK_B, "p-c", t0 + 8),
        ("insert", "ok", MUK_B, "p-b", t0 + 9),
        ("recover", "ok", MUK_B, "p-b", t0 + 10),
        ("destroy", "refused", None, "p-d", t0 + 11),
        ("destroy", "ok", MUK_A, "p-e", t0 + 12),
        ("insert", "destroyed", MUK_A, "p-a", t0 + 13),
    ]
    entries = store.history("card-1")
    assert [e.id for e in entries] == sorted(e.id for e in entries)
    assert entries[0].as_dict() == {
        "id": entries[0].id, "serial": "card-1", "op": "issue", "result": "ok", "muk": None,
        "peer": "admin", "at": t0, "detail": "enrolment code valid for 600 s",
    }
    assert entries[3].as_dict()["muk"] == MUK_A.hex()
    assert [e.serial for e in store.history()] == ["card-1"] * len(entries)


# ---------------------------------------------------------------- leases [0081]


def test_lease_acquire_busy_release(store):
    """A lease excludes other owners until released; only its owner can release it; any serial can be leased."""
    assert store.acquire("card-1", "owner-a", ttl=30)
    assert not store.acquire("card-1", "owner-b", ttl=30)
    assert not store.acquire("card-1", "owner-a", ttl=30)  # not re-entrant: one operation at a time
    assert store.acquire("card-2", "owner-b", ttl=30)  # other serials are independent
    store.release("card-1", "owner-b")  # not the owner: no effect
    assert not store.acquire("card-1", "owner-b", ttl=30)
    store.release("card-1", "owner-a")
    assert store.acquire("card-1", "owner-b", ttl=30)


def test_lease_expires_after_its_ttl(store, clock):
    """A lease left behind (its holder died) is taken over only after its TTL."""
    assert store.acquire("card-1", "owner-a", ttl=30)
    clock.advance(29.9)
    assert not store.acquire("card-1", "owner-b", ttl=30)
    clock.advance(0.2)
    assert store.acquire("card-1", "owner-b", ttl=30)
    store.release("card-1", "owner-a")  # the old holder's late release does not free the new lease
    assert not store.acquire("card-1", "owner-c", ttl=30)


def test_two_stores_on_one_database_exclude_each_other(database_url, clock):
    """Two Store objects (as two server processes) on one database see each other's leases and card changes."""
    a, b = Store(database_url, clock, LOCKOUT), Store(database_url, clock, LOCKOUT)
    try:
        a.migrate()
        b.migrate()
        assert a.acquire("card-1", "proc-a", ttl=30)
        assert not b.acquire("card-1", "proc-b", ttl=30)
        a.release("card-1", "proc-a")
        assert b.acquire("card-1", "proc-b", ttl=30)
        assert not a.acquire("card-1", "proc-a", ttl=30)
        enrolled(a, "card-2")
        assert b.checkout("card-2", MUK_A, SESSION_A, CHANNEL, "p")[0] == "ok"
        assert a.checkout("card-2", MUK_B, SESSION_B, CHANNEL, "p")[0] == "in-use"
        # and many threads across both stores: exactly one lease granted
        results = run_threads(10, lambda i: (a if i % 2 else b).acquire("card-3", f"owner-{i}", ttl=30))
        assert results.count(True) == 1
    finally:
        a.close()
        b.close()


def test_clear_dead_leases_drops_only_dead_local_owners(store):
    """A lease whose owner pid on this host is gone is dropped; live local owners and other hosts' leases stay."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # reaped: the pid no longer exists
    host = socket.gethostname()
    dead = f"{host}:{proc.pid}:deadbeef"
    alive = f"{host}:{__import__('os').getpid()}:cafe0001"
    remote = f"some-other-host.invalid:{proc.pid}:cafe0002"
    assert store.acquire("card-dead", dead, ttl=3600)
    assert store.acquire("card-alive", alive, ttl=3600)
    assert store.acquire("card-remote", remote, ttl=3600)
    assert store.clear_dead_leases() == 1
    assert store.acquire("card-dead", "new-owner", ttl=30)
    assert not store.acquire("card-alive", "new-owner", ttl=30)
    assert not store.acquire("card-remote", "new-owner", ttl=30)
    assert store.clear_dead_leases() == 0


# ---------------------------------------------------------------- atomicity


CRASHING = {
    "insert": (CardState.IDLE, lambda s, serial: s.checkout(serial, MUK_A, SESSION_A, CHANNEL, "p")),
    "remove": (CardState.IN_USE, lambda s, serial: s.checkin(serial, SESSION_A, 1, b"new", "p")),
    "sync": (CardState.IN_USE, lambda s, serial: s.sync(serial, SESSION_A, 1, b"new", "p")),
    "recover": (CardState.IN_USE, lambda s, serial: s.recover(serial, MUK_A, "p")),
    "destroy": (CardState.IDLE, lambda s, serial: s.destroy(serial, "p")),
    "unlock": (CardState.IDLE, lambda s, serial: s.unlock(serial)),
    "duplicate": (CardState.IDLE, lambda s, serial: s.duplicate(serial, "copy")),
}


def snapshot(store: Store, cur=None) -> list[tuple]:
    sql = "SELECT serial, state, version, failures, locked_until, muk, protected, channel_info FROM cards ORDER BY serial"
    rows = store._x(cur, sql).fetchall() if cur is not None else store._read(sql)
    return [tuple(bytes(v) if isinstance(v, memoryview) else v for v in row) for row in rows]


@pytest.mark.parametrize("op", sorted(CRASHING))
def test_a_crash_mid_transaction_leaves_the_record_unchanged(store, monkeypatch, op):
    """
    An exception after the UPDATE but before the history line commits
    (``_history`` raising) rolls the whole transaction back: the records are
    exactly as before and there is no history line; the store keeps working.
    """
    state, call = CRASHING[op]
    serial = in_state(store, state)
    store.auth_failed(serial, "insert", "p", "bad")  # so unlock has something to undo
    before, lines = snapshot(store), len(store.history())
    inside = []

    def crash(cur, *args, **kwargs):
        inside.append(snapshot(store, cur))
        raise RuntimeError("power cut")

    monkeypatch.setattr(store, "_history", crash)
    with pytest.raises(RuntimeError, match="power cut"):
        call(store, serial)
    monkeypatch.undo()
    assert inside and inside[0] != before, "the change was not written before _history ran: the test proves nothing"
    assert snapshot(store) == before
    assert len(store.history()) == lines
    # the same connection still works after the rollback, and the operation now commits
    call(store, serial)
    assert snapshot(store) == inside[0]
    assert len(store.history()) > lines


# ---------------------------------------------------------------- duplicate [0102]


def test_duplicate_copies_the_information_into_a_new_idle_card(store, clock):
    """[0102]: the copy is a new idle entry with the same protected information, verifier, KDF, auth info and version."""
    serial = in_state(store, CardState.IN_USE)
    assert store.sync(serial, SESSION_A, 1, b"P2", "p") == ("ok", 2)
    clock.advance(5)
    store.duplicate(serial, "card-copy")
    original, copy = store.get(serial), store.get("card-copy")
    assert copy.state is CardState.IDLE and copy.muk is None and copy.channel_info is None
    assert (copy.protected, copy.verifier, copy.kdf, copy.auth_info, copy.version) == (
        original.protected, original.verifier, original.kdf, original.auth_info, original.version,
    )
    assert copy.created == clock.t and original.state is CardState.IN_USE
    assert (last(store, serial).op, last(store, serial).detail) == ("duplicate", "copied to card-copy")
    assert [(e.op, e.result, e.detail) for e in store.history("card-copy")] == [("duplicate", "ok", f"copy of {serial}")]
    # the copy lives its own life
    assert store.checkout("card-copy", MUK_B, SESSION_B, CHANNEL, "p")[0] == "ok"


def test_duplicate_refusals(store):
    """Duplicating an unknown or destroyed card, or onto an existing card or pending serial, is a StoreError."""
    enrolled(store, "a")
    enrolled(store, "b")
    store.issue("pending", h("X"), "{}", ttl=600)
    with pytest.raises(StoreError, match="no card"):
        store.duplicate("ghost", "c")
    with pytest.raises(StoreError, match="already exists"):
        store.duplicate("a", "b")
    with pytest.raises(StoreError, match="enrolment"):
        store.duplicate("a", "pending")
    store.destroy("b", "admin")
    with pytest.raises(StoreError, match="destroyed"):
        store.duplicate("b", "c")
    assert store.get("c") is None
