"""
A full disk is its own status on the wire (issue 11; docs/protocol.md §10.3,
STORAGE_FULL): the server answers STORAGE_FULL when its database cannot
store a change (SQLite SQLITE_FULL, PostgreSQL disk_full), nothing is
changed, and the card tells its user "the server cannot store changes right
now" without acknowledging the change.

* the store: a real SQLite database limited with ``PRAGMA max_page_count``
  raises StorageFull on the change that does not fit, keeps the record as it
  was, and stores again once there is room;
* the machine: a store call that failed for want of space is answered
  STORAGE_FULL (and a refusal whose history line did not fit stays that
  refusal);
* the real thing: a ``twistd vsc-server`` whose database lives on a 3 MiB
  tmpfs (root: CI), a real card daemon in use; the tmpfs is filled, a
  counter step is refused with the one line, the counter keeps its value on
  the card and on the server; room again, and the same step is stored.
"""

from __future__ import annotations

import contextlib
import os
import subprocess

import pytest

from tests.cards import cards  # noqa: F401  (fixture)
from tests.integration import missing
from tests.servers import Servers, admin, init_data_dir, open_store
from vsc.card import ops
from vsc.card.session import explain
from vsc.protocol.cardstore import EnrolCard, LogRefusal, SyncCard, CheckOut
from vsc.protocol.lifecycle import Operation
from vsc.protocol.server_ops import OpsPolicy, Reply, ServerOps
from vsc.server.store import StorageFull, Store, storage_full
from vsc.wire.ops import OpRequest, OpResult, Op, Status

PASSWORD = "storage full password"


class _Now:
    def __init__(self):
        self.t = 1_000_000.0

    def __call__(self):
        return self.t


def _enrolled_store(tmp_path) -> Store:
    store = Store(f"sqlite:///{tmp_path / 'full.sqlite3'}", _Now())
    store.migrate()
    from vsc.protocol.auth import code_hash

    store.issue("full-1", code_hash("CODE"), "{}", 3600)
    out = store.enrol(EnrolCard(serial="full-1", code_hash=code_hash("CODE"), verifier=b"v" * 32, kdf=b"k",
                                protected=b"p1", registration=b"", auth_extra={}, peer="test"))
    assert out.status is Status.OK
    session = b"\x01" * 32
    assert store.check_out(CheckOut(serial="full-1", muk=b"M" * 32, session=session, channel={"suite": "x"},
                                    peer="test", verifier=b"v" * 32)).status is Status.OK
    return store


def test_a_sqlite_database_that_cannot_grow_raises_storage_full_and_keeps_the_record(tmp_path):
    """
    With max_page_count at the database's current size, a sync whose upload
    needs new pages raises StorageFull (recognised by storage_full); the
    record keeps its version and bytes; the connection stays usable, and once
    the limit is lifted the same sync is stored.
    """
    store = _enrolled_store(tmp_path)
    conn = store._conn()
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages}")
    big = os.urandom(64 * 1024)
    sync = SyncCard(serial="full-1", session=b"\x01" * 32, version=1, protected=big, peer="test")
    with pytest.raises(StorageFull) as e:
        store.sync(sync)
    assert storage_full(e.value.__cause__)
    card = store.get("full-1")
    assert (card.version, card.protected) == (1, b"p1")
    conn.execute("PRAGMA max_page_count = 1073741823")
    assert store.sync(sync).status is Status.OK
    assert store.get("full-1").version == 2
    store.close()


def test_the_machine_answers_storage_full_and_keeps_a_pending_refusal():
    """A sync whose transaction met a full disk is answered STORAGE_FULL; other failures stay INTERNAL."""
    for full, status in ((True, Status.STORAGE_FULL), (False, Status.INTERNAL)):
        m = ServerOps(OpsPolicy(), b"m" * 32, b"d" * 32, "tcp:127.0.0.1:1", "aes256-gcm", lambda: 0.0)
        effects = m.message(OpRequest(op=Op.SYNC, serial="s", insert_secret=b"x" * 32, version=1, protected=b"p"))
        assert any(isinstance(e, SyncCard) for e in effects)
        assert m.store_failed("no space", full) == [Reply(OpResult(status=status))]
    # a refusal whose history line could not be stored is still that refusal
    m = ServerOps(OpsPolicy(), b"m" * 32, b"d" * 32, "tcp:127.0.0.1:1", "aes256-gcm", lambda: 0.0)
    effects = m.message(OpRequest(op=Op.PASSWORD, serial="s"))
    assert any(isinstance(e, LogRefusal) and e.op is Operation.PASSWORD for e in effects)
    assert m.store_failed("no space", True) == [Reply(OpResult(status=Status.BAD_REQUEST))]


def test_the_card_says_the_server_cannot_store_changes_right_now():
    """The owner's line for STORAGE_FULL is plain words, not the status name."""
    line = explain(ops.OperationRefused(Status.STORAGE_FULL, "sync"))
    assert "the server cannot store changes right now" in line and "STORAGE_FULL" not in line


# ---------------------------------------------------------------- the real thing


@contextlib.contextmanager
def _small_tmpfs(path, size: str = "16m"):
    if os.geteuid() != 0:
        missing("a full disk for real needs root (a small tmpfs)")
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
                       capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        missing(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


def _fill(directory) -> int:
    """Write a filler file until the file system is full (unbuffered: every ENOSPC is seen here); its size."""
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    written, chunk = 0, b"\0" * 65536
    try:
        while True:
            try:
                n = os.write(fd, chunk)
            except OSError:
                chunk = chunk[: len(chunk) // 2]
                if len(chunk) < 512:
                    return written
                continue
            written += n
    finally:
        os.close(fd)


def test_a_full_disk_is_storage_full_on_the_wire_and_the_card_says_so(tmp_path, cards):
    """
    A real server with its SQLite database on a 16 MiB tmpfs and a real card
    daemon in use: with the tmpfs full, ``vsc card counter runs --add 1`` fails
    with one line "the server cannot store changes right now", the server
    logged the full database, its record keeps the version and the card's
    counter keeps its value; with room again, the same step is stored
    (version + 1) and the counter moves.
    """
    servers = Servers(tmp_path / "logs")
    try:
        with _small_tmpfs(tmp_path / "small") as small:
            data = small / "srv"
            info = init_data_dir(data)
            server = servers.start(data)
            home, pw = cards.enrol(server, info["fingerprint"], data, "full-card", PASSWORD)
            cards.start(home, pw)
            assert cards.card(home, "counter", "runs", "--add", "2").json()["value"] == 2
            before = admin(data, "show", "full-card")["version"]
            filled = _fill(small)
            assert filled > 0
            refused = cards.card(home, "counter", "runs", "--add", "1", check=False)
            lines = refused.error_lines
            assert refused.returncode != 0 and len(lines) == 1, refused
            assert "the server cannot store changes right now" in lines[0], lines
            assert "Traceback" not in refused.stderr and "STORAGE_FULL" not in lines[0]
            assert "the database cannot store" in server.log_text()
            assert cards.card(home, "counter", "runs").json()["value"] == 2
            (small / "filler").unlink()
            assert admin(data, "show", "full-card")["version"] == before
            assert cards.card(home, "counter", "runs", "--add", "1").json()["value"] == 3
            assert admin(data, "show", "full-card")["version"] == before + 1
            print(f"\nstorage full: {filled} bytes filled the tmpfs; the step was refused with: {lines[0]}")
            cards.card(home, "remove")
            servers.close()
    finally:
        servers.close()
