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
import threading

import pytest

from vsc.protocol.cardstore import (
    ChangeCardPassword,
    CheckIn,
    CheckOut,
    CountFailure,
    DestroyCard,
    EnrolCard,
    LogRefusal,
    RecoverCard,
    SyncCard,
)
from vsc.protocol.lifecycle import Operation
from vsc.protocol.lockout import LockoutPolicy
from vsc.server.store import (
    SCHEMA_VERSION,
    CardState,
    Store,
    StoreError,
)
from vsc.wire.ops import Status

LOCKOUT = LockoutPolicy(threshold=3, base=10.0, maximum=35.0, shared_threshold=4)
OK, REFUSED, IN_USE, DESTROYED = Status.OK, Status.REFUSED, Status.IN_USE, Status.DESTROYED
NOT_IN_USE, MUK_MISMATCH, CONFLICT = Status.NOT_IN_USE, Status.MUK_MISMATCH, Status.VERSION_CONFLICT
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


def enrol(store: Store, serial: str, code: bytes = b"", protected: bytes = P1, peer: str = "tcp:10.0.0.1:1",
          verifier: bytes = VERIFIER, registration: bytes = b"", extra: dict | None = None) -> Status:
    e = EnrolCard(serial, code or h(CODE), verifier, KDF, protected, registration, extra or {}, peer)
    return store.enrol(e).status


def insert(store: Store, serial: str, muk: bytes, session: bytes, peer: str = "p", verifier: bytes = VERIFIER,
           **kw):
    """Check-out after authentication passed; returns the Outcome."""
    return store.check_out(CheckOut(serial, muk, session, CHANNEL, peer, verifier, **kw))


def sync(store, serial, session, version, protected, peer="p"):
    o = store.sync(SyncCard(serial, session, version, protected, peer))
    return o.status, o.version


def remove(store, serial, session, version, protected, peer="p"):
    o = store.check_in(CheckIn(serial, session, version, protected, peer))
    return o.status, o.version


def recover(store, serial, muk, peer="p", verifier=VERIFIER, **kw) -> Status:
    return store.recover(RecoverCard(serial, muk, peer, verifier, **kw)).status


def destroy(store, serial, muk=b"", peer="p", verifier=VERIFIER, **kw) -> Status:
    return store.destroy(DestroyCard(serial, muk, peer, verifier, **kw)).status


def fail(store, serial, own: bool = False, op: Operation = Operation.INSERT, peer: str = "p", detail: str = "bad",
         muk: bytes | None = None) -> None:
    store.count_failure(CountFailure(serial, op, peer, detail, muk, own))


def enrolled(store: Store, serial: str = "card-1", protected: bytes = P1) -> str:
    store.issue(serial, h(CODE), '{"methods": ["password"]}', ttl=600)
    assert enrol(store, serial, protected=protected) is OK
    return serial


def in_state(store: Store, state: CardState, serial: str = "card-1") -> str:
    """A card in ``state``: enrolled (idle), inserted with MUK_A/SESSION_A (in-use), or destroyed."""
    enrolled(store, serial)
    if state is CardState.IN_USE:
        assert insert(store, serial, MUK_A, SESSION_A, "peer-a").status is OK
    elif state is CardState.DESTROYED:
        assert store.destroy_by_admin(serial) is OK
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
            assert [c.serial for c in b.list_cards()] == ["card-1"]
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
    assert enrol(store, "card-1", h(CODE), P1, registration=b"\x07\x08") is OK
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
    assert enrol(store, "card-1", h("WRONG"), P1, peer="p") is REFUSED
    assert store.get("card-1") is None and store.enrolment("card-1") is not None
    assert (last(store, "card-1").op, last(store, "card-1").result) == ("enrol", "refused")
    assert enrol(store, "card-1", h(CODE), P1, peer="p") is OK


def test_enrol_with_an_expired_code_is_refused(store, clock):
    """A code used after its TTL creates nothing."""
    store.issue("card-1", h(CODE), "{}", ttl=60)
    clock.advance(61)
    assert enrol(store, "card-1", h(CODE), P1, peer="p") is REFUSED
    assert store.get("card-1") is None
    assert last(store, "card-1").result == "refused"


def test_a_code_works_once(store):
    """A used code cannot enrol again (the first card is untouched)."""
    enrolled(store)
    assert enrol(store, "card-1", h(CODE), b"other", peer="p", verifier=b"x" * 32) is REFUSED
    card = store.get("card-1")
    assert card.verifier == VERIFIER and card.protected == P1


def test_unknown_serial_and_no_code_is_refused(store):
    """Enrolling a serial that was never issued is refused and logged."""
    assert enrol(store, "nobody", h(CODE), P1, peer="p") is REFUSED
    assert [(e.op, e.result) for e in store.history("nobody")] == [("enrol", "refused")]


def test_issue_refuses_an_existing_card_and_reissue_replaces_the_code(store):
    """issue() on an enrolled serial is a StoreError; re-issuing a pending serial invalidates the old code."""
    enrolled(store)
    with pytest.raises(StoreError, match="already exists"):
        store.issue("card-1", h("NEW"), "{}", ttl=600)
    store.issue("card-2", h("FIRST"), "{}", ttl=600)
    store.issue("card-2", h("SECOND"), "{}", ttl=600)
    assert enrol(store, "card-2", h("FIRST"), P1, peer="p") is REFUSED
    assert enrol(store, "card-2", h("SECOND"), P1, peer="p") is OK


def test_concurrent_enrolments_with_one_code_create_one_card(store):
    """Many threads presenting the same code at once: exactly one enrols, the others are refused (no crash)."""
    store.issue("card-1", h(CODE), "{}", ttl=600)
    results = run_threads(12, lambda i: enrol(store, "card-1", h(CODE), b"P%d" % i, peer=f"t{i}"))
    assert sorted(results) == [OK] + [REFUSED] * 11
    assert [e.result for e in store.history("card-1")].count("ok") == 2  # issue + one enrol


# ---------------------------------------------------------------- Figure 4 [0074]

STATES = [CardState.IDLE, CardState.IN_USE, CardState.DESTROYED]
OPS = ["insert", "remove", "recover", "destroy", "sync"]

#: (state, operation) -> (result, resulting state), per [0074]: insert only from idle;
#: remove and recover only from in-use; destroy from idle or in-use; destroyed is terminal.
#: sync is not a transition: it stores new information while in use and leaves the state alone.
#: insert/recover/destroy carry the MUK of the card's machine; remove/sync carry SESSION_A.
FIGURE_4 = {
    (CardState.IDLE, "insert"): (OK, CardState.IN_USE),
    (CardState.IDLE, "remove"): (REFUSED, CardState.IDLE),
    (CardState.IDLE, "recover"): (NOT_IN_USE, CardState.IDLE),
    (CardState.IDLE, "destroy"): (OK, CardState.DESTROYED),
    (CardState.IDLE, "sync"): (REFUSED, CardState.IDLE),
    (CardState.IN_USE, "insert"): (IN_USE, CardState.IN_USE),
    (CardState.IN_USE, "remove"): (OK, CardState.IDLE),
    (CardState.IN_USE, "recover"): (OK, CardState.IDLE),
    (CardState.IN_USE, "destroy"): (OK, CardState.DESTROYED),
    (CardState.IN_USE, "sync"): (OK, CardState.IN_USE),
    (CardState.DESTROYED, "insert"): (DESTROYED, CardState.DESTROYED),
    (CardState.DESTROYED, "remove"): (REFUSED, CardState.DESTROYED),
    (CardState.DESTROYED, "recover"): (DESTROYED, CardState.DESTROYED),
    (CardState.DESTROYED, "destroy"): (DESTROYED, CardState.DESTROYED),
    (CardState.DESTROYED, "sync"): (REFUSED, CardState.DESTROYED),
}
HISTORY = {OK: "ok", REFUSED: "refused", NOT_IN_USE: "not-in-use", IN_USE: "in-use", DESTROYED: "destroyed"}


def apply(store: Store, serial: str, op: str) -> Status:
    """Run ``op`` as the machine that inserted the card would (MUK_A, SESSION_A); return the status."""
    version = store.get(serial).version
    if op == "insert":
        # an insert from another machine while in use; from idle it is simply the insert
        return insert(store, serial, MUK_B, SESSION_B, "peer-b").status
    if op == "remove":
        return remove(store, serial, SESSION_A, version, b"removed", "peer-a")[0]
    if op == "recover":
        return recover(store, serial, MUK_A, "peer-a")
    if op == "destroy":
        return destroy(store, serial, MUK_A, "peer-a")
    if op == "sync":
        return sync(store, serial, SESSION_A, version, b"synced", "peer-a")[0]
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
        assert (entries[-1].op, entries[-1].result, entries[-1].at) == (op, HISTORY[result], clock.t)
        if result is not OK:
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
    assert store.destroy_by_admin(serial) is OK
    for _ in range(2):
        for op in OPS:
            assert apply(store, serial, op) in (DESTROYED, REFUSED)
            assert store.get(serial).state is CardState.DESTROYED
    with pytest.raises(StoreError, match="destroyed"):
        store.duplicate(serial, "copy")


def test_recover_needs_the_muk_of_the_last_insert(store):
    """Recover from another machine's MUK is refused (muk-mismatch) and the card stays in use; the right MUK recovers."""
    serial = in_state(store, CardState.IN_USE)
    assert recover(store, serial, MUK_B, "peer-b") is MUK_MISMATCH
    assert store.get(serial).state is CardState.IN_USE
    e = last(store, serial)
    assert (e.op, e.result, e.muk, e.peer) == ("recover", "muk-mismatch", MUK_B, "peer-b")
    assert recover(store, serial, MUK_A, "peer-a") is OK
    assert store.get(serial).state is CardState.IDLE


def test_recover_discards_the_unsynced_insert_and_a_later_insert_uses_the_new_muk(store):
    """After recover the next insert may come from another machine, and then only that MUK recovers."""
    serial = in_state(store, CardState.IN_USE)
    assert recover(store, serial, MUK_A, "peer-a") is OK
    assert insert(store, serial, MUK_B, SESSION_B, "peer-b").status is OK
    assert recover(store, serial, MUK_A, "peer-a") is MUK_MISMATCH
    assert recover(store, serial, MUK_B, "peer-b") is OK


def test_operations_on_an_unknown_serial_are_refused_and_logged(store):
    """Every life-cycle operation on a serial with no record is refused, changes nothing and is logged."""
    assert insert(store, "ghost", MUK_A, SESSION_A, "p").status is REFUSED
    assert remove(store, "ghost", SESSION_A, 1, P1, "p") == (REFUSED, 0)
    assert sync(store, "ghost", SESSION_A, 1, P1, "p") == (REFUSED, 0)
    assert recover(store, "ghost", MUK_A, "p") is REFUSED
    assert destroy(store, "ghost") is REFUSED
    assert store.get("ghost") is None
    assert [(e.op, e.result) for e in store.history("ghost")] == [
        ("insert", "refused"), ("remove", "refused"), ("sync", "refused"), ("recover", "refused"), ("destroy", "refused"),
    ]


# ---------------------------------------------------------------- insert retries


def test_repeated_insert_same_session_and_muk_is_a_repeat(store, clock):
    """The same insert retried (same session and MUK) answers 'repeat' with the same check-out; nothing changes."""
    serial = enrolled(store)
    out = insert(store, serial, MUK_A, SESSION_A, "peer-a")
    first = store.get(serial)
    assert out.status is OK and (out.version, out.protected) == (1, P1)
    assert first.state is CardState.IN_USE and first.session_hash == SESSION_A
    clock.advance(3)
    again = insert(store, serial, MUK_A, SESSION_A, "peer-a")
    assert again == out and store.get(serial) == first
    assert [(e.op, e.result) for e in store.history(serial)][-2:] == [("insert", "ok"), ("insert", "repeat")]
    assert [e.result for e in store.history(serial) if e.op == "insert"].count("ok") == 1


def test_insert_while_in_use_from_another_session_is_in_use(store):
    """Another session (even with the same MUK), or another MUK in the same session, is told 'in-use'; the check-out stays."""
    serial = in_state(store, CardState.IN_USE)
    first = store.get(serial)
    assert insert(store, serial, MUK_A, SESSION_B, "peer-a").status is IN_USE
    assert insert(store, serial, MUK_B, SESSION_A, "peer-b").status is IN_USE
    assert store.get(serial) == first


def test_concurrent_inserts_on_one_serial_give_exactly_one_ok(database_url, clock):
    """Many threads inserting one card at once (each its own session and MUK): exactly one 'ok', every other 'in-use'."""
    store = Store(database_url, clock, LOCKOUT)
    try:
        store.migrate()
        serial = enrolled(store)
        n = 16
        results = run_threads(
            n, lambda i: insert(store, serial, bytes([i]) * 32, bytes([i + 100]) * 32, f"t{i}").status
        )
        assert sorted(results) == [OK] + [IN_USE] * (n - 1)
        winner = results.index(OK)
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
    assert sync(store, serial, SESSION_A, 1, b"P2", "peer-a") == (OK, 2)
    assert sync(store, serial, SESSION_A, 1, b"P2", "peer-a") == (OK, 2)  # retried after a lost reply
    assert last(store, serial).result == "repeat"
    assert sync(store, serial, SESSION_A, 1, b"P2-other", "peer-a") == (CONFLICT, 2)
    assert sync(store, serial, SESSION_A, 0, b"P0", "peer-a") == (CONFLICT, 2)
    assert sync(store, serial, SESSION_A, 7, b"P7", "peer-a") == (CONFLICT, 2)
    assert sync(store, serial, SESSION_B, 2, b"P3", "peer-b") == (REFUSED, 0)
    card = store.get(serial)
    assert (card.version, card.protected, card.state) == (2, b"P2", CardState.IN_USE)
    assert sync(store, serial, SESSION_A, 2, b"P3", "peer-a") == (OK, 3)
    assert [e.result for e in store.history(serial) if e.op == "sync"] == [
        "ok", "repeat", "conflict", "conflict", "conflict", "refused", "ok",
    ]


def test_remove_uploads_sets_idle_and_is_idempotent(store):
    """Remove stores the final information at version+1 and sets idle; the identical remove retried is 'ok' again."""
    serial = in_state(store, CardState.IN_USE)
    assert remove(store, serial, SESSION_A, 1, b"final", "peer-a") == (OK, 2)
    card = store.get(serial)
    assert (card.state, card.version, card.protected, card.muk, card.channel_info) == (
        CardState.IDLE, 2, b"final", None, None,
    )
    assert remove(store, serial, SESSION_A, 1, b"final", "peer-a") == (OK, 2)
    assert (last(store, serial).op, last(store, serial).result) == ("remove", "repeat")
    assert store.get(serial) == card


def test_remove_after_a_sync_retried(store):
    """A remove based on the version before a sync that already stored the same bytes is accepted without a bump."""
    serial = in_state(store, CardState.IN_USE)
    assert sync(store, serial, SESSION_A, 1, b"P2", "peer-a") == (OK, 2)
    assert remove(store, serial, SESSION_A, 1, b"P2", "peer-a") == (OK, 2)
    assert store.get(serial).state is CardState.IDLE


def test_remove_version_conflicts_and_wrong_session(store):
    """A remove based on a stale version (or other bytes for the previous one), or from another session, changes nothing."""
    serial = in_state(store, CardState.IN_USE)
    assert sync(store, serial, SESSION_A, 1, b"P2", "peer-a") == (OK, 2)
    before = store.get(serial)
    assert remove(store, serial, SESSION_A, 1, b"other", "peer-a") == (CONFLICT, 2)
    assert remove(store, serial, SESSION_A, 0, b"P0", "peer-a") == (CONFLICT, 2)
    assert remove(store, serial, SESSION_B, 2, b"P3", "peer-b") == (REFUSED, 0)
    assert store.get(serial) == before


def test_a_stale_remove_after_recover_is_not_reported_as_stored(store):
    """
    After recover, a late remove from the recovered insert (its bytes were
    never stored) is refused, not answered 'ok': the card must not believe
    its upload was kept.
    """
    serial = in_state(store, CardState.IN_USE)
    assert recover(store, serial, MUK_A, "peer-a") is OK
    assert remove(store, serial, SESSION_A, 1, b"lost-changes", "peer-a") == (REFUSED, 0)
    assert store.get(serial).protected == P1


def test_a_remove_retry_with_different_bytes_is_refused(store):
    """A 'retry' of a completed remove that carries other bytes is not the same remove: refused, the stored bytes stay."""
    serial = in_state(store, CardState.IN_USE)
    assert remove(store, serial, SESSION_A, 1, b"final", "peer-a") == (OK, 2)
    assert remove(store, serial, SESSION_A, 2, b"more", "peer-a") == (REFUSED, 0)
    assert remove(store, serial, SESSION_A, 1, b"changed", "peer-a") == (REFUSED, 0)
    assert store.get(serial).protected == b"final"


# ---------------------------------------------------------------- lockout


def test_failures_from_other_machines_throttle_after_the_shared_threshold_and_unlock_resets(store, clock):
    """
    Failures from anywhere but the card's last machine count in the card's
    shared bucket: below ``shared_threshold`` (4) nothing is throttled; from
    it the next answer is evaluated only base*2^k (capped) seconds after the
    last failure, and a failure inside that waiting time is not counted (it
    can only be an answer to a challenge sent before the bucket closed);
    unlock clears both buckets.
    """
    serial = enrolled(store)
    expected = {1: 0.0, 2: 0.0, 3: 0.0, 4: 10.0, 5: 20.0, 6: 35.0, 7: 35.0}  # shared 4, base 10, maximum 35
    wait = 0.0
    for failures, delay in expected.items():
        if wait:  # inside the window: not counted, the window unchanged
            until = store.get(serial).locked_until
            fail(store, serial, peer="peer-x", detail="failed: password")
            assert (store.get(serial).failures, store.get(serial).locked_until) == (failures - 1, until)
            assert "not counted" in last(store, serial).detail
        clock.advance(wait)
        wait = delay
        fail(store, serial, peer="peer-x", detail="failed: password")
        card = store.get(serial)
        assert (card.failures, card.machine_failures) == (failures, 0)
        if delay:
            assert card.locked_until == clock.t + delay
            assert card.throttled(clock.t, False) and not card.throttled(clock.t + delay, False)
            assert not card.throttled(clock.t, True), "other machines' failures throttled the owner's machine"
            assert "next answer evaluated after" in last(store, serial).detail
        else:
            assert not card.throttled(clock.t, False) and card.locked_until == 0
    assert (last(store, serial).op, last(store, serial).result, last(store, serial).peer) == ("insert", "refused", "peer-x")
    store.unlock(serial)
    card = store.get(serial)
    assert (card.failures, card.locked_until, card.throttled(clock.t, False)) == (0, 0, False)
    assert (last(store, serial).op, last(store, serial).result, last(store, serial).peer) == ("unlock", "ok", "admin")
    with pytest.raises(StoreError):
        store.unlock("ghost")


def test_the_owners_machine_has_its_own_bucket(store, clock):
    """
    Failures carrying the last insert's MUK count in the machine bucket
    (threshold 3): they throttle only that bucket; strangers' failures never
    touch it, and a success from the machine resets only it.
    """
    serial = in_state(store, CardState.IN_USE)
    assert store.get(serial).last_muk == MUK_A
    for _ in range(10):
        clock.advance(max(0.0, store.get(serial).locked_until - clock.t))  # each one when it may be evaluated
        fail(store, serial, own=False)
    card = store.get(serial)
    assert card.throttled(clock.t, False) and not card.throttled(clock.t, True) and card.machine_failures == 0
    for n in (1, 2, 3):
        fail(store, serial, own=True, muk=MUK_A)
    card = store.get(serial)
    assert card.machine_failures == 3 and card.machine_locked_until == clock.t + 10
    clock.advance(11)
    assert recover(store, serial, MUK_A, own_machine=True) is OK
    card = store.get(serial)
    assert (card.machine_failures, card.machine_locked_until) == (0, 0)
    assert card.failures == 10, "a success on the owner's machine must not refund strangers' failures"
    assert card.last_muk == MUK_A, "recover forgets the session, not the last machine"


def test_a_throttle_never_shortens_and_a_successful_insert_resets_its_bucket(store, clock):
    """A clock stepped back cannot shorten a throttle; a successful insert from another machine resets the shared bucket."""
    serial = enrolled(store)
    for _ in range(5):
        fail(store, serial)
    until = store.get(serial).locked_until
    assert until > clock.t
    clock.advance(-100)  # a clock step backwards must not shorten the throttle
    fail(store, serial)
    assert store.get(serial).locked_until >= until
    clock.advance(10_000)
    assert insert(store, serial, MUK_A, SESSION_A, "p").status is OK
    card = store.get(serial)
    assert (card.failures, card.locked_until, card.last_muk) == (0, 0, MUK_A)


def test_failures_on_an_unknown_serial_are_logged(store):
    """An authentication failure for a serial with no card is logged (no record to count on)."""
    fail(store, "ghost", detail="no such card")
    assert store.get("ghost") is None
    assert [(e.op, e.result) for e in store.history("ghost")] == [("insert", "refused")]


def test_an_answer_checked_against_a_replaced_verifier_changes_nothing(store):
    """
    A password change between the challenge and the answer: the check-out
    carries the verifier the answer was checked against; the transaction
    finds another one and answers BUSY (try again) without checking out.
    """
    serial = enrolled(store)
    out = insert(store, serial, MUK_A, SESSION_A, verifier=b"old" * 8)
    assert out.status is Status.BUSY and store.get(serial).state is CardState.IDLE
    assert (last(store, serial).result, last(store, serial).detail) == ("busy", "the password changed during authentication")


def test_a_totp_step_is_good_once(store):
    """The TOTP step an answer matched is consumed with the operation; the same (or an older) step is then refused."""
    store.issue("t-1", h(CODE), '{"methods": ["password", "totp"]}', ttl=600)
    assert enrol(store, "t-1", extra={"totp": {"secret": "00" * 20, "last_step": -1}}) is OK
    assert insert(store, "t-1", MUK_A, SESSION_A, totp_step=100).status is OK
    assert recover(store, "t-1", MUK_A, totp_step=100) is REFUSED
    assert last(store, "t-1").detail == "TOTP code already used"
    assert store.get("t-1").state is CardState.IN_USE
    assert recover(store, "t-1", MUK_A, totp_step=101) is OK


# ---------------------------------------------------------------- history


def test_every_transition_and_refusal_is_in_history(store, clock):
    """The append-only history records op, result, MUK, peer and time of every transition and refusal, in order."""
    store.issue("card-1", h(CODE), "{}", ttl=600, peer="admin")
    clock.advance(1)
    enrol(store, "card-1", h("WRONG"), P1, peer="p-enrol")
    clock.advance(1)
    enrol(store, "card-1", h(CODE), P1, peer="p-enrol")
    clock.advance(1)
    insert(store, "card-1", MUK_A, SESSION_A, "p-a")
    clock.advance(1)
    insert(store, "card-1", MUK_B, SESSION_B, "p-b")
    clock.advance(1)
    sync(store, "card-1", SESSION_A, 1, b"P2", "p-a")
    clock.advance(1)
    recover(store, "card-1", MUK_B, "p-b")
    clock.advance(1)
    remove(store, "card-1", SESSION_A, 2, b"P3", "p-a")
    clock.advance(1)
    store.log_refusal(LogRefusal("card-1", Operation.INSERT, "bad-request", "p-c", "insert needs a MUK", MUK_B))
    clock.advance(1)
    insert(store, "card-1", MUK_B, SESSION_B, "p-b")
    clock.advance(1)
    recover(store, "card-1", MUK_B, "p-b")
    clock.advance(1)
    fail(store, "card-1", op=Operation.DESTROY, peer="p-d", detail="failed: password")
    clock.advance(1)
    destroy(store, "card-1", MUK_A, "p-e")
    clock.advance(1)
    insert(store, "card-1", MUK_A, SESSION_A, "p-a")
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


# ---------------------------------------------------------------- exclusion across processes [0081]


def test_two_stores_on_one_database_see_each_others_check_out(database_url, clock):
    """
    Two Store objects (as two server processes) on one database: the row
    lock of one transaction is the exclusion. Many threads across both
    stores inserting one card get exactly one check-out.
    """
    a, b = Store(database_url, clock, LOCKOUT), Store(database_url, clock, LOCKOUT)
    try:
        a.migrate()
        b.migrate()
        enrolled(a, "card-2")
        assert insert(b, "card-2", MUK_A, SESSION_A).status is OK
        assert insert(a, "card-2", MUK_B, SESSION_B).status is IN_USE
        enrolled(a, "card-3")
        results = run_threads(10, lambda i: insert(a if i % 2 else b, "card-3", bytes([i]) * 32,
                                                   bytes([i + 50]) * 32, f"t{i}").status)
        assert sorted(results) == [OK] + [IN_USE] * 9
    finally:
        a.close()
        b.close()


# ---------------------------------------------------------------- atomicity


CRASHING = {
    "insert": (CardState.IDLE, lambda s, serial: insert(s, serial, MUK_A, SESSION_A)),
    "remove": (CardState.IN_USE, lambda s, serial: remove(s, serial, SESSION_A, 1, b"new")),
    "sync": (CardState.IN_USE, lambda s, serial: sync(s, serial, SESSION_A, 1, b"new")),
    "password": (CardState.IN_USE, lambda s, serial: s.change_password(
        ChangeCardPassword(serial, SESSION_A, 1, b"w" * 32, b"kdf2", b"new", "p"))),
    "recover": (CardState.IN_USE, lambda s, serial: recover(s, serial, MUK_A)),
    "destroy": (CardState.IDLE, lambda s, serial: destroy(s, serial)),
    "failure": (CardState.IDLE, lambda s, serial: fail(s, serial)),
    "unlock": (CardState.IDLE, lambda s, serial: s.unlock(serial)),
    "duplicate": (CardState.IDLE, lambda s, serial: s.duplicate(serial, "copy")),
}


def snapshot(store: Store, cur=None) -> list[tuple]:
    sql = ("SELECT serial, state, version, failures, locked_until, muk, protected, channel_info, verifier, kdf, "
           "last_muk, machine_failures FROM cards ORDER BY serial")
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
    fail(store, serial)  # so unlock has something to undo
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
    assert sync(store, serial, SESSION_A, 1, b"P2", "p") == (OK, 2)
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
    assert insert(store, "card-copy", MUK_B, SESSION_B, "p").status is OK


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
    assert store.destroy_by_admin("b") is OK
    with pytest.raises(StoreError, match="destroyed"):
        store.duplicate("b", "c")
    assert store.get("c") is None


def test_a_check_out_reads_the_card_row_once(clock, tmp_path):
    """
    The check-out's one transaction reads the locked row once and answers
    from it (version and protected information, which a check-out does not
    change): one SELECT of the card, not a second read after the write.
    """
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}", clock)
    store.migrate()
    try:
        serial = enrolled(store)
        statements: list[str] = []
        store._conn().set_trace_callback(statements.append)
        out = insert(store, serial, b"m" * 32, b"s" * 32)
        store._conn().set_trace_callback(None)
        assert out.status is OK and out.version == 1 and out.protected == P1
        assert sum(1 for s in statements if s.lstrip().upper().startswith("SELECT")) == 1, statements
        assert store.get(serial).state is CardState.IN_USE
    finally:
        store.close()


def test_the_history_keeps_each_cards_newest_rows(store):
    """
    Every request of a card's holder is a history row (an identical retry
    too), so the history keeps a card's newest ``history_per_card`` rows:
    pruned in the same transaction once every HISTORY_PRUNE_EVERY rows the
    process wrote for the card. Another card's rows are untouched, and the
    newest row is always kept. On SQLite and PostgreSQL.
    """
    from vsc.server import store as store_module

    store.history_per_card = 10
    every = store_module.HISTORY_PRUNE_EVERY
    for i in range(3):
        store.log_refusal(LogRefusal("other", Operation.INSERT, "bad-request", f"o-{i}", "kept", None))
    for i in range(every * 3 + 5):
        store.log_refusal(LogRefusal("card-1", Operation.INSERT, "bad-request", f"p-{i}", "pruned", None))
    rows = store.history("card-1")
    assert 10 <= len(rows) <= 10 + every
    assert rows[-1].peer == f"p-{every * 3 + 4}"  # the newest is kept
    assert [r.peer for r in rows] == [f"p-{i}" for i in range(every * 3 + 5 - len(rows), every * 3 + 5)]
    assert [r.peer for r in store.history("other")] == ["o-0", "o-1", "o-2"]
