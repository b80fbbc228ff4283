"""
kill -9 of the VSC Server in the middle of operations, on both backends.

Three simulated cards (one client each, each on its own machine) run insert
→ sync × 3 → remove cycles back to back against a real ``twistd -n
vsc-server``, retrying any operation whose answer they did not get with
exactly the same request (same insert secret and MUK, same version and
upload). At seeded random moments the test SIGKILLs the server, restarts it,
and before letting the cards go on checks every card against the database:

* the state is what the last successful transition in the history implies
  (Figure 4 [0074]: enrol/remove/recover → idle, insert → in-use);
* the version is 1 + the number of successful syncs and removes;
* nothing acknowledged is lost: the stored protected information is the last
  upload the card saw acknowledged, or the one upload it was still waiting
  for (committed, answer lost), and then exactly one version further;
* the dead process held nothing that outlives it (each operation is one
  transaction; there are no per-serial leases to clear), so every retry
  after the restart is answered and no card is ever told BUSY — neither in
  its answers nor in the history.

The test asserts that the kills did land mid-operation: at least half of them
with an operation in flight, and some operation retried after a kill.
"""

from __future__ import annotations

import random
import signal
import time

import attrs
import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, ensureDeferred, gatherResults

from tests.servers import MANY_MACHINES, init_data_dir, open_store, servers  # noqa: F401  (servers is a fixture)
from tests.faults.common import Gate, Pending, sleep, within  # shared with the fault suite
from vsc import crypto
from vsc.card import ops
from vsc.card.connect import connect
from vsc.protocol.auth import DEFAULT_MASTER_KEY, code_hash
from vsc.server.policy import Policy, new_enrolment_code
from vsc.server.store import CardState
from vsc.wire.ops import Status

pytestmark = pytest.mark.integration

CARDS = 3
KILLS = 10
SYNCS_PER_INSERT = 3
PASSWORD = "crash password"
STEP = 10.0
SEED = 0x9C0FFEE



@attrs.define
class CardClient:
    serial: str
    muk: bytes
    keys: ops.PasswordKeys
    endpoint: object  # () -> str
    fingerprint: str
    gate: Gate
    # what the card saw acknowledged
    state: str = "idle"
    version: int = 1
    protected: bytes = b""
    secret: bytes = b""
    syncs: int = 0
    pending: Pending | None = None
    # statistics and anomalies
    acked: int = 0
    retries: int = 0
    bad: list = attrs.Factory(list)
    proto: object = None
    stop: bool = False
    counter: int = 0

    def next_upload(self) -> bytes:
        self.counter += 1
        return f"{self.serial} upload {self.counter} ".encode() * 8

    async def run(self) -> None:
        from twisted.internet import reactor

        while not (self.stop and self.pending is None):
            try:
                if self.proto is None:
                    self.proto = await within(connect(reactor, self.endpoint(), self.fingerprint))
                await self.step()
            except ops.OperationRefused as e:
                self.bad.append((self.pending, e.status))
                self.pending = None  # a refusal is an answer: nothing to retry
                if len(self.bad) > 5:
                    return
            except Exception:  # noqa: BLE001 - connection refused/lost, channel closed, timeout: retry
                if self.proto is not None:
                    self.proto.transport.abortConnection()
                    self.proto = None
                if self.pending is not None:
                    self.retries += 1
                await self.gate.wait()
                if self.stop and self.pending is None:
                    return
                await sleep(0.01)

    async def step(self) -> None:
        p = self.proto
        if self.pending is None:
            if self.stop:
                return
            if self.state == "idle":
                self.pending = Pending("insert", secret=crypto.system_random(32))
            elif self.syncs < SYNCS_PER_INSERT:
                self.pending = Pending("sync", self.secret, self.version, self.next_upload())
            else:
                self.pending = Pending("remove", self.secret, self.version, self.next_upload())
        job = self.pending
        if job.op == "insert":
            result, _ = await within(ops.insert(p, self.serial, PASSWORD, self.muk, job.secret, DEFAULT_MASTER_KEY,
                                                keys=self.keys))
            # nothing acknowledged was lost: the download is the last upload acknowledged
            if (result.version, result.protected) != (self.version, self.protected):
                self.bad.append(("insert download", self.version, result.version))
            self.state, self.secret, self.syncs = "in-use", job.secret, 0
        elif job.op == "sync":
            result = await within(ops.sync(p, self.serial, job.secret, job.version, job.protected))
            if result.version != job.version + 1:
                self.bad.append(("sync version", job.version, result.version))
            self.version, self.protected, self.syncs = result.version, job.protected, self.syncs + 1
        else:
            result = await within(ops.remove(p, self.serial, job.secret, job.version, job.protected))
            if result.version != job.version + 1:
                self.bad.append(("remove version", job.version, result.version))
            self.version, self.protected, self.state = result.version, job.protected, "idle"
        self.pending = None
        self.acked += 1


def replay(history) -> tuple[str, int]:
    """The state the last successful transition implies, and 1 + the successful syncs and removes."""
    state, version = None, 1
    for h in history:
        if h.result != "ok":
            continue
        if h.op == "enrol":
            state = "idle"
        elif h.op == "insert":
            state = "in-use"
        elif h.op in ("remove", "recover"):
            state = "idle"
        elif h.op == "destroy":
            state = "destroyed"
        if h.op in ("sync", "remove"):
            version += 1
            assert h.detail == f"version {version}", h
    return state, version


def check_consistency(store, clients: list[CardClient], final: bool = False) -> dict:
    """Every card's record against its history and against what its client saw acknowledged."""
    found = {"committed-unacknowledged": 0}
    for c in clients:
        card = store.get(c.serial)
        history = store.history(c.serial)
        state, version = replay(history)
        assert card.state.value == state, (c.serial, card.state, state)
        assert card.version == version, (c.serial, card.version, version)
        job = c.pending
        assert not (final and job is not None)
        if card.protected == c.protected and card.version == c.version:
            # the acknowledged upload is what is stored
            committed = False
        else:
            # otherwise only the upload still awaiting its answer can have been committed, one version on
            assert job is not None and job.op in ("sync", "remove"), (c.serial, job)
            assert (card.protected, card.version) == (job.protected, c.version + 1), c.serial
            committed = True
        expected_state = c.state
        if job is not None and job.op == "insert" and card.state is CardState.IN_USE:
            assert card.session_hash == crypto.sha256(job.secret)
            expected_state, committed = "in-use", True
        if job is not None and job.op == "remove" and committed:
            expected_state = "idle"
        assert card.state.value == expected_state, (c.serial, card.state, expected_state, job)
        if card.state is CardState.IN_USE:
            assert card.muk == c.muk
        found["committed-unacknowledged"] += committed
    return found


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
@pytest_twisted.ensureDeferred
async def test_kill_9_mid_operation_loses_nothing_acknowledged(backend, tmp_path, servers, request):  # noqa: F811
    """SIGKILL the server 10 times at seeded random moments during insert/sync/remove cycles of 3 cards; after every restart each record matches its history and its client's acknowledgements, and no card is ever BUSY (nothing was held by the dead process)."""
    from twisted.internet import reactor

    url = request.getfixturevalue("pg_database_url") if backend == "postgresql" else None
    t_start = time.monotonic()
    rng = random.Random(SEED + (backend == "postgresql"))
    data_dir = tmp_path / "server"
    info = init_data_dir(data_dir, url, settings=MANY_MACHINES)
    fp = info["fingerprint"]
    server = servers.start(data_dir, "server")
    gate = Gate()

    # enrol the cards (codes straight into the store; enrolment over the network)
    kdf = ops.new_kdf(crypto.system_random, log2_n=10)
    keys = ops.derive_keys(PASSWORD, kdf)
    clients = []
    store = open_store(data_dir)
    try:
        for i in range(CARDS):
            serial = f"crash-{i}"
            code = new_enrolment_code()
            store.issue(serial, code_hash(code), Policy().initial_auth_info(), 3600)
            p = await within(connect(reactor, server.endpoint, fp))
            first = f"{serial} enrolled".encode()
            assert (await within(ops.enrol(p, serial, code, keys, kdf, first))).status is Status.OK
            p.transport.loseConnection()
            clients.append(CardClient(serial, crypto.sha256(f"machine {i}".encode()), keys,
                                      lambda: server.endpoint, fp, gate, protected=first))
    finally:
        store.close()

    runs = [ensureDeferred(c.run()) for c in clients]
    kills = []
    for k in range(KILLS):
        await sleep(rng.uniform(0.15, 0.6))
        in_flight = ", ".join(c.pending.op if c.pending else "-" for c in clients)
        acked_before = sum(c.acked for c in clients)
        gate.close()
        assert server.kill(signal.SIGKILL) == -signal.SIGKILL
        store = open_store(data_dir)
        try:
            server.start()
            found = check_consistency(store, clients)
        finally:
            store.close()
        kills.append({"kill": k + 1, "in_flight": in_flight, "acked_so_far": acked_before, **found})
        gate.release()

    await sleep(0.3)
    for c in clients:
        c.stop = True
    await within(gatherResults(runs, consumeErrors=True), 30)
    store = open_store(data_dir)
    try:
        check_consistency(store, clients, final=True)
        busy = [(c.serial, h.op) for c in clients for h in store.history(c.serial) if h.result == "busy"]
        history_ops = sum(1 for c in clients for h in store.history(c.serial) if h.result in ("ok", "repeat"))
    finally:
        store.close()
    elapsed = time.monotonic() - t_start
    print(f"\nkill -9 on {backend}: {KILLS} kills in {elapsed:.1f} s; acknowledged operations "
          f"{sum(c.acked for c in clients)}, retried after a kill {sum(c.retries for c in clients)}, "
          f"history ok/repeat lines {history_ops}")
    for k in kills:
        print(f"  kill {k['kill']:2}: in flight {k['in_flight']}; "
              f"{k['committed-unacknowledged']} committed but unacknowledged")
    assert busy == [], busy
    for c in clients:
        assert c.bad == [], (c.serial, c.bad)  # never BUSY, never a conflict, never a lost upload
    assert sum(c.acked for c in clients) > KILLS
    # the kills landed mid-operation (otherwise the properties above went unexercised): at least half of them
    # with some card's operation in flight, and operations whose answer a kill cut off were retried
    mid_operation = [k for k in kills if set(k["in_flight"].split(", ")) - {"-"}]
    assert len(mid_operation) >= KILLS // 2, [k["in_flight"] for k in kills]
    assert sum(c.retries for c in clients) > 0
