"""
Interleaved A/B of two checkouts' servers on one (noisy, shared) machine.

    .venv/bin/python bench/ab.py handshakes /path/to/main /path/to/branch [--count 300] [--rounds 5]
    .venv/bin/python bench/ab.py cycles /path/to/main /path/to/branch [--window 3] [--rounds 6]

Run it from either checkout (its ``bench`` and ``vsc`` drive the cards). This
is a benchmark tool, not a test.

``handshakes``: two bench servers (``bench/channel.py --serve`` of each
checkout, each with ``PYTHONPATH`` set to its checkout, the same RSA-3072 key),
one card process alternating connect + handshake + close between them, 5 ms
apart (``measure_wall_cpu``'s pattern), the order swapped every other pair.
``cycles``: two ``twistd -n vsc-server`` processes (SQLite, the bench's
settings, the same key), each driven by its own bench/server.py ``Worker``
with one card doing insert + remove cycles back to back (one card each: with
several, the two servers' rates drift apart and a server's CPU per cycle
depends on its rate). Each round reads both servers' CPU from /proc over the
same window, so both meet the same load from whatever else runs on the
machine; the ratio B/A per round is what to compare, not the absolute figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``bench`` and ``vsc`` importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _report(a: str, b: str, res: dict) -> None:
    ratios = [y / x for x, y in zip(res[a], res[b])]
    print(f"median {Path(a).name} {statistics.median(res[a]):.3f} ms  {Path(b).name} {statistics.median(res[b]):.3f} ms"
          f"  B/A per round {', '.join(f'{r:.3f}' for r in ratios)}  median {statistics.median(ratios):.3f}")


def handshakes(a: str, b: str, count: int, rounds: int) -> None:
    from twisted.internet import task

    from bench.channel import run_in_reactor
    from vsc import crypto
    from vsc.card.connect import connect

    tmp = tempfile.TemporaryDirectory(prefix="vsc-ab-")
    key = crypto.RSAPrivateKey.generate(3072)
    key_path = Path(tmp.name) / "server-key.pem"
    key_path.write_bytes(key.to_pem())
    fp = key.public_key().fingerprint()
    servers = {}
    for root in (a, b):
        p = subprocess.Popen([sys.executable, f"{root}/bench/channel.py", "--serve", str(key_path)],
                             env=dict(os.environ, PYTHONPATH=root), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        line = p.stdout.readline().decode()
        if not line.startswith("READY "):
            raise RuntimeError(f"the server of {root} did not start: {line!r}")
        servers[root] = (p, f"tcp:127.0.0.1:{int(line.split()[1])}")

    async def go(reactor):
        for _, endpoint in servers.values():
            for _ in range(5):  # warm up
                (await connect(reactor, endpoint, fp)).closeChannel()
        res: dict = {a: [], b: []}
        for r in range(rounds):
            before = {root: _cpu_s(p.pid) for root, (p, _) in servers.items()}
            for i in range(count):
                for root in ((a, b) if i % 2 == 0 else (b, a)):
                    (await connect(reactor, servers[root][1], fp)).closeChannel()
                    await task.deferLater(reactor, 0.005, lambda: None)
            for root, (p, _) in servers.items():
                res[root].append((_cpu_s(p.pid) - before[root]) / count * 1000)
            print(f"round {r}: {Path(a).name} {res[a][-1]:.3f} ms  {Path(b).name} {res[b][-1]:.3f} ms  "
                  f"B/A {res[b][-1] / res[a][-1]:.3f}", flush=True)
        return res

    try:
        res = run_in_reactor(go)
    finally:
        for p, _ in servers.values():
            p.stdin.close()
            p.wait()
        tmp.cleanup()
    _report(a, b, res)


def cycles(a: str, b: str, window: float, rounds: int) -> None:
    import bench.server as bs
    from bench.__main__ import _server_allow_all_suites
    from vsc import crypto
    from vsc.server import config

    base = Path(tempfile.mkdtemp(prefix="vsc-ab-cycles-"))
    workers = [bs.Worker(base, i) for i in range(2)]
    dirs = [bs.make_data_dir(base, "a", None, "", 3072)]
    key_pem = (dirs[0] / config.KEY_NAME).read_bytes()
    dirs.append(bs.make_data_dir(base, "b", key_pem, "", 3072))
    fp = crypto.RSAPrivateKey.from_pem(key_pem).public_key().fingerprint()
    for d, serial in zip(dirs, ("a-0", "b-0")):
        _server_allow_all_suites(d)
        store = bs.open_store(config.load(d).database_url)
        bs.enrol_cards(store, [serial])
        store.close()
    servers = [bs.ServerProcess(d, base / f"{n}.log", env=dict(os.environ, PYTHONPATH=root))
               for d, n, root in zip(dirs, "ab", (a, b))]
    res: dict = {a: [], b: []}
    try:
        for s in servers:
            s.wait_port()
        for w in workers:
            w.wait_ready()
        for r in range(rounds + 1):  # round 0 warms up
            warm = time.time() + 0.3
            start, end = warm + 1.0, warm + 1.0 + window
            for w, s, serial in zip(workers, servers, ("a-0", "b-0")):
                w.send({"cmd": "run", "fp": fp, "warm": warm, "start": start, "end": end,
                        "cards": [[serial, s.endpoint]], "suite": None})
            time.sleep(max(0.0, start - time.time()))
            before = [bs.proc_ticks(s.pid) for s in servers]
            time.sleep(max(0.0, end - time.time()))
            after = [bs.proc_ticks(s.pid) for s in servers]
            done = []
            for w in workers:
                out = json.loads(w.readline(timeout=60) or "{}")
                if out.get("errors"):
                    raise RuntimeError(f"cycle errors: {out['errors']}")
                done.append(len(out.get("latencies", [])))
            if r == 0:
                continue
            for i, root in enumerate((a, b)):
                res[root].append((after[i] - before[i]) / bs.CLK_TCK * 1000 / max(1, done[i]))
            print(f"round {r}: {Path(a).name} {res[a][-1]:.2f} ms ({done[0]} cycles)  {Path(b).name} "
                  f"{res[b][-1]:.2f} ms ({done[1]} cycles)  B/A {res[b][-1] / res[a][-1]:.3f}", flush=True)
    finally:
        for s in servers:
            s.stop()
        for w in workers:
            w.stop()
    _report(a, b, res)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    ap.add_argument("what", choices=("handshakes", "cycles"))
    ap.add_argument("a", help="checkout A (e.g. main)")
    ap.add_argument("b", help="checkout B (e.g. a branch's worktree)")
    ap.add_argument("--count", type=int, default=300, help="handshakes per server per round")
    ap.add_argument("--window", type=float, default=3.0, help="seconds per cycles round")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    a, b = str(Path(args.a).resolve()), str(Path(args.b).resolve())
    if args.what == "handshakes":
        handshakes(a, b, args.count, args.rounds)
    else:
        cycles(a, b, args.window, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
