"""
The VSC Server's database: the card records of [0034], an append-only
history, and one-time enrolment codes. It implements the store interface
of the operation machine (vsc.protocol.cardstore.CardStore).

Two backends behind one class: SQLite in WAL mode (the embedded default) and
PostgreSQL (several server processes). Every method is synchronous and runs
on a worker thread, never on the reactor thread (vsc.server.service uses a
thread pool).

Each operation is ONE transaction: read the card's row under a lock (SELECT
... FOR UPDATE on PostgreSQL; SQLite's BEGIN IMMEDIATE takes the write lock
up front), classify the request against it and decide with Figure 4's table
(vsc.protocol.lifecycle), write the decision and the history line that
explains it, commit. The decision is taken on the very row it changes, so
two inserts of one serial racing from two machines, in one process or two,
get exactly one check-out, and nothing is held while a peer authenticates:
the per-serial exclusion of [0081] is the row lock of one transaction.
A row that does not exist yet locks nothing on PostgreSQL: a new serial
(issue, duplicate) is decided under one advisory lock, and an issue or revoke
locks the enrolment code an enrolment may be consuming.
A crash leaves the old record or the new one, never a mix.

One responsibility (and so one module despite its length): the card database, on both backends.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
from typing import Any, Callable, Iterator
from urllib.parse import urlparse, urlunparse

import attrs

from vsc import crypto
from vsc.protocol.cardstore import (
    AttachCard,
    CardRecord,
    ChangeCardPassword,
    CheckIn,
    CheckOut,
    CountFailure,
    DestroyCard,
    EnrolCard,
    LoadCard,
    LogRefusal,
    Outcome,
    RecoverCard,
    SyncCard,
)
from vsc.protocol.lifecycle import (
    Action,
    CardFacts,
    Condition,
    Decision,
    Operation,
    RequestFacts,
    State,
    classify,
    decide,
)
from vsc.protocol.lockout import LockoutPolicy
from vsc.wire.ops import Status

SCHEMA_VERSION = 3

CardState = State  # the life-cycle states of Figure 4 (vsc.protocol.lifecycle)

#: History details for conditions (the reason a refusal or a repeat was answered as it was).
_DETAILS: dict[tuple[Operation, Condition], str] = {
    (Operation.INSERT, Condition.RETRY): "same insert retried; same check-out",
    (Operation.INSERT, Condition.OTHERWISE): "in use on another machine",
    (Operation.RECOVER, Condition.OTHER_MACHINE): "recover attempted from another machine",
    (Operation.SYNC, Condition.STRANGER): "not this card's current insert",
    (Operation.PASSWORD, Condition.STRANGER): "not this card's current insert",
    (Operation.REMOVE, Condition.STRANGER): "not this card's current insert",
    (Operation.SYNC, Condition.ANY): "not in use",
    (Operation.PASSWORD, Condition.ANY): "not in use",
    (Operation.REMOVE, Condition.OTHERWISE): "not in use",
    (Operation.REMOVE, Condition.RETRY): "already removed",
    (Operation.DESTROY, Condition.ANY): "",
}


#: the history rows kept per card (the newest): every request of a card's holder is a row, so without a
#: bound one owner could grow the database without end (docs/admin.md, "The history")
HISTORY_PER_CARD = 10_000
#: how many rows a process writes for a card between two prunes (a card holds at most the sum of the two)
HISTORY_PRUNE_EVERY = 64
_UNPRUNED_MAX = 100_000


class StoreError(Exception):
    """A database-level refusal meant for an administrator (message is user-facing)."""


class StorageFull(StoreError):
    """The database cannot store the change now: its disk (or its quota) is full. Nothing was changed."""


#: SQLSTATE of PostgreSQL's disk_full ("could not extend file ... No space left on device")
_PG_DISK_FULL = "53100"


def storage_full(e: BaseException) -> bool:
    """Whether a database error means "no space to store" (SQLite SQLITE_FULL, PostgreSQL disk_full)."""
    if isinstance(e, sqlite3.Error):
        code = getattr(e, "sqlite_errorcode", None)
        if code is not None and code & 0xFF == sqlite3.SQLITE_FULL:
            return True
        return "database or disk is full" in str(e)
    return getattr(e, "sqlstate", None) == _PG_DISK_FULL


def _full_as_storage_full(e: BaseException) -> None:
    if storage_full(e):
        raise StorageFull("the database cannot store changes: its disk is full") from e


@attrs.frozen
class HistoryEntry:
    id: int
    serial: str
    op: str
    result: str
    muk: bytes | None
    peer: str
    at: float
    detail: str

    def as_dict(self) -> dict:
        return {
            "id": self.id,
            "serial": self.serial,
            "op": self.op,
            "result": self.result,
            "muk": self.muk.hex() if self.muk else None,
            "peer": self.peer,
            "at": self.at,
            "detail": self.detail,
        }


_CARD_COLUMNS = (
    "serial, state, muk, protected, channel_info, verifier, kdf, auth_info, version, "
    "failures, locked_until, created, updated, last_session, last_muk, machine_failures, machine_locked_until"
)

_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS cards (
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
        machine_locked_until DOUBLE PRECISION NOT NULL DEFAULT 0,
        totp_tag TEXT
    )""",
    """CREATE TABLE IF NOT EXISTS history (
        id {serial_pk},
        serial TEXT NOT NULL,
        op TEXT NOT NULL,
        result TEXT NOT NULL,
        muk {blob},
        peer TEXT NOT NULL,
        at DOUBLE PRECISION NOT NULL,
        detail TEXT NOT NULL DEFAULT ''
    )""",
    """CREATE INDEX IF NOT EXISTS history_serial ON history (serial, id)""",
    """CREATE TABLE IF NOT EXISTS enrolment_codes (
        serial TEXT PRIMARY KEY,
        code_hash {blob} NOT NULL,
        auth_info TEXT NOT NULL,
        created DOUBLE PRECISION NOT NULL,
        expires DOUBLE PRECISION NOT NULL
    )""",
]

#: the tables of vsc's schema besides schema_version: a database holding one of them without a version is not vsc's
_TABLES = frozenset({"cards", "history", "enrolment_codes", "leases"})

#: the index of the cards' TOTP seed tags (``_totp_fresh``): made with the column (a new database, migration 3)
_TOTP_TAG_INDEX = "CREATE INDEX IF NOT EXISTS cards_totp_tag ON cards (totp_tag)"

#: Migrations from version N to N+1, appended as the schema evolves: SQL, or "fill totp tags" (``_fill_totp_tags``).
_MIGRATIONS: dict[int, list[str]] = {
    # 2: the owner's-machine lockout bucket (vsc.protocol.lockout); per-serial leases are gone
    1: [
        "ALTER TABLE cards ADD COLUMN last_muk {blob}",
        "ALTER TABLE cards ADD COLUMN machine_failures INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE cards ADD COLUMN machine_locked_until DOUBLE PRECISION NOT NULL DEFAULT 0",
        "DROP TABLE IF EXISTS leases",
    ],
    # 3: the indexed tag of each card's TOTP seed, so the look-up of the copies sharing it is not a scan
    2: [
        "ALTER TABLE cards ADD COLUMN totp_tag TEXT",
        _TOTP_TAG_INDEX,
        "fill totp tags",
    ],
}


def _totp_secret(info: dict) -> str | None:
    """The card's TOTP seed as stored in auth_info (lower-case hex), or None: no seed to share."""
    totp = info.get("totp") if isinstance(info, dict) else None
    secret = str(totp.get("secret", "")) if isinstance(totp, dict) else ""
    return secret if secret and all(c in "0123456789abcdef" for c in secret) else None


def _totp_tag(info: dict) -> str | None:
    """
    The ``totp_tag`` column of a card whose auth_info is ``info``: SHA-256
    of its TOTP seed (domain-separated), or NULL without one. The cards
    holding one seed (a card, its duplicates, a replacement's original)
    share the tag, which is indexed: ``_totp_fresh`` finds them without
    reading every row. A tag, not a second copy of the seed: the index
    holds nothing that answers a TOTP challenge (the seed itself stays
    where it was, in auth_info). Written with auth_info by every statement
    that writes it (enrol, re-enrol, duplicate, reissue, a consumed step),
    and filled in for existing rows by migration 3.
    """
    secret = _totp_secret(info)
    return None if secret is None else crypto.sha256(b"vsc totp seed tag\x00" + secret.encode()).hex()


def _identical_enrolment(card: CardRecord, verifier: bytes, kdf: bytes, protected: bytes, registration: bytes) -> bool:
    """Whether the stored card is exactly this enrolment, untouched since (idle, version 1): a retry of it."""
    try:
        stored_registration = json.loads(card.auth_info or "{}").get("registration", "")
    except (ValueError, AttributeError):
        return False
    return (card.state is State.IDLE and card.version == 1
            and crypto.constant_time_equal(bytes(card.verifier), verifier)
            and (card.kdf, card.protected) == (kdf, protected) and stored_registration == registration.hex())


def _wal_mode(conn: sqlite3.Connection, attempts: int = 5) -> None:
    """
    ``PRAGMA journal_mode=WAL``, waiting for another writer. On a database
    still in rollback mode (a new one that another process is switching to
    WAL and creating the schema in, in its first moments) the switch is
    refused at once with "database is locked": SQLite does not wait (the
    busy timeout) for a lock it would have to upgrade. So on that refusal
    wait for the write lock the SQLite way (BEGIN IMMEDIATE honours the busy
    timeout), let it go, and switch again: the other process has finished,
    and the database is in WAL mode already.
    """
    for attempt in range(attempts):
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if attempt == attempts - 1 or "locked" not in str(e):
                raise
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("ROLLBACK")


def redact(url: str) -> str:
    """A database URL without its password (``USER:***@HOST``), for every message and log line."""
    try:
        parsed = urlparse(url)
        password = parsed.password
    except ValueError:  # a URL urlparse cannot take apart (a bad port): say nothing of what it holds
        return "(the database URL)"
    if password is None:
        return url
    netloc = parsed.netloc.rsplit("@", 1)
    return urlunparse(parsed._replace(netloc=f"{parsed.username}:***@{netloc[-1]}"))


class Store:
    """Open with ``Store.open(url, now)``; ``now`` is the injected clock (reactor.seconds)."""

    #: seconds a statement waits for a lock another connection holds (SQLite's busy timeout, PostgreSQL's
    #: lock_timeout) before it fails (INTERNAL for a card): a process stopped in the middle of a transaction
    #: must not hold every other process's calls for that card, and their database threads, with it
    lock_timeout = 10.0
    #: PostgreSQL ends a session idle inside a transaction this long (its transaction rolled back, its locks
    #: released): a transaction never waits on anything outside the database between its statements, so only a
    #: process stopped or cut off mid-transaction is, and it must not keep a card locked for the others
    idle_in_transaction = 60.0
    #: libpq's connection options, unless the database URL sets them itself: a database host that vanishes
    #: without a FIN or RST (a power cut, a failover to another address, a partition) is noticed in about a
    #: minute (keepalive probes after 30 s idle, 3 probes 10 s apart; 60 s for data it never acknowledges)
    #: instead of the kernel's defaults (over two hours), which held the database thread and its cards as long
    pg_connect_options = {"connect_timeout": 10, "keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10,
                          "keepalives_count": 3, "tcp_user_timeout": 60_000}

    def __init__(self, url: str, now: Callable[[], float], lockout: LockoutPolicy = LockoutPolicy(),
                 history_per_card: int = HISTORY_PER_CARD):
        self.url = url
        self.now = now
        self.lockout = lockout
        self.history_per_card = max(1, history_per_card)
        self._unpruned: dict[str, int] = {}  # history rows written per serial since it was last pruned
        parsed = urlparse(url)
        if parsed.scheme == "sqlite":
            self.kind = "sqlite"
            self.path = url[len("sqlite:///") - 1 :] if url.startswith("sqlite:///") else parsed.path
            if self.path.startswith("//"):
                self.path = self.path[1:]
        elif parsed.scheme in ("postgresql", "postgres"):
            self.kind = "postgresql"
            try:
                import psycopg  # noqa: F401
            except ImportError:
                raise StoreError("PostgreSQL needs psycopg: pip install 'vsc[postgres]'") from None
        else:
            raise StoreError(f"unsupported database URL {redact(url)!r}: use sqlite:///PATH or postgresql://...")
        self._local = threading.local()
        self._all: list[Any] = []
        self._all_lock = threading.Lock()

    # ------------------------------------------------------------ plumbing

    def _connect(self):
        if self.kind == "sqlite":
            if not os.path.exists(self.path):  # the database holds every card's record: owner-only, like the key
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
            conn = sqlite3.connect(self.path, timeout=self.lock_timeout, isolation_level=None,
                                   check_same_thread=False)
            _wal_mode(conn)
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute(f"PRAGMA busy_timeout={int(self.lock_timeout * 1000)}")
            return conn
        import psycopg

        from psycopg.conninfo import conninfo_to_dict

        given = conninfo_to_dict(self.url)
        options = {key: value for key, value in self.pg_connect_options.items() if key not in given}
        conn = psycopg.connect(self.url, autocommit=True, **options)
        try:
            conn.execute("SELECT set_config('lock_timeout', %s, false), "
                         "set_config('idle_in_transaction_session_timeout', %s, false)",
                         (f"{int(self.lock_timeout * 1000)}ms", f"{int(self.idle_in_transaction * 1000)}ms"))
        except BaseException:
            conn.close()
            raise
        return conn

    def _conn(self):
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
            with self._all_lock:
                self._all.append(conn)
        return conn

    def close(self) -> None:
        with self._all_lock:
            conns, self._all = self._all, []
        for conn in conns:
            with contextlib.suppress(Exception):
                conn.close()
        self._local = threading.local()

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self.kind == "postgresql" else sql

    def _params(self, params: tuple) -> tuple:
        """
        PostgreSQL text cannot hold a NUL (psycopg raises): a NUL in a text
        parameter (a request's serial is any UTF-8 on the wire) is stored and
        looked up as U+FFFD. Neither is in the serial alphabet, so such a
        serial names no card on either backend: refused like any unknown one.
        """
        if self.kind != "postgresql":
            return params
        return tuple(p.replace("\x00", "\ufffd") if isinstance(p, str) and "\x00" in p else p for p in params)

    @contextlib.contextmanager
    def _txn(self) -> Iterator[Any]:
        """One write transaction (see ``_txn_raw``); a full disk is StorageFull, whatever statement met it."""
        try:
            with self._txn_raw() as cur:
                yield cur
        except StoreError:
            raise
        except Exception as e:
            _full_as_storage_full(e)
            raise

    @contextlib.contextmanager
    def _txn_raw(self) -> Iterator[Any]:
        """One write transaction; SQLite takes the write lock up front (BEGIN IMMEDIATE)."""
        conn = self._conn()
        if self.kind == "postgresql":
            try:
                with contextlib.ExitStack() as stack:
                    try:
                        stack.enter_context(conn.transaction())  # BEGIN
                    except Exception:
                        # a connection the database dropped (it restarted) fails at BEGIN, before
                        # anything of this transaction was sent: reconnect once and begin again
                        if not self._discard_if_broken(conn):
                            raise
                        conn = self._conn()
                        stack.enter_context(conn.transaction())
                    yield conn.cursor()
            except BaseException:
                self._discard_if_broken(conn)
                raise
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn.cursor()
            conn.execute("COMMIT")  # may fail too (a full disk): then roll back, leaving the connection usable
        except BaseException:
            with contextlib.suppress(Exception):
                conn.execute("ROLLBACK")
            raise

    def _discard_if_broken(self, conn) -> bool:
        """Forget this thread's connection if the database closed it (the next call reconnects)."""
        if self.kind == "postgresql" and getattr(conn, "closed", False):
            if getattr(self._local, "conn", None) is conn:
                self._local.conn = None
            with self._all_lock:
                self._all = [c for c in self._all if c is not conn]
            return True
        return False

    def _x(self, cur, sql: str, params: tuple = ()) -> Any:
        cur.execute(self._sql(sql), self._params(params))
        return cur

    def _read(self, sql: str, params: tuple = ()) -> list[tuple]:
        for attempt in (1, 2):
            conn = self._conn()
            try:
                cur = conn.cursor()
                cur.execute(self._sql(sql), self._params(params))
                return cur.fetchall()
            except Exception:
                # a connection the database dropped: forget it; a read changes nothing, so read once more
                if not self._discard_if_broken(conn) or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _blob(self, value):
        return None if value is None else bytes(value)

    # ------------------------------------------------------------ schema

    def _tables(self, cur) -> set[str]:
        """The names of the tables the database holds (its current schema, on PostgreSQL)."""
        if self.kind == "sqlite":
            rows = self._x(cur, "SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
        else:
            rows = self._x(cur, "SELECT table_name FROM information_schema.tables "
                                "WHERE table_schema = current_schema()").fetchall()
        return {row[0] for row in rows}

    def migrate(self) -> int:
        """Create the schema, or bring it up to SCHEMA_VERSION. Returns the version."""
        blob = "BLOB" if self.kind == "sqlite" else "BYTEA"
        serial_pk = "INTEGER PRIMARY KEY AUTOINCREMENT" if self.kind == "sqlite" else "BIGSERIAL PRIMARY KEY"
        with self._txn() as cur:
            if self.kind == "postgresql":
                # serialise concurrent migrations across processes
                cur.execute("SELECT pg_advisory_xact_lock(7390001)")
            found = self._tables(cur)
            for stmt in _SCHEMA:
                self._x(cur, stmt.format(blob=blob, serial_pk=serial_pk))
            rows = self._x(cur, "SELECT version FROM schema_version").fetchall()
            if not rows:
                if found & _TABLES:  # never vsc's (its version row is written with its tables): not taken over
                    raise StoreError(
                        f"the database {redact(self.url)} holds a table named {sorted(found & _TABLES)[0]} but no "
                        f"vsc schema version: it is not a vsc database (or it is damaged); name an empty one")
                self._x(cur, _TOTP_TAG_INDEX)  # the column is in the new cards table
                self._x(cur, "INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
                return SCHEMA_VERSION
            version = rows[0][0]
            if not isinstance(version, int) or version < 1:
                raise StoreError(f"database {redact(self.url)}: schema version {version!r} is not one this vsc knows "
                                 f"(1 to {SCHEMA_VERSION}): it is damaged")
            if version > SCHEMA_VERSION:
                raise StoreError(f"database schema {version} is newer than this vsc ({SCHEMA_VERSION}); upgrade vsc")
            while version < SCHEMA_VERSION:
                for stmt in _MIGRATIONS[version]:
                    if stmt == "fill totp tags":
                        self._fill_totp_tags(cur)
                    else:
                        self._x(cur, stmt.format(blob=blob, serial_pk=serial_pk))
                version += 1
            self._x(cur, "UPDATE schema_version SET version = ?", (version,))
            return version

    def _fill_totp_tags(self, cur) -> None:
        """Migration 3: every existing card's ``totp_tag``, in the migration's transaction (one scan, once)."""
        rows = self._x(cur, "SELECT serial, auth_info FROM cards").fetchall()
        for serial, auth_info in rows:
            try:
                tag = _totp_tag(json.loads(auth_info or "{}"))
            except ValueError:
                continue
            if tag is not None:
                self._x(cur, "UPDATE cards SET totp_tag = ? WHERE serial = ?", (tag, serial))

    # ------------------------------------------------------------ rows

    def _set_auth_info(self, cur, serial: str, info: dict) -> None:
        """Write a card's auth_info and, with it, the tag of its TOTP seed (``_totp_tag``)."""
        self._x(cur, "UPDATE cards SET auth_info = ?, totp_tag = ? WHERE serial = ?",
                (json.dumps(info, sort_keys=True), _totp_tag(info), serial))

    def _card(self, row) -> CardRecord:
        (serial, state, muk, protected, channel_info, verifier, kdf, auth_info, version,
         failures, locked_until, created, updated, last_session, last_muk, machine_failures,
         machine_locked_until) = row
        return CardRecord(
            serial=serial,
            state=State(state),
            muk=self._blob(muk),
            protected=bytes(protected),
            channel_info=channel_info,
            verifier=bytes(verifier),
            kdf=bytes(kdf),
            auth_info=auth_info,
            version=version,
            failures=failures,
            locked_until=locked_until,
            created=created,
            updated=updated,
            last_session=self._blob(last_session),
            last_muk=self._blob(last_muk),
            machine_failures=machine_failures,
            machine_locked_until=machine_locked_until,
        )

    def _get_for_update(self, cur, serial: str) -> CardRecord | None:
        lock = " FOR UPDATE" if self.kind == "postgresql" else ""
        row = self._x(cur, f"SELECT {_CARD_COLUMNS} FROM cards WHERE serial = ?{lock}", (serial,)).fetchone()
        return self._card(row) if row else None

    def _history(self, cur, serial: str, op: str, result: str, peer: str, muk: bytes | None = None, detail: str = "") -> None:
        self._x(
            cur,
            "INSERT INTO history (serial, op, result, muk, peer, at, detail) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (serial, op, result, muk, peer, self.now(), detail),
        )
        # the history keeps a card's newest history_per_card rows: pruned in the same transaction once every
        # HISTORY_PRUNE_EVERY rows this process wrote for the card, so one owner's requests (each is a row,
        # an identical retry too) cannot fill the database for everyone
        unpruned = self._unpruned.get(serial, 0) + 1
        if unpruned >= HISTORY_PRUNE_EVERY:
            self._x(cur, "DELETE FROM history WHERE serial = ? AND id < (SELECT id FROM history WHERE serial = ? "
                         "ORDER BY id DESC LIMIT 1 OFFSET ?)", (serial, serial, self.history_per_card - 1))
            unpruned = 0
            if len(self._unpruned) > _UNPRUNED_MAX:  # a bound of its own (strangers name any serial)
                self._unpruned.clear()
        self._unpruned[serial] = unpruned

    def get(self, serial: str) -> CardRecord | None:
        rows = self._read(f"SELECT {_CARD_COLUMNS} FROM cards WHERE serial = ?", (serial,))
        return self._card(rows[0]) if rows else None

    def load_card(self, e: LoadCard) -> CardRecord | None:
        """
        The row a challenge is made from: a plain read, nothing is held —
        unless a bucket on it opens further ahead than ``lockout_max``: the
        wall clock was stepped back since its last failure, and the bucket is
        brought back to ``lockout_max`` from now (vsc.protocol.lockout), or
        it would keep the owner out for the whole size of the step.
        """
        card = self.get(e.serial)
        if card is not None and max(card.locked_until, card.machine_locked_until) > self.now() + self.lockout.maximum:
            card = self._bound_throttles(e.serial)
        return card

    def _bound_throttles(self, serial: str) -> CardRecord | None:
        now = self.now()
        with self._txn() as cur:
            card = self._get_for_update(cur, serial)
            if card is None:
                return None
            locked = self.lockout.bound(card.locked_until, now)
            machine = self.lockout.bound(card.machine_locked_until, now)
            if (locked, machine) == (card.locked_until, card.machine_locked_until):
                return card
            self._x(cur, "UPDATE cards SET locked_until = ?, machine_locked_until = ? WHERE serial = ?",
                    (locked, machine, serial))
            self._history(cur, serial, "throttle", "ok", "server", detail=(
                f"the server's clock was stepped back: the throttle now ends within {self.lockout.maximum:g} s "
                "(lockout_max)"))
            return attrs.evolve(card, locked_until=locked, machine_locked_until=machine)

    def list_cards(self) -> list[CardRecord]:
        return [self._card(r) for r in self._read(f"SELECT {_CARD_COLUMNS} FROM cards ORDER BY serial")]

    def pending(self) -> list[tuple[str, float]]:
        return [(r[0], r[1]) for r in self._read("SELECT serial, expires FROM enrolment_codes ORDER BY serial")]

    def history(self, serial: str | None = None) -> list[HistoryEntry]:
        if serial is None:
            rows = self._read("SELECT id, serial, op, result, muk, peer, at, detail FROM history ORDER BY id")
        else:
            rows = self._read(
                "SELECT id, serial, op, result, muk, peer, at, detail FROM history WHERE serial = ? ORDER BY id",
                (serial,),
            )
        return [HistoryEntry(r[0], r[1], r[2], r[3], self._blob(r[4]), r[5], r[6], r[7]) for r in rows]

    # ------------------------------------------------------------ enrolment

    def _claim_serials(self, cur) -> None:
        """
        The lock under which a new serial is decided (issue, duplicate), taken
        first in its transaction. SQLite's BEGIN IMMEDIATE already serialises
        every writer; on PostgreSQL nothing locks a row that does not exist
        yet, so without this two processes each found the other's new serial
        absent (or no look-alike of it) and both committed.
        """
        if self.kind == "postgresql":
            self._x(cur, "SELECT pg_advisory_xact_lock(7390002)")

    def _refuse_new_serial(self, cur, serial: str) -> None:
        """A new serial must be in the alphabet and look like no other (vsc.protocol.serials), under the lock."""
        from vsc.protocol import serials

        try:
            if serials.check(serial) != serial:
                raise serials.SerialError(f"serial {serial!r} is not in NFC form")
            others = [r[0] for r in self._x(cur, "SELECT serial FROM cards UNION SELECT serial FROM enrolment_codes").fetchall()]
            serials.refuse_confusable(serial, others)
        except serials.SerialError as e:
            raise StoreError(str(e)) from None

    def issue(self, serial: str, code_hash: bytes, auth_info: str, ttl: float, peer: str = "admin") -> None:
        with self._txn() as cur:
            self._claim_serials(cur)
            self._issue(cur, serial, code_hash, auth_info, ttl, peer, self.now())

    def _issue(self, cur, serial: str, code_hash: bytes, auth_info: str, ttl: float, peer: str, now: float) -> None:
        lock = " FOR UPDATE" if self.kind == "postgresql" else ""
        # the code it replaces first: an enrolment using it (holding its row) ends before the card is looked for
        self._x(cur, f"SELECT 1 FROM enrolment_codes WHERE serial = ?{lock}", (serial,)).fetchall()
        if self._get_for_update(cur, serial) is not None:
            raise StoreError(f"card {serial} already exists")
        self._refuse_new_serial(cur, serial)
        self._x(cur, "DELETE FROM enrolment_codes WHERE serial = ?", (serial,))
        self._x(
            cur,
            "INSERT INTO enrolment_codes (serial, code_hash, auth_info, created, expires) VALUES (?, ?, ?, ?, ?)",
            (serial, code_hash, auth_info, now, now + ttl),
        )
        self._history(cur, serial, "issue", "ok", peer, detail=f"enrolment code valid for {ttl:g} s")

    def revoke(self, serial: str, peer: str = "admin") -> float:
        """
        `vsc admin revoke`: the enrolment code of a serial issued but not
        enrolled is deleted (it can no longer enrol the card), with a history
        row. Returns when the code would have expired. An enrolled card has no
        code to revoke (StoreError: destroy it instead).
        """
        lock = " FOR UPDATE" if self.kind == "postgresql" else ""
        with self._txn() as cur:
            # locked: an enrolment consuming the code ends first (then there is none to revoke)
            row = self._x(cur, f"SELECT expires FROM enrolment_codes WHERE serial = ?{lock}", (serial,)).fetchone()
            if row is None:
                if self._get_for_update(cur, serial) is not None:
                    raise StoreError(f"card {serial} is enrolled: there is no code to revoke "
                                     "(vsc admin destroy retires a card)")
                raise StoreError(f"no enrolment code for {serial}")
            self._x(cur, "DELETE FROM enrolment_codes WHERE serial = ?", (serial,))
            self._history(cur, serial, "revoke", "ok", peer, detail="enrolment code revoked")
            return float(row[0])

    def enrolment(self, serial: str) -> tuple[bytes, str, float] | None:
        rows = self._read("SELECT code_hash, auth_info, expires FROM enrolment_codes WHERE serial = ?", (serial,))
        return (bytes(rows[0][0]), rows[0][1], rows[0][2]) if rows else None

    def may_enrol(self, serial: str, code_hash: bytes, verifier: bytes, kdf: bytes, protected: bytes,
                  registration: bytes) -> bool:
        """
        A plain read before any work is done for an enrolment (a keyfile's
        signature): whether its code is valid now, or the card exists as this
        very enrolment, untouched (a retry: idle, version 1, the same
        verifier, KDF parameters, upload and registration — what ``enrol``
        answers OK again, and nothing less: the verifier alone would have a
        guessed password's request signed for, then refused). ``enrol``
        decides again under its lock.
        """
        rows = self._read("SELECT code_hash, expires FROM enrolment_codes WHERE serial = ?", (serial,))
        if rows and crypto.constant_time_equal(bytes(rows[0][0]), code_hash) and rows[0][1] >= self.now():
            return True
        card = self.get(serial)
        return card is not None and _identical_enrolment(card, verifier, kdf, protected, registration)

    def enrol(self, e: EnrolCard) -> Outcome:
        """
        Create the card (idle, version 1) with the auth_info fixed when the
        code was issued, and consume the code, atomically. The card's
        ``registration`` (public material for implementation authentication)
        is kept in auth_info, and so is ``auth_extra``: the server's side of
        the material issued (keyfile as1, TOTP seed). The same enrolment
        retried after its answer was lost (the card untouched since: idle,
        version 1, the same verifier, KDF, protected information and
        registration) is answered OK again, and material issued anew for
        that answer replaces the first (the card never received that one).
        """
        now = self.now()
        lock = " FOR UPDATE" if self.kind == "postgresql" else ""
        with self._txn() as cur:
            # FOR UPDATE: a concurrent enrolment with the same code waits, then finds it consumed
            row = self._x(
                cur, f"SELECT code_hash, expires, auth_info FROM enrolment_codes WHERE serial = ?{lock}", (e.serial,)
            ).fetchone()
            card = self._get_for_update(cur, e.serial)
            info = {}
            if card is not None:
                info = json.loads(card.auth_info or "{}")
                identical = _identical_enrolment(card, e.verifier, e.kdf, e.protected, e.registration)
                req = RequestFacts(identical_enrolment=identical)
            else:
                valid = row is not None and bytes(row[0]) == e.code_hash and row[1] >= now
                req = RequestFacts(valid_code=valid)
            facts = card.facts() if card is not None else None
            condition = classify(Operation.ENROL, facts, req)
            decision = decide(card.state if card else State.NONE, Operation.ENROL, condition)
            if decision.action is Action.CREATE:
                info = json.loads(row[2] or "{}")
                if e.registration:
                    info["registration"] = e.registration.hex()
                self._merge_material(info, e.auth_extra)
                self._x(cur, "DELETE FROM enrolment_codes WHERE serial = ?", (e.serial,))
                self._x(
                    cur,
                    f"INSERT INTO cards ({_CARD_COLUMNS}, totp_tag) VALUES "
                    "(?, 'idle', NULL, ?, NULL, ?, ?, ?, 1, 0, 0, ?, ?, NULL, NULL, 0, 0, ?)",
                    (e.serial, e.protected, e.verifier, e.kdf, json.dumps(info, sort_keys=True), now, now,
                     _totp_tag(info)),
                )
                detail = ""
            elif decision.status is Status.OK:  # the identical enrolment retried
                if e.auth_extra:
                    self._merge_material(info, e.auth_extra)
                    self._set_auth_info(cur, e.serial, info)
                detail = "same enrolment retried; answered again"
            else:
                detail = "no valid enrolment code"
            if decision.status is Status.OK or e.record:
                self._history(cur, e.serial, "enrol", decision.history, e.peer, detail=detail)
            if decision.status is not Status.OK:
                # nothing proven (the code is the authority): counted for the source like a failed authentication
                return Outcome(decision.status, holder=False)
            return Outcome(decision.status, version=1)

    @staticmethod
    def _merge_material(info: dict, extra: dict) -> None:
        """Material issued for a method means the card must pass it (and `vsc admin show` lists it)."""
        if not extra:
            return
        info.update(extra)
        methods = info.setdefault("methods", ["password"])
        for name in ("keyfile", "totp"):
            if name in extra and name not in methods:
                methods.append(name)

    # ------------------------------------------------------------ authentication bookkeeping

    def count_failure(self, e: CountFailure) -> None:
        """
        A failed or unanswered authentication, counted in one bucket
        (vsc.protocol.lockout): the owner's last machine, or everyone else.
        From the bucket's threshold on, the next attempt in it is evaluated
        only after a delay; nothing is locked, and the other bucket is untouched.
        """
        now = self.now()
        with self._txn() as cur:
            card = self._get_for_update(cur, e.serial)
            detail = e.detail
            if card is not None and card.throttled(now, e.own_machine):
                # the answer was let through on a row read before another failure closed the bucket (the
                # machine checks the row it loaded with the challenge): inside the window it is not counted,
                # so answers held back on many challenges cannot extend the wait
                detail += "; not counted: it came inside the waiting time another failure started"
            elif card is not None:
                if e.own_machine:
                    failures = card.machine_failures + 1
                    until = self.lockout.next_allowed(failures, now, self.lockout.threshold)
                    until = max(until, card.machine_locked_until) if until else 0.0  # a clock step back never shortens it
                    self._x(cur, "UPDATE cards SET machine_failures = ?, machine_locked_until = ?, updated = ? "
                                 "WHERE serial = ?", (failures, until, now, e.serial))
                else:
                    failures = card.failures + 1
                    until = self.lockout.next_allowed(failures, now, self.lockout.shared_threshold)
                    until = max(until, card.locked_until) if until else 0.0
                    self._x(cur, "UPDATE cards SET failures = ?, locked_until = ?, updated = ? WHERE serial = ?",
                            (failures, until, now, e.serial))
                who = "the card's last machine" if e.own_machine else "other machines"
                if until:
                    detail += f"; {failures} failures from {who}: next answer evaluated after {until - now:.0f} s"
            self._history(cur, e.serial, e.op.value, e.result, e.peer, e.muk, detail=detail)

    def log_refusal(self, e: LogRefusal) -> None:
        """A refusal that changes nothing but the history."""
        with self._txn() as cur:
            self._history(cur, e.serial, e.op.value, e.result, e.peer, e.muk, e.detail)

    def unlock(self, serial: str, peer: str = "admin") -> None:
        with self._txn() as cur:
            card = self._get_for_update(cur, serial)
            if card is None:
                raise StoreError(f"no card {serial}")
            self._x(cur, "UPDATE cards SET failures = 0, locked_until = 0, machine_failures = 0, "
                         "machine_locked_until = 0, updated = ? WHERE serial = ?", (self.now(), serial))
            self._history(cur, serial, "unlock", "ok", peer)

    # ------------------------------------------------------------ the life cycle (Figure 4)

    def check_out(self, e: CheckOut) -> Outcome:
        """Insert's mediation 305 and set in-use 307 (Figure 6), after authentication passed."""
        return self._authenticated(Operation.INSERT, e.serial, e.muk, e.peer, e.verifier, e.totp_step, e.own_machine,
                                   RequestFacts(session_hash=e.session, muk=e.muk), e)

    def recover(self, e: RecoverCard) -> Outcome:
        """Recover (Figure 12): from in-use only, only with the MUK of the last insert."""
        return self._authenticated(Operation.RECOVER, e.serial, e.muk, e.peer, e.verifier, e.totp_step, e.own_machine,
                                   RequestFacts(muk=e.muk), e)

    def destroy(self, e: DestroyCard) -> Outcome:
        """Destroy: from idle or in-use; terminal. The protected information is wiped."""
        return self._authenticated(Operation.DESTROY, e.serial, e.muk or None, e.peer, e.verifier, e.totp_step,
                                   e.own_machine, RequestFacts(muk=e.muk), e)

    def sync(self, e: SyncCard) -> Outcome:
        """Store a modifying operation's new protected information while in use."""
        return self._session(Operation.SYNC, e.serial, e.peer, RequestFacts(
            session_hash=e.session, version=e.version, protected=e.protected), e)

    def change_password(self, e: ChangeCardPassword) -> Outcome:
        """A password change while in use: verifier, KDF parameters and upload replace the old ones together."""
        return self._session(Operation.PASSWORD, e.serial, e.peer, RequestFacts(
            session_hash=e.session, version=e.version, protected=e.protected, verifier=e.verifier, kdf=e.kdf), e)

    def check_in(self, e: CheckIn) -> Outcome:
        """Remove (Figure 11): upload the re-encrypted information and set idle, together."""
        return self._session(Operation.REMOVE, e.serial, e.peer, RequestFacts(
            session_hash=e.session, version=e.version, protected=e.protected), e)

    def attach(self, e: AttachCard) -> Outcome:
        """A new channel of the in-use card: the insert secret proves it; nothing is written unless refused."""
        return self._session(Operation.ATTACH, e.serial, e.peer, RequestFacts(session_hash=e.session), e)

    def _authenticated(self, op: Operation, serial: str, muk: bytes | None, peer: str, verifier: bytes,
                       totp_step: int | None, own_machine: bool, req: RequestFacts, e) -> Outcome:
        now = self.now()
        with self._txn() as cur:
            card = self._get_for_update(cur, serial)
            detail = ""
            if card is None:
                decision = decide(State.NONE, op, Condition.ANY)
                detail = "no such card"
            elif card.throttled(now, own_machine):
                # the machine checked the bucket on the row it loaded with the challenge; another failure may
                # have closed it since. Under the row lock the current row decides: inside the waiting time
                # the answer is refused as a failed one, unevaluated, so challenges loaded while the bucket
                # was open (from many sources) do not get their answers evaluated after it closed
                decision = decide(card.state, op, Condition.AUTH_FAILED)
                detail = "throttled: not evaluated (the bucket closed after the challenge was sent)"
            elif card.verifier != verifier:
                # the password changed between the challenge and this answer: the answer proves the old one
                decision = decide(card.state, op, Condition.CHANGED)
                detail = "the password changed during authentication"
            elif not self._totp_fresh(cur, card, totp_step):
                decision = decide(card.state, op, Condition.AUTH_FAILED)
                detail = "TOTP code already used"
            else:
                condition = classify(op, card.facts(), req)
                decision = decide(card.state, op, condition)
                detail = _DETAILS.get((op, condition), "")
                self._authenticated_ok(cur, card, totp_step, own_machine, now)
                self._carry_out(cur, card, decision, e, now)
            self._history(cur, serial, op.value, decision.history, peer, muk, detail)
            if decision.status is Status.OK and op is Operation.INSERT and getattr(e, "auth_extra", None):
                self._reissued(cur, serial, e, peer, muk)
            if decision.status is Status.OK and op is Operation.INSERT:
                # a check-out (or its retry) changes neither the version nor the protected information: the
                # row read under this lock is what the card gets, without reading it again
                return Outcome(Status.OK, version=card.version, protected=card.protected)
            return Outcome(decision.status)

    def _reissued(self, cur, serial: str, e: CheckOut, peer: str, muk: bytes | None) -> None:
        """The material an insert re-issues (issue 13) is the card's from now on, with a history row."""
        card = self._get_for_update(cur, serial)
        info = json.loads(card.auth_info or "{}")
        self._merge_material(info, e.auth_extra)
        self._set_auth_info(cur, serial, info)
        names = ", ".join(m.name.lower().replace("_", "-") for m in e.reissue)
        self._history(cur, serial, "reissue", "ok", peer, muk, f"{names} issued with this insert")

    def _session(self, op: Operation, serial: str, peer: str, req: RequestFacts, e) -> Outcome:
        """Sync, password change, remove: the insert secret is the authority."""
        now = self.now()
        with self._txn() as cur:
            card = self._get_for_update(cur, serial)
            facts = card.facts() if card is not None else None
            condition = classify(op, facts, req)
            decision = decide(card.state if card else State.NONE, op, condition)
            if card is not None:
                self._carry_out(cur, card, decision, e, now)
            detail = _DETAILS.get((op, condition), "")
            if card is not None and decision.status is Status.VERSION_CONFLICT:
                detail = f"based on {req.version}, stored {card.version}"
            elif card is not None and decision.action in (Action.STORE, Action.STORE_PASSWORD, Action.CHECK_IN):
                detail = f"version {card.version + 1}"
            elif card is not None and decision.status is Status.OK and condition is Condition.RETRY:
                detail = f"version {card.version} already stored"
            elif card is None:
                detail = "no such card"
            holder = card is not None and condition in (Condition.CURRENT, Condition.RETRY, Condition.CONFLICT)
            if decision.history != "-" and (holder or e.record):
                self._history(cur, serial, op.value, decision.history, peer, card.muk if holder else None, detail)
            if decision.status is Status.OK:
                version = card.version + 1 if decision.action in (Action.STORE, Action.STORE_PASSWORD,
                                                                  Action.CHECK_IN) else card.version
                return Outcome(Status.OK, version=version)
            if decision.status is Status.VERSION_CONFLICT:
                return Outcome(decision.status, version=card.version)
            return Outcome(decision.status, holder=holder)

    def _totp_fresh(self, cur, card: CardRecord, step: int | None) -> bool:
        """
        Whether ``step`` is later than the last step used with this card's
        TOTP seed, on this card or on any other holding the same seed (a
        duplicate, `vsc admin duplicate`, or a replacement's original): each
        code is accepted once, whichever copy it is typed for. On PostgreSQL
        the seed's advisory lock, taken after this card's row lock and held
        to the commit, makes a concurrent answer for a copy read this step
        once it is written (its transaction waits for the lock, and never
        holds one this transaction waits for: only this card's row is written).
        """
        if step is None:
            return True
        info = json.loads(card.auth_info or "{}")
        totp = info.get("totp")
        if not isinstance(totp, dict):
            return False
        last = int(totp.get("last_step", -1))
        secret = _totp_secret(info)
        if secret is not None:
            if self.kind == "postgresql":
                key = int.from_bytes(crypto.sha256(b"vsc totp " + secret.encode())[:8], "big", signed=True)
                self._x(cur, "SELECT pg_advisory_xact_lock(?)", (key,)).fetchall()
            # the copies are found by the indexed tag of the seed (not a scan of every card's auth_info),
            # then compared by the seed itself
            rows = self._x(cur, "SELECT auth_info FROM cards WHERE totp_tag = ? AND serial <> ?",
                           (_totp_tag(info), card.serial)).fetchall()
            for (other_info,) in rows:
                try:
                    other = json.loads(other_info or "{}").get("totp")
                except ValueError:
                    continue
                if isinstance(other, dict) and other.get("secret") == secret:
                    last = max(last, int(other.get("last_step", -1)))
        return last < step

    def _authenticated_ok(self, cur, card: CardRecord, totp_step: int | None, own_machine: bool, now: float) -> None:
        """Authentication passed: consume the TOTP step (each code is good once) and reset the bucket it counted in."""
        if totp_step is not None:
            info = json.loads(card.auth_info or "{}")
            info["totp"]["last_step"] = totp_step
            self._set_auth_info(cur, card.serial, info)
        if own_machine and (card.machine_failures or card.machine_locked_until):
            self._x(cur, "UPDATE cards SET machine_failures = 0, machine_locked_until = 0 WHERE serial = ?", (card.serial,))
        elif not own_machine and (card.failures or card.locked_until):
            self._x(cur, "UPDATE cards SET failures = 0, locked_until = 0 WHERE serial = ?", (card.serial,))

    def _carry_out(self, cur, card: CardRecord, d: Decision, e, now: float) -> None:
        """Write what the decision's action says, guarded by the state it was decided on."""
        a, serial, state = d.action, card.serial, card.state.value
        if a is Action.NOTHING:
            return
        if a is Action.CHECK_OUT:
            info = json.dumps(dict(e.channel, session=e.session.hex(), since=now), sort_keys=True)
            sql = ("UPDATE cards SET state = 'in-use', muk = ?, channel_info = ?, last_session = ?, last_muk = ?, "
                   "updated = ? WHERE serial = ? AND state = ?")
            args = (e.muk, info, e.session, e.muk, now, serial, state)
        elif a is Action.STORE:
            sql = "UPDATE cards SET protected = ?, version = ?, updated = ? WHERE serial = ? AND version = ?"
            args = (e.protected, card.version + 1, now, serial, card.version)
        elif a is Action.STORE_PASSWORD:
            sql = ("UPDATE cards SET verifier = ?, kdf = ?, protected = ?, version = ?, updated = ? "
                   "WHERE serial = ? AND version = ?")
            args = (e.verifier, e.kdf, e.protected, card.version + 1, now, serial, card.version)
        elif a is Action.CHECK_IN:
            sql = ("UPDATE cards SET state = 'idle', muk = NULL, channel_info = NULL, protected = ?, version = ?, "
                   "updated = ? WHERE serial = ? AND state = ?")
            args = (e.protected, card.version + 1, now, serial, state)
        elif a is Action.CHECK_IN_AGAIN:
            sql = ("UPDATE cards SET state = 'idle', muk = NULL, channel_info = NULL, updated = ? "
                   "WHERE serial = ? AND state = ?")
            args = (now, serial, state)
        elif a is Action.RELEASE:
            sql = ("UPDATE cards SET state = 'idle', muk = NULL, channel_info = NULL, last_session = NULL, "
                   "updated = ? WHERE serial = ? AND state = ?")
            args = (now, serial, state)
        elif a is Action.WIPE:
            sql = ("UPDATE cards SET state = 'destroyed', muk = NULL, channel_info = NULL, protected = ?, "
                   "updated = ? WHERE serial = ? AND state = ?")
            args = (b"", now, serial, state)
        else:  # pragma: no cover - CREATE is enrol's own
            raise AssertionError(f"unexpected action {a}")
        if self._x(cur, sql, args).rowcount != 1:  # impossible under the row lock: never write half a decision
            raise StoreError(f"card {serial} changed under its own lock")

    # ------------------------------------------------------------ administration

    def destroy_by_admin(self, serial: str, peer: str = "admin") -> Status:
        """`vsc admin destroy`: Figure 4's destroy 107 without a card, from idle or in use."""
        with self._txn() as cur:
            return self._destroy_by_admin(cur, serial, peer, self.now())

    def _destroy_by_admin(self, cur, serial: str, peer: str, now: float) -> Status:
        card = self._get_for_update(cur, serial)
        if card is None:
            decision = decide(State.NONE, Operation.DESTROY, Condition.ANY)
        else:
            decision = decide(card.state, Operation.DESTROY, Condition.ANY)
            self._carry_out(cur, card, decision, None, now)
        detail = f"from {card.state.value}" if card is not None and decision.status is Status.OK else ""
        self._history(cur, serial, "destroy", decision.history, peer, None, detail)
        return decision.status

    def duplicate(self, serial: str, new_serial: str, peer: str = "admin") -> None:
        """[0102]: a new idle entry with a copy of the same information."""
        with self._txn() as cur:
            self._claim_serials(cur)
            self._duplicate(cur, serial, new_serial, peer, self.now())

    def replace(self, serial: str, new_serial: str, peer: str = "admin",
                fresh: tuple[bytes, str, float] | None = None) -> Status:
        """
        `vsc admin replace` ([0062]), ONE transaction: the lost card is copied
        to ``new_serial`` (or, with ``fresh`` = (code hash, auth info, ttl),
        an enrolment code is issued for it) and destroyed. A failure leaves
        both serials as they were: never a copy beside a lost card still
        alive. Returns the destroy's status (DESTROYED: it was already, which
        only a fresh replacement accepts).
        """
        now = self.now()
        with self._txn() as cur:
            self._claim_serials(cur)
            card = self._get_for_update(cur, serial)
            if card is None:
                raise StoreError(f"no card {serial}")
            if fresh is None:
                self._duplicate(cur, serial, new_serial, peer, now)  # refuses a destroyed card: nothing to copy
            else:
                self._issue(cur, new_serial, *fresh, peer, now)
            if card.state is CardState.DESTROYED:
                return Status.DESTROYED
            return self._destroy_by_admin(cur, serial, peer, now)

    def _duplicate(self, cur, serial: str, new_serial: str, peer: str, now: float) -> None:
        card = self._get_for_update(cur, serial)
        if card is None:
            raise StoreError(f"no card {serial}")
        if card.state is CardState.DESTROYED:
            raise StoreError(f"card {serial} is destroyed; its information is gone")
        if self._get_for_update(cur, new_serial) is not None:
            raise StoreError(f"card {new_serial} already exists")
        if self._x(cur, "SELECT 1 FROM enrolment_codes WHERE serial = ?", (new_serial,)).fetchone():
            raise StoreError(f"serial {new_serial} has a pending enrolment code")
        self._refuse_new_serial(cur, new_serial)
        info = json.loads(card.auth_info or "{}")
        detail = f"copy of {serial}"
        if "keyfile" in info:
            # the keyfile names the old serial: the copy's first insert is issued one for its own (issue 13)
            del info["keyfile"]
            info.setdefault("registered_as", serial)
            detail += "; a keyfile for this serial is issued at its first insert"
        self._x(
            cur,
            f"INSERT INTO cards ({_CARD_COLUMNS}, totp_tag) VALUES "
            "(?, 'idle', NULL, ?, NULL, ?, ?, ?, ?, 0, 0, ?, ?, NULL, NULL, 0, 0, ?)",
            (new_serial, card.protected, card.verifier, card.kdf, json.dumps(info, sort_keys=True), card.version,
             now, now, _totp_tag(info)),
        )
        self._history(cur, serial, "duplicate", "ok", peer, detail=f"copied to {new_serial}")
        self._history(cur, new_serial, "duplicate", "ok", peer, detail=detail)
