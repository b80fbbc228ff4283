"""
PostgreSQL stopped and restarted under load, with two server processes on
one database.

The test runs its OWN private cluster (tests/pg.py ``start_cluster``), not
the session's one, so stopping it disturbs no other test. Two real ``twistd
-n vsc-server`` processes share one database; CARDS simulated cards run
insert → sync → remove cycles, each cycle on a new connection to the other
server, retrying every unanswered operation exactly as first sent.

Twice, under that load, PostgreSQL goes away: first ``pg_ctl stop -m fast``
held down for OUTAGE seconds and started again, then ``pg_ctl restart -m
fast``; a third ``pg_ctl restart -m fast`` comes while no operation is in
flight, so that every pooled database connection of both servers is stale
when the cards go on. What must hold:

* during the outage every operation fails cleanly: answered INTERNAL or not
  answered (connection error) — never BUSY (nothing is held before an
  operation's one transaction, so nothing is left held when the database
  cannot finish it) and never a wrong answer (a refusal, a conflict, another
  version or download);
* both servers stay up throughout;
* once PostgreSQL is back every card completes cycles again within a
  bounded time, and every answer later than RECOVERY seconds is OK (the
  servers reconnect to the database on their own); after the quiet restart not a
  single operation fails (a connection PostgreSQL dropped is replaced at
  the start of the next transaction or read);
* at the end every record is what its history replayed through Figure 4
  explains, holds the last upload its card saw acknowledged, and no history
  line says BUSY.
"""

from __future__ import annotations

import time

import pytest
import pytest_twisted
from twisted.internet.defer import ensureDeferred, gatherResults

from tests.faults.common import (
    Budget,
    CycleClient,
    Gate,
    check_clients,
    cheap_keys,
    enrol_cards,
    sleep,
    wait_until,
    within,
)
from tests.servers import MANY_MACHINES, init_data_dir, open_store, servers  # noqa: F401  (servers is a fixture)
from vsc import crypto
from vsc.wire.ops import Status

pytestmark = pytest.mark.integration

CARDS = 6
OUTAGE = 2.0  # seconds PostgreSQL stays down in the first outage
RECOVERY = 5.0  # after PostgreSQL is back, every answer later than this is OK
CYCLES_AFTER = 3  # every card completes this many cycles after each outage


@pytest.fixture
def own_cluster():
    """A private PostgreSQL cluster for this test only (stopping it disturbs no other test)."""
    from tests.pg import start_cluster

    cluster = start_cluster()
    try:
        yield cluster
    finally:
        cluster.stop()


def pg_ctl(cluster, action: str, *args: str) -> float:
    """``pg_ctl ACTION -w`` on the cluster (as its owner); returns how long it took."""
    t0 = time.monotonic()
    data = cluster.root / "data"
    extra = ["-l", str(cluster.root / "server.log"), "-o", f"-p {cluster.port}"] if action in ("start", "restart") else []
    proc = cluster._run("pg_ctl", action, "-w", "-t", "30", "-D", str(data), *args, *extra, timeout=60)
    cluster._check(proc, f"pg_ctl {action}")
    return time.monotonic() - t0


def answers_between(clients, t0: float, t1: float) -> list[tuple]:
    return [(c.serial, op, answer) for c in clients for t, op, answer in c.log if t0 <= t < t1]


def clean_failure(answer: str) -> bool:
    return answer == Status.INTERNAL.name or answer.startswith("no answer")


def clean_while_down(answer: str) -> bool:
    return answer == "OK" or clean_failure(answer)


@pytest_twisted.ensureDeferred
async def test_postgresql_restart_under_load(tmp_path, own_cluster, servers):  # noqa: F811
    """PostgreSQL stopped for OUTAGE s, then restarted, under insert/sync/remove load through two servers: operations fail cleanly while it is down, the servers stay up, everything works again once it is back, and every record matches its history and its card's acknowledgements."""
    import psycopg

    t_start = time.monotonic()
    with psycopg.connect(own_cluster.url(), autocommit=True) as conn:
        conn.execute('CREATE DATABASE "vsc_restart"')
    data_dir = tmp_path / "server"
    fp = init_data_dir(data_dir, own_cluster.url("vsc_restart"), settings=MANY_MACHINES)["fingerprint"]
    pair = servers.start_many(data_dir, 2)

    keys, kdf = cheap_keys()
    serials = [f"pg-{i}" for i in range(CARDS)]
    first = await enrol_cards(data_dir, pair[0].endpoint, fp, serials, keys, kdf)
    budget = Budget(10**9)
    clients = [
        CycleClient(serial, crypto.sha256(f"machine {i}".encode()), keys, lambda: [s.endpoint for s in pair], fp,
                    Gate(), budget, syncs=1, retry=frozenset({Status.INTERNAL}), index=i,
                    reconnect_each_cycle=True, protected=first[serial])
        for i, serial in enumerate(serials)
    ]
    runs = gatherResults([ensureDeferred(c.run()) for c in clients], consumeErrors=True)
    phases = []  # (name, went down, back up, end, recovery allowed, pg_ctl seconds...)

    async def cycles_after(what: str) -> None:
        marks = [c.cycles + CYCLES_AFTER for c in clients]
        try:
            await wait_until(lambda: all(c.cycles >= m for c, m in zip(clients, marks)) or runs.called, 30,
                             f"{CYCLES_AFTER} cycles of every card {what}")
        except AssertionError as e:
            recent = {c.serial: _count([(None, None, a) for _, _, a in c.log[-50:]]) for c in clients}
            raise AssertionError(f"{e}; the last answers each card got: {recent}") from None
        assert not runs.called, [c.bad for c in clients]

    try:
        await cycles_after("before the outage")
        # 1: down for OUTAGE seconds under load
        t_down = time.monotonic()
        stop_s = pg_ctl(own_cluster, "stop", "-m", "fast")
        await sleep(OUTAGE)
        start_s = pg_ctl(own_cluster, "start")
        t_up = time.monotonic()
        assert all(s.running() for s in pair), "a server died while PostgreSQL was down"
        await cycles_after("after PostgreSQL came back")
        phases.append(("stop/start", t_down, t_up, time.monotonic(), RECOVERY, stop_s, start_s))
        # 2: pg_ctl restart -m fast under load
        t_down = time.monotonic()
        restart_s = pg_ctl(own_cluster, "restart", "-m", "fast")
        t_up = time.monotonic()
        assert all(s.running() for s in pair), "a server died while PostgreSQL restarted"
        await cycles_after("after the restart")
        phases.append(("restart", t_down, t_up, time.monotonic(), RECOVERY, restart_s, 0.0))
        # 3: a restart with nothing in flight: every pooled database connection of both servers is now
        # stale, and the next operations must not notice (answered OK at once, INTERNAL is a wrong answer)
        for c in clients:
            c.stop = True
        await within(runs, 30)
        t_down = time.monotonic()
        restart_s = pg_ctl(own_cluster, "restart", "-m", "fast")
        t_up = time.monotonic()
        for c in clients:
            c.stop, c.retry = False, frozenset()
        runs = gatherResults([ensureDeferred(c.run()) for c in clients], consumeErrors=True)
        await cycles_after("after a restart with nothing in flight")
        phases.append(("quiet restart", t_down, t_up, time.monotonic(), 0.0, restart_s, 0.0))
    finally:
        for c in clients:
            c.stop = True
    await within(runs, 30)
    assert all(s.running() for s in pair)

    store = open_store(data_dir)
    try:
        final = check_clients(store, clients, final=True)
        busy = [(c.serial, h.op) for c in clients for h in store.history(c.serial) if h.result == "busy"]
    finally:
        store.close()
    elapsed = time.monotonic() - t_start

    print(f"\nPostgreSQL restart under load: {CARDS} cards, 2 servers, {budget.done} cycles, "
          f"{sum(c.acked for c in clients)} acknowledged operations, {sum(c.retries for c in clients)} retried, "
          f"{final['history-lines']} history lines; {elapsed:.1f} s")
    for name, t_down, t_up, t_end, recovery, a, b in phases:
        during = answers_between(clients, t_down, t_up)
        after = answers_between(clients, t_up, t_end)
        print(f"  {name}: down {t_up - t_down:.1f} s (pg_ctl {a:.1f} + {b:.1f} s); answers while down: "
              f"{_count(during)}; after: {_count(after)}")
        # while down: only OK (finished before the stop), INTERNAL or no answer
        assert all(clean_while_down(a) for _, _, a in during), during
        late = [(s, op, a) for s, op, a in answers_between(clients, t_up + recovery, t_end) if a != "OK"]
        assert late == [], f"{name}: still failing {recovery:g} s after PostgreSQL was back: {late}"
    assert any(clean_failure(a) for _, _, a in answers_between(clients, phases[0][1], phases[0][2])), \
        "the outage was not seen by any card"
    for c in clients:
        assert c.bad == [], (c.serial, c.bad)
    assert busy == [], f"BUSY in the history: {busy}"


def _count(answers) -> dict:
    out: dict = {}
    for _, _, a in answers:
        key = "no answer" if a.startswith("no answer") else a
        out[key] = out.get(key, 0) + 1
    return out
