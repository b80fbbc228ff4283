"""
The acceptance test for exclusion and mediation [0081] under real
concurrency: many machines insert the SAME card at the same moment, through
several real ``twistd -n vsc-server`` processes sharing one database.

Every round, 50 simulated machines (distinct MUKs and insert secrets) open
fresh protected channels concurrently, alternating between the servers, and
all send insert for one serial at once. Exactly one insert may succeed
(Figure 6, [0077]: idle → in-use); every other machine must be told IN_USE
— each check-out is one transaction deciding on the locked row, so the
losers learn the state they lost to, and nobody is ever told BUSY (nothing
is held before authentication, so there is nothing to be busy on). The
winner then removes (Figure 11, [0095]) uploading a new version, and the next
round starts; the next winner must download exactly what the last one
uploaded, whichever server each went through.
The contention is arranged, not hoped for: each round every machine first
gets its challenge (nothing is held before authentication), then all answers
are sent together, and the test asserts that all 50 were in flight before the
first result came back. (BUSY never happens by design; the contention the
test asserts is 50 check-outs deciding on one row at once.)
"""

from __future__ import annotations

import collections
import os
import time

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, ensureDeferred, gatherResults

from tests.servers import MANY_MACHINES, init_data_dir, open_store, servers  # noqa: F401  (servers is a fixture)
from vsc import crypto
from vsc.card import ops
from vsc.card.connect import connect
from vsc.protocol.auth import DEFAULT_MASTER_KEY, code_hash
from vsc.server.policy import Policy, new_enrolment_code
from vsc.wire.ops import AuthChallenge, AuthResponse, Op, OpRequest, OpResult, Status

pytestmark = pytest.mark.integration

MACHINES = 50
SERIAL = "shared-card"
PASSWORD = "race password"
STEP = 30.0  # bound on one round's network step


def within(d, seconds: float = STEP) -> Deferred:
    from twisted.internet import reactor

    if not isinstance(d, Deferred):
        d = ensureDeferred(d)
    return d.addTimeout(seconds, reactor)


async def enrol_shared_card(endpoint: str, fingerprint: str, data_dir) -> ops.PasswordKeys:
    from twisted.internet import reactor

    code = new_enrolment_code()
    store = open_store(data_dir)
    try:
        store.issue(SERIAL, code_hash(code), Policy().initial_auth_info(), 3600)
    finally:
        store.close()
    kdf = ops.new_kdf(crypto.system_random, log2_n=10)
    keys = ops.derive_keys(PASSWORD, kdf)
    p = await within(connect(reactor, endpoint, fingerprint))
    try:
        assert (await within(ops.enrol(p, SERIAL, code, keys, kdf, b"round 0"))).status is Status.OK
    finally:
        p.transport.loseConnection()
    return keys


async def challenged(proto, secret: bytes) -> AuthChallenge:
    """One machine's insert request, up to its challenge (nothing is held yet)."""
    first = await proto.request(OpRequest(op=Op.INSERT, serial=SERIAL, insert_secret=secret))
    assert isinstance(first, AuthChallenge), first
    return first


async def attempt(proto, challenge: AuthChallenge, muk: bytes, keys: ops.PasswordKeys, events: list, i: int):
    """One machine's answer to its challenge: (status, OpResult or None); ``events`` records send and answer."""
    answers, _ = ops.answer(challenge, SERIAL, PASSWORD, DEFAULT_MASTER_KEY, crypto.system_random, keys)
    d = proto.request(AuthResponse(responses=tuple(answers), muk=muk))
    events.append(("sent", i))
    result = await d
    events.append(("answered", i))
    assert isinstance(result, OpResult), result
    return result.status, (result if result.status is Status.OK else None)


async def race(endpoints: list[str], fingerprint: str, keys: ops.PasswordKeys, rounds: int) -> list[dict]:
    """Run the rounds; returns one summary per round (winner, counts of each status)."""
    from twisted.internet import reactor

    muks = [crypto.sha256(f"machine {i}".encode()) for i in range(MACHINES)]
    expected_download = b"round 0"
    summaries = []
    for rnd in range(1, rounds + 1):
        protos = await within(gatherResults(
            [ensureDeferred(_connect(reactor, endpoints[i % len(endpoints)], fingerprint)) for i in range(MACHINES)]))
        try:
            secrets = [os.urandom(32) for _ in range(MACHINES)]
            # a barrier: every machine holds its challenge before any answers, then all answers go out at once,
            # so all MACHINES check-outs are in flight together and contend for the one row
            challenges = await within(gatherResults(
                [ensureDeferred(challenged(protos[i], secrets[i])) for i in range(MACHINES)]))
            events: list = []
            outcomes = await within(gatherResults(
                [ensureDeferred(attempt(protos[i], challenges[i], muks[i], keys, events, i)) for i in range(MACHINES)]))
            first_answer = next(n for n, e in enumerate(events) if e[0] == "answered")
            in_flight = sum(1 for e in events[:first_answer] if e[0] == "sent")
            assert in_flight == MACHINES, f"round {rnd}: only {in_flight} answers in flight before the first result"
            statuses = collections.Counter(status.name for status, _ in outcomes)
            winners = [i for i, (status, _) in enumerate(outcomes) if status is Status.OK]
            summaries.append({"round": rnd, "winners": winners, "statuses": dict(statuses), "in_flight": in_flight,
                              "server": [w % len(endpoints) for w in winners]})
            assert len(winners) == 1, f"round {rnd}: {len(winners)} winners: {dict(statuses)}"
            assert statuses == {"OK": 1, "IN_USE": MACHINES - 1}, f"round {rnd}: {dict(statuses)}"
            w = winners[0]
            won = outcomes[w][1]
            # what the previous winner uploaded, through whichever server it went
            assert won.protected == expected_download, f"round {rnd}"
            expected_download = f"round {rnd}".encode()
            removed = await within(ops.remove(protos[w], SERIAL, secrets[w], won.version, expected_download))
            assert removed.status is Status.OK and removed.version == won.version + 1
        finally:
            for p in protos:
                p.transport.loseConnection()
    return summaries


async def _connect(reactor, endpoint, fingerprint):
    return await connect(reactor, endpoint, fingerprint)


def check_history(data_dir, rounds: int, summaries: list[dict]) -> None:
    store = open_store(data_dir)
    try:
        history = store.history(SERIAL)
        card = store.get(SERIAL)
    finally:
        store.close()
    counts = collections.Counter((h.op, h.result) for h in history)
    assert counts[("insert", "ok")] == rounds
    assert counts[("remove", "ok")] == rounds
    # every refusal the machines saw is in the history too (IN_USE as "in-use"), and none was BUSY
    seen = collections.Counter()
    for s in summaries:
        seen.update(s["statuses"])
    assert seen["BUSY"] == 0 and counts[("insert", "busy")] == 0
    assert counts[("insert", "in-use")] == seen["IN_USE"] == rounds * (MACHINES - 1)
    # check-outs and check-ins alternate strictly
    transitions = [h.op for h in history if h.result == "ok" and h.op in ("insert", "remove")]
    assert transitions == ["insert", "remove"] * rounds
    assert card.state.value == "idle" and card.version == 1 + rounds and card.protected == f"round {rounds}".encode()


def report(name: str, summaries: list[dict], elapsed: float) -> None:
    totals = collections.Counter()
    for s in summaries:
        totals.update(s["statuses"])
    winners_per_round = [len(s["winners"]) for s in summaries]
    by_server = collections.Counter(x for s in summaries for x in s["server"])
    print(f"\n{name}: {len(summaries)} rounds x {MACHINES} machines in {elapsed:.1f} s; "
          f"winners per round: {dict(collections.Counter(winners_per_round))} (rounds won through server #: "
          f"{dict(sorted(by_server.items()))}); all answers: {dict(totals)}")


@pytest_twisted.ensureDeferred
async def test_race_two_servers_one_postgresql(tmp_path, pg_database_url, servers):  # noqa: F811
    """2 server processes, 1 PostgreSQL database, 50 machines, 100 rounds: all 50 answers in flight at once, exactly one insert wins every round (the other 49 IN_USE, never BUSY), and the history shows exactly 100 check-outs."""
    rounds = 100
    data_dir = tmp_path / "server"
    info = init_data_dir(data_dir, pg_database_url, settings=MANY_MACHINES)
    pair = servers.start_many(data_dir, 2)
    t0 = time.monotonic()
    keys = await enrol_shared_card(pair[0].endpoint, info["fingerprint"], data_dir)
    summaries = await race([s.endpoint for s in pair], info["fingerprint"], keys, rounds)
    elapsed = time.monotonic() - t0
    report("PostgreSQL, 2 servers", summaries, elapsed)
    check_history(data_dir, rounds, summaries)
    assert all(s.running() for s in pair)


@pytest_twisted.ensureDeferred
async def test_race_one_server_sqlite(tmp_path, servers):  # noqa: F811
    """1 server process on SQLite, 50 machines, 20 rounds, all 50 answers in flight at once: exactly one insert wins every round (the other 49 IN_USE, never BUSY)."""
    rounds = 20
    data_dir = tmp_path / "server"
    info = init_data_dir(data_dir, settings=MANY_MACHINES)
    server = servers.start(data_dir)
    t0 = time.monotonic()
    keys = await enrol_shared_card(server.endpoint, info["fingerprint"], data_dir)
    summaries = await race([server.endpoint], info["fingerprint"], keys, rounds)
    elapsed = time.monotonic() - t0
    report("SQLite, 1 server", summaries, elapsed)
    check_history(data_dir, rounds, summaries)
