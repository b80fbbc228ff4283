"""
``vsc admin`` card-database commands (vsc/cli/admin.py), run through the
real installed console script in a subprocess on a temporary data dir, the
way an administrator types them. Cards that need an enrolled record are
created directly through the Store API (enrolment over the network is
tested elsewhere); the CLI must then see exactly what the store holds.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time

import pytest

from vsc.protocol.auth import code_hash
from vsc.protocol.cardstore import CheckOut, CountFailure, EnrolCard, SyncCard
from vsc.protocol.lifecycle import Operation
from vsc.server.store import SCHEMA_VERSION, Store
from vsc.wire.ops import Status

VSC = os.path.join(os.path.dirname(sys.executable), "vsc")
CODE_RE = re.compile(r"^[A-Z2-7]{5}(-[A-Z2-7]{5}){3}-[A-Z2-7]{4}$")  # 120 bits: 24 base32 characters, grouped
MUK = b"M" * 32
SESSION = b"S" * 32
VERIFIER = b"v" * 32

pytestmark = pytest.mark.integration


def vsc(data_dir, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    if not os.path.exists(VSC):
        pytest.fail(f"{VSC} is missing: vsc is not installed in this environment (run ./quickstart test)")
    env = {k: v for k, v in os.environ.items() if k != "VSC_DEBUG"}
    proc = subprocess.run(
        [VSC, "admin", "--data-dir", str(data_dir), *args],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, env=env,
    )
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    if ok:
        assert proc.returncode == 0, f"vsc admin {' '.join(args)} failed: {proc.stderr}"
    return proc


def vsc_json(data_dir, *args: str):
    return json.loads(vsc(data_dir, *args, "--json").stdout)


def fails(data_dir, *args: str) -> str:
    """Run a command that must fail: non-zero exit, nothing on stdout, ONE line on stderr; return that line."""
    proc = vsc(data_dir, *args, ok=False)
    assert proc.returncode != 0, f"vsc admin {' '.join(args)} succeeded: {proc.stdout}"
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("vsc: ")
    return lines[0]


@pytest.fixture(scope="module")
def initialised(tmp_path_factory):
    """One data dir initialised through the CLI (SQLite), copied for each test: init is the slow part."""
    d = tmp_path_factory.mktemp("template") / "server"
    vsc(d, "init", "--key-bits", "2048")
    return d


@pytest.fixture
def data_dir(initialised, tmp_path):
    """A fresh, initialised SQLite data dir of this test's own (a copy of the template: no database is open)."""
    d = tmp_path / "server"
    shutil.copytree(initialised, d)
    return d


@pytest.fixture(scope="module")
def error_dir(tmp_path_factory, initialised):
    """A data dir holding one enrolled card, card-1, shared by the error cases (failures change nothing)."""
    d = tmp_path_factory.mktemp("errors") / "server"
    shutil.copytree(initialised, d)
    enrol(d, "card-1")
    return d


def store_for(data_dir) -> Store:
    from vsc.server import config

    return Store(config.load(data_dir).database_url, time.time)  # clock-ok: the CLI uses wall time too


def enrolled(store: Store, serial: str, code: str, protected: bytes = b"protected-1", verifier: bytes = VERIFIER,
             peer: str = "tcp:10.1.2.3:4000") -> Status:
    """The store's answer to the enrolment the network path would make with ``code``."""
    return store.enrol(EnrolCard(serial, code_hash(code), verifier, b"kdf", protected, b"", {}, peer)).status


def check_out(store: Store, serial: str, session: bytes = SESSION, peer: str = "p", channel: dict | None = None):
    """Insert's check-out after authentication passed (MUK), as the server would run it; returns the Outcome."""
    return store.check_out(CheckOut(serial, MUK, session, channel or {}, peer, VERIFIER))


def enrol(data_dir, serial: str, protected: bytes = b"protected-1") -> None:
    """Issue through the CLI, enrol through the Store with the printed code (as the network path would)."""
    code = vsc_json(data_dir, "issue", serial)["code"]
    store = store_for(data_dir)
    try:
        assert enrolled(store, serial, code, protected) is Status.OK
    finally:
        store.close()


# ---------------------------------------------------------------- init


def test_init_prints_the_fingerprint_and_creates_the_schema(tmp_path):
    """init prints the SHA256: fingerprint cards pin (same as 'fingerprint') and creates the SQLite schema at once."""
    d = tmp_path / "server"
    out = vsc(d, "init", "--key-bits", "2048").stdout
    fp = re.search(r"^SHA256:[A-Za-z0-9+/]{43}$", out, re.M)
    assert fp, out
    assert vsc(d, "fingerprint").stdout.strip() == fp.group(0)
    db = sqlite3.connect(d / "vsc.sqlite3")
    try:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert {"schema_version", "cards", "history", "enrolment_codes"} <= tables
        assert "leases" not in tables  # nothing is held before authentication: no per-serial leases
        assert db.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    finally:
        db.close()
    assert vsc_json(d, "list") == {"cards": []}
    assert "already exists" in fails(d, "init", "--key-bits", "2048")


def test_init_json(tmp_path):
    """init --json reports the fingerprint, the database URL (SQLite in the data dir by default) and the listen endpoint."""
    d = tmp_path / "server"
    info = vsc_json(d, "init", "--key-bits", "2048")
    assert info["fingerprint"].startswith("SHA256:")
    assert info["database"] == f"sqlite:///{d / 'vsc.sqlite3'}"
    assert info["data_dir"] == str(d)


def test_init_with_a_bad_database_url_fails_cleanly_and_can_be_retried(tmp_path):
    """An unsupported URL fails with one line and leaves no key behind, so init can simply be run again."""
    d = tmp_path / "server"
    line = fails(d, "init", "--database", "mysql://localhost/vsc", "--key-bits", "2048")
    assert "unsupported database URL" in line
    assert not (d / "server-key.pem").exists() and not (d / "vsc-server.ini").exists()
    vsc(d, "init", "--key-bits", "2048")


def test_init_with_an_unreachable_postgresql_hides_the_password(tmp_path):
    """A PostgreSQL URL nobody listens on fails with one line that names the URL without its password."""
    d = tmp_path / "server"
    line = fails(d, "init", "--database", "postgresql://vsc:s3cret@127.0.0.1:1/vsc", "--key-bits", "2048")
    assert "cannot open the database postgresql://vsc:***@127.0.0.1:1/vsc" in line
    assert "s3cret" not in line


# ---------------------------------------------------------------- issue, list, show, history


def test_issue_prints_the_code_once_and_stores_only_its_hash(data_dir):
    """issue prints a fresh 120-bit code with its expiry; the database holds its hash, never the code."""
    t0 = time.time()  # clock-ok
    info = vsc_json(data_dir, "issue", "card-1", "--ttl", "600")
    assert set(info) >= {"serial", "code", "expires"} and info["serial"] == "card-1"
    assert CODE_RE.match(info["code"]), info["code"]
    assert t0 + 600 <= info["expires"] <= time.time() + 600  # clock-ok
    store = store_for(data_dir)
    try:
        stored_hash, auth_info, expires = store.enrolment("card-1")
    finally:
        store.close()
    assert stored_hash == code_hash(info["code"]) and expires == info["expires"]
    assert json.loads(auth_info) == {"methods": ["password", "master-key"]}
    raw = (data_dir / "vsc.sqlite3").read_bytes()
    assert info["code"].encode() not in raw and info["code"].replace("-", "").encode() not in raw
    human = vsc(data_dir, "issue", "card-2").stdout
    assert re.search(r"^    [A-Z2-7-]{28}$", human, re.M) and "card-2" in human


def test_reissue_replaces_the_pending_code(data_dir):
    """Issuing again for a pending serial prints a new code; the old one no longer matches."""
    first = vsc_json(data_dir, "issue", "card-1")
    second = vsc_json(data_dir, "issue", "card-1")
    assert second["replaced"] is True and second["code"] != first["code"]
    store = store_for(data_dir)
    try:
        assert enrolled(store, "card-1", first["code"]) is Status.REFUSED
        assert enrolled(store, "card-1", second["code"]) is Status.OK
    finally:
        store.close()


def test_list_shows_cards_and_pending_enrolments(data_dir):
    """list gives serial, state, version and locked_out for every card, and pending enrolments as state 'issued'."""
    enrol(data_dir, "card-a")
    enrol(data_dir, "card-b")
    vsc(data_dir, "issue", "card-c")
    vsc(data_dir, "destroy", "card-b")
    rows = vsc_json(data_dir, "list")["cards"]
    assert [(r["serial"], r["state"], r["version"], r["locked_out"]) for r in rows] == [
        ("card-a", "idle", 1, False),
        ("card-b", "destroyed", 1, False),
        ("card-c", "issued", None, False),
    ]
    human = vsc(data_dir, "list").stdout
    assert re.search(r"^card-a\s+idle\s+1\s+no$", human, re.M)
    assert re.search(r"^card-c\s+issued\b", human, re.M)


def test_show_and_history_of_an_enrolled_card_in_use(data_dir):
    """show reports state, MUK, version and lockout of a card in use; history lists every step with op, result, MUK, peer."""
    enrol(data_dir, "card-1")
    store = store_for(data_dir)
    try:
        assert check_out(store, "card-1", peer="tcp:10.1.2.3:5000", channel={"suite": "aes256-gcm"}).status is Status.OK
        synced = store.sync(SyncCard("card-1", SESSION, 1, b"protected-2", "tcp:10.1.2.3:5000"))
        assert (synced.status, synced.version) == (Status.OK, 2)
    finally:
        store.close()
    info = vsc_json(data_dir, "show", "card-1")
    assert (info["serial"], info["state"], info["muk"], info["locked_out"], info["version"]) == (
        "card-1", "in-use", MUK.hex(), False, 2,
    )
    assert info["channel"]["suite"] == "aes256-gcm" and info["protected_bytes"] == len(b"protected-2")
    human = vsc(data_dir, "show", "card-1").stdout
    assert "state:       in-use" in human and MUK.hex() in human
    assert "protected-2" not in human and "protected-2" not in json.dumps(info)
    history = vsc_json(data_dir, "history", "card-1")
    assert history["serial"] == "card-1"
    assert [(e["op"], e["result"], e["muk"], e["peer"]) for e in history["history"]] == [
        ("issue", "ok", None, "admin"),
        ("enrol", "ok", None, "tcp:10.1.2.3:4000"),
        ("insert", "ok", MUK.hex(), "tcp:10.1.2.3:5000"),
        ("sync", "ok", MUK.hex(), "tcp:10.1.2.3:5000"),
    ]
    assert all(isinstance(e["at"], float) and e["id"] for e in history["history"])
    lines = vsc(data_dir, "history", "card-1").stdout.splitlines()
    assert len(lines) == 4 and "insert" in lines[2] and "tcp:10.1.2.3:5000" in lines[2]


def test_unlock_clears_a_throttle(data_dir):
    """
    A card throttled by failed authentications — 20 from other machines (the
    default shared threshold) and 5 from the owner's last machine (the default
    threshold) — shows locked_out, both counts and until when in show and
    list; unlock clears both buckets and is in the history.
    """
    enrol(data_dir, "card-1")
    store = store_for(data_dir)
    try:
        for _ in range(20):
            store.count_failure(CountFailure("card-1", Operation.INSERT, "tcp:10.9.9.9:1", "failed: password", None,
                                             False))
        for _ in range(5):
            store.count_failure(CountFailure("card-1", Operation.INSERT, "tcp:10.1.2.3:1", "failed: password", MUK,
                                             True))
    finally:
        store.close()
    shown = vsc_json(data_dir, "show", "card-1")
    assert (shown["locked_out"], shown["failures"], shown["machine_failures"]) == (True, 20, 5)
    assert shown["locked_until"] > time.time()  # clock-ok
    assert "locked out:  until " in vsc(data_dir, "show", "card-1").stdout
    assert vsc_json(data_dir, "list")["cards"][0]["locked_out"] is True
    result = vsc_json(data_dir, "unlock", "card-1")
    assert result["serial"] == "card-1" and result["locked_out"] is False
    shown = vsc_json(data_dir, "show", "card-1")
    assert (shown["locked_out"], shown["failures"], shown["machine_failures"], shown["locked_until"]) == (
        False, 0, 0, None)
    last = vsc_json(data_dir, "history", "card-1")["history"][-1]
    assert (last["op"], last["result"], last["peer"]) == ("unlock", "ok", "admin")
    assert "unlocked" in vsc(data_dir, "unlock", "card-1").stdout


# ---------------------------------------------------------------- destroy, duplicate, replace


def test_destroy_is_final(data_dir):
    """destroy works from in-use; the card stays destroyed, a second destroy and a duplicate of it fail with one line."""
    enrol(data_dir, "card-1")
    store = store_for(data_dir)
    try:
        assert check_out(store, "card-1").status is Status.OK
    finally:
        store.close()
    assert vsc_json(data_dir, "destroy", "card-1") == {"serial": "card-1", "state": "destroyed", "was": "in-use"}
    shown = vsc_json(data_dir, "show", "card-1")
    assert (shown["state"], shown["muk"], shown["protected_bytes"]) == ("destroyed", None, 0)
    assert "already destroyed" in fails(data_dir, "destroy", "card-1")
    assert "destroyed" in fails(data_dir, "duplicate", "card-1", "card-2")
    entries = vsc_json(data_dir, "history", "card-1")["history"]
    assert [(e["op"], e["result"], e["peer"]) for e in entries[-2:]] == [
        ("destroy", "ok", "admin"), ("destroy", "destroyed", "admin"),
    ]


def test_duplicate_makes_an_idle_copy(data_dir):
    """[0102]: duplicate creates a second idle card with the same information and version; both histories say so."""
    enrol(data_dir, "card-1", protected=b"the-information")
    out = vsc_json(data_dir, "duplicate", "card-1", "card-2")
    assert out == {"serial": "card-1", "new_serial": "card-2", "state": "idle", "version": 1}
    store = store_for(data_dir)
    try:
        assert store.get("card-2").protected == b"the-information"
        assert store.get("card-2").verifier == store.get("card-1").verifier
    finally:
        store.close()
    assert vsc_json(data_dir, "history", "card-2")["history"][-1]["detail"] == "copy of card-1"
    assert vsc_json(data_dir, "history", "card-1")["history"][-1]["detail"] == "copied to card-2"
    assert "already exists" in fails(data_dir, "duplicate", "card-1", "card-2")
    assert "copy of card-1" in vsc(data_dir, "duplicate", "card-1", "card-3").stdout


def test_replace_by_duplicate_destroys_the_lost_card_and_copies_it(data_dir):
    """[0062] default policy: the lost card is destroyed and SERIAL-rN (first free N) is its exact, idle copy."""
    enrol(data_dir, "card-1", protected=b"the-information")
    store = store_for(data_dir)
    try:
        assert check_out(store, "card-1", peer="thief").status is Status.OK  # the lost card is in use somewhere
    finally:
        store.close()
    vsc(data_dir, "issue", "card-1-r1")  # r1 is taken (pending), so the replacement is r2
    out = vsc_json(data_dir, "replace", "card-1")
    assert out["new_serial"] == "card-1-r2" and out["policy"] == "duplicate"
    assert vsc_json(data_dir, "show", "card-1")["state"] == "destroyed"
    new = vsc_json(data_dir, "show", "card-1-r2")
    assert (new["state"], new["version"], new["muk"]) == ("idle", 1, None)
    store = store_for(data_dir)
    try:
        assert store.get("card-1-r2").protected == b"the-information"
        assert check_out(store, "card-1", b"T" * 32, "thief").status is Status.DESTROYED
    finally:
        store.close()
    old_ops = [(e["op"], e["result"]) for e in vsc_json(data_dir, "history", "card-1")["history"]]
    assert ("duplicate", "ok") in old_ops and ("destroy", "ok") in old_ops
    assert [e["op"] for e in vsc_json(data_dir, "history", "card-1-r2")["history"]] == ["duplicate"]
    assert "destroyed and its information is gone" in fails(data_dir, "replace", "card-1")


def test_replace_fresh_issues_a_new_card(data_dir):
    """[0062] fresh policy: the lost card is destroyed and NEW gets a new enrolment code; both serials have history."""
    enrol(data_dir, "card-1")
    out = vsc_json(data_dir, "replace", "card-1", "--policy", "fresh", "--new-serial", "card-9")
    assert out["new_serial"] == "card-9" and out["state"] == "issued" and CODE_RE.match(out["code"])
    assert vsc_json(data_dir, "show", "card-1")["state"] == "destroyed"
    assert vsc_json(data_dir, "show", "card-9")["state"] == "issued"
    store = store_for(data_dir)
    try:
        assert enrolled(store, "card-9", out["code"], b"new-card", b"w" * 32, "p") is Status.OK
    finally:
        store.close()
    assert vsc_json(data_dir, "history", "card-1")["history"][-1]["op"] == "destroy"
    assert [e["op"] for e in vsc_json(data_dir, "history", "card-9")["history"]] == ["issue", "enrol"]
    # a card already destroyed (reported lost earlier) can still be replaced afresh; the new serial must be free
    assert "already in use" in fails(data_dir, "replace", "card-1", "--policy", "fresh", "--new-serial", "card-9")
    human = vsc(data_dir, "replace", "card-1", "--policy", "fresh").stdout
    assert "card-1-r1" in human and re.search(r"^    [A-Z2-7-]{28}$", human, re.M)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "args, message",
    [
        (["show", "nope"], "no card nope"),
        (["history", "nope"], "no card nope"),
        (["destroy", "nope"], "no card nope"),
        (["unlock", "nope"], "no card nope"),
        (["duplicate", "nope", "other"], "no card nope"),
        (["replace", "nope"], "no card nope"),
        (["issue", "card-1"], "card card-1 already exists"),
        (["duplicate", "card-1", "card-1"], "card card-1 already exists"),
        (["issue", "x" * 65], "at most 64 bytes"),
        (["show", "bad\tserial"], "invalid serial"),
    ],
)
def test_errors_are_one_line(error_dir, args, message):
    """Unknown or existing serials and invalid input: one 'vsc: ...' line on stderr, non-zero exit, no traceback."""
    assert message in fails(error_dir, *args)
    assert vsc_json(error_dir, "show", "card-1")["state"] == "idle"


def test_a_missing_data_dir_is_one_line(tmp_path):
    """Any action on a directory that was never initialised says to run init, in one line."""
    line = fails(tmp_path / "nowhere", "list")
    assert "not found" in line and "init" in line


# ---------------------------------------------------------------- PostgreSQL


def test_postgresql_backend_through_the_cli(tmp_path, pg_database_url):
    """init --database postgresql://... records the URL, creates the schema there, and the commands work on it."""
    d = tmp_path / "server"
    info = vsc_json(d, "init", "--database", pg_database_url, "--key-bits", "2048")
    assert info["database"] == pg_database_url
    parser = configparser.ConfigParser()
    parser.read(d / "vsc-server.ini")
    assert parser["server"]["database"] == pg_database_url
    assert not (d / "vsc.sqlite3").exists()
    import psycopg

    with psycopg.connect(pg_database_url) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    enrol(d, "card-1")
    vsc(d, "issue", "card-2")
    assert [(r["serial"], r["state"]) for r in vsc_json(d, "list")["cards"]] == [("card-1", "idle"), ("card-2", "issued")]
    assert vsc_json(d, "duplicate", "card-1", "card-3")["version"] == 1
    assert vsc_json(d, "replace", "card-3")["new_serial"] == "card-3-r1"
    assert vsc_json(d, "show", "card-3")["state"] == "destroyed"
    assert [e["op"] for e in vsc_json(d, "history", "card-1")["history"]] == ["issue", "enrol", "duplicate"]
    assert "no card nope" in fails(d, "show", "nope")
