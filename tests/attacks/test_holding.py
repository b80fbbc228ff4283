"""
Holding a card without authenticating (issue 11, point 2), against a real
``twistd vsc-server`` and a real ``twistd vsc-card``.

The attack as it was reported: after a handshake, an insert request for a
victim serial whose challenge is never answered, repeated before the
deadline, kept the serial BUSY — the owner's insert was refused, an in-use
card's syncs failed (11 of 15 counter updates in 30 s), nothing counted
toward lockout, and the history grew by 1,109 rows in 80 s.

Now: nothing is held before authentication (each operation is one
transaction on the locked row), an unanswered challenge counts like a wrong
answer, and once its source is throttled on that serial an unanswered
challenge is neither counted nor written (a log line only), so the history
stays bounded. The attacker here uses 127.0.0.2 and 8 connections, asking
again the moment each answer comes; the owner and the live card use
127.0.0.1. auth_deadline is 2 s (the setting's range starts at 1 s) so the
30 s run holds 15 deadlines per connection.
"""

from __future__ import annotations

import os
import time

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, threads

from tests.cards import cards  # noqa: F401  (fixture)
from tests.faults.common import sleep
from tests.servers import admin, init_data_dir, open_store, servers  # noqa: F401  (fixture)
from vsc.card import ops
from vsc.card.connect import connect
from vsc.net.channel import ChannelClosedError
from vsc.protocol.auth import DEFAULT_MASTER_KEY
from vsc.wire.ops import AuthChallenge, Op, OpRequest, OpResult, Status

ATTACK_SECONDS = 30.0
CONNECTIONS = 8
UPDATES = 15
SETTINGS = {"auth_deadline": 2, "unauthenticated_idle": 5}


class Holder:
    """One attacker connection: ask for an insert of ``serial``, never answer, ask again when the answer comes."""

    def __init__(self, endpoint: str, fp: str, serial: str, until: float):
        self.endpoint, self.fp, self.serial, self.until = endpoint, fp, serial, until
        self.challenges = 0
        self.answers: list[Status] = []
        self.reconnects = 0

    async def run(self) -> None:
        while time.monotonic() < self.until:
            try:
                proto = await connect(reactor, self.endpoint, self.fp)
            except Exception:  # noqa: BLE001 - refused (caps, SERVER_BUSY): try again shortly
                self.reconnects += 1
                await sleep(0.2)
                continue
            try:
                while time.monotonic() < self.until:
                    first = await proto.request(OpRequest(op=Op.INSERT, serial=self.serial,
                                                          insert_secret=os.urandom(32)))
                    if isinstance(first, AuthChallenge):
                        self.challenges += 1
                        # ... never answered: the server's deadline answers for us
                        first = await proto.nextMessage()
                    if isinstance(first, OpResult):
                        self.answers.append(first.status)
            except ChannelClosedError:
                self.reconnects += 1
            finally:
                if proto.transport is not None:
                    proto.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_an_unanswered_challenge_holds_nothing_and_the_history_stays_bounded(tmp_path, servers, cards):  # noqa: F811
    """
    For 30 s, 8 attacker connections from 127.0.0.2 keep insert challenges
    open for "live" (in use by a real card daemon) and "idle-card"; meanwhile
    the daemon makes 15 counter updates (every 2 s) and the owner inserts
    "idle-card" from 127.0.0.1. Asserted: 15 of 15 updates stored, the
    owner's insert OK, every attacker challenge answered (TIMEOUT, never
    BUSY), the unanswered challenges counted (history rows "timeout")
    until the source was throttled, and the rows per serial bounded by
    the throttle, not by the number of attempts.
    """
    data = tmp_path / "srv"
    fp = init_data_dir(data, settings=SETTINGS)["fingerprint"]
    server = servers.start(data)
    home, pw = cards.enrol(server, fp, data, "live", "live password")
    await threads.deferToThread(lambda: cards.start(home, pw))
    code = admin(data, "issue", "idle-card")["code"]
    kdf = ops.new_kdf(os.urandom, log2_n=10)
    keys = ops.derive_keys("owner password", kdf)
    p = await connect(reactor, server.endpoint, fp)
    await ops.enrol(p, "idle-card", code, keys, kdf, b"idle card")
    p.transport.loseConnection()

    attacker = f"tcp:host=127.0.0.1:port={server.port}:bindAddress=127.0.0.2"
    until = time.monotonic() + ATTACK_SECONDS
    holders = [Holder(attacker, fp, serial, until) for serial in ("live", "idle-card") for _ in range(CONNECTIONS // 2)]
    attack = defer.DeferredList([defer.ensureDeferred(h.run()) for h in holders], consumeErrors=True)

    updates, owner = [], {}

    def step(i: int) -> bool:
        r = cards.card(home, "counter", "runs", "--add", "1", check=False)
        return r.returncode == 0 and r.json()["value"] == i + 1

    await sleep(1.0)  # the attack is under way
    for i in range(UPDATES):
        t0 = time.monotonic()
        updates.append(await threads.deferToThread(step, i))
        if i == UPDATES // 2:
            t1 = time.monotonic()
            proto = await connect(reactor, server.endpoint, fp)
            r, _ = await ops.insert(proto, "idle-card", "owner password", os.urandom(32), os.urandom(32),
                                    DEFAULT_MASTER_KEY, keys=keys)
            owner.update(status=r.status, seconds=time.monotonic() - t1)
            proto.transport.loseConnection()
        await sleep(max(0.0, ATTACK_SECONDS / UPDATES - (time.monotonic() - t0)))
    await attack

    store = open_store(data)
    try:
        rows = {s: store.history(s) for s in ("live", "idle-card")}
    finally:
        store.close()
    log = server.log_text()
    challenges = sum(h.challenges for h in holders)
    answers = [s for h in holders for s in h.answers]
    timeouts = {s: [h for h in rows[s] if h.result == "timeout"] for s in rows}
    throttled_lines = log.count("no answer within 2 s from a throttled source: not counted")
    print(f"\nholding: {challenges} challenges held open by {len(holders)} connections from 127.0.0.2 in "
          f"{ATTACK_SECONDS:g} s; counter updates stored {sum(updates)} of {UPDATES}; owner's insert "
          f"{owner['status'].name} in {owner['seconds'] * 1000:.0f} ms; counted (history 'timeout' rows): "
          f"live {len(timeouts['live'])}, idle-card {len(timeouts['idle-card'])}; throttled, not written: "
          f"{throttled_lines}; history rows: live {len(rows['live'])} (15 of them syncs), idle-card {len(rows['idle-card'])}")

    assert sum(updates) == UPDATES, updates
    assert owner["status"] is Status.OK
    assert challenges >= 4 * len(holders)  # the attack really held challenges, again and again
    assert answers and set(answers) <= {Status.TIMEOUT}, set(answers)  # never BUSY
    assert "busy" not in {h.result for r in rows.values() for h in r}
    # each unanswered challenge is counted (a row) until the source is throttled; after that, a log line only
    counted = sum(len(t) for t in timeouts.values())
    assert counted >= 2 * 5  # the source's free failures on each serial (lockout_threshold)
    assert counted + throttled_lines >= len(answers)
    for serial, history in rows.items():
        assert len(timeouts[serial]) <= 5 + 2, (serial, len(timeouts[serial]))  # threshold, then 30 s delays
        theirs = [h for h in history if h.peer.startswith("127.0.0.2:")]
        assert theirs == timeouts[serial], serial  # the attacker's only trace: its counted challenges
