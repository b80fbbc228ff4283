"""
The Virtual Smart Card end to end, with nothing simulated but the second
machine: a real ``twistd -n vsc-server`` (tests/servers.py), real ``twistd
-n vsc-card`` daemons and the real ``vsc`` CLI (tests/cards.py), on
127.0.0.1 only, with every wait bounded and every process killed at
teardown.

The second machine is ``unshare --uts --mount`` with another host name (the
MUK hashes it, [0031]) and a private tmpfs over the machine-lock directory
([0054]); without root and unshare these tests skip locally and fail under
VSC_REQUIRE_INTEGRATION=1 (tests/integration.py).

What they show: enrol, insert (Figure 6), the card's services (sign and
decrypt with keys that never leave it, verified by openssl; counters and
data objects synced before they are acknowledged), remove (Figure 11) and
insert on another machine; one card in use at a time [0081]; one card
process per machine [0054]; recover only from the machine of the last
insert (Figure 12); destroy is final [0098]; refusals an outsider cannot
tell apart; kill -9 loses nothing acknowledged; SIGTERM removes; and the CLI
fails with one clear line.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import attrs
import pytest

from tests.cards import Cards, CLIResult, copy_home, unshare_available
from tests.integration import need_program
from tests.servers import Server, Servers, admin, init_data_dir, open_store

pytestmark = pytest.mark.integration

PASSWORD = "correct horse battery staple"
ALL_SLOTS = {"9a": "rsa2048", "9c": "p256", "9d": "rsa2048", "9e": "p256"}


@attrs.define
class Deployment:
    root: Path
    data_dir: Path
    server: Server
    fingerprint: str

    def show(self, serial: str) -> dict:
        """``vsc admin show SERIAL --json`` (a process)."""
        return admin(self.data_dir, "show", serial)

    def record(self, serial: str) -> dict:
        """The same summary read in-process from the database (cheaper, for intermediate checks)."""
        store = open_store(self.data_dir)
        try:
            return store.get(serial).summary(store.now())
        finally:
            store.close()


def _deploy(root: Path, servers: Servers, database: str | None = None) -> Deployment:
    data_dir = root / "server"
    info = init_data_dir(data_dir, database)
    server = servers.start(data_dir, "vsc-server")
    return Deployment(root, data_dir, server, info["fingerprint"])


@pytest.fixture(scope="module")
def sqlite_deployment(tmp_path_factory):
    """One SQLite server for the module's scenario tests (each test enrols its own serial)."""
    root = tmp_path_factory.mktemp("card-e2e")
    servers = Servers(root / "logs")
    try:
        yield _deploy(root, servers)
    finally:
        servers.close()


@pytest.fixture
def walk_deployment(tmp_path, database_url):
    """A fresh server on the parametrized backend (SQLite file, or a fresh PostgreSQL database)."""
    servers = Servers(tmp_path / "logs")
    try:
        yield _deploy(tmp_path, servers, database_url)
    finally:
        servers.close()


@pytest.fixture
def cards(tmp_path):
    c = Cards(tmp_path / "cards")
    try:
        yield c
    finally:
        c.close()


def one_line(result: CLIResult | list[str], *needles: str) -> str:
    """A failure: exactly one non-empty stderr line, no traceback, containing every needle."""
    if isinstance(result, CLIResult):
        assert result.returncode != 0, result
        assert "Traceback" not in result.stderr, result.stderr
        lines = result.error_lines
    else:
        lines = result
    assert len(lines) == 1, lines
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def openssl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([need_program("openssl"), *args], capture_output=True, text=True, timeout=30)


# ---------------------------------------------------------------- the main walk


def test_main_walk_enrol_use_remove_and_insert_on_another_machine(walk_deployment, cards, tmp_path):
    """
    On SQLite and on PostgreSQL: enrol; insert; ``status --json`` has state,
    serial and the four slots; RSA (9a) and EC (9c) signatures verify with
    ``openssl dgst -sha256 -verify`` against ``vsc card public-key`` (and a
    changed message does not); an ``openssl pkeyutl -encrypt`` ciphertext
    decrypts on the card; a counter steps down and refuses to go below zero;
    a data object round-trips; ``vsc card remove`` makes the daemon exit 0
    and the server shows the card idle with a later version; the card then
    inserts on a second (simulated) machine with a different MUK and brings
    its counter and data object along. Every ``--json`` output parses.
    """
    unshare_available()
    dep = walk_deployment
    serial = "walk-1"
    home, pw = cards.enrol(dep.server, dep.fingerprint, dep.data_dir, serial, PASSWORD)
    enrolled = dep.record(serial)
    assert enrolled["state"] == "idle" and enrolled["muk"] is None, enrolled

    daemon = cards.start(home, pw)
    status = cards.card(home, "status").json()
    assert status["state"] == "in-use" and status["serial"] == serial, status
    assert {s: v["algorithm"] for s, v in status["slots"].items()} == ALL_SLOTS, status
    inserted = dep.record(serial)
    assert inserted["state"] == "in-use" and inserted["muk"], inserted

    msg = tmp_path / "msg"
    msg.write_bytes(b"the quick brown fox signs with a virtual smart card\n")
    other = tmp_path / "other-msg"
    other.write_bytes(b"the quick brown fox signs with a virtual smart card!\n")
    pems = {}
    for slot in ("9a", "9c"):
        pem = cards.card(home, "public-key", "--slot", slot).json()["pem"]
        pems[slot] = tmp_path / f"{slot}.pem"
        pems[slot].write_text(pem)
        sig = tmp_path / f"{slot}.sig"
        out = cards.card(home, "sign", "--slot", slot, "--in", str(msg), "--out", str(sig)).json()
        assert out["signature_bytes"] == sig.stat().st_size > 0, out
        ok = openssl("dgst", "-sha256", "-verify", str(pems[slot]), "-signature", str(sig), str(msg))
        assert ok.returncode == 0 and "Verified OK" in ok.stdout, (slot, ok.stdout, ok.stderr)
        bad = openssl("dgst", "-sha256", "-verify", str(pems[slot]), "-signature", str(sig), str(other))
        assert bad.returncode != 0, (slot, bad.stdout)
    assert "BEGIN PUBLIC KEY" in pems["9a"].read_text()

    secret = tmp_path / "secret"
    secret.write_bytes(os.urandom(100))
    enc, dec = tmp_path / "secret.enc", tmp_path / "secret.dec"
    r = openssl("pkeyutl", "-encrypt", "-pubin", "-inkey", str(pems["9a"]), "-in", str(secret), "-out", str(enc))
    assert r.returncode == 0, r.stderr
    out = cards.card(home, "decrypt", "--slot", "9a", "--in", str(enc), "--out", str(dec)).json()
    assert out["bytes"] == 100 and dec.read_bytes() == secret.read_bytes()

    assert cards.card(home, "counter", "runs", "--add", "3").json() == {"name": "runs", "value": 3}
    assert cards.card(home, "counter", "runs", "--sub", "1").json() == {"name": "runs", "value": 2}
    below = cards.card(home, "counter", "runs", "--sub", "5", check=False)
    one_line(below, "cannot go below zero")
    assert cards.card(home, "counter", "runs").json()["value"] == 2

    value = os.urandom(48)
    (tmp_path / "note").write_bytes(value)
    assert cards.card(home, "data", "put", "note", "--in", str(tmp_path / "note")).json()["stored"] is True
    out = cards.card(home, "data", "get", "note", "--out", str(tmp_path / "note.out")).json()
    assert out["bytes"] == 48 and (tmp_path / "note.out").read_bytes() == value
    before_remove = cards.card(home, "status").json()
    assert before_remove["counters"] == ["runs"] and before_remove["data"] == ["note"], before_remove
    assert before_remove["version"] > status["version"], (status, before_remove)  # each change was synced

    assert cards.card(home, "remove").json() == {"state": "idle"}
    assert daemon.wait_exit() == 0, daemon.describe()
    removed = dep.show(serial)
    assert removed["state"] == "idle", removed
    assert removed["version"] > before_remove["version"] > enrolled["version"], (enrolled, before_remove, removed)

    # the same card on a second machine: another MUK, the same protected information
    daemon_b = cards.start(home, pw, machine=cards.other, name="card-other")
    on_b = dep.record(serial)
    assert on_b["state"] == "in-use" and on_b["muk"] and on_b["muk"] != inserted["muk"], (inserted, on_b)
    status_b = cards.card(home, "status").json()
    assert status_b["version"] == removed["version"] and status_b["slots"] == status["slots"], status_b
    assert cards.card(home, "counter", "runs").json()["value"] == 2
    cards.card(home, "data", "get", "note", "--out", str(tmp_path / "note.b"))
    assert (tmp_path / "note.b").read_bytes() == value
    cards.card(home, "remove")
    assert daemon_b.wait_exit() == 0, daemon_b.describe()
    assert dep.record(serial)["state"] == "idle"


# ---------------------------------------------------------------- exclusion


def test_second_insert_elsewhere_and_second_process_here_are_refused(sqlite_deployment, cards, tmp_path):
    """
    While the card is in use on this machine: a daemon for the same serial
    (another HOME) on the other machine is refused by the server with one
    stderr line "in use on another machine" [0081]; a second card process on
    THIS machine is refused by the machine lock before it talks to the
    server [0054]; both exit non-zero, and the first card keeps working.
    """
    unshare_available()
    dep = sqlite_deployment
    serial = "excl-1"
    home, pw = cards.enrol(dep.server, dep.fingerprint, dep.data_dir, serial, PASSWORD)
    first = cards.start(home, pw)
    muk = dep.record(serial)["muk"]
    home2 = copy_home(home, tmp_path / "home-excl-copy")

    code, lines = cards.daemon(home2, pw, cards.other, name="elsewhere").refused()
    assert code != 0
    one_line(lines, "vsc-card: insert refused", "in use on another machine")

    code, lines = cards.daemon(home2, pw, cards.here, name="second-here").refused()
    assert code != 0
    one_line(lines, "vsc-card: insert refused", "another card process holds this machine's lock")

    assert first.running()
    assert cards.card(home, "status").json()["state"] == "in-use"
    show = dep.record(serial)
    assert show["state"] == "in-use" and show["muk"] == muk, show
    cards.card(home, "remove")
    assert first.wait_exit() == 0


def test_sigterm_removes_the_card_then_exits(sqlite_deployment, cards):
    """SIGTERM: the daemon uploads and removes the card (idle, a later version on the server), then exits 0."""
    dep = sqlite_deployment
    serial = "term-1"
    home, pw = cards.enrol(dep.server, dep.fingerprint, dep.data_dir, serial, PASSWORD)
    daemon = cards.start(home, pw)
    cards.card(home, "counter", "c", "--add", "7")
    version = cards.card(home, "status").json()["version"]
    assert dep.record(serial)["state"] == "in-use"
    daemon.send(signal.SIGTERM)
    assert daemon.wait_exit() == 0, daemon.describe()
    show = dep.show(serial)
    assert show["state"] == "idle" and show["muk"] is None and show["version"] > version, show
    assert f"card {serial} removed" in daemon.log_text() + daemon.stderr_text()


# ---------------------------------------------------------------- crash, recover


def test_kill9_loses_no_acknowledged_update_and_recover_needs_the_last_machine(sqlite_deployment, cards, tmp_path):
    """
    A counter step and a data object are acknowledged by the CLI, then the
    daemon is killed with SIGKILL (no remove). The card stays in use on the
    server; the CLI against the dead daemon's stale socket fails with one
    line; ``vsc card recover`` from the other machine is refused
    (MUK_MISMATCH: not the machine of the last insert, Figure 12) and leaves
    it in use; from this machine it works (idle). Inserted again, the card
    shows the decremented counter and the stored data object: nothing that
    was acknowledged was lost.
    """
    unshare_available()
    dep = sqlite_deployment
    serial = "crash-1"
    home, pw = cards.enrol(dep.server, dep.fingerprint, dep.data_dir, serial, PASSWORD)
    daemon = cards.start(home, pw)
    assert cards.card(home, "counter", "rent", "--add", "5").json()["value"] == 5
    assert cards.card(home, "counter", "rent", "--sub", "1").json()["value"] == 4
    value = os.urandom(48)
    (tmp_path / "v").write_bytes(value)
    cards.card(home, "data", "put", "blob", "--in", str(tmp_path / "v"))

    assert daemon.kill(signal.SIGKILL) == -signal.SIGKILL
    one_line(cards.card(home, "status", check=False))  # stale socket, nobody behind it
    assert dep.record(serial)["state"] == "in-use"

    refused = cards.card(home, "recover", "--password-file", str(pw), machine=cards.other, check=False)
    one_line(refused, "recover refused", "not the machine the card was last inserted on")
    assert dep.record(serial)["state"] == "in-use"

    assert cards.card(home, "recover", "--password-file", str(pw)).json() == {"serial": serial, "state": "idle"}
    assert dep.record(serial)["state"] == "idle"

    again = cards.start(home, pw, name="after-recover")
    assert cards.card(home, "counter", "rent").json()["value"] == 4
    cards.card(home, "data", "get", "blob", "--out", str(tmp_path / "v.out"))
    assert (tmp_path / "v.out").read_bytes() == value
    cards.card(home, "remove")
    assert again.wait_exit() == 0


# ---------------------------------------------------------------- refusals


def test_destroy_is_final(sqlite_deployment, cards):
    """``vsc card destroy --yes``: the server shows it destroyed, and a later insert is refused "destroyed"."""
    dep = sqlite_deployment
    serial = "doomed-1"
    home, pw = cards.enrol(dep.server, dep.fingerprint, dep.data_dir, serial, PASSWORD)
    out = cards.card(home, "destroy", "--yes", "--password-file", str(pw)).json()
    assert out == {"serial": serial, "state": "destroyed"}
    assert dep.show(serial)["state"] == "destroyed"
    code, lines = cards.daemon(home, pw, name="after-destroy").refused()
    assert code != 0
    one_line(lines, "vsc-card: insert refused", "destroyed")
    one_line(cards.card(home, "recover", "--password-file", str(pw), check=False), "destroyed")


def test_wrong_password_and_unknown_serial_fail_the_same_way(sqlite_deployment, cards, tmp_path):
    """
    A daemon for a serial the server never heard of, and one with a wrong
    password for a real serial, exit with the same status and the same one
    stderr line: a refusal never reveals whether the serial exists. (The
    ghost's card.ini pins no salt: a copy of real-1's, salt and all, is
    refused by the card itself, since the server's decoy salt is not
    real-1's, as tests/test_kdf_salt.py shows.)
    """
    dep = sqlite_deployment
    serial = "real-1"
    home, pw = cards.enrol(dep.server, dep.fingerprint, dep.data_dir, serial, PASSWORD)
    ghost = copy_home(home, tmp_path / "home-ghost", serial="no-such-card", kdf_salt="")
    wrong = cards.password_file("wrong", "not the password")

    code_ghost, lines_ghost = cards.daemon(ghost, pw, name="ghost").refused()
    code_wrong, lines_wrong = cards.daemon(home, wrong, name="wrong-pw").refused()
    assert code_ghost == code_wrong != 0
    assert lines_ghost == lines_wrong, (lines_ghost, lines_wrong)
    one_line(lines_wrong, "vsc-card: insert refused")
    assert dep.record(serial)["state"] == "idle"


def test_commands_without_a_daemon_fail_with_one_line(cards, tmp_path):
    """
    Every daemon command against a HOME with no daemon (an enrolled-looking
    HOME, and one that does not exist) exits non-zero with one clear stderr
    line and no traceback, with and without --json.
    """
    from vsc.card import config as cc

    home = tmp_path / "home-idle"
    cc.save(home, server="tcp:127.0.0.1:9", server_key="SHA256:x", serial="idle-1")
    (tmp_path / "in").write_bytes(b"x" * 32)
    commands = [
        ("status",), ("sign", "--slot", "9c", "--in", str(tmp_path / "in"), "--out", str(tmp_path / "o")),
        ("counter", "c", "--sub", "1"), ("data", "get", "d", "--out", str(tmp_path / "o")), ("remove",),
    ]
    for h, cmds in ((home, commands), (tmp_path / "no-such-home", commands[:1])):
        for i, args in enumerate(cmds):
            result = cards.card(h, *args, json_out=bool(i % 2), check=False)
            one_line(result, "no card daemon is running")
            assert result.stdout == "", result
    assert not (tmp_path / "o").exists()
