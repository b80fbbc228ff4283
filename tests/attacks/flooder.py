"""
A handshake flooder in a process of its own (tests/attacks/test_flood.py,
bench): ``python -m tests.attacks.flooder ENDPOINT FINGERPRINT SECONDS LOOPS``
handshakes as fast as the server lets it from ENDPOINT (which names its
bindAddress) in LOOPS concurrent loops, then prints one JSON line: completed
handshakes, SERVER_BUSY refusals, other failures. Bounded by SECONDS.
"""

from __future__ import annotations

import json
import sys
import time


def main(endpoint: str, fp: str, seconds: float, loops: int) -> None:
    from twisted.internet import defer, task

    from vsc.card.connect import connect
    from vsc.net.channel import ChannelClosedError
    from vsc.wire import ErrorCode

    counts = {"ok": 0, "busy": 0, "other": 0}

    async def loop(reactor, until: float) -> None:
        while time.monotonic() < until:
            try:
                p = await connect(reactor, endpoint, fp)
            except ChannelClosedError as e:
                counts["busy" if e.code is ErrorCode.SERVER_BUSY else "other"] += 1
                continue
            except Exception:  # noqa: BLE001 - refused at accept: counted, tried again
                counts["other"] += 1
                await task.deferLater(reactor, 0.01, lambda: None)
                continue
            counts["ok"] += 1
            p.transport.loseConnection()

    async def run(reactor) -> None:
        until = time.monotonic() + seconds
        await defer.DeferredList([defer.ensureDeferred(loop(reactor, until)) for _ in range(loops)],
                                 consumeErrors=True)

    try:
        task.react(lambda reactor: defer.ensureDeferred(run(reactor)))
    except SystemExit:
        pass
    print(json.dumps(counts), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4]))
