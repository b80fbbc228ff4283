"""
The TOTP seed look-up of every TOTP authentication (vsc.server.store
``_totp_fresh``: the copies of a card holding its seed share its replay
state) runs by an indexed tag of the seed (``totp_tag``, schema 3), not by
a scan of every card's auth_info: these tests hold that every write of a
card's auth_info keeps the tag right, on both backends, and that a
database of schema 2 migrates (its rows' tags filled in) and is then
refused by an older vsc. The index itself: tests/test_review_followup3.py,
test_the_totp_seed_lookup_of_every_totp_authentication_uses_an_index.
"""

from __future__ import annotations

import json

import pytest

from tests.test_store import CODE, MUK_A, MUK_B, SESSION_A, SESSION_B, VERIFIER, enrol, h, insert
from vsc.protocol.cardstore import ChangeCardPassword, CheckIn, RecoverCard
from vsc.server.store import SCHEMA_VERSION, Store, StoreError
from vsc.wire.ops import Status

S1, S2, S3 = "ab" * 20, "cd" * 20, "ef" * 20


def tag(secret: str) -> str:
    """The tag of a seed, computed here from its definition (SHA-256 of a label and the hex seed)."""
    import hashlib

    return hashlib.sha256(b"vsc totp seed tag\x00" + secret.encode()).hexdigest()


def holders(store: Store, secret: str) -> set[str]:
    """The cards the look-up finds for ``secret``: those whose tag is the seed's."""
    return {row[0] for row in store._read("SELECT serial FROM cards WHERE totp_tag = ?", (tag(secret),))}


def consistent(store: Store) -> None:
    """Every card's tag is its auth_info's seed's (NULL without one): no write left one stale."""
    for serial, info, stored in store._read("SELECT serial, auth_info, totp_tag FROM cards"):
        totp = json.loads(info).get("totp")
        secret = totp.get("secret") if isinstance(totp, dict) else None
        assert stored == (tag(secret) if secret else None), serial


def totp_card(store: Store, serial: str, secret: str) -> None:
    store.issue(serial, h(CODE), '{"methods": ["password", "totp"]}', ttl=600)
    assert enrol(store, serial, extra={"totp": {"secret": secret, "last_step": -1}}) is Status.OK


def test_every_write_of_auth_info_keeps_the_seed_tag(database_url):
    """
    Rule (docs/admin.md `impl_auth`, `totp`: "each code is accepted once, on
    the card and on its copies (`duplicate`)"): the look-up finds exactly the
    cards holding the seed, after every kind of write of auth_info -- an
    enrolment, the same enrolment retried with new material (the seed the
    card received replaces the first), a consumed step, a duplicate, a
    replacement (copy or fresh), a password change, a remove, a destroy.
    With an index, a write that changed auth_info but not the tag would lose
    a copy's replay state (a code accepted twice) or give a card another's.
    A destroyed card keeps its tag: its seed is still in its auth_info, and
    the step last used on it still counts for its surviving copies (a code
    used on it just before the destroy is not good again on a copy).
    """
    store = Store(database_url, lambda: 1_000_000.0)
    store.migrate()
    try:
        totp_card(store, "a", S1)
        assert holders(store, S1) == {"a"}
        # the same enrolment retried (its answer lost): the new seed replaces the first, tag included
        assert enrol(store, "a", extra={"totp": {"secret": S2, "last_step": -1}}) is Status.OK
        assert holders(store, S1) == set() and holders(store, S2) == {"a"}
        store.duplicate("a", "b")
        assert holders(store, S2) == {"a", "b"}
        consistent(store)

        assert insert(store, "a", MUK_A, SESSION_A, totp_step=100).status is Status.OK  # a consumed step
        assert insert(store, "b", MUK_B, SESSION_B, totp_step=100).status is Status.REFUSED
        assert store.history("b")[-1].detail == "TOTP code already used"
        assert insert(store, "b", MUK_B, SESSION_B, totp_step=101).status is Status.OK
        out = store.change_password(ChangeCardPassword("b", SESSION_B, 1, VERIFIER, b"kdf-params", b"p2", "p"))
        assert out.status is Status.OK
        assert store.check_in(CheckIn("b", SESSION_B, 2, b"p3", "p")).status is Status.OK
        assert holders(store, S2) == {"a", "b"}
        consistent(store)

        store.replace("b", "b-r1")  # a copy of b, and b destroyed: all three hold the seed
        assert holders(store, S2) == {"a", "b", "b-r1"}
        assert store.recover(RecoverCard("a", MUK_A, "p", VERIFIER, totp_step=101)).status is Status.REFUSED
        assert store.recover(RecoverCard("a", MUK_A, "p", VERIFIER, totp_step=102)).status is Status.OK
        assert insert(store, "a", MUK_A, SESSION_A, totp_step=103).status is Status.OK
        assert store.destroy_by_admin("a") is Status.OK  # the step used on it just before still counts
        assert insert(store, "b-r1", MUK_B, SESSION_B, totp_step=103).status is Status.REFUSED
        assert insert(store, "b-r1", MUK_B, SESSION_B, totp_step=104).status is Status.OK
        consistent(store)

        totp_card(store, "c", S1)  # a card of its own: found alone, and finds none of the others
        store.replace("c", "c-r1", fresh=(h(CODE), '{"methods": ["password", "totp"]}', 600.0))
        assert enrol(store, "c-r1", extra={"totp": {"secret": S3, "last_step": -1}}) is Status.OK
        assert holders(store, S3) == {"c-r1"} and holders(store, S1) == {"c"}
        assert insert(store, "c-r1", MUK_A, SESSION_A, totp_step=103).status is Status.OK  # nothing shared with S2
        assert holders(store, S2) == {"a", "b", "b-r1"}
        store.issue("plain", h(CODE), '{"methods": ["password"]}', ttl=600)
        assert enrol(store, "plain") is Status.OK
        consistent(store)
    finally:
        store.close()


def test_the_seed_lookup_uses_the_index_on_postgresql(pg_database_url):
    """
    (See tests/test_review_followup3.py for SQLite.) On PostgreSQL too the
    copies are found through the index on the tag: with sequential scans
    made as expensive as the planner allows, the statement ``_totp_fresh``
    runs is planned on cards_totp_tag (on a few rows the planner would scan
    anyway; at 100,000 cards an indexed equality look-up is what it picks).
    """
    store = Store(pg_database_url, lambda: 1_000_000.0)
    store.migrate()
    try:
        with store._txn() as cur:
            cur.execute("SET LOCAL enable_seqscan = off")
            plan = " ".join(row[0] for row in cur.execute(
                "EXPLAIN SELECT auth_info FROM cards WHERE totp_tag = %s AND serial <> %s", (tag(S1), "x")))
        assert "cards_totp_tag" in plan, plan
    finally:
        store.close()


#: the cards table of schema 2, as vsc wrote it before the tag (the other tables did not change)
_CARDS_V2 = """CREATE TABLE cards (
    serial TEXT PRIMARY KEY,
    state TEXT NOT NULL CHECK (state IN ('idle', 'in-use', 'destroyed')),
    muk {blob},
    protected {blob} NOT NULL,
    channel_info TEXT,
    verifier {blob} NOT NULL,
    kdf {blob} NOT NULL,
    auth_info TEXT NOT NULL,
    version INTEGER NOT NULL,
    failures INTEGER NOT NULL DEFAULT 0,
    locked_until DOUBLE PRECISION NOT NULL DEFAULT 0,
    created DOUBLE PRECISION NOT NULL,
    updated DOUBLE PRECISION NOT NULL,
    last_session {blob},
    last_muk {blob},
    machine_failures INTEGER NOT NULL DEFAULT 0,
    machine_locked_until DOUBLE PRECISION NOT NULL DEFAULT 0
)"""


def test_a_schema_2_database_migrates_with_its_seed_tags_and_an_older_vsc_refuses_it(database_url, monkeypatch):
    """
    Rule (vsc.server.store ``migrate``: "Create the schema, or bring it up
    to SCHEMA_VERSION"; docs/admin.md, upgrade notes): a database written by
    the previous vsc (schema 2: no tag) migrates to 3 in one transaction,
    the tag of every existing card filled in from its auth_info (cards
    sharing a seed share it; a card without a seed, or with unreadable
    auth_info, gets none), so the replay state of copies made before the
    upgrade is still shared after it. The previous vsc (schema 2) then
    refuses the migrated database with its one line instead of writing
    auth_info without the tag.
    """
    store = Store(database_url, lambda: 1_000_000.0)
    blob = "BLOB" if store.kind == "sqlite" else "BYTEA"
    try:
        with store._txn() as cur:
            store._x(cur, "CREATE TABLE schema_version (version INTEGER NOT NULL)")
            store._x(cur, "INSERT INTO schema_version (version) VALUES (2)")
            store._x(cur, _CARDS_V2.format(blob=blob))
            for serial, info in [
                ("old-a", {"methods": ["password", "totp"], "totp": {"secret": S1, "last_step": 200}}),
                ("old-b", {"methods": ["password", "totp"], "totp": {"secret": S1, "last_step": 150}}),
                ("old-c", {"methods": ["password", "totp"], "totp": {"secret": S2, "last_step": 7}}),
                ("old-p", {"methods": ["password"]}),
            ]:
                store._x(cur, "INSERT INTO cards (serial, state, protected, verifier, kdf, auth_info, version, "
                              "created, updated) VALUES (?, 'idle', ?, ?, ?, ?, 1, 0, 0)",
                         (serial, b"p", VERIFIER, b"kdf-params", json.dumps(info, sort_keys=True)))
            store._x(cur, "INSERT INTO cards (serial, state, protected, verifier, kdf, auth_info, version, "
                          "created, updated) VALUES ('old-x', 'idle', ?, ?, ?, 'not json', 1, 0, 0)",
                     (b"p", VERIFIER, b"kdf-params"))
        assert store.migrate() == SCHEMA_VERSION == 3
        assert store._read("SELECT version FROM schema_version") == [(3,)]
        assert holders(store, S1) == {"old-a", "old-b"} and holders(store, S2) == {"old-c"}
        assert store._read("SELECT totp_tag FROM cards WHERE serial IN ('old-p', 'old-x')") == [(None,), (None,)]
        # the step used on old-a before the upgrade still counts for its copy old-b
        assert insert(store, "old-b", MUK_A, SESSION_A, totp_step=200).status is Status.REFUSED
        assert insert(store, "old-b", MUK_A, SESSION_A, totp_step=201).status is Status.OK
        assert store.migrate() == 3  # and again: nothing to do
    finally:
        store.close()
    import vsc.server.store as module

    monkeypatch.setattr(module, "SCHEMA_VERSION", 2)  # the previous vsc on the migrated database
    older = Store(database_url, lambda: 1_000_000.0)
    try:
        with pytest.raises(StoreError, match=r"^database schema 3 is newer than this vsc \(2\); upgrade vsc$"):
            older.migrate()
    finally:
        older.close()
