"""
Handshake flood (issue 11, point 5), against a real ``twistd vsc-server``.

Before: each handshake cost one RSA-3072 decryption on the reactor thread,
with no limit per source; at ~140 handshakes/s from one client an honest
handshake went from 39 ms to 145-456 ms and an insert from 3 s to 8 s.

Now (vsc/server/admission.py): the decryption runs on a bounded worker pool,
admitted per source (handshakes_per_second, handshake_burst) and while fewer
than max_pending_handshakes wait; anything else is refused with the
SERVER_BUSY alert before any RSA work, and established channels never wait
for handshakes.

The flooder (16 concurrent handshake loops in a process of its own,
tests/attacks/flooder.py) binds 127.0.0.2; the owner and
a live card use 127.0.0.1. The test measures the owner's insert latency and
the live card's poll (an echo on its established channel) p99 unloaded,
then under the flood, in the same run, and prints them; it asserts what does
not depend on the machine: the owner's inserts and every poll complete
during the flood, and the flooder was refused with SERVER_BUSY. (Speed
ratios are figures, not assertions: docs/security.md.)
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest_twisted
from twisted.internet import defer, reactor, utils

from tests.faults.common import sleep
from tests.servers import admin, init_data_dir, servers  # noqa: F401  (fixture)
from vsc.card import ops
from vsc.card.connect import connect
from vsc.protocol.auth import DEFAULT_MASTER_KEY
from vsc.wire.messages import EchoRequest

FLOOD_SECONDS = 12.0
FLOODERS = 16
INSERTS = 3


def _p99(values: list[float]) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(0.99 * len(values)))]


@pytest_twisted.ensureDeferred
async def test_a_one_source_handshake_flood_is_refused_and_the_owner_and_a_live_card_carry_on(tmp_path, servers):  # noqa: F811
    """
    Unloaded first: 3 inserts (connect + insert + remove) and 3 s of polls;
    then 16 loops handshaking as fast as the server lets them from
    127.0.0.2 for 12 s, during which the owner does the same 3 inserts and
    the live card polls every 20 ms. Asserted: every insert OK, every poll
    answered, at least one flooder handshake refused with SERVER_BUSY, and
    the flooder's completed handshakes within its per-source budget.
    """
    data = tmp_path / "srv"
    fp = init_data_dir(data)["fingerprint"]
    server = servers.start(data)
    kdf = ops.new_kdf(os.urandom, log2_n=10)
    keys = ops.derive_keys("pw", kdf)
    for serial in ("owner", "live"):
        p = await connect(reactor, server.endpoint, fp)
        await ops.enrol(p, serial, admin(data, "issue", serial)["code"], keys, kdf, b"p")
        p.transport.loseConnection()
    live = await connect(reactor, server.endpoint, fp)
    live_secret = os.urandom(32)
    r, _ = await ops.insert(live, "live", "pw", os.urandom(32), live_secret, DEFAULT_MASTER_KEY, keys=keys)
    assert r.status is ops.Status.OK

    async def owner_insert() -> float:
        t0 = time.perf_counter()
        proto = await connect(reactor, server.endpoint, fp)
        secret = os.urandom(32)
        r, _ = await ops.insert(proto, "owner", "pw", os.urandom(32), secret, DEFAULT_MASTER_KEY, keys=keys)
        took = time.perf_counter() - t0
        assert r.status is ops.Status.OK
        await ops.remove(proto, "owner", secret, r.version, b"p")
        proto.transport.loseConnection()
        return took

    async def polls(seconds: float) -> list[float]:
        out, end = [], time.monotonic() + seconds
        while time.monotonic() < end:
            t0 = time.perf_counter()
            reply = await live.request(EchoRequest(b"poll"))
            out.append(time.perf_counter() - t0)
            assert reply.data == b"poll"
            await sleep(0.02)
        return out

    unloaded_inserts = [await owner_insert() for _ in range(INSERTS)]
    unloaded_polls = await polls(3.0)

    flooder = f"tcp:host=127.0.0.1:port={server.port}:bindAddress=127.0.0.2"
    root = str(Path(__file__).resolve().parents[2])
    flooding = utils.getProcessOutputAndValue(
        sys.executable, ["-m", "tests.attacks.flooder", flooder, fp, str(FLOOD_SECONDS), str(FLOODERS)],
        env=dict(os.environ, PYTHONPATH=root), path=root)
    await sleep(1.5)
    loaded_polls_d = defer.ensureDeferred(polls(FLOOD_SECONDS - 2.0))
    loaded_inserts = []
    for _ in range(INSERTS):
        loaded_inserts.append(await owner_insert())
        await sleep(0.5)
    loaded_polls = await loaded_polls_d
    out, err, code = await flooding
    assert code == 0, err
    flood = json.loads(out.decode().strip().splitlines()[-1])
    assert (await ops.remove(live, "live", live_secret, r.version, b"p")).status is ops.Status.OK
    live.transport.loseConnection()

    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    rate = flood["ok"] / FLOOD_SECONDS
    print(f"\nflood: {FLOODERS} loops from 127.0.0.2 for {FLOOD_SECONDS:g} s: {flood['ok']} handshakes completed "
          f"({rate:.1f}/s), {flood['busy']} refused with SERVER_BUSY, {flood['other']} other; owner's insert "
          f"(connect + insert) median {med(unloaded_inserts) * 1000:.0f} ms unloaded, {med(loaded_inserts) * 1000:.0f} "
          f"ms flooded ({med(loaded_inserts) / med(unloaded_inserts):.2f}x); live card poll p99 "
          f"{_p99(unloaded_polls) * 1000:.1f} ms unloaded, {_p99(loaded_polls) * 1000:.1f} ms flooded "
          f"({_p99(loaded_polls) / _p99(unloaded_polls):.2f}x; {len(loaded_polls)} polls)")
    assert len(loaded_inserts) == INSERTS and len(loaded_polls) > 100
    assert flood["busy"] > 0
    # the per-source budget: a burst of 40, then 20 per second (the defaults)
    assert flood["ok"] <= 40 + 20 * (FLOOD_SECONDS + 1)
