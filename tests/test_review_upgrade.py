"""
Rules about running vsc for real across versions and restarts -- the
server's schema and config file, the files the card keeps in its HOME --
that an adversarial review found broken, each with how it was broken; they
hold since the fix.
"""

from __future__ import annotations

import json

import pytest

from tests.test_freshness import PK, SERIAL, envelope, step
from vsc.card.freshness import FreshnessStore, RollbackError
from vsc.card.protected import CardMemory


# ================================================================ 1. a damaged HOME/freshness fails closed


@pytest.mark.parametrize("damage", ["truncated", "empty", "not-a-record"])
def test_a_damaged_freshness_record_does_not_let_an_older_copy_in(tmp_path, damage):
    """
    HOME/freshness is what lets the card refuse "a restored backup, a
    relabelled blob, a malicious server that hands back any older copy"
    (docs/security.md, "Rollback"); only a machine with NO record is said
    to accept the first copy it is given. Broken: a file that is there but
    cannot be read as a record (cut short by a full disk or a crash of an
    editor, emptied, overwritten with something else) was read exactly like
    no file at all: the next insert accepted an older copy (rental runs and
    PIN tries refunded) without a word, and the next upload rewrote the file
    with that card's record alone, dropping every other card's. Now such a
    file refuses the insert with one line naming it (nothing is served), and
    is never rewritten over; moving it away is the owner's deliberate choice.
    """
    store = FreshnessStore(tmp_path)
    mem = CardMemory.load(SERIAL, envelope(runs=10), PK)
    backup = step(mem, store)  # generation 1, 10 runs
    step(mem, store, runs=9)  # generation 2: one run spent and acknowledged
    text = store.path.read_text()
    store.path.write_text({"truncated": text[: len(text) // 2], "empty": "",
                           "not-a-record": json.dumps(["records"])}[damage])
    older = CardMemory.load(SERIAL, backup, PK)
    with pytest.raises(RollbackError, match=f"{store.path} cannot be read") as refused:
        store.check(older)
    assert "\n" not in str(refused.value) and "Nothing was served" in str(refused.value)
    damaged = store.path.read_bytes()
    with pytest.raises(RollbackError, match="cannot be read"):  # an upload does not write over it either
        store.save(mem)
    assert store.path.read_bytes() == damaged
    store.path.unlink()  # the owner's deliberate choice: as on a new machine, the first copy is taken
    assert store.check(CardMemory.load(SERIAL, backup, PK)) == (None, [])


# ================================================================ 2. a setting outside [server] is not ignored


def test_a_setting_in_another_section_of_the_server_config_is_refused(tmp_path):
    """
    docs/admin.md §5: "an unknown name ... stops it with one line on stderr
    naming the setting" -- a typo must not silently keep a default
    (vsc/server/settings.py). Broken: only the [server] section was read;
    every other section of vsc-server.ini was skipped without a word, so
    ``[lockout]`` (or ``[sever]``, or a second copy pasted under
    ``[Server]``) holding ``lockout_threshold = 2`` or ``forward_secrecy =
    require`` started a server with the defaults, the administrator believing
    the stricter policy was in force. Now a section other than [server] stops
    the server (and `vsc admin`) with one line naming it.
    """
    from vsc.server import config

    config.init(tmp_path, key_bits=2048)
    ini = tmp_path / config.CONFIG_NAME
    good = ini.read_text()
    for extra in ("[lockout]\nlockout_threshold = 2\n", "[Server]\nforward_secrecy = require\n"):
        ini.write_text(good + extra)
        name = extra[1:extra.index("]")]
        with pytest.raises(config.ConfigError, match=rf"unknown section \[{name}\]") as refused:
            config.load(tmp_path)
        assert "\n" not in str(refused.value)
    ini.write_text("[DEFAULT]\nlockout_threshold = 2\n" + good)  # configparser's defaults reach [server]: allowed
    assert config.load(tmp_path).settings["lockout_threshold"] == 2


# ================================================================ 3. two processes start on one new SQLite database


def test_a_store_opening_a_new_sqlite_database_another_process_is_setting_up_waits(tmp_path):
    """
    Two server processes (or a server and `vsc admin`) may open one SQLite
    database at once; each migrate()s it at start-up, and the store waits
    (busy timeout, 10 s) for the other's write (vsc/server/store.py: "two
    inserts ... in one process or two"). Broken: every connection first
    switches the database to WAL, and on a new database that another process
    was still setting up (holding its write lock in rollback mode, for a
    moment) SQLite refuses that switch at once with "database is locked"
    without waiting: of 12 server processes started together on a new
    database, about one in ten rounds saw one fail to start ("cannot open the
    database ...: database is locked"). Here the other process is held in
    that moment for 0.3 s. Now the store waits for the write lock and
    switches again: it opens the database once the other is done.
    """
    import sqlite3
    import threading

    from vsc.server.store import SCHEMA_VERSION, Store

    path = tmp_path / "vsc.sqlite3"
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")  # a process setting up the new database: its write lock, still rollback mode
    other.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    done_ = threading.Timer(0.3, lambda: other.execute("COMMIT"))
    done_.start()
    store = Store(f"sqlite:///{path}", lambda: 1.0)
    try:
        assert store.migrate() == SCHEMA_VERSION
        assert store._read("PRAGMA journal_mode") == [("wal",)]
    finally:
        done_.join()
        store.close()
        other.close()


# ================================================================ 4. a kdf_floor that is not one is not "no floor"


@pytest.mark.parametrize("text", ["scrpyt:17", "Scrypt:17", "scrypt 17", "scrypt:seventeen", "md5"])
def test_a_kdf_floor_that_is_not_one_is_refused_not_dropped(tmp_path, text):
    """
    card.ini ``kdf_floor`` is "the weakest password derivation the card
    accepts from the server, scrypt:N ... or legacy; weaker parameters are
    refused before anything is derived" (docs/card.md, Settings). Broken:
    any value but ``scrypt...`` (a typo, ``Scrypt:17``) was read as no
    floor at all, so a malicious server could ask that card for the legacy
    MD5 derivation (or scrypt 2^10) and receive a verifier it can test
    password guesses against at speed, the owner believing the floor was
    raised; ``scrypt:seventeen`` failed at the insert with int()'s words.
    Now card.ini is refused with one line naming the setting when the card
    starts, and check_kdf refuses a floor it cannot read (fail closed).
    """
    from vsc.card import config as cc
    from vsc.card import ops
    from vsc.wire.ops import KdfAlg, KdfParams

    home = tmp_path / "home"
    cc.save(home, server="tcp:127.0.0.1:9", server_key="SHA256:x", serial="card-1", kdf_floor=text)
    with pytest.raises(cc.CardConfigError, match=r"card\.ini: kdf_floor = .* is not accepted") as refused:
        cc.load(home)
    assert "\n" not in str(refused.value)
    legacy = KdfParams(alg=KdfAlg.LEGACY_MD5, salt=b"", log2_n=0, r=0, p=0)
    with pytest.raises(ops.WeakKdfRefused):
        ops.check_kdf(legacy, text)
    for good in ("legacy", "scrypt", "scrypt:15", ""):  # what enrolment writes, and a card enrolled before it
        cc.save(home, server="tcp:127.0.0.1:9", server_key="SHA256:x", serial="card-1", kdf_floor=good)
        assert cc.load(home).settings["kdf_floor"] == good


# ================================================================ 5. card.ini: a misspelt setting is not ignored


def test_a_misspelt_card_ini_setting_is_refused_with_one_line(tmp_path):
    """
    card.ini's settings include the card's security policy (docs/card.md,
    Settings: ``forward_secrecy = require``, ``suites``, ``allow_insecure``,
    ``kdf_floor``); the server's config already refuses an unknown name
    because "a typo would otherwise silently keep a default"
    (vsc/server/settings.py). Broken: card.ini's unknown names were kept and
    never looked at, so ``forward_secercy = require`` (or the setting under
    a ``[Card]`` section) left the card offering the server a handshake
    without forward secrecy, the owner believing it required it. Now an
    unknown name, or a section other than [card], stops the card with one
    line naming it; every name vsc itself writes (enroll, dongle enroll,
    the first-insert pin) still loads.
    """
    from vsc.card import config as cc

    home = tmp_path / "home"
    base = dict(server="tcp:127.0.0.1:9", server_key="SHA256:x", serial="card-1")
    cc.save(home, **base, forward_secercy="require")
    with pytest.raises(cc.CardConfigError, match=r"card\.ini: unknown setting 'forward_secercy'") as refused:
        cc.load(home)
    assert "\n" not in str(refused.value)
    cc.save(home, **base)
    ini = home / cc.CARD_INI
    ini.write_text(ini.read_text() + "[Card]\nforward_secrecy = require\n")
    with pytest.raises(cc.CardConfigError, match=r"card\.ini: unknown section \[Card\]"):
        cc.load(home)
    everything = dict(base, suites="aes256-gcm", allow_insecure="false", forward_secrecy="require",
                      handshake_timeout="30", muk_poll="60", clock_poll="3600", clock_tolerance="5400",
                      reconnect_attempts="5", kdf_floor="scrypt:15", kdf_salt="73" * 16, mode="dongle",
                      key_cache="9a", applications="piv,openpgp", totp="true", token="pkcs11:token=t",
                      table="dongle.table", dongle_poll="60")
    cc.save(home, **everything)
    assert cc.load(home).settings == everything


# ================================================================ 6. a database that is not vsc's is not taken over


def test_a_database_that_is_not_a_vsc_one_is_refused_untouched(database_url):
    """
    migrate() is "Create the schema, or bring it up to SCHEMA_VERSION", and
    a database it cannot read as vsc's must be refused with one line, like
    one "newer than this vsc" (docs/admin.md, troubleshooting), never used or
    damaged. Broken: a database that already held tables of vsc's names but
    no vsc schema version -- another application's database named in
    ``database =`` by mistake, or a vsc one whose version row was lost --
    was stamped with the current version as if it were new: vsc's missing
    tables were created in it, and its own ``cards``/``history`` rows were
    then read and written as vsc's (here every later call failed with "no
    such column: state"). A version row vsc never wrote (0) ended `vsc
    admin` with "vsc: 0" (a KeyError). Now both are a StoreError naming the
    database, and nothing is written to it.
    """
    from vsc.server.store import Store, StoreError

    store = Store(database_url, lambda: 1.0)
    try:
        with store._txn() as cur:
            store._x(cur, "CREATE TABLE cards (serial TEXT PRIMARY KEY, owner TEXT)")
            store._x(cur, "INSERT INTO cards (serial, owner) VALUES ('x', 'someone else')")
        with pytest.raises(StoreError, match="not a vsc database") as refused:
            store.migrate()
        assert "\n" not in str(refused.value)
        with pytest.raises(Exception):  # nothing of vsc's was made in it
            store._read("SELECT version FROM schema_version")
        assert store._read("SELECT serial, owner FROM cards") == [("x", "someone else")]
    finally:
        store.close()


def test_a_schema_version_vsc_never_wrote_is_one_line(database_url):
    """(See above.) A version row below 1 is refused with one line, not a KeyError."""
    from vsc.server.store import Store, StoreError

    store = Store(database_url, lambda: 1.0)
    try:
        store.migrate()
        with store._txn() as cur:
            store._x(cur, "UPDATE schema_version SET version = ?", (0,))
        with pytest.raises(StoreError, match="schema version 0 is not one this vsc knows"):
            store.migrate()
    finally:
        store.close()
