"""
Issue 11's flood figure: the owner's insert latency and a live card's poll
p99 during a one-source handshake flood at the server's full RSA rate,
against the same unloaded, in one run.

    .venv/bin/python bench/flood.py [--quick] [--no-write]
    .venv/bin/python -m bench --part flood        (python -m bench runs it)

Set-up. One real ``twistd -n vsc-server`` with its DEFAULT admission settings
(vsc/server/admission.py: 20 handshakes/s per source, bursts of 40, 64
pending, 2 RSA threads) and the default RSA-3072 key; two cards, "owner" and
"live", enrolled through the Store API. The live card is a process of its
own (``--poller``, as a real card is): it inserts once and keeps its channel
open, polling (a sealed EchoRequest) every 5 ms and noting each poll's start
(CLOCK_MONOTONIC, system-wide) and round trip, until told to stop; the polls
of each phase are those that started inside it. Meanwhile this process, the
owner, measures connect + handshake + insert, then removes, a few times — the
same in the unloaded phase and in the flooded one. (Until 2026-12-03 the
polls ran in the owner's process, whose own client work — scrypt, the OAEP
encryption — held them up: with about 500 polls per phase their p99 was the
few that met an insert of the owner, which measured the bench, not the server.
The live card polls every 5 ms, so that each phase has about 1,700 polls and
the p99 is not the fifth-worst of 500.)

The flood. A process of its own (``--flooder``) binds 127.0.0.2 (the owner and
the live card use 127.0.0.1) and starts new handshakes at the rate at which
the server can decrypt them — the RSA-3072 OAEP decrypt floor measured in this
run just before — for the flood's duration: every attempt is a new TCP
connection; an admitted one completes its handshake and closes, a refused one
is answered SERVER_BUSY and closed by the server. Its offered and completed
rates are reported beside the figures. It runs at nice 19: on a network the
attacker's CPU is another machine's, here it shares two cores with the
server and both cards, and its own Python (a client channel per attempt)
would otherwise take CPU time the measured processes are waiting for; the
refusal counts show it still offers the full rate.

The unloaded and the flooded phase alternate, five rounds of 10 s each (one
of 6 s with ``--quick``): on a shared 2-core machine a single pair of phases
is at the mercy of whatever else ran in one of them (three rounds of 14 s
gave round ratios from 0.63x to 4.77x in one run on a busy day: one
disturbed round could decide the median of three). Ratios are flooded / unloaded per
round — the owner's insert median, the live card's poll p99 — and each
figure is the median of its rounds' ratios (every round's ratio is shown
beside it; the milliseconds quoted pool the rounds). Issue 11 asks for both
≤ 2×. ``--write`` (what ``python -m bench``
does unless ``--no-write``) puts the figure into docs/security.md between
the ``bench:flood`` markers.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ROOT = Path(__file__).resolve().parent.parent
SECURITY_MD = ROOT / "docs" / "security.md"
FLOOD_SOURCE = "127.0.0.2"
POLL_EVERY = 0.005


ROUNDS = 5  # alternated unloaded / flooded rounds; each ratio is the median of the rounds' ratios


def _ratios(out: dict) -> None:
    """
    Each round's ratios (flooded / unloaded: the owner's insert median, the
    live card's poll p99), their medians as the figures, and every round's
    lists pooled for the paragraph.
    """
    med = lambda xs: _p(xs, 0.5)  # noqa: E731
    for key in ("inserts_unloaded", "inserts_flooded", "polls_unloaded", "polls_flooded"):
        out[key] = [x for rnd in out["rounds"] for x in rnd[key]]
    for rnd in out["rounds"]:
        ok = all(rnd[k] for k in ("inserts_unloaded", "inserts_flooded", "polls_unloaded", "polls_flooded"))
        rnd["insert_ratio"] = med(rnd["inserts_flooded"]) / med(rnd["inserts_unloaded"]) if ok else None
        rnd["poll_p99_ratio"] = _p(rnd["polls_flooded"], 0.99) / _p(rnd["polls_unloaded"], 0.99) if ok else None
    for key in ("insert_ratio", "poll_p99_ratio"):
        got = [rnd[key] for rnd in out["rounds"] if rnd[key] is not None]
        out[key] = med(got) if len(got) == len(out["rounds"]) else None


def _p(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


# ---------------------------------------------------------------- the flooder (a process of its own)


def flooder_main(endpoint: str, fp: str, rate: float, seconds: float) -> None:
    """``--flooder ENDPOINT FP RATE SECONDS``: start handshakes at RATE/s for SECONDS; print one JSON line."""
    from twisted.internet import defer, task

    from vsc.card.connect import connect
    from vsc.net.channel import ChannelClosedError
    from vsc.wire import ErrorCode

    counts = {"started": 0, "ok": 0, "busy": 0, "other": 0}
    MAX_OPEN = 256  # attempts in flight at most (a refused one takes a round trip)

    async def attempt(reactor) -> None:
        try:
            p = await connect(reactor, endpoint, fp)
        except ChannelClosedError as e:
            counts["busy" if e.code is ErrorCode.SERVER_BUSY else "other"] += 1
            return
        except Exception:  # noqa: BLE001 - refused at accept or reset: counted
            counts["other"] += 1
            return
        counts["ok"] += 1
        p.transport.loseConnection()

    async def run(reactor) -> None:
        start = time.monotonic()
        until = start + seconds
        pending: set = set()
        while True:
            now = time.monotonic()
            if now >= until:
                break
            due = int((now - start) * rate) - counts["started"]
            for _ in range(max(0, min(due, MAX_OPEN - len(pending)))):
                counts["started"] += 1
                d = defer.ensureDeferred(attempt(reactor))
                pending.add(d)
                d.addBoth(lambda _, d=d: pending.discard(d))
            await task.deferLater(reactor, 0.002, lambda: None)
        if pending:
            await defer.DeferredList(list(pending), consumeErrors=True)

    try:
        task.react(lambda reactor: defer.ensureDeferred(run(reactor)))
    except SystemExit:
        pass
    print(json.dumps(counts), flush=True)


def _flooder_priority() -> None:
    """The flooder runs at nice 19 (see the module's docstring)."""
    os.nice(19)


# ---------------------------------------------------------------- the live card (a process of its own)


def poller_main(endpoint: str, fp: str, workdir: str) -> None:
    """
    ``--poller ENDPOINT FP DIR``: insert the card "live", write DIR/ready, poll every POLL_EVERY seconds until
    DIR/stop exists, remove it, and write DIR/polls.json: [[start (time.monotonic), round trip ms], ...].
    """
    from twisted.internet import defer, task

    from bench import server as bs
    from vsc.card import ops
    from vsc.card.connect import connect
    from vsc.protocol.auth import DEFAULT_MASTER_KEY
    from vsc.wire.messages import EchoRequest

    d = Path(workdir)

    async def run(reactor) -> None:
        live = await connect(reactor, endpoint, fp)
        secret = os.urandom(32)
        result, _ = await ops.insert(live, "live", bs.PASSWORD, os.urandom(32), secret, DEFAULT_MASTER_KEY)
        (d / "ready").write_text("")
        out = []
        while not (d / "stop").exists():
            t0 = time.monotonic()
            await live.request(EchoRequest(b"poll"))
            out.append([t0, (time.monotonic() - t0) * 1000.0])
            await task.deferLater(reactor, POLL_EVERY, lambda: None)
        await ops.remove(live, "live", secret, result.version, os.urandom(bs.PROTECTED_SIZE))
        live.closeChannel()
        (d / "polls.json.part").write_text(json.dumps(out))
        os.replace(d / "polls.json.part", d / "polls.json")

    try:
        task.react(lambda reactor: defer.ensureDeferred(run(reactor)))
    except SystemExit:
        pass


# ---------------------------------------------------------------- the measurement


def run(quick: bool = False, progress=lambda msg: None, write: bool = False) -> dict:
    from bench import server as bs
    from bench._util import rate as measure_rate
    from vsc import crypto
    from vsc.server import config

    flood_s = 6.0 if quick else 10.0
    inserts = 3 if quick else 6
    rounds = 1 if quick else ROUNDS
    base = Path(tempfile.mkdtemp(prefix="vsc-bench-flood-"))
    server = None
    try:
        data = bs.make_data_dir(base, "srv", None, "", 3072, settings={})  # the default admission settings
        key = crypto.RSAPrivateKey.from_pem((data / config.KEY_NAME).read_bytes())
        fp = key.public_key().fingerprint()
        ct = key.public_key().oaep_encrypt(os.urandom(64), os.urandom)
        rsa_rate = measure_rate(lambda: key.oaep_decrypt(ct), 0.5 if quick else 1.5, cpu=True)
        store = bs.open_store(config.load(data).database_url)
        try:
            bs.enrol_cards(store, ["owner", "live"])
        finally:
            store.close()
        server = bs.ServerProcess(data, base / "server.log")
        server.wait_port()
        progress(f"  flood: server on port {server.port}; RSA-3072 floor {rsa_rate:.0f}/s; measuring unloaded...")
        from bench.channel import run_in_reactor

        out = run_in_reactor(lambda reactor: _measure(reactor, server, fp, rsa_rate, flood_s, inserts, rounds,
                                                      progress))
        out.update({"rsa3072_decrypt": rsa_rate, "flood_s": flood_s, "source": FLOOD_SOURCE,
                    "poll_every_s": POLL_EVERY})
        _ratios(out)
        if write:
            write_security_md(out)
        return out
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(base, ignore_errors=True)


async def _measure(reactor, server, fp, rsa_rate, flood_s, inserts, rounds, progress) -> dict:
    from twisted.internet import task

    from bench import server as bs
    from vsc.card import ops
    from vsc.card.connect import connect
    from vsc.protocol.auth import DEFAULT_MASTER_KEY

    def sleep(s: float):
        return task.deferLater(reactor, s, lambda: None)

    endpoint = server.endpoint
    muk = os.urandom(32)
    polldir = Path(tempfile.mkdtemp(prefix="vsc-bench-poller-"))
    poller = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--poller", endpoint, fp, str(polldir)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=str(ROOT))
    while not (polldir / "ready").exists():
        if poller.poll() is not None:
            raise RuntimeError(f"the live card's poller exited: {poller.stderr.read().decode()[-500:]}")
        await sleep(0.05)

    async def owner_insert() -> float:
        t0 = time.perf_counter()
        proto = await connect(reactor, endpoint, fp)
        secret = os.urandom(32)
        r, _ = await ops.insert(proto, "owner", bs.PASSWORD, muk, secret, DEFAULT_MASTER_KEY)
        took = (time.perf_counter() - t0) * 1000.0
        await ops.remove(proto, "owner", secret, r.version, os.urandom(bs.PROTECTED_SIZE))
        proto.closeChannel()
        return took

    async def phase(seconds: float) -> tuple[list[float], tuple[float, float]]:
        """The owner inserts ``inserts`` times, spread over ``seconds`` (the same in both phases), while the
        live card polls in its own process; the phase's monotonic window, to pick its polls."""
        t0 = time.monotonic()
        done = []
        gap = max(0.1, seconds / inserts - 0.2)
        for _ in range(inserts):
            done.append(await owner_insert())
            await sleep(gap)
        return done, (t0, time.monotonic())

    windows, counts = [], {}
    try:
        await owner_insert()  # warm-up
        for n in range(rounds):
            inserts_unloaded, unloaded_window = await phase(flood_s - 3.0)
            flood_endpoint = f"tcp:host=127.0.0.1:port={server.port}:bindAddress={FLOOD_SOURCE}"
            progress(f"  flood: round {n + 1} of {rounds}: {rsa_rate:.0f} handshakes/s offered from {FLOOD_SOURCE} "
                     f"for {flood_s:g} s...")
            flooder = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--flooder", flood_endpoint, fp, f"{rsa_rate:.1f}",
                 f"{flood_s:g}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(ROOT),
                preexec_fn=_flooder_priority)
            try:
                await sleep(1.5)
                inserts_flooded, flooded_window = await phase(flood_s - 3.0)
                while flooder.poll() is None:
                    await sleep(0.2)
                stdout = flooder.stdout.read().decode()
                if not stdout.strip():
                    raise RuntimeError(f"the flooder said nothing: {flooder.stderr.read().decode()[-500:]}")
                for k, v in json.loads(stdout.strip().splitlines()[-1]).items():
                    counts[k] = counts.get(k, 0) + v
            finally:
                if flooder.poll() is None:
                    flooder.kill()
                    flooder.wait(10)
            windows.append((inserts_unloaded, unloaded_window, inserts_flooded, flooded_window))
    finally:
        (polldir / "stop").write_text("")
        try:
            poller.wait(30)
        except subprocess.TimeoutExpired:
            poller.kill()
            poller.wait(10)
    try:
        stamped = json.loads((polldir / "polls.json").read_text())
    except OSError:
        raise RuntimeError(f"the live card's poller left no polls: {poller.stderr.read().decode()[-500:]}") from None
    finally:
        shutil.rmtree(polldir, ignore_errors=True)

    def inside(window: tuple[float, float]) -> list[float]:
        return [rtt for t, rtt in stamped if window[0] <= t < window[1]]

    return {"rounds": [{"inserts_unloaded": iu, "polls_unloaded": inside(wu), "inserts_flooded": if_,
                        "polls_flooded": inside(wf)} for iu, wu, if_, wf in windows],
            "flooder": counts}


# ---------------------------------------------------------------- reporting


def summary(res: dict) -> str:
    """One paragraph with the figures (docs/benchmarks.md and docs/security.md)."""
    if "error" in res:
        return f"Not measured: {res['error']}"
    fl = res["flooder"]
    med = lambda xs: _p(xs, 0.5)  # noqa: E731
    n = len(res["rounds"])
    fs = res["flood_s"] * n  # seconds of flood in all

    def f(x):
        return "—" if x is None else f"{x:.1f}"

    def r(x):
        return "—" if x is None else f"{x:.2f}×"

    def each(key):
        return ", ".join(r(rnd[key]) for rnd in res["rounds"])

    return (f"one source ({res['source']}) offering {fl.get('started', 0) / fs:,.0f} handshakes/s for "
            f"{n} × {res['flood_s']:g} s, alternated with unloaded rounds as long "
            f"(the RSA-3072 decrypt floor measured beside it: {res['rsa3072_decrypt']:,.0f}/s): "
            f"{fl.get('ok', 0):,} completed ({fl.get('ok', 0) / fs:,.1f}/s), {fl.get('busy', 0):,} refused with "
            f"SERVER_BUSY, {fl.get('other', 0):,} other; the owner's connect + handshake + insert median "
            f"{f(med(res['inserts_unloaded']))} ms unloaded, {f(med(res['inserts_flooded']))} ms flooded "
            f"(**{r(res['insert_ratio'])}**, the median of the rounds' {each('insert_ratio')}); a live card's poll "
            f"p99 {f(_p(res['polls_unloaded'], 0.99))} ms unloaded, {f(_p(res['polls_flooded'], 0.99))} ms flooded "
            f"(**{r(res['poll_p99_ratio'])}**, the median of the rounds' {each('poll_p99_ratio')}; "
            f"{len(res['polls_flooded']):,} polls flooded)")


MARK_START, MARK_END = "<!-- bench:flood -->", "<!-- /bench:flood -->"


def write_security_md(res: dict, path: Path = SECURITY_MD) -> bool:
    """Replace the text between the bench:flood markers in docs/security.md; False if there are none."""
    try:
        text = path.read_text()
    except OSError:
        return False
    pattern = re.compile(re.escape(MARK_START) + ".*?" + re.escape(MARK_END), re.S)
    if not pattern.search(text):
        return False
    stamp = time.strftime("%Y-%m-%d", time.gmtime())
    new = f"{MARK_START}{summary(res)} (`python -m bench`, {stamp}){MARK_END}"
    path.write_text(pattern.sub(lambda _: new, text, count=1))
    return True


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--poller":
        poller_main(argv[1], argv[2], argv[3])
        return 0
    if argv and argv[0] == "--flooder":
        flooder_main(argv[1], argv[2], float(argv[3]), float(argv[4]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-write", action="store_true", help="do not update docs/security.md")
    args = ap.parse_args(argv)
    res = run(args.quick, progress=lambda m: print(m, file=sys.stderr, flush=True), write=not args.no_write)
    print(summary(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
