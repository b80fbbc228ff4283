"""
kill -9 of the VSC Server at seeded random points during insert → sync →
remove cycles of several cards at once, on SQLite and on PostgreSQL.

Each backend runs CYCLES cycles in total (CARDS cards concurrently, each over
its own protected channel to a real ``twistd -n vsc-server`` with a 2048-bit
key; cheap scrypt for the simulated cards). KILLS kill points are drawn from
a seeded generator as cycle counts; when the cards together have finished
that many cycles the test waits a further seeded 0-30 ms (so the kill lands
inside whatever operations are in flight), SIGKILLs the server and, before
restarting it, checks the database as the crash left it:

* every card's history replays through Figure 4 and explains its record's
  state, version and MUK (tests/faults/common.py ``replay``);
* no acknowledged protected information is lost: each record holds the last
  upload its card saw acknowledged, or the upload still awaiting its answer
  (committed, answer lost) exactly one version further;
* the dead process held nothing that outlives it (each operation is one
  transaction, there are no per-serial leases): no history line, before or
  after the restart, is BUSY.

The cards retry every unanswered operation exactly as first sent; each such
repeat must be answered OK (insert: the same check-out and the same
download; sync/remove: the version the first attempt stored). Any other
answer fails the test. The test also asserts that the kills did land
mid-operation (at least half of them with an operation in flight,
operations retried after the restarts, and at least one kill between a commit
and its answer): otherwise the above went unexercised.
"""

from __future__ import annotations

import random
import signal
import time

import pytest
import pytest_twisted
from twisted.internet.defer import ensureDeferred, gatherResults

from tests.faults.common import Budget, CycleClient, Gate, check_clients, cheap_keys, enrol_cards, sleep, wait_until, within
from tests.servers import MANY_MACHINES, init_data_dir, open_store, servers  # noqa: F401  (servers is a fixture)
from vsc import crypto

pytestmark = pytest.mark.integration

CARDS = 6
CYCLES = 1000  # per backend
KILLS = 25  # per backend
SYNCS_PER_CYCLE = 1
SEED = 0xFA017


def busy_lines(store, clients) -> list[tuple]:
    return [(c.serial, h.op) for c in clients for h in store.history(c.serial) if h.result == "busy"]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
@pytest_twisted.ensureDeferred
async def test_kill_9_at_random_points_loses_nothing_acknowledged(backend, tmp_path, servers, request):  # noqa: F811
    """CYCLES insert/sync/remove cycles of CARDS cards with KILLS seeded kill -9s of the server: after each, every record is what its history (Figure 4) and its card's acknowledgements explain, and nothing held by the dead process ever makes a card BUSY."""
    t_start = time.monotonic()
    url = request.getfixturevalue("pg_database_url") if backend == "postgresql" else None
    rng = random.Random(f"{SEED}-{backend}")
    data_dir = tmp_path / "server"
    fp = init_data_dir(data_dir, url, settings=MANY_MACHINES)["fingerprint"]
    server = servers.start(data_dir, "server")

    keys, kdf = cheap_keys()
    serials = [f"kill-{i}" for i in range(CARDS)]
    first = await enrol_cards(data_dir, server.endpoint, fp, serials, keys, kdf)
    gate, budget = Gate(), Budget(CYCLES)
    clients = [
        CycleClient(serial, crypto.sha256(f"machine {i}".encode()), keys, lambda: [server.endpoint], fp, gate, budget,
                    syncs=SYNCS_PER_CYCLE, index=i, protected=first[serial])
        for i, serial in enumerate(serials)
    ]
    points = sorted(rng.sample(range(5, CYCLES - 5), KILLS))
    runs = [ensureDeferred(c.run()) for c in clients]
    finished = gatherResults(runs, consumeErrors=True)
    kills = []
    t_cycles = time.monotonic()
    try:
        for k, point in enumerate(points):
            # the kill point, and operations flowing again since the last restart
            since = sum(c.acked for c in clients) + CARDS
            await wait_until(lambda: (budget.done >= point and sum(c.acked for c in clients) >= since)
                             or finished.called, 60, f"{point} cycles")
            assert not finished.called, [c.bad for c in clients]
            await sleep(rng.uniform(0, 0.03))
            in_flight = "".join(c.pending.op[0] if c.pending else "-" for c in clients)
            t_kill = time.monotonic()
            gate.close()
            assert server.kill(signal.SIGKILL) == -signal.SIGKILL
            store = open_store(data_dir)
            try:
                found = check_clients(store, clients)
                server.start()
            finally:
                store.close()
            kills.append(dict(kill=k + 1, cycles=budget.done, in_flight=in_flight,
                              at=t_kill - t_cycles, down=time.monotonic() - t_kill, **found))
            gate.release()
        await within(finished, 120)
    finally:
        for c in clients:
            c.stop = True
        gate.release()
    elapsed = time.monotonic() - t_start
    store = open_store(data_dir)
    try:
        final = check_clients(store, clients, final=True)
        busy = busy_lines(store, clients)
    finally:
        store.close()

    acked = sum(c.acked for c in clients)
    retries = sum(c.retries for c in clients)
    print(f"\nkill -9 on {backend}: {budget.done} cycles ({CARDS} cards, {SYNCS_PER_CYCLE} sync each), "
          f"{len(kills)} kills, {acked} acknowledged operations, {retries} retried, "
          f"{sum(k['committed-unacknowledged'] for k in kills)} committed but unacknowledged at a kill, "
          f"{final['history-lines']} history lines; {elapsed:.1f} s "
          f"({time.monotonic() - t_cycles:.1f} s of cycles and restarts)")
    for k in kills:
        print(f"  kill {k['kill']:2} at {k['at']:5.1f} s (down {k['down']:.2f} s) after {k['cycles']:4} cycles: in flight {k['in_flight']}; "
              f"{k['committed-unacknowledged']} committed but unacknowledged")
    assert busy == [], busy
    for c in clients:
        assert c.bad == [], (c.serial, c.bad)  # every answer OK: never BUSY, a conflict or a lost upload
    assert budget.done == CYCLES
    assert len(kills) == KILLS
    # the property was exercised: kills landed with operations in flight, and those were retried after the restart
    mid_operation = [k for k in kills if k["in_flight"].strip("-")]
    assert len(mid_operation) >= KILLS // 2, [k["in_flight"] for k in kills]
    assert retries > 0
    assert sum(k["committed-unacknowledged"] for k in kills) > 0  # some kill fell between a commit and its answer
