"""
Rollback (issue 11, point 1), against real processes: a ``twistd vsc-server``
on SQLite and a real ``twistd vsc-card`` with a rental grant (docs/licensing.md).

The attack as it was reported: back up the server's database while the card
is idle, use a rental run, remove, restore the backup, insert — the run is
back, with no warning. The same with a relabelled blob: the server copies an
older protected-information blob into the card's row with a higher version
number. Now (vsc/card/freshness.py) the card refuses both copies at insert
with the RollbackError line and serves nothing; after ``vsc card
accept-rollback`` the older copy loads, and the rental counter stays at its
last stored value (the floor), so no run is refunded.

(PIN/PUK tries are floors the same way: tests/test_freshness.py.)
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess

import pytest

from tests.cards import Cards, cards  # noqa: F401  (fixture)
from tests.servers import admin, init_data_dir, servers  # noqa: F401  (fixture)

PASSWORD = "rollback password"
SERIAL = "roll-1"


class Rental:
    """A vendor key pair and one rental keyfile of ``runs`` runs for the card (vsc license)."""

    def __init__(self, cards: Cards, home, root, runs: int):
        self.cards, self.home, self.root = cards, home, root
        card_pem = root / "card.pem"
        card_pem.write_text(cards.card(home, "public-key", "--slot", "9c", json_out=False).stdout)
        self.vendor_key, self.vendor_pub = root / "vendor.key", root / "vendor.pub"
        cards.vsc("license", "keygen", "--private", str(self.vendor_key), "--public", str(self.vendor_pub))
        self.keyfile = root / "rental.key"
        cards.vsc("license", "issue", "--slot", "9c", "--vendor-key", str(self.vendor_key), "--product", "editor",
                  "--card-key", str(card_pem), "--out", str(self.keyfile), "--runs", str(runs))
        shown = cards.vsc("license", "show", "--license", str(self.keyfile), "--vendor-key", str(self.vendor_pub),
                          "--json").json()
        self.counter = shown["counter"]

    def run(self) -> None:
        """`vsc run --license ... -- true`: funds the counter the first time, then uses one run."""
        self.cards.vsc("run", "--home", str(self.home), "--license", str(self.keyfile), "--vendor-key",
                       str(self.vendor_pub), "--", "true")

    def left(self) -> int:
        return self.cards.card(self.home, "counter", self.counter).json()["value"]


def _backup(db, to) -> None:
    """An online backup of the live SQLite database (WAL included), as an operator would take it."""
    src, dst = sqlite3.connect(db), sqlite3.connect(to)
    with dst:
        src.backup(dst)
    src.close()
    dst.close()


def _restore(backup, db) -> None:
    for suffix in ("-wal", "-shm"):
        db.with_name(db.name + suffix).unlink(missing_ok=True)
    shutil.copyfile(backup, db)


def _row(db, serial: str) -> tuple[int, bytes]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute("SELECT version, protected FROM cards WHERE serial = ?", (serial,)).fetchone()
    finally:
        conn.close()


def test_a_restored_backup_and_a_relabelled_blob_are_refused_and_accepting_refunds_nothing(tmp_path, cards, servers):  # noqa: F811
    """
    1. a rental of 5 runs; one run used (4 left); remove; the database is
       backed up while the card is idle; one more run (3 left); remove;
    2. the server is stopped, the backup restored, the server started: the
       insert is refused with the RollbackError line (generation older than
       seen), nothing is served (no control socket: `vsc card status` finds
       no daemon) and the record is not left in use;
    3. the operator instead relabels: the backup's blob written into the
       current row with a version 10 higher: refused the same way;
    4. `vsc card accept-rollback`, insert: the older copy loads and the
       counter is 3 (its last stored value), not the 4 of the copy.
    """
    data = tmp_path / "srv"
    info = init_data_dir(data)
    server = servers.start(data)
    db = data / "vsc.sqlite3"
    home, pw = cards.enrol(server, info["fingerprint"], data, SERIAL, PASSWORD)
    cards.start(home, pw)
    rental = Rental(cards, home, tmp_path, runs=5)
    rental.run()
    assert rental.left() == 4
    cards.card(home, "remove")
    backup = tmp_path / "backup.sqlite3"
    _backup(db, backup)
    old_version, old_blob = _row(backup, SERIAL)

    cards.start(home, pw)
    rental.run()
    assert rental.left() == 3
    cards.card(home, "remove")
    figures = {}

    # 2. the restored backup
    server.stop()
    _restore(backup, db)
    server.start()
    assert admin(data, "show", SERIAL)["version"] == old_version
    code, lines = cards.daemon(home, pw, name="restored").refused()
    assert code == 1 and len(lines) == 1, lines
    assert "the server handed back an older copy of this card" in lines[0] and "Nothing was served" in lines[0]
    figures["restored backup"] = lines[0]
    status = cards.card(home, "status", check=False)
    assert status.returncode != 0 and "no card daemon is running" in status.stderr
    assert admin(data, "show", SERIAL)["state"] == "idle"

    # 3. the relabelled blob: the backup's bytes under a higher version number, in a database that moved on
    cards.card(home, "accept-rollback")
    cards.start(home, pw, name="accepted-1")
    assert rental.left() == 3  # the floor: the restored copy's 4 is not handed back
    rental.run()
    assert rental.left() == 2
    cards.card(home, "remove")
    version_now, _ = _row(db, SERIAL)
    conn = sqlite3.connect(db)
    with conn:
        conn.execute("UPDATE cards SET protected = ?, version = ? WHERE serial = ?",
                     (old_blob, version_now + 10, SERIAL))
    conn.close()
    code, lines = cards.daemon(home, pw, name="relabelled").refused()
    assert code == 1 and len(lines) == 1 and "the server handed back an older copy" in lines[0], lines
    figures["relabelled blob"] = lines[0]
    assert admin(data, "show", SERIAL)["state"] == "idle"

    # 4. accepted deliberately: loads, and the runs stay used
    cards.card(home, "accept-rollback")
    cards.start(home, pw, name="accepted-2")
    assert rental.left() == 2
    cards.card(home, "remove")
    print("\nrollback detected:\n" + "\n".join(f"  {k}: {v}" for k, v in figures.items()))
    print("  after accept-rollback: rental runs left 2 (the copy held 4): nothing refunded")
