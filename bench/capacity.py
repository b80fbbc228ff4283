"""
Capacity of one VSC Server process: how many cards it holds IN USE, each
keeping its protected channel open and polling, and what a new insert costs
while they do.

    .venv/bin/python bench/capacity.py [--quick] [--steps 1000,2000,5000,10000] [--budget 215]
                                       [--poll 5] [--clients 2] [--keep]

This is a benchmark, not a test.

Set-up. One real ``twistd -n vsc-server`` process (the production entry
point, default settings: SQLite with WAL and synchronous=FULL, 8 database
threads, master-key implementation authentication, forward secrecy
``prefer``) with a 2048-bit server key (for a faster ramp; the default is
3072), listening on ``tcp:0:interface=127.0.0.1``. It is started through a
small wrapper (``bench/capacity.py --twistd ...``) that raises RLIMIT_NOFILE
to 65,536 and then runs twistd's own ``run()`` in the same process, so the
RSS read from /proc/PID/status is the server's.

The cards. Every serial is enrolled beforehand directly through the Store
API (``Store.issue`` + ``Store.enrol``, not over the network), all with the
SAME password, hence the same scrypt salt and verifier (fine for a
benchmark: the server does the same work per card either way), and a 2 KiB
opaque protected blob. The enrolling connection sets ``PRAGMA
synchronous=OFF`` for itself only (set-up speed); the server's own
connections keep synchronous=FULL. The card side runs in ``--clients``
client processes (``bench/capacity.py --worker``, one Twisted epoll reactor
each, RLIMIT_NOFILE raised too); the password keys are derived once, so an
insert costs the card no scrypt.

A card in use = connect + Figure 7 handshake + insert (challenge, password
and Master-key answers, check-out; the protected blob comes back), then the
channel stays OPEN and the card sends a sealed EchoRequest of 16 bytes over
it every ``--poll`` seconds (random phase) as its liveness traffic; the
server answers EchoReply.

The ramp. N goes through the steps (1k, 2k, 5k, 10k by default) while the
whole part stays within ``--budget`` seconds (enrolment included). At each
step: insert the missing cards (16 concurrent inserts in all), wait one poll
interval so every card has polled under the new load, then measure while
all N poll (a window of at least one poll interval):

* server RSS (VmRSS in /proc/PID/status) and (RSS - RSS at 0 cards) / N;
* latency of NEW inserts: up to ``--probes`` extra cards (bounded in time),
  one at a time, connect + handshake + insert timed (and the insert exchange
  alone), each then removed and closed, so N stays N;
* the polls during the window: count, failures, round-trip p50 / p99;
  channels lost since the start.

The ramp stops early (and says why) on the time budget, file-descriptor
exhaustion, failed inserts (> 2 %), lost channels, saturation (fewer than
80 % of the offered polls answered in the window, or a poll round-trip p50
over half the poll interval), or low memory (MemAvailable < 10 %). The CPU
used by the server and the clients (from /proc) and how busy the whole
machine was are reported per step, to tell "the server is out of CPU" from
"the machine is shared". Every process started here is stopped in a
``finally``; the temporary directory is deleted unless ``--keep``.

After the last step the server is restarted and every card reconnects at
once (the reconnect storm: ATTACH with the insert secret, polls meanwhile).
``BENCH_TRACEMALLOC=FILE`` makes the server write its largest allocations by
traceback to FILE every 10 s (slow: for finding what a card costs in memory).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a script: make ``bench`` and ``vsc`` importable from the checkout
    sys.path.insert(0, str(ROOT))

from bench import server as bserver  # noqa: E402  (reused: ServerProcess, Worker, make_data_dir, percentile)

NOFILE = 65536
KEY_BITS = 2048
PROTECTED_SIZE = 2048
POLL_BYTES = 16
STEPS_FULL = (1000, 2000, 5000, 10000, 20000)
BUDGET_FULL = 330.0  # seconds for the whole part: the ramp to 20,000, the windows and the reconnect storm
CLIENTS = 4  # client processes in a full run (the card side must not be the bottleneck)
STORM_CONCURRENCY = 256  # reconnects in flight at once, over all clients
STEPS_QUICK = (300, 800)
INSERT_CONCURRENCY = 16  # concurrent inserts during a ramp, over all clients
MAX_FAILED = 0.02


# ---------------------------------------------------------------- small helpers


def raise_nofile(want: int = NOFILE) -> tuple[int, int]:
    """Raise RLIMIT_NOFILE to ``want`` (root may raise the hard limit); returns the (soft, hard) in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for limits in ((max(want, soft), max(want, hard)), (min(want, hard) if hard != resource.RLIM_INFINITY else want,
                                                         hard)):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, limits)
            break
        except (ValueError, OSError):
            continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def proc_status_kb(pid: int, field: str = "VmRSS") -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def meminfo_kb(field: str) -> int | None:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def open_fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return bserver.percentile(sorted(values), q)


# ---------------------------------------------------------------- the server wrapper


def twistd_main(argv: list[str]) -> None:
    """``--twistd ARGS``: raise RLIMIT_NOFILE, then run twistd in THIS process (its RSS is the server's)."""
    soft, hard = raise_nofile()
    print(f"capacity wrapper: RLIMIT_NOFILE {soft}/{hard}", flush=True)
    from twisted.scripts.twistd import run

    dump = os.environ.get("BENCH_TRACEMALLOC")  # a file: the server's allocations by traceback, every 10 s
    if dump:
        import tracemalloc

        from twisted.internet import reactor, task

        def write() -> None:
            stats = tracemalloc.take_snapshot().statistics("traceback")
            with open(dump, "w") as f:
                for st in stats[:40]:
                    f.write(f"{st.size / 1024:10.0f} KiB {st.count:8d}  " + " <- ".join(
                        line.strip() for line in reversed(st.traceback.format()[-6:]) if line.strip()
                        and not line.strip().startswith("File")) + "\n")
                    f.write("      " + str(st.traceback[-1]) + "\n")

        tracemalloc.start(6)
        task.LoopingCall(write).start(10.0, now=False)
        del reactor
    sys.argv = ["twistd", *argv]
    run()


class CapacityServer(bserver.ServerProcess):
    """bench/server.py's ServerProcess (port from the log, stop), started through the wrapper above."""

    def __init__(self, data_dir: Path, log_path: Path):
        env = {k: v for k, v in os.environ.items() if not k.startswith("VSC_")}
        super().__init__(data_dir, log_path, launcher=[sys.executable, str(Path(__file__).resolve()), "--twistd"],
                         env=env)


class CapacityWorker(bserver.Worker):
    """bench/server.py's Worker (JSON lines over stdin/stdout), running this file's --worker."""

    def __init__(self, logdir: Path, index: int):
        super().__init__(logdir, index, script=Path(__file__).resolve(), name="capacity-worker")

    def call(self, obj: dict, timeout: float) -> dict:
        self.send(obj)
        line = self.readline(timeout)
        if line is None:
            raise RuntimeError(f"capacity client gave no answer to {obj.get('cmd')!r} within {timeout:.0f} s")
        return json.loads(line)


# ---------------------------------------------------------------- the client worker (a separate process)


def worker_main() -> None:
    """Long-lived card-side process: one JSON command per stdin line, one JSON answer per stdout line."""
    nofile = raise_nofile()
    from collections import Counter

    from twisted.internet import reactor, stdio
    from twisted.internet.defer import ensureDeferred, gatherResults
    from twisted.protocols.basic import LineReceiver
    from twisted.internet.task import deferLater

    from vsc.card import ops
    from vsc.card.connect import connect
    from vsc.protocol.auth import DEFAULT_MASTER_KEY
    from vsc.wire.messages import EchoReply, EchoRequest
    from vsc.wire.ops import KdfParams

    state: dict = {"fp": "", "endpoint": "", "poll": 5.0, "keys": None}
    cards: dict[str, object] = {}
    polls = {"rtts": [], "failed": 0, "late": 0, "lost": 0, "sent": 0}

    from bench._util import describe_failure as describe

    class Card:
        __slots__ = ("serial", "proto", "call", "dead", "secret")

        def __init__(self, serial, proto, secret=b""):
            self.serial, self.proto, self.call, self.dead, self.secret = serial, proto, None, False, secret

        def schedule(self, delay: float) -> None:
            self.call = reactor.callLater(delay, self.poll)

        def poll(self) -> None:
            self.call = None
            if self.proto.channel.closed:
                self.lose()
                return
            t0 = time.perf_counter()
            polls["sent"] += 1
            payload = os.urandom(POLL_BYTES)

            def ok(reply):
                rtt = time.perf_counter() - t0
                if not isinstance(reply, EchoReply) or reply.data != payload:
                    polls["failed"] += 1
                else:
                    polls["rtts"].append(rtt * 1000.0)
                    if rtt > state["poll"]:
                        polls["late"] += 1
                if not self.dead:
                    self.schedule(max(0.0, state["poll"] - rtt))

            def failed(_f):
                polls["failed"] += 1
                self.lose()

            self.proto.request(EchoRequest(payload)).addCallbacks(ok, failed)

        def lose(self) -> None:
            if not self.dead:
                self.dead = True
                polls["lost"] += 1

        def stop(self) -> None:
            self.dead = True
            if self.call is not None and self.call.active():
                self.call.cancel()
            self.call = None
            transport = getattr(self.proto, "transport", None)
            if transport is not None:
                transport.abortConnection()

    async def insert(serial: str):
        """connect + handshake + insert; returns (proto, secret, version, connect_s, insert_s)."""
        t0 = time.perf_counter()
        proto = await connect(reactor, state["endpoint"], state["fp"])
        t1 = time.perf_counter()
        secret = os.urandom(32)
        try:
            result, _ = await ops.insert(proto, serial, state["password"], os.urandom(32), secret, DEFAULT_MASTER_KEY,
                                         keys=state["keys"])
        except BaseException:
            if not proto.channel.closed:
                proto.closeChannel()
            raise
        t2 = time.perf_counter()
        return proto, secret, result.version, t1 - t0, t2 - t1

    async def ramp(cmd: dict) -> dict:
        queue = list(cmd["serials"])
        deadline = cmd["deadline"]
        errors: Counter = Counter()
        done = 0
        t0 = time.perf_counter()

        async def loop():
            nonlocal done
            while queue and time.time() < deadline:
                serial = queue.pop(0)
                try:
                    proto, secret, _version, _c, _i = await insert(serial)
                except Exception as e:  # noqa: BLE001 - counted and reported
                    errors[describe(e)] += 1
                    continue
                card = Card(serial, proto, secret)
                cards[serial] = card
                card.schedule(random.uniform(0, state["poll"]))
                done += 1

        await gatherResults([ensureDeferred(loop()) for _ in range(cmd["concurrency"])], consumeErrors=True)
        return {"inserted": done, "errors": dict(errors), "left": len(queue), "elapsed": time.perf_counter() - t0}

    async def probe(cmd: dict) -> dict:
        """New inserts, one at a time, each removed and closed afterwards (not kept in use)."""
        total, only, errors = [], [], Counter()
        blob = os.urandom(PROTECTED_SIZE)
        deadline = cmd.get("deadline") or float("inf")
        for serial in cmd["serials"]:
            if time.time() > deadline:
                break
            try:
                proto, secret, version, c, i = await insert(serial)
            except Exception as e:  # noqa: BLE001
                errors[describe(e)] += 1
                continue
            total.append((c + i) * 1000.0)
            only.append(i * 1000.0)
            try:
                await ops.remove(proto, serial, secret, version, blob)
            except Exception as e:  # noqa: BLE001
                errors[f"remove: {describe(e)}"] += 1
            proto.closeChannel()
        return {"total_ms": total, "insert_ms": only, "errors": dict(errors)}

    async def reconnect(cmd: dict) -> dict:
        """
        The storm after a server restart: every card whose channel is gone
        connects again and ATTACHes with its insert secret (what an in-use
        card does), ``concurrency`` at a time, then polls again at once; the
        cards already back keep polling meanwhile. Returns when all are back
        (or the deadline passes), with the time each came back.
        """
        todo = [c for c in cards.values() if c.dead or c.proto.channel.closed]
        for c in todo:
            c.dead = True
            if c.call is not None and c.call.active():
                c.call.cancel()
            c.call = None
        back, errors = [], Counter()
        t0 = time.perf_counter()
        deadline = cmd["deadline"]

        async def loop():
            while todo and time.time() < deadline:
                card = todo.pop()
                for attempt in range(20):
                    try:
                        proto = await connect(reactor, state["endpoint"], state["fp"])
                        try:
                            await ops.attach(proto, card.serial, card.secret)
                        except BaseException:
                            if not proto.channel.closed:
                                proto.closeChannel()
                            raise
                    except Exception as e:  # noqa: BLE001 - counted, tried again shortly
                        errors[describe(e)] += 1
                        await deferLater(reactor, 0.05 * (attempt + 1), lambda: None)
                        continue
                    card.proto, card.dead = proto, False
                    card.schedule(random.uniform(0, state["poll"]))
                    back.append(time.perf_counter() - t0)
                    break

        await gatherResults([ensureDeferred(loop()) for _ in range(cmd["concurrency"])], consumeErrors=True)
        return {"back": back, "errors": dict(errors), "left": len(todo), "elapsed": time.perf_counter() - t0}

    def stats(cmd: dict) -> dict:
        rtts = polls["rtts"]
        out = {
            "cards": len(cards),
            "open": sum(1 for c in cards.values() if not c.dead and not c.proto.channel.closed),
            "lost": polls["lost"],
            "sent": polls["sent"],
            "answered": len(rtts),
            "failed": polls["failed"],
            "late": polls["late"],
            "rtts": rtts if cmd.get("rtts") else [],
            "rss_kb": proc_status_kb(os.getpid()),
            "nofile": list(nofile),
        }
        if cmd.get("reset"):
            polls["rtts"] = []
            polls["sent"] = polls["failed"] = polls["late"] = 0
        return out

    class Control(LineReceiver):
        delimiter = b"\n"
        MAX_LENGTH = 1 << 24

        def connectionMade(self) -> None:
            self.sendLine(b'{"ready": true}')

        def answer(self, result) -> None:
            self.sendLine(json.dumps(result).encode())

        def lineReceived(self, line: bytes) -> None:
            cmd = json.loads(line)
            kind = cmd.get("cmd")
            if kind == "quit":
                for card in cards.values():
                    card.stop()
                reactor.callLater(0.2, reactor.stop)
                return
            if kind == "setup":
                state.update(fp=cmd["fp"], endpoint=cmd["endpoint"], poll=cmd["poll"], password=cmd["password"])
                kdf = KdfParams.decode(bytes.fromhex(cmd["kdf"]))
                state["keys"] = ops.derive_keys(cmd["password"], kdf)  # once: every card has this password
                self.answer({"ok": True, "nofile": list(nofile)})
                return
            if kind == "stats":
                self.answer(stats(cmd))
                return
            fn = {"ramp": ramp, "probe": probe, "reconnect": reconnect}[kind]
            d = ensureDeferred(fn(cmd))
            d.addErrback(lambda f: {"failure": f.getErrorMessage(), "errors": {f.getErrorMessage(): 1}})
            d.addCallback(self.answer)

        def connectionLost(self, reason=None) -> None:
            if reactor.running:
                reactor.stop()

    stdio.StandardIO(Control())
    reactor.run()


# ---------------------------------------------------------------- set-up


def enrol_fast(url: str, serials: list[str], password: str, log2_n: int) -> str:
    """
    Enrol ``serials`` through the Store API with ONE password (same salt, same
    verifier for every card); the enrolling connection uses synchronous=OFF.
    Returns the encoded KDF parameters (hex) the clients derive the keys from.
    """
    from vsc.card import ops
    from vsc.protocol import auth
    from vsc.protocol.cardstore import EnrolCard
    from vsc.server.policy import Policy, new_enrolment_code
    from vsc.server.store import Store
    from vsc.wire.ops import Status

    store = Store(url, time.time)
    # set-up speed: the look-alike check of a new serial against every existing one (vsc.protocol.serials) is
    # quadratic in the number of cards; these serials are ASCII "cap-NNNNN"/"probe-NNNNN", distinct by design
    store._refuse_new_serial = lambda cur, serial: None
    try:
        store.migrate()
        store._conn().execute("PRAGMA synchronous=OFF")  # this connection only: set-up speed
        info = Policy().initial_auth_info()
        kdf = ops.new_kdf(os.urandom, log2_n=log2_n)
        keys = ops.derive_keys(password, kdf)
        verifier = auth.verifier_for(keys.auth_key, kdf.alg)
        code = new_enrolment_code()
        code_hash = auth.code_hash(code)
        blob = os.urandom(PROTECTED_SIZE)
        for serial in serials:
            store.issue(serial, code_hash, info, 3600, peer="bench")
            enrolled = store.enrol(EnrolCard(serial, code_hash, verifier, kdf.encode(), blob, b"", {}, "bench"))
            if enrolled.status is not Status.OK:
                raise RuntimeError(f"enrolling {serial} through the Store failed")
        return kdf.encode().hex()
    finally:
        store.close()


# ---------------------------------------------------------------- the measurement


def reconnect_storm(server, workers, cards: int, t_end: float, poll: float, progress) -> dict:
    """
    Restart the server (SIGTERM, then the same command on the same port) while
    every card is in use: each card's channel is gone, and every card connects
    again and ATTACHes with its insert secret (STORM_CONCURRENCY at a time over
    all clients), polling again as soon as it is back. Measured: the restart,
    the time until every card is back, reconnects/s, the server's CPU per
    reconnect against one RSA decrypt, and the polls of the cards already back.
    """
    from vsc.server import config

    key = config.load(server.data_dir).load_key()
    ct = key.public_key().oaep_encrypt(os.urandom(64), os.urandom)
    rsa = bserver.rate(lambda: key.oaep_decrypt(ct), 0.5, cpu=True)
    progress(f"  capacity: restarting the server with {cards:,} cards in use...")
    t0 = time.monotonic()
    server.stop()
    server.spawn()
    server.wait_port()
    restart_s = time.monotonic() - t0
    spid = server.pid
    for w in workers:
        w.call({"cmd": "stats", "reset": True}, 30)
    cpu0, mach0 = bserver.proc_ticks(spid), bserver.machine_ticks()
    deadline = time.time() + max(30.0, t_end - time.monotonic() + 60.0)
    conc = max(1, STORM_CONCURRENCY // len(workers))
    for w in workers:
        w.send({"cmd": "reconnect", "concurrency": conc, "deadline": deadline})
    back, errors, left, elapsed = [], {}, 0, 0.0
    for w in workers:
        line = w.readline(timeout=max(60.0, deadline - time.time() + 60))
        if line is None:
            raise RuntimeError("a capacity client did not finish its reconnects")
        ans = json.loads(line)
        back += ans.get("back", [])
        left += ans.get("left", 0)
        elapsed = max(elapsed, ans.get("elapsed", 0.0))
        for k, v in ans.get("errors", {}).items():
            errors[k] = errors.get(k, 0) + v
    cpu1, mach1 = bserver.proc_ticks(spid), bserver.machine_ticks()
    st = [w.call({"cmd": "stats", "reset": True, "rtts": True}, 60) for w in workers]
    rtts = [x for s in st for x in s["rtts"]]
    server_cpu = (cpu1 - cpu0) / bserver.CLK_TCK
    out = {
        "cards": cards, "back": len(back), "left": left, "errors": errors, "restart_s": restart_s,
        "all_back_s": max(back) if back else None, "half_back_s": pct(back, 0.5), "elapsed_s": elapsed,
        "rate": len(back) / elapsed if elapsed else None,
        "server_cpu_ms": server_cpu * 1000 / len(back) if back else None,
        "server_cpu_share": server_cpu / elapsed if elapsed else None,
        "machine": (mach1[0] - mach0[0]) / max(1, mach1[1] - mach0[1]),
        "rsa_decrypt_per_s": rsa, "rsa_bits": key.bits, "concurrency": conc * len(workers),
        "polls_answered": sum(s["answered"] for s in st), "polls_failed": sum(s["failed"] for s in st),
        "poll_p50_ms": pct(rtts, 0.5), "poll_p99_ms": pct(rtts, 0.99),
    }
    progress(f"  capacity: storm: {len(back):,} of {cards:,} back in {out['all_back_s'] or 0:.1f} s "
             f"({out['rate'] or 0:.0f}/s; server {out['server_cpu_ms'] or 0:.2f} ms CPU each, RSA-{key.bits} "
             f"decrypt {1000 / rsa:.2f} ms); {out['polls_answered']:,} polls answered meanwhile")
    return out


def run(quick: bool = False, steps: tuple[int, ...] | None = None, budget: float | None = None,
        poll: float | None = None, clients: int | None = None, probes: int | None = None, keep: bool = False,
        progress=lambda msg: None, storm: bool = True) -> dict:
    """Run the capacity ramp; returns a JSON-able dict (see ``report``)."""
    from vsc.server import config

    clients = clients or (2 if quick else CLIENTS)
    steps = tuple(steps or (STEPS_QUICK if quick else STEPS_FULL))
    nofile_note = None
    if max(steps) > 10_000 and raise_nofile()[0] < max(steps) + 1024:
        # the open-file limit does not allow the top step: the largest thousand it does, if above 10,000
        fit = (raise_nofile()[0] - 1024) // 1000 * 1000
        nofile_note = (f"{max(steps):,} cards need {max(steps) + 1024:,} descriptors per process; RLIMIT_NOFILE "
                       f"allows {raise_nofile()[0]:,} (hard limit), so the top step is {fit:,}" if fit > 10_000 else
                       f"{max(steps):,} cards need more descriptors than RLIMIT_NOFILE allows ({raise_nofile()[0]:,})")
        steps = tuple(s for s in steps if s <= 10_000) + ((fit,) if fit > 10_000 else ())
    budget = budget if budget is not None else (40.0 if quick else BUDGET_FULL)
    poll = poll if poll is not None else (3.0 if quick else 5.0)
    probes = probes if probes is not None else (10 if quick else 40)
    t_start = time.monotonic()
    t_end = t_start + budget
    base = Path(tempfile.mkdtemp(prefix="vsc-bench-cap-"))
    server = None
    workers: list[CapacityWorker] = []
    res: dict = {"steps_planned": list(steps), "budget_s": budget, "poll_s": poll, "clients": clients,
                 "nofile_note": nofile_note,
                 "probes_per_step": probes, "key_bits": KEY_BITS, "rows": [], "stopped": None,
                 "fsync_per_s": None}
    try:
        workers = [CapacityWorker(base, i) for i in range(clients)]
        data_dir = bserver.make_data_dir(base, "capacity", None, "", KEY_BITS)
        cfg = config.load(data_dir)
        fp = cfg.load_key().public_key().fingerprint()
        res["fsync_per_s"] = bserver.fsync_rate(base, 0.6 if quick else 1.0)

        # ---- enrol every serial we may need (steps + probes + warm-up), through the Store
        n_max = max(steps)
        cap_serials = [f"cap-{i:05d}" for i in range(n_max)]
        probe_serials = [f"probe-{i:05d}" for i in range(probes * (len(steps) + 1))]
        t0 = time.monotonic()
        kdf_hex = enrol_fast(cfg.database_url, cap_serials + probe_serials, bserver.PASSWORD, bserver.KDF_LOG2_N)
        res["enrol_s"] = time.monotonic() - t0
        res["enrolled"] = len(cap_serials) + len(probe_serials)
        progress(f"  capacity: enrolled {res['enrolled']} cards through the Store in {res['enrol_s']:.1f} s")

        server = CapacityServer(data_dir, base / "capacity-server.log")
        server.wait_port()
        spid = server.pid
        log_text = server.log_path.read_text(errors="replace")
        res["server_nofile"] = log_text.split("RLIMIT_NOFILE ", 1)[1].split()[0] if "RLIMIT_NOFILE " in log_text else "?"
        for w in workers:
            w.wait_ready()
            ans = w.call({"cmd": "setup", "fp": fp, "endpoint": server.endpoint, "poll": poll,
                          "password": bserver.PASSWORD, "kdf": kdf_hex}, 30)
            res["client_nofile"] = ans.get("nofile")

        # ---- warm-up (first connections, lazy imports, DB threads), then the 0-card RSS
        probe_iter = iter(probe_serials)

        def take_probes(k: int) -> list[str]:
            return [next(probe_iter) for _ in range(k)]

        workers[0].call({"cmd": "probe", "serials": take_probes(probes)}, 120)
        time.sleep(0.5)
        rss0 = proc_status_kb(spid)
        res["rss0_kb"] = rss0
        progress(f"  capacity: server RSS with no card in use: {rss0 / 1024:.1f} MiB")

        in_use = 0
        lost_before = 0
        for step in steps:
            need = step - in_use
            # settle + polls alone + probes (bounded) + stats after the ramp, and the reconnect storm of them all
            reserve = poll + 3.0 + probes * 0.25 + 6.0 + (step / 250 + 15.0 if storm else 0.0)
            ramp_deadline = time.time() + max(0.0, (t_end - time.monotonic()) - reserve)
            if time.time() >= ramp_deadline:
                res["stopped"] = f"time budget: no time left for the {step:,}-card step"
                break
            share: list[list[str]] = [[] for _ in workers]
            for j, serial in enumerate(cap_serials[in_use:step]):
                share[j % len(workers)].append(serial)
            conc = max(1, INSERT_CONCURRENCY // len(workers))
            t_ramp = time.monotonic()
            cpu0, mach0 = bserver.proc_ticks(spid), bserver.machine_ticks()
            cl0 = sum(bserver.proc_ticks(w.pid) for w in workers)
            for w, serials in zip(workers, share):
                w.send({"cmd": "ramp", "serials": serials, "concurrency": conc, "deadline": ramp_deadline})
            inserted, errors, left = 0, {}, 0
            for w in workers:
                line = w.readline(timeout=max(60.0, ramp_deadline - time.time() + 60))
                if line is None:
                    raise RuntimeError("a capacity client did not finish its ramp")
                ans = json.loads(line)
                inserted += ans.get("inserted", 0)
                left += ans.get("left", 0)
                for k, v in ans.get("errors", {}).items():
                    errors[k] = errors.get(k, 0) + v
            ramp_s = time.monotonic() - t_ramp
            cpu1, mach1 = bserver.proc_ticks(spid), bserver.machine_ticks()
            ramp_cpu = (cpu1 - cpu0) / bserver.CLK_TCK
            ramp_clients = (sum(bserver.proc_ticks(w.pid) for w in workers) - cl0) / bserver.CLK_TCK
            ramp_machine = (mach1[0] - mach0[0]) / max(1, mach1[1] - mach0[1])
            in_use += inserted
            progress(f"  capacity: {in_use:,} cards in use (ramp {inserted:,} inserts in {ramp_s:.1f} s, "
                     f"{inserted / ramp_s if ramp_s else 0:.0f}/s; {sum(errors.values())} failed)")

            # ---- steady state: every card polls at least once under the new load, then measure
            time.sleep(poll)
            for w in workers:
                w.call({"cmd": "stats", "reset": True}, 30)
            # polls alone (no insert): the server's CPU per poll
            quiet = min(poll, 3.0)
            t_q, q0 = time.monotonic(), bserver.proc_ticks(spid)
            time.sleep(quiet)
            q1, quiet_s = bserver.proc_ticks(spid), time.monotonic() - t_q
            quiet_answered = sum(w.call({"cmd": "stats", "reset": True}, 30)["answered"] for w in workers)
            t_win = time.monotonic()
            wcpu0, wmach0 = bserver.proc_ticks(spid), bserver.machine_ticks()
            probe_s = max(3.0, min(probes * 0.25 + 3.0, (t_end - time.monotonic()) - 3.0))
            pr = workers[0].call({"cmd": "probe", "serials": take_probes(probes), "deadline": time.time() + probe_s},
                                 probe_s + 120.0)
            window = time.monotonic() - t_win
            if window < poll:  # polls of every card inside the window
                time.sleep(poll - window)
                window = time.monotonic() - t_win
            wcpu1, wmach1 = bserver.proc_ticks(spid), bserver.machine_ticks()
            rss = proc_status_kb(spid)
            hwm = proc_status_kb(spid, "VmHWM")
            fds = open_fds(spid)
            st = [w.call({"cmd": "stats", "reset": True, "rtts": True}, 60) for w in workers]
            rtts = [x for s in st for x in s["rtts"]]
            open_now = sum(s["open"] for s in st)
            lost = sum(s["lost"] for s in st)
            row = {
                "target": step, "in_use": in_use, "open": open_now, "ramp_inserted": inserted,
                "ramp_s": ramp_s, "ramp_rate": inserted / ramp_s if ramp_s else None, "ramp_errors": errors,
                "ramp_server_cpu": ramp_cpu / ramp_s if ramp_s else None,
                "ramp_server_cpu_ms": ramp_cpu * 1000 / inserted if inserted else None,
                "ramp_machine": ramp_machine,
                "ramp_clients_cpu": ramp_clients / ramp_s if ramp_s else None,
                "window_server_cpu": (wcpu1 - wcpu0) / bserver.CLK_TCK / max(1e-9, window),
                "window_machine": (wmach1[0] - wmach0[0]) / max(1, wmach1[1] - wmach0[1]),
                "rss_kb": rss, "hwm_kb": hwm, "fds": fds,
                "rss_per_card_kb": (rss - rss0) / in_use if in_use and rss and rss0 else None,
                "client_rss_kb": [s["rss_kb"] for s in st],
                "probe_total_ms": pr.get("total_ms", []), "probe_insert_ms": pr.get("insert_ms", []),
                "probe_errors": pr.get("errors", {}),
                "window_s": window, "polls_answered": sum(s["answered"] for s in st),
                "polls_failed": sum(s["failed"] for s in st), "polls_late": sum(s["late"] for s in st),
                "poll_p50_ms": pct(rtts, 0.50), "poll_p99_ms": pct(rtts, 0.99),
                "poll_max_ms": max(rtts) if rtts else None, "lost": lost,
                "load": os.getloadavg()[0],
                "quiet_s": quiet_s, "quiet_polls": quiet_answered,
                "quiet_server_cpu": (q1 - q0) / bserver.CLK_TCK / max(1e-9, quiet_s),
                "poll_cpu_ms": (q1 - q0) / bserver.CLK_TCK * 1000 / quiet_answered if quiet_answered else None,
            }
            res["rows"].append(row)
            tp = row["probe_total_ms"]
            progress(f"  capacity: N={in_use:,}: server RSS {rss / 1024:.0f} MiB "
                     f"({row['rss_per_card_kb'] or 0:.1f} KiB/card); new insert p50/p95/p99 "
                     f"{pct(tp, .5) or 0:.1f}/{pct(tp, .95) or 0:.1f}/{pct(tp, .99) or 0:.1f} ms; "
                     f"polls {row['polls_answered']:,} ({row['polls_answered'] / window:.0f}/s), "
                     f"p50 {row['poll_p50_ms'] or 0:.1f} ms; lost {lost}")

            # ---- why stop?
            expected = in_use / poll
            row["polls_expected_per_s"] = expected
            saturated = None
            if (row["polls_answered"] < 0.8 * expected * window) or (row["poll_p50_ms"] or 0) > poll * 1000 / 2:
                saturated = (f"saturated at {in_use:,} cards: {row['polls_answered'] / window:,.0f} polls/s answered "
                             f"of {expected:,.0f}/s offered, poll RTT p50 {row['poll_p50_ms'] or 0:,.0f} ms, the server "
                             f"at {row['window_server_cpu'] * 100:.0f}% of one CPU with the machine "
                             f"{row['window_machine'] * 100:.0f}% busy")
            failed = sum(errors.values())
            if any("EMFILE" in k or "Too many open files" in k for k in errors):
                res["stopped"] = f"file-descriptor limit (EMFILE) at {in_use:,} cards"
                break
            if failed > MAX_FAILED * max(1, need):
                res["stopped"] = f"failed inserts: {failed} of {need} ({', '.join(errors)})"
                break
            if lost > lost_before:
                res["stopped"] = f"{lost - lost_before} channels lost while polling"
                break
            lost_before = lost
            avail, total = meminfo_kb("MemAvailable"), meminfo_kb("MemTotal")
            if avail is not None and total and avail < 0.10 * total:
                res["stopped"] = f"memory: MemAvailable {avail // 1024} MiB of {total // 1024} MiB"
                break
            if left:
                res["stopped"] = (
                    f"time budget: the ramp to {step:,} stopped at {in_use:,} cards; during that last ramp the "
                    f"server process used {(row['ramp_server_cpu'] or 0) * 100:.0f}% of one CPU (the machine "
                    f"{row['ramp_machine'] * 100:.0f}% busy) for {row['ramp_rate'] or 0:.0f} inserts/s while "
                    f"answering about {expected:,.0f} polls/s"
                    + (f"; and the polls were backing up ({saturated})" if saturated else ""))
                break
            if saturated:
                res["stopped"] = saturated
                break
        res["max_in_use"] = max((r["open"] for r in res["rows"]), default=0)
        if storm and in_use and res["rows"]:
            res["storm"] = reconnect_storm(server, workers, in_use, t_end, poll, progress)
        res["elapsed_s"] = time.monotonic() - t_start
        return res
    finally:
        for w in workers:
            w.stop()
        if server is not None:
            server.stop()
        if keep:
            print(f"capacity logs kept in {base}", file=sys.stderr)
        else:
            shutil.rmtree(base, ignore_errors=True)


# ---------------------------------------------------------------- report


def _ms(x) -> str:
    return "—" if x is None else f"{x:.1f}"


def report(res: dict) -> str:
    from bench._util import markdown_table

    rows = []
    for r in res["rows"]:
        tp, ti = r["probe_total_ms"], r["probe_insert_ms"]
        rows.append([
            f"{r['open']:,}", f"{r['rss_kb'] / 1024:.0f}" if r["rss_kb"] else "—",
            f"{r['rss_per_card_kb']:.1f}" if r["rss_per_card_kb"] else "—",
            f"{r['fds']:,}" if r["fds"] else "—",
            f"{_ms(pct(tp, .5))} / {_ms(pct(tp, .95))} / {_ms(pct(tp, .99))}",
            f"{_ms(pct(ti, .5))} / {_ms(pct(ti, .95))}",
            f"{len(tp)}" + (f" ({sum(r['probe_errors'].values())} failed)" if r["probe_errors"] else ""),
            f"{r['polls_answered'] / r['window_s']:,.0f} of {r.get('polls_expected_per_s', 0):,.0f}",
            f"{_ms(r['poll_p50_ms'])} / {_ms(r['poll_p99_ms'])}",
            f"{r['polls_failed'] + r['lost']}",
            f"{r['window_server_cpu'] * 100:.0f}% / {r['window_machine'] * 100:.0f}%",
            f"{r['ramp_rate']:.0f}" if r["ramp_rate"] else "—",
            f"{_ms(r['ramp_server_cpu_ms'])}",
            f"{r['ramp_server_cpu'] * 100:.0f}% / {r['ramp_clients_cpu'] * 100:.0f}% / {r['ramp_machine'] * 100:.0f}%"
            if r["ramp_server_cpu"] is not None else "—",
        ])
    table = markdown_table(
        ["cards in use (open, polling)", "server RSS MiB", "RSS per card KiB", "server fds",
         "new insert p50 / p95 / p99 ms (connect+handshake+insert)", "insert exchange only p50 / p95 ms", "probes",
         "polls/s answered of offered", "poll RTT p50 / p99 ms", "poll failures + lost", "window CPU: server / machine",
         "ramp inserts/s", "server CPU ms per ramp insert", "ramp CPU: server / clients / machine"],
        rows,
    )
    lines = [table, ""]
    rss0 = res.get("rss0_kb")
    lines.append(f"Server RSS with no card in use (after a warm-up of {res['probes_per_step']} inserts): "
                 f"{rss0 / 1024:.1f} MiB; RSS per card = (RSS - that) / cards in use." if rss0 else "")
    lines.append(f"Largest number of cards held in use with polling running: **{res.get('max_in_use', 0):,}**"
                 + (f" (goal 10,000; stopped: {res['stopped']})" if res.get("stopped") else
                    f" (every planned step reached: {', '.join(f'{s:,}' for s in res['steps_planned'])})") + ".")
    rows_ = res["rows"]
    if res.get("stopped") and rows_ and rows_[-1].get("rss_per_card_kb"):
        per = rows_[-1]["rss_per_card_kb"]
        lines.append(f"Arithmetic, not a measurement: at {per:.1f} KiB per card, 10,000 cards in use would add about "
                     f"{per * 10000 / 1024:.0f} MiB to the server's RSS, and need 10,000 of its "
                     f"{res.get('server_nofile', '?').split('/')[0]} file descriptors.")
    if res.get("nofile_note"):
        lines.append(f"20,000 cards: {res['nofile_note']}.")
    for r in rows_:
        if r.get("poll_cpu_ms") is not None:
            lines.append(f"{r['open']:,} cards, polls alone ({r['quiet_s']:.1f} s, no insert): the server used "
                         f"{r['quiet_server_cpu'] * 100:.0f}% of one CPU for {r['quiet_polls'] / r['quiet_s']:,.0f} "
                         f"polls/s: **{r['poll_cpu_ms']:.3f} ms of server CPU per poll** (timers and epoll included).")
    st = res.get("storm")
    if st:
        rsa_ms = 1000 / st["rsa_decrypt_per_s"]
        lines.append(
            f"**Reconnect storm**: the server restarted (SIGTERM, the same command on the same port: "
            f"{st['restart_s']:.1f} s) with {st['cards']:,} cards in use; every card connected again and ATTACHed "
            f"with its insert secret, {st['concurrency']} at a time over all clients, polling again once back. "
            f"{st['back']:,} of {st['cards']:,} back"
            + (f" ({st['left']:,} not within the time left)" if st["left"] else "")
            + f"; half after {st['half_back_s'] or 0:.1f} s, all after {st['all_back_s'] or 0:.1f} s "
            f"({st['rate'] or 0:,.0f} reconnects/s); the server used {(st['server_cpu_share'] or 0) * 100:.0f}% of one "
            f"CPU, {st['server_cpu_ms'] or 0:.2f} ms per reconnect = {(st['server_cpu_ms'] or 0) / rsa_ms:.2f}× one "
            f"RSA-{st['rsa_bits']} decrypt ({rsa_ms:.2f} ms, measured beside it; the RSA floor of a reconnect); the "
            f"machine {st['machine'] * 100:.0f}% busy. Meanwhile the cards already back answered "
            f"{st['polls_answered']:,} polls ({st['polls_failed']} failed), p50 / p99 "
            f"{st['poll_p50_ms'] or 0:.1f} / {st['poll_p99_ms'] or 0:.1f} ms"
            + (f"; failed attempts (retried): {', '.join(f'{k} x{v}' for k, v in st['errors'].items())}"
               if st["errors"] else "") + ".")
    lines.append("CPU columns: the share of ONE CPU used by the server process (and, during the ramp, by the client "
                 "processes together), and how busy the whole machine (all CPUs) was; a machine at 100 % with a "
                 "server well below 100 % of one CPU means the server was mostly waiting for a CPU (other load on "
                 "the machine) or for the disk.")
    lines.append(f"Enrolment of {res.get('enrolled', 0):,} records through the Store API took "
                 f"{res.get('enrol_s', 0):.1f} s; the disk does {res['fsync_per_s']:,.0f} fdatasync/s "
                 f"(every insert is one SQLite commit, the check-out, after a plain read). "
                 f"RLIMIT_NOFILE: server {res.get('server_nofile', '?')}, clients "
                 f"{'/'.join(map(str, res.get('client_nofile') or ['?']))}. Capacity part: {res.get('elapsed_s', 0):.0f} s "
                 f"of a {res['budget_s']:.0f} s budget.")
    return "\n".join(line for line in lines if line is not None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--twistd"]:
        twistd_main(argv[1:])
        return 0
    if argv[:1] == ["--worker"]:
        worker_main()
        return 0
    ap = argparse.ArgumentParser(prog="bench/capacity.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="steps 300, 800 within 40 s")
    ap.add_argument("--steps", help="comma-separated numbers of cards in use, e.g. 1000,2000,5000,10000")
    ap.add_argument("--budget", type=float, help="seconds for the whole capacity part (default 215; quick 40)")
    ap.add_argument("--poll", type=float, help="seconds between a card's polls (default 5; quick 3)")
    ap.add_argument("--clients", type=int, default=None, help=f"client processes (default {CLIENTS}; --quick 2)")
    ap.add_argument("--probes", type=int, help="new inserts timed per step (default 40; quick 10)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    args = ap.parse_args(argv)
    steps = tuple(int(x) for x in args.steps.split(",")) if args.steps else None
    res = run(args.quick, steps, args.budget, args.poll, args.clients, args.probes, args.keep,
              progress=lambda m: print(m, file=sys.stderr, flush=True))
    print(f"# vsc capacity — one vsc-server process, SQLite, RSA-{KEY_BITS} server key\n")
    print(report(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
