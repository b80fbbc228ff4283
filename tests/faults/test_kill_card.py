"""
kill -9 of a card process in use.

Two cards are killed:

* a real ``twistd -n vsc-card`` daemon (tests/cards.py), killed while the
  ``vsc`` CLI is stepping one of its counters (each step synced to the
  server before it is acknowledged);
* a simulated card (vsc.card.ops in a subprocess that takes the machine
  lock, inserts, then syncs numbered uploads and reports each one sent and
  acknowledged), killed at seeded random points of its sync loop, ROUNDS
  times.

After each kill: the kernel has released the card's machine lock ([0054]:
another process takes it at once); the server still has the card in use
with the dead card's MUK, and nothing acknowledged is lost (the stored
version and protected information are the last acknowledged, or the one
upload in flight, committed, one version further); recover from another
machine (another MUK) is refused MUK_MISMATCH and changes nothing; recover
on the same machine (the same MUK) works (Figure 12); the record is what its
history replayed through Figure 4 explains; and the card inserts again.
The daemon case runs the other machine as ``unshare --uts --mount`` (another
host name, so another MUK); the simulated case uses another MUK directly.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import pytest_twisted

from tests.cards import Cards, unshare_available
from tests.integration import wait_for
from tests.faults.common import PASSWORD, check_card, cheap_keys, enrol_cards, within
from tests.servers import VSC, _env, admin, init_data_dir, open_store, servers  # noqa: F401  (servers is a fixture)
from vsc import crypto
from vsc.card import ops
from vsc.card.connect import connect
from vsc.protocol.auth import DEFAULT_MASTER_KEY
from vsc.wire.ops import Status

pytestmark = pytest.mark.integration

ROUNDS = 5
SEED = 0xCA4D
WAIT = 30.0  # bound on any wait for a subprocess

#: Does another process get the machine lock? Exit 0: taken (and given back); 3: held by someone.
LOCK_PROBE = """
import sys
from vsc.card.machine import MachineLock, MachineLockHeld
lock = MachineLock(sys.argv[1])
try:
    lock.acquire()
except MachineLockHeld:
    sys.exit(3)
lock.release()
"""

#: A simulated card: machine lock, insert, then numbered syncs until killed.
CARD = """
import sys
from twisted.internet import task
from vsc.card import ops
from vsc.card.connect import connect
from vsc.card.machine import MachineLock
from vsc.protocol.auth import DEFAULT_MASTER_KEY

endpoint, fingerprint, serial, password, muk, secret, lock_dir, tag = sys.argv[1:9]

def say(*words):
    sys.stdout.write(" ".join(str(w) for w in words) + "\\n")
    sys.stdout.flush()

async def main(reactor):
    lock = MachineLock(lock_dir)
    lock.acquire()
    say("LOCKED")
    proto = await connect(reactor, endpoint, fingerprint)
    result, _ = await ops.insert(proto, serial, password, bytes.fromhex(muk), bytes.fromhex(secret), DEFAULT_MASTER_KEY)
    version = result.version
    say("INSERTED", version)
    n = 0
    while True:
        n += 1
        say("SENT", n, version)
        result = await ops.sync(proto, serial, bytes.fromhex(secret), version, f"{tag} {n}".encode())
        version = result.version
        say("ACK", n, version)

task.react(lambda reactor: __import__("twisted.internet.defer", fromlist=["x"]).ensureDeferred(main(reactor)))
"""


def json_stream(text: str) -> list:
    """The complete JSON documents in ``text``, one after another (a cut-off last one is left out)."""
    decoder, out, i = json.JSONDecoder(), [], 0
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        try:
            value, i = decoder.raw_decode(text, i)
        except ValueError:
            return out
        out.append(value)


def lock_probe(lock_dir, env: dict | None = None) -> int:
    return subprocess.run([sys.executable, "-c", LOCK_PROBE, str(lock_dir)], env=env or _env(),
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=WAIT).returncode


# ---------------------------------------------------------------- simulated card (vsc.card.ops)


class CardProcess:
    """The CARD script as a subprocess; ``lines`` are what it reported so far (read straight off the pipe)."""

    def __init__(self, argv: list[str]):
        self.proc = subprocess.Popen([sys.executable, "-c", CARD, *argv], env=_env(), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.lines: list[list[str]] = []
        self._buf = b""

    def _take(self, data: bytes) -> None:
        self._buf += data
        *whole, self._buf = self._buf.split(b"\n")
        self.lines.extend(line.decode().split() for line in whole if line.strip())

    def read_until(self, predicate, what: str) -> None:
        """Read report lines until ``predicate(lines)``; bounded by WAIT (the process is killed on timeout)."""
        import select

        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + WAIT
        while not predicate(self.lines):
            left = deadline - time.monotonic()
            ready = select.select([fd], [], [], max(left, 0))[0] if left > 0 else []
            data = os.read(fd, 65536) if ready else b""
            if not data:
                self.proc.kill()
                self.proc.wait(WAIT)
                raise AssertionError(f"the simulated card stopped (exit {self.proc.returncode}) before {what}: "
                                     f"{self.lines[-3:]}\n{self.proc.stderr.read().decode(errors='replace')}")
            self._take(data)

    def acks(self) -> list[list[str]]:
        return [w for w in self.lines if w[0] == "ACK"]

    def kill(self) -> int:
        """SIGKILL, reap, and read what it reported before it died (the pipe still holds it)."""
        self.proc.kill()
        code = self.proc.wait(WAIT)
        self._take(self.proc.stdout.read() + b"\n")
        self.proc.stdout.close()
        self.proc.stderr.close()
        return code


@pytest_twisted.ensureDeferred
async def test_kill_9_simulated_card_mid_sync(tmp_path, servers):  # noqa: F811
    """A simulated card process SIGKILLed at ROUNDS seeded points of its sync loop: its machine lock is free at once, nothing acknowledged is lost, recover with another MUK is refused MUK_MISMATCH, with the same MUK it works, and the history explains the record."""
    from twisted.internet import reactor

    rng = random.Random(SEED)
    data_dir = tmp_path / "server"
    fp = init_data_dir(data_dir)["fingerprint"]
    server = servers.start(data_dir, "server")
    keys, kdf = cheap_keys()
    serial = "killed-card"
    await enrol_cards(data_dir, server.endpoint, fp, [serial], keys, kdf)
    lock_dir = tmp_path / "lock"
    lock_dir.mkdir()
    muk = crypto.sha256(b"the machine the card runs on")
    other_muk = crypto.sha256(b"another machine")
    report = []
    for r in range(ROUNDS):
        tag = f"round {r} upload"
        card = CardProcess([server.endpoint, fp, serial, PASSWORD, muk.hex(), crypto.system_random(32).hex(),
                            str(lock_dir), tag])
        try:
            card.read_until(lambda lines: any(w[0] == "LOCKED" for w in lines), "taking the machine lock")
            assert lock_probe(lock_dir) == 3, "the running card's machine lock was not held"
            target = rng.randint(1, 20)
            card.read_until(lambda lines: len([w for w in lines if w[0] == "ACK"]) >= target, f"{target} acks")
            time.sleep(rng.uniform(0, 0.01))  # into the next sync
        finally:
            assert card.kill() == -signal.SIGKILL
        acks = card.acks()
        sent = [w for w in card.lines if w[0] == "SENT"]
        last_n, last_version = int(acks[-1][1]), int(acks[-1][2])

        assert lock_probe(lock_dir) == 0, "the kernel did not release the killed card's machine lock"
        store = open_store(data_dir)
        try:
            record, _ = check_card(store, serial)
            assert record.state.value == "in-use" and record.muk == muk
            if (record.version, record.protected) == (last_version, f"{tag} {last_n}".encode()):
                in_flight_committed = False
            else:  # the sync in flight was committed, its answer never read
                assert int(sent[-1][1]) == last_n + 1, (sent[-1], acks[-1])
                assert (record.version, record.protected) == (last_version + 1, f"{tag} {last_n + 1}".encode())
                in_flight_committed = True
        finally:
            store.close()

        p = await within(connect(reactor, server.endpoint, fp))
        try:
            with pytest.raises(ops.OperationRefused) as refused:
                await within(ops.recover(p, serial, PASSWORD, other_muk, DEFAULT_MASTER_KEY, keys=keys))
            assert refused.value.status is Status.MUK_MISMATCH
            store = open_store(data_dir)
            try:
                assert store.get(serial).state.value == "in-use"
            finally:
                store.close()
            result, _ = await within(ops.recover(p, serial, PASSWORD, muk, DEFAULT_MASTER_KEY, keys=keys))
            assert result.status is Status.OK
        finally:
            p.transport.loseConnection()
        store = open_store(data_dir)
        try:
            record, history = check_card(store, serial)
            assert record.state.value == "idle" and record.muk is None
            assert [h.result for h in history if h.op == "recover"][-2:] == ["muk-mismatch", "ok"]
        finally:
            store.close()
        report.append((len(acks), in_flight_committed))
    print(f"\nsimulated card killed {ROUNDS} times: acks before each kill {[a for a, _ in report]}, "
          f"in-flight sync committed {sum(c for _, c in report)} times; every recover from another MUK refused, "
          f"from the same MUK OK")


# ---------------------------------------------------------------- the real card daemon


@pytest.fixture
def cards(tmp_path):
    c = Cards(tmp_path / "cards")
    try:
        yield c
    finally:
        c.close()


def test_kill_9_card_daemon_in_use(tmp_path, servers, cards):  # noqa: F811
    """A vsc-card daemon SIGKILLed while the CLI steps its counter: its machine lock is free at once, the server keeps it in use, insert and recover from the other machine are refused, recover here works, and the reinserted card has every acknowledged step."""
    unshare_available()
    data_dir = tmp_path / "server"
    fp = init_data_dir(data_dir)["fingerprint"]
    server = servers.start(data_dir, "server")
    serial = "daemon-1"
    home, pw = cards.enrol(server, fp, data_dir, serial, PASSWORD)
    daemon = cards.start(home, pw)
    assert lock_probe(cards.here.lock_dir, cards.env()) == 3, "the running card does not hold the machine lock"

    # the CLI steps a counter over and over; each step is synced before it is acknowledged
    steps = tmp_path / "steps.jsonl"
    loop = subprocess.Popen(
        ["sh", "-c", 'for i in $(seq 1 100); do "$0" card --home "$1" counter rent --add 1 --json || exit 0; done',
         str(VSC), str(home)],
        env=cards.env(), stdin=subprocess.DEVNULL, stdout=open(steps, "w"), stderr=subprocess.DEVNULL,
        start_new_session=True)
    try:
        wait_for(lambda: len(json_stream(steps.read_text())) >= 3 or loop.poll() is not None, WAIT,
                 "the counter loop to step the counter three times")
        assert loop.poll() is None, "the counter loop ended before the kill"
        assert daemon.kill(signal.SIGKILL) == -signal.SIGKILL
        loop.wait(WAIT)
    finally:
        if loop.poll() is None:
            loop.kill()
            loop.wait(WAIT)
    acknowledged = [out["value"] for out in json_stream(steps.read_text())]
    assert acknowledged == list(range(1, len(acknowledged) + 1)), acknowledged

    assert lock_probe(cards.here.lock_dir, cards.env()) == 0, "the kernel did not release the killed card's lock"
    shown = admin(data_dir, "show", serial)
    assert shown["state"] == "in-use", shown

    # the other machine can neither insert it nor recover it
    code, lines = cards.daemon(home, pw, cards.other, name="elsewhere").refused()
    assert code != 0 and any("in use on another machine" in line for line in lines), lines
    refused = cards.card(home, "recover", "--password-file", str(pw), machine=cards.other, check=False)
    assert refused.returncode != 0 and "not the machine the card was last inserted on" in refused.stderr, refused
    assert admin(data_dir, "show", serial)["state"] == "in-use"

    # this machine can
    assert cards.card(home, "recover", "--password-file", str(pw)).json() == {"serial": serial, "state": "idle"}
    store = open_store(data_dir)
    try:
        record, history = check_card(store, serial)
        assert record.state.value == "idle"
        assert [h.result for h in history if h.op == "recover"] == ["muk-mismatch", "ok"]
    finally:
        store.close()
    again = cards.start(home, pw, name="after-recover")
    value = cards.card(home, "counter", "rent").json()["value"]
    # every acknowledged step is there; at most the one in flight when it died was stored besides
    assert acknowledged[-1] <= value <= acknowledged[-1] + 1, (acknowledged, value)
    assert cards.card(home, "remove").json() == {"state": "idle"}
    assert again.wait_exit() == 0, again.describe()
    print(f"\ncard daemon killed after {len(acknowledged)} acknowledged counter steps; stored value {value}; "
          f"machine lock free at once; the other machine refused (insert and recover); recovered here")
