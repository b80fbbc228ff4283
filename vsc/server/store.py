"""
The VSC Server's database: the card records of [0034], an append-only
history, one-time enrolment codes and per-serial operation leases.

Two backends behind one class: SQLite in WAL mode (the embedded default) and
PostgreSQL (several server processes). Every method is synchronous and runs
on a worker thread, never on the reactor thread (vsc.server.service uses a
thread pool). Every state change and its data write, together with the
history line that explains it, commit in ONE transaction: a crash leaves the
old record or the new one, never a mix.

Per-serial exclusion [0081] is a lease row (``leases``), taken atomically
with an upsert, so it holds across server processes sharing the database; a
lease left by a killed process expires after its TTL, or at once when a
server on the same host restarts and finds the owning process gone.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import socket
import sqlite3
import threading
from typing import Any, Callable, Iterator
from urllib.parse import urlparse

import attrs

SCHEMA_VERSION = 1


class CardState(str, enum.Enum):
    IDLE = "idle"
    IN_USE = "in-use"
    DESTROYED = "destroyed"


class StoreError(Exception):
    """A database-level refusal meant for an administrator (message is user-facing)."""


@attrs.frozen
class CardRecord:
    serial: str
    state: CardState
    muk: bytes | None
    protected: bytes = attrs.field(repr=False)
    channel_info: str | None  # JSON while in use: session hash, suite, peer, since
    verifier: bytes = attrs.field(repr=False)
    kdf: bytes
    auth_info: str  # JSON: implementation-auth material (master key id, keyfile, agent)
    version: int
    failures: int
    locked_until: float
    created: float
    updated: float
    last_session: bytes | None = attrs.field(default=None, repr=False)

    def locked_out(self, now: float) -> bool:
        return self.locked_until > now

    @property
    def session_hash(self) -> bytes | None:
        if not self.channel_info:
            return None
        return bytes.fromhex(json.loads(self.channel_info)["session"])

    def summary(self, now: float) -> dict:
        return {
            "serial": self.serial,
            "state": self.state.value,
            "muk": self.muk.hex() if self.muk else None,
            "locked_out": self.locked_out(now),
            "locked_until": self.locked_until or None,
            "failures": self.failures,
            "version": self.version,
            "protected_bytes": len(self.protected),
            "channel": json.loads(self.channel_info) if self.channel_info else None,
            "auth": json.loads(self.auth_info or "{}").get("methods", []),
            "created": self.created,
            "updated": self.updated,
        }


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


@attrs.frozen
class LockoutPolicy:
    """After ``threshold`` consecutive failures, lock for base * 2^(extra failures), capped."""

    threshold: int = 5
    base: float = 30.0
    maximum: float = 3600.0

    def locked_until(self, failures: int, now: float) -> float:
        if failures < self.threshold:
            return 0.0
        return now + min(self.maximum, self.base * (2 ** (failures - self.threshold)))


_CARD_COLUMNS = (
    "serial, state, muk, protected, channel_info, verifier, kdf, auth_info, version, "
    "failures, locked_until, created, updated, last_session"
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
        last_session {blob}
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
    """CREATE TABLE IF NOT EXISTS leases (
        serial TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        expires DOUBLE PRECISION NOT NULL
    )""",
]

#: Migrations from version N to N+1, appended as the schema evolves.
_MIGRATIONS: dict[int, list[str]] = {}


def instance_owner() -> str:
    """A lease owner id: host, pid and a random part (pids are reused)."""
    return f"{socket.gethostname()}:{os.getpid()}:{os.urandom(4).hex()}"


class Store:
    """Open with ``Store.open(url, now)``; ``now`` is the injected clock (reactor.seconds)."""

    def __init__(self, url: str, now: Callable[[], float], lockout: LockoutPolicy = LockoutPolicy()):
        self.url = url
        self.now = now
        self.lockout = lockout
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
            raise StoreError(f"unsupported database URL {url!r}: use sqlite:///PATH or postgresql://...")
        self._local = threading.local()
        self._all: list[Any] = []
        self._all_lock = threading.Lock()

    # ------------------------------------------------------------ plumbing

    def _connect(self):
        if self.kind == "sqlite":
            if not os.path.exists(self.path):  # the database holds every card's record: owner-only, like the key
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
            conn = sqlite3.connect(self.path, timeout=10.0, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA busy_timeout=10000")
            return conn
        import psycopg

        conn = psycopg.connect(self.url, autocommit=True, connect_timeout=10)
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

    @contextlib.contextmanager
    def _txn(self) -> Iterator[Any]:
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
        except BaseException:
            with contextlib.suppress(Exception):
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

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
        cur.execute(self._sql(sql), params)
        return cur

    def _read(self, sql: str, params: tuple = ()) -> list[tuple]:
        for attempt in (1, 2):
            conn = self._conn()
            try:
                cur = conn.cursor()
                cur.execute(self._sql(sql), params)
                return cur.fetchall()
            except Exception:
                # a connection the database dropped: forget it; a read changes nothing, so read once more
                if not self._discard_if_broken(conn) or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _blob(self, value):
        return None if value is None else bytes(value)

    # ------------------------------------------------------------ schema

    def migrate(self) -> int:
        """Create the schema, or bring it up to SCHEMA_VERSION. Returns the version."""
        blob = "BLOB" if self.kind == "sqlite" else "BYTEA"
        serial_pk = "INTEGER PRIMARY KEY AUTOINCREMENT" if self.kind == "sqlite" else "BIGSERIAL PRIMARY KEY"
        with self._txn() as cur:
            if self.kind == "postgresql":
                # serialise concurrent migrations across processes
                cur.execute("SELECT pg_advisory_xact_lock(7390001)")
            for stmt in _SCHEMA:
                self._x(cur, stmt.format(blob=blob, serial_pk=serial_pk))
            rows = self._x(cur, "SELECT version FROM schema_version").fetchall()
            if not rows:
                self._x(cur, "INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
                return SCHEMA_VERSION
            version = rows[0][0]
            if version > SCHEMA_VERSION:
                raise StoreError(f"database schema {version} is newer than this vsc ({SCHEMA_VERSION}); upgrade vsc")
            while version < SCHEMA_VERSION:
                for stmt in _MIGRATIONS[version]:
                    self._x(cur, stmt.format(blob=blob, serial_pk=serial_pk))
                version += 1
            self._x(cur, "UPDATE schema_version SET version = ?", (version,))
            return version

    # ------------------------------------------------------------ rows

    def _card(self, row) -> CardRecord:
        (serial, state, muk, protected, channel_info, verifier, kdf, auth_info, version,
         failures, locked_until, created, updated, last_session) = row
        return CardRecord(
            serial=serial,
            state=CardState(state),
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

    def get(self, serial: str) -> CardRecord | None:
        rows = self._read(f"SELECT {_CARD_COLUMNS} FROM cards WHERE serial = ?", (serial,))
        return self._card(rows[0]) if rows else None

    def list(self) -> list[CardRecord]:
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

    # ------------------------------------------------------------ leases [0081]

    def acquire(self, serial: str, owner: str, ttl: float) -> bool:
        """Take the operation lease on ``serial`` (existing or not); False means busy."""
        now = self.now()
        with self._txn() as cur:
            cur = self._x(
                cur,
                "INSERT INTO leases (serial, owner, expires) VALUES (?, ?, ?) "
                "ON CONFLICT (serial) DO UPDATE SET owner = excluded.owner, expires = excluded.expires "
                "WHERE leases.expires < ?",
                (serial, owner, now + ttl, now),
            )
            return cur.rowcount == 1

    def release(self, serial: str, owner: str) -> None:
        with self._txn() as cur:
            self._x(cur, "DELETE FROM leases WHERE serial = ? AND owner = ?", (serial, owner))

    def clear_dead_leases(self) -> int:
        """Drop leases of processes on this host that no longer exist (after a crash)."""
        host = socket.gethostname()
        dead = []
        for serial, owner in self._read("SELECT serial, owner FROM leases"):
            parts = owner.rsplit(":", 2)
            if len(parts) == 3 and parts[0] == host:
                try:
                    os.kill(int(parts[1]), 0)
                except ProcessLookupError:
                    dead.append((serial, owner))
                except (PermissionError, ValueError):
                    pass
        for serial, owner in dead:
            self.release(serial, owner)
        return len(dead)

    # ------------------------------------------------------------ enrolment

    def issue(self, serial: str, code_hash: bytes, auth_info: str, ttl: float, peer: str = "admin") -> None:
        now = self.now()
        with self._txn() as cur:
            if self._get_for_update(cur, serial) is not None:
                raise StoreError(f"card {serial} already exists")
            self._x(cur, "DELETE FROM enrolment_codes WHERE serial = ?", (serial,))
            self._x(
                cur,
                "INSERT INTO enrolment_codes (serial, code_hash, auth_info, created, expires) VALUES (?, ?, ?, ?, ?)",
                (serial, code_hash, auth_info, now, now + ttl),
            )
            self._history(cur, serial, "issue", "ok", peer, detail=f"enrolment code valid for {ttl:g} s")

    def enrolment(self, serial: str) -> tuple[bytes, str, float] | None:
        rows = self._read("SELECT code_hash, auth_info, expires FROM enrolment_codes WHERE serial = ?", (serial,))
        return (bytes(rows[0][0]), rows[0][1], rows[0][2]) if rows else None

    def enrol(
        self,
        serial: str,
        code_hash: bytes,
        verifier: bytes,
        kdf: bytes,
        protected: bytes,
        auth_info: str | None = None,
        peer: str = "",
        registration: bytes = b"",
        auth_extra: dict | None = None,
    ) -> bool:
        """
        Create the card (idle, version 1) and consume the code, atomically.
        ``auth_info`` defaults to what was fixed when the code was issued;
        the card's ``registration`` (public material for implementation
        authentication) is kept in it, and so is ``auth_extra``: the
        server's side of the material it issued (keyfile as1, TOTP seed).
        False: refused (no valid code).
        """
        now = self.now()
        lock = " FOR UPDATE" if self.kind == "postgresql" else ""
        with self._txn() as cur:
            # FOR UPDATE: a concurrent enrolment with the same code waits, then finds it consumed
            # (without it both pass the check and the second dies on the cards primary key)
            row = self._x(
                cur, f"SELECT code_hash, expires, auth_info FROM enrolment_codes WHERE serial = ?{lock}", (serial,)
            ).fetchone()
            if row is None and self._enrol_repeat(cur, serial, verifier, kdf, protected, registration, auth_extra, peer):
                return True
            if row is None or bytes(row[0]) != code_hash or row[1] < now or self._get_for_update(cur, serial):
                self._history(cur, serial, "enrol", "refused", peer, detail="no valid enrolment code")
                return False
            info = json.loads(auth_info if auth_info is not None else (row[2] or "{}"))
            if registration:
                info["registration"] = registration.hex()
            if auth_extra:
                info.update(auth_extra)
                # material issued for a method means the card must pass it (and `vsc admin show` lists it)
                methods = info.setdefault("methods", ["password"])
                for name in ("keyfile", "totp"):
                    if name in auth_extra and name not in methods:
                        methods.append(name)
            self._x(cur, "DELETE FROM enrolment_codes WHERE serial = ?", (serial,))
            self._x(
                cur,
                f"INSERT INTO cards ({_CARD_COLUMNS}) VALUES (?, 'idle', NULL, ?, NULL, ?, ?, ?, 1, 0, 0, ?, ?, NULL)",
                (serial, protected, verifier, kdf, json.dumps(info, sort_keys=True), now, now),
            )
            self._history(cur, serial, "enrol", "ok", peer)
            return True

    def _enrol_repeat(self, cur, serial: str, verifier: bytes, kdf: bytes, protected: bytes, registration: bytes,
                      auth_extra: dict | None, peer: str) -> bool:
        """
        The same enrolment retried after its answer was lost (the code is already
        consumed): answered OK again while the card is untouched since (idle,
        version 1) and the request is the one stored: the same verifier (only
        the enrolling card knows it), KDF parameters, protected information and
        registration. Material issued anew for this answer replaces the first
        (the card never received that one).
        """
        card = self._get_for_update(cur, serial)
        if card is None or card.state is not CardState.IDLE or card.version != 1:
            return False
        info = json.loads(card.auth_info or "{}")
        if (card.verifier, card.kdf, card.protected) != (verifier, kdf, protected) or \
                info.get("registration", "") != registration.hex():
            return False
        if auth_extra:
            info.update(auth_extra)
            self._x(cur, "UPDATE cards SET auth_info = ? WHERE serial = ?", (json.dumps(info, sort_keys=True), serial))
        self._history(cur, serial, "enrol", "repeat", peer, detail="same enrolment retried; answered again")
        return True

    # ------------------------------------------------------------ authentication bookkeeping

    def auth_failed(self, serial: str, op: str, peer: str, detail: str, muk: bytes | None = None) -> None:
        """Count a failed authentication (lockout with growing delays) and log the refusal."""
        now = self.now()
        with self._txn() as cur:
            card = self._get_for_update(cur, serial)
            if card is not None:
                failures = card.failures + 1
                until = self.lockout.locked_until(failures, now)
                self._x(
                    cur,
                    "UPDATE cards SET failures = ?, locked_until = ?, updated = ? WHERE serial = ?",
                    (failures, max(until, card.locked_until), now, serial),
                )
                if until:
                    detail += f"; locked out until {until:.0f} after {failures} failures"
            self._history(cur, serial, op, "refused", peer, muk, detail=detail)

    def refused(self, serial: str, op: str, result: str, peer: str, muk: bytes | None = None, detail: str = "") -> None:
        """Log a refusal that changes nothing."""
        with self._txn() as cur:
            self._history(cur, serial, op, result, peer, muk, detail)

    def unlock(self, serial: str, peer: str = "admin") -> None:
        with self._txn() as cur:
            card = self._get_for_update(cur, serial)
            if card is None:
                raise StoreError(f"no card {serial}")
            self._x(cur, "UPDATE cards SET failures = 0, locked_until = 0, updated = ? WHERE serial = ?", (self.now(), serial))
            self._history(cur, serial, "unlock", "ok", peer)

    # ------------------------------------------------------------ the life cycle (Figure 4)

    def checkout(self, serial: str, muk: bytes, session: bytes, channel: dict, peer: str,
                 totp_step: int | None = None) -> tuple[str, CardRecord | None]:
        """
        Insert's mediation 305 + set in-use 307, in one transaction. Returns
        ("ok"|"repeat"|"in-use"|"destroyed"|"refused", record). "repeat" is the
        same insert retried after a dropped connection (same session, same
        MUK): the same check-out is returned, never a second one.
        ``totp_step``: the TOTP step the owner's code matched, consumed here
        (refused if it, or a later one, was already used).
        """
        now = self.now()
        with self._txn() as cur:
            card = self._get_for_update(cur, serial)
            if card is None:
                self._history(cur, serial, "insert", "refused", peer, muk, "no such card")
                return "refused", None
            if not self._consume_totp(cur, card, totp_step, "insert", peer, muk):
                return "refused", None
            if card.state is CardState.DESTROYED:
                self._history(cur, serial, "insert", "destroyed", peer, muk)
                return "destroyed", card
            if card.state is CardState.IN_USE:
                if card.session_hash == session and card.muk == muk:
                    self._history(cur, serial, "insert", "repeat", peer, muk, "same insert retried; same check-out")
                    return "repeat", card
                self._history(cur, serial, "insert", "in-use", peer, muk, "in use on another machine")
                return "in-use", card
            info = json.dumps(dict(channel, session=session.hex(), since=now), sort_keys=True)
            self._x(
                cur,
                "UPDATE cards SET state = 'in-use', muk = ?, channel_info = ?, failures = 0, locked_until = 0, "
                "last_session = ?, updated = ? WHERE serial = ? AND state = 'idle'",
                (muk, info, session, now, serial),
            )
            self._history(cur, serial, "insert", "ok", peer, muk)
            return "ok", self._get_for_update(cur, serial)

    def sync(self, serial: str, session: bytes, version: int, protected: bytes, peer: str) -> tuple[str, int]:
        """Store a modifying operation's new protected information while in use."""
        now = self.now()
        with self._txn() as cur:
            card = self._get_for_update(cur, serial)
            if card is None or card.state is not CardState.IN_USE or card.session_hash != session:
                self._history(cur, serial, "sync", "refused", peer, detail="not this card's current insert")
                return "refused", 0
            if version != card.version:
                if version == card.version - 1 and protected == card.protected:
                    self._history(cur, serial, "sync", "repeat", peer, card.muk, f"version {card.version} already stored")
                    return "ok", card.version
                self._history(cur, serial, "sync", "conflict", peer, card.muk, f"based on {version}, stored {card.version}")
                return "conflict", card.version
            new = card.version + 1
            self._x(
                cur,
                "UPDATE cards SET protected = ?, version = ?, updated = ? WHERE serial = ? AND version = ?",
                (protected, new, now, serial, card.version),
            )
            self._history(cur, serial, "sync", "ok", peer, card.muk, f"version {new}")
            return "ok", new

    def checkin(self, serial: str, session: bytes, version: int, protected: bytes, peer: str) -> tuple[str, int]:
        """Remove (Figure 11): upload the re-encrypted information and set idle."""
        now = self.now()
        with self._txn() as cur:
            card = self._get_for_update(cur, serial)
            if card is None or card.state is CardState.DESTROYED:
                self._history(cur, serial, "remove", "refused", peer, detail="no such card or destroyed")
                return "refused", 0
            if card.state is CardState.IDLE:
                # only the identical remove retried is answered "ok": same session, and its bytes are
                # what is stored (a late remove after a recover, or other bytes, were never stored)
                if card.last_session == session and protected == card.protected and version == card.version - 1:
                    self._history(cur, serial, "remove", "repeat", peer, detail="already removed")
                    return "ok", card.version
                self._history(cur, serial, "remove", "refused", peer, detail="not in use")
                return "refused", 0
            if card.session_hash != session:
                self._history(cur, serial, "remove", "refused", peer, detail="not this card's current insert")
                return "refused", 0
            if version not in (card.version, card.version - 1):
                self._history(cur, serial, "remove", "conflict", peer, card.muk, f"based on {version}, stored {card.version}")
                return "conflict", card.version
            if version == card.version - 1 and protected != card.protected:
                self._history(cur, serial, "remove", "conflict", peer, card.muk, f"based on {version}, stored {card.version}")
                return "conflict", card.version
            new = card.version + 1 if version == card.version else card.version
            self._x(
                cur,
                "UPDATE cards SET state = 'idle', muk = NULL, channel_info = NULL, protected = ?, version = ?, "
                "updated = ? WHERE serial = ? AND state = 'in-use'",
                (protected, new, now, serial),
            )
            self._history(cur, serial, "remove", "ok", peer, card.muk, f"version {new}")
            return "ok", new

    def recover(self, serial: str, muk: bytes, peer: str, totp_step: int | None = None) -> str:
        """Recover (Figure 12): from in-use only, only with the MUK of the last insert."""
        now = self.now()
        with self._txn() as cur:
            card = self._get_for_update(cur, serial)
            if card is None:
                self._history(cur, serial, "recover", "refused", peer, muk, "no such card")
                return "refused"
            if not self._consume_totp(cur, card, totp_step, "recover", peer, muk):
                return "refused"
            if card.state is CardState.DESTROYED:
                self._history(cur, serial, "recover", "destroyed", peer, muk)
                return "destroyed"
            if card.state is not CardState.IN_USE:
                self._history(cur, serial, "recover", "not-in-use", peer, muk)
                return "not-in-use"
            if card.muk != muk:
                self._history(cur, serial, "recover", "muk-mismatch", peer, muk, "recover attempted from another machine")
                return "muk-mismatch"
            self._x(
                cur,
                "UPDATE cards SET state = 'idle', muk = NULL, channel_info = NULL, last_session = NULL, updated = ? "
                "WHERE serial = ? AND state = 'in-use'",
                (now, serial),
            )
            self._history(cur, serial, "recover", "ok", peer, muk)
            return "ok"

    def destroy(self, serial: str, peer: str, muk: bytes | None = None, totp_step: int | None = None) -> str:
        """Destroy: from idle or in-use; terminal. The protected information is wiped."""
        now = self.now()
        with self._txn() as cur:
            card = self._get_for_update(cur, serial)
            if card is None:
                self._history(cur, serial, "destroy", "refused", peer, muk, "no such card")
                return "refused"
            if not self._consume_totp(cur, card, totp_step, "destroy", peer, muk):
                return "refused"
            if card.state is CardState.DESTROYED:
                self._history(cur, serial, "destroy", "destroyed", peer, muk, "already destroyed")
                return "destroyed"
            self._x(
                cur,
                "UPDATE cards SET state = 'destroyed', muk = NULL, channel_info = NULL, protected = ?, "
                "updated = ? WHERE serial = ?",
                (b"", now, serial),
            )
            self._history(cur, serial, "destroy", "ok", peer, muk, f"from {card.state.value}")
            return "ok"

    def change_password(self, serial: str, session: bytes, version: int, verifier: bytes, kdf: bytes,
                        protected: bytes, peer: str) -> tuple[str, int]:
        """
        A password change while in use: the new verifier, KDF parameters and
        re-wrapped protected information replace the old ones in one
        transaction (version + 1). Like sync, only the current insert may do
        it, based on the stored version; the identical change retried after a
        lost reply is answered "ok" again.
        """
        now = self.now()
        with self._txn() as cur:
            card = self._get_for_update(cur, serial)
            if card is None or card.state is not CardState.IN_USE or card.session_hash != session:
                self._history(cur, serial, "password", "refused", peer, detail="not this card's current insert")
                return "refused", 0
            if version != card.version:
                if (version == card.version - 1 and protected == card.protected and verifier == card.verifier
                        and kdf == card.kdf):
                    self._history(cur, serial, "password", "repeat", peer, card.muk, f"version {card.version} already stored")
                    return "ok", card.version
                self._history(cur, serial, "password", "conflict", peer, card.muk, f"based on {version}, stored {card.version}")
                return "conflict", card.version
            new = card.version + 1
            self._x(
                cur,
                "UPDATE cards SET verifier = ?, kdf = ?, protected = ?, version = ?, updated = ? "
                "WHERE serial = ? AND version = ?",
                (verifier, kdf, protected, new, now, serial, card.version),
            )
            self._history(cur, serial, "password", "ok", peer, card.muk, f"version {new}; new verifier and KDF parameters")
            return "ok", new

    def _consume_totp(self, cur, card: CardRecord, step: int | None, op: str, peer: str, muk: bytes | None) -> bool:
        """Use up the TOTP step the owner's code matched: each code is good once. False (logged): already used."""
        if step is None:
            return True
        info = json.loads(card.auth_info or "{}")
        totp = info.get("totp")
        if not isinstance(totp, dict) or int(totp.get("last_step", -1)) >= step:
            self._history(cur, card.serial, op, "refused", peer, muk, "TOTP code already used")
            return False
        totp["last_step"] = step
        self._x(cur, "UPDATE cards SET auth_info = ? WHERE serial = ?", (json.dumps(info, sort_keys=True), card.serial))
        return True

    # ------------------------------------------------------------ administration

    def duplicate(self, serial: str, new_serial: str, peer: str = "admin") -> None:
        """[0102]: a new idle entry with a copy of the same information."""
        now = self.now()
        with self._txn() as cur:
            card = self._get_for_update(cur, serial)
            if card is None:
                raise StoreError(f"no card {serial}")
            if card.state is CardState.DESTROYED:
                raise StoreError(f"card {serial} is destroyed; its information is gone")
            if self._get_for_update(cur, new_serial) is not None:
                raise StoreError(f"card {new_serial} already exists")
            if self._x(cur, "SELECT 1 FROM enrolment_codes WHERE serial = ?", (new_serial,)).fetchone():
                raise StoreError(f"serial {new_serial} has a pending enrolment code")
            self._x(
                cur,
                f"INSERT INTO cards ({_CARD_COLUMNS}) VALUES (?, 'idle', NULL, ?, NULL, ?, ?, ?, ?, 0, 0, ?, ?, NULL)",
                (new_serial, card.protected, card.verifier, card.kdf, card.auth_info, card.version, now, now),
            )
            self._history(cur, serial, "duplicate", "ok", peer, detail=f"copied to {new_serial}")
            self._history(cur, new_serial, "duplicate", "ok", peer, detail=f"copy of {serial}")
