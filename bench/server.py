"""
Benchmark of the VSC Server: insert + remove cycles per second over loopback,
with the server's cryptographic and database floors measured in the same run.

    .venv/bin/python bench/server.py [--quick] [--key-bits 3072] [--cards 1,10,50]
                                     [--backends sqlite,postgresql] [--keep]

This is a benchmark, not a test: it asserts nothing beyond "the cycles worked"
(failed cycles are counted and shown in the table).

Set-up. Real ``twistd -n vsc-server`` processes (the production entry point,
default settings: 8 database threads, master-key implementation
authentication, forward secrecy ``prefer``) listen on
``tcp:0:interface=127.0.0.1``; the port is read from the server's log. Nothing
leaves 127.0.0.1. The server key is generated once per run (3072 bits unless
``--key-bits``) and shared by every data directory. Four server
configurations:

* ``sqlite x1``: one process, the embedded SQLite database (WAL, synchronous=FULL);
* ``sqlite x2``: two processes on the SAME data directory and SQLite file;
* ``postgresql x1`` / ``x2``: one or two processes sharing one database of a
  private PostgreSQL cluster started by this script (vsc/devtools/pg.py: fsync on,
  synchronous_commit on, listening on 127.0.0.1 only).

With two server processes each listens on its own port; card i talks to
server i mod 2.

The cards. Every simulated card has its own serial, enrolled beforehand
through the Store API (``Store.issue`` + ``Store.enrol``, not timed), with a
2 KiB opaque protected blob. Each card runs a loop of cycles; one cycle is

    new TCP connection + protected channel handshake (vsc.card.connect.connect)
    + insert (vsc.card.ops.insert: challenge, password scrypt, Master-key
      answer, check-out; returns the protected blob)
    + remove (vsc.card.ops.remove: uploads a 2 KiB blob, check-in)
    + close.

The password KDF is scrypt at a LOW cost, log2(N) = 10 (r = 8, p = 1), for
the benchmark: it is the card's cost (client side), not the server's; the
default for real cards is log2(N) = 15, about 30 times more client CPU per
insert. The card does not decrypt or re-encrypt its blob (a few µs of AES).

Client load placement. The cards run in two long-lived client processes
(``bench/server.py --worker``, Twisted reactor each), started once; the cards
of a cell are split round-robin between them (N = 1 uses one). Neither the
clients, the servers nor PostgreSQL are pinned to a core: the OS schedules them
all on the machine's cores, so on a 2-core machine the clients compete with the
servers. The table therefore also shows the CPU time each side used per cycle
(from /proc, during the measured window) and how busy the whole machine was.

Measured per (configuration, N cards): a warm-up, then a fixed window; a cycle
counts when it completes inside the window. cycles/s = counted cycles / window;
latencies are per counted cycle (p50, p95). A request answered BUSY (the
serial's lease held, [0081]) is retried after 1-20 ms, as a real card must,
and counted in the "BUSY retries" column; a cycle that fails otherwise is
counted under "failed cycles" and the card is recovered (Figure 12) before it
goes on. The CPU columns come from /proc: CPU seconds used during the window by
the server processes, the client processes and (PostgreSQL) the postmaster and
its backends, per counted cycle; "CPU used" compares what this benchmark's
processes used with what the whole machine used (a gap is somebody else's load).

The floors, measured in this process while no server runs:

* RSA-OAEP-SHA256 decryptions/s with the same server key, single thread,
  through vsc.crypto.RSAPrivateKey.oaep_decrypt (every cycle costs the server
  exactly one; "ratio" = cycles/s / this floor);
* the bare database cost through the Store API directly, single thread:
  check-out + check-in pairs/s (the two transactions that change the card's
  state), and the whole per-cycle store sequence the server performs (load,
  check-out, check-in: nothing is held between them) per second;
* the disk under it: 4 KiB appends + fdatasync per second (what a durable
  commit costs).

Every floor is the median of 3 windows. Every process started here (servers,
client workers, PostgreSQL) is stopped in a ``finally``; the temporary
directory is deleted unless ``--keep``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a script: make ``bench`` and ``vsc`` importable from the checkout
    sys.path.insert(0, str(ROOT))

from vsc.devtools.process import Child, ProcessFailed, VscServer  # noqa: E402

PASSWORD = "benchmark password"
KDF_LOG2_N = 10
PROTECTED_SIZE = 2048
WORKERS = 2
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------- small helpers


def rate(fn, budget: float, repeats: int = 3, cpu: bool = False) -> float:
    """
    Operations per second of ``fn()``: the median of ``repeats`` windows of
    ``budget / repeats`` seconds each (after one warm-up call); a median resists a
    neighbour's burst of CPU or disk use on a shared machine. With ``cpu`` (a
    single-threaded CPU floor, such as one RSA decrypt) the operations are divided
    by the CPU time this thread spent, not the wall time, so time spent waiting
    for a CPU the machine's other load holds does not lower the floor; without it
    (anything that waits for a disk) by the wall time.
    """
    fn()
    rates = []
    for _ in range(repeats):
        n = 0
        start, cpu0 = time.perf_counter(), time.thread_time()
        deadline = start + budget / repeats
        while True:
            fn()
            n += 1
            now = time.perf_counter()
            if now >= deadline and n >= 3:
                break
        spent = time.thread_time() - cpu0 if cpu else now - start
        rates.append(n / (spent if spent > 0 else now - start))
    return statistics.median(rates)


def fsync_rate(directory: Path, budget: float) -> float:
    """Small appends + fdatasync per second in ``directory`` (what one durable commit costs the disk)."""
    path = directory / "fsync-probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        block = os.urandom(4096)

        def one() -> None:
            os.write(fd, block)
            os.fdatasync(fd)

        return rate(one, budget)
    finally:
        os.close(fd)
        path.unlink()


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, int(round(q * len(sorted_values) + 0.5)) - 1))
    return sorted_values[k]


def fmt(x: float | None, digits: int | None = None) -> str:
    if x is None or x != x:
        return "—"
    if digits is not None:
        return f"{x:.{digits}f}"
    if x >= 100:
        return f"{x:,.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    out = ["| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |",
           "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    for r in rows:
        out.append("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
    return "\n".join(out)


def proc_ticks(pid: int) -> int:
    """utime + stime of one process, in clock ticks (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, IndexError, ValueError):
        return 0


def children_of(ppid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == ppid:
                        out.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return out


def machine_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of the whole machine since boot."""
    with open("/proc/stat") as f:
        vals = [int(v) for v in f.readline().split()[1:]]
    total = sum(vals[:8])
    idle = vals[3] + vals[4]
    return total - idle, total


def machine_line() -> str:
    import platform

    try:
        from cryptography.hazmat.backends.openssl import backend

        ssl = backend.openssl_version_text()
    except Exception:  # noqa: BLE001 - informational only
        ssl = "OpenSSL ?"
    return (f"Python {platform.python_version()}, {ssl}, {os.cpu_count()} CPU(s), "
            f"{platform.machine()} {platform.system()}")


def card_channel_config(suite: str | None = None):
    """The cards' channel policy: the default one, or offering only ``suite`` (des-cbc-md5 needs allow_insecure)."""
    from vsc.protocol.suites import INSECURE_SUITES, ChannelConfig
    from vsc.wire.messages import Suite

    if not suite:
        return ChannelConfig()
    chosen = Suite.from_label(suite)
    return ChannelConfig(suites=(chosen,), allow_insecure=chosen in INSECURE_SUITES)


# ---------------------------------------------------------------- the client worker (a separate process)


def worker_main() -> None:
    """Long-lived client process: one JSON command per stdin line, one JSON result per stdout line."""
    from collections import Counter

    from twisted.internet import reactor, stdio
    from twisted.internet.defer import ensureDeferred
    from twisted.internet.task import deferLater
    from twisted.protocols.basic import LineReceiver

    from vsc.card import ops
    from vsc.card.connect import connect
    from vsc.protocol.auth import DEFAULT_MASTER_KEY
    from vsc.wire.ops import Status

    from bench._util import describe_failure as describe

    async def run_cell(cmd: dict) -> dict:
        fp, warm, start, end = cmd["fp"], cmd["warm"], cmd["start"], cmd["end"]
        channel = card_channel_config(cmd.get("suite"))
        latencies: list[float] = []
        errors: Counter = Counter()
        busy: Counter = Counter()
        attempted = 0

        async def busy_retry(what: str, call):
            """BUSY means another operation holds the serial's lease: wait a moment and ask again."""
            for attempt in range(200):
                try:
                    return await call()
                except ops.OperationRefused as e:
                    if e.status is not Status.BUSY:
                        raise
                    busy[what] += 1
                    await deferLater(reactor, min(0.001 * (attempt + 1), 0.02), lambda: None)
            raise ops.OperationRefused(Status.BUSY, f"{what} (200 retries)")

        async def card_loop(serial: str, endpoint: str) -> None:
            nonlocal attempted
            muk = os.urandom(32)  # this "machine"'s unique key
            blob = os.urandom(PROTECTED_SIZE)
            while time.time() < end:
                t0 = time.perf_counter()
                attempted += 1
                proto = None
                try:
                    proto = await connect(reactor, endpoint, fp, channel)
                    secret = os.urandom(32)
                    result, _ = await busy_retry("insert", lambda: ops.insert(
                        proto, serial, PASSWORD, muk, secret, DEFAULT_MASTER_KEY))
                    await busy_retry("remove", lambda: ops.remove(proto, serial, secret, result.version, blob))
                except Exception as e:  # noqa: BLE001 - counted and shown
                    errors[describe(e)] += 1
                    if proto is not None and not proto.channel.closed:
                        proto.closeChannel()
                    await deferLater(reactor, 0.05, lambda: None)  # no hot loop on a failing server
                    await recover(serial, endpoint, muk)
                    continue
                proto.closeChannel()
                t1 = time.perf_counter()
                done = time.time()
                if start <= done <= end:
                    latencies.append((t1 - t0) * 1000.0)

        async def recover(serial: str, endpoint: str, muk: bytes) -> None:
            """After a failed cycle the card may be left in use: recover it (Figure 12) from this machine."""
            try:
                proto = await connect(reactor, endpoint, fp, channel)
                try:
                    await busy_retry("recover", lambda: ops.recover(proto, serial, PASSWORD, muk, DEFAULT_MASTER_KEY))
                    errors["(recovered after the failure)"] += 1
                finally:
                    proto.closeChannel()
            except ops.OperationRefused as e:
                if e.status is not Status.NOT_IN_USE:
                    errors[f"recover: {describe(e)}"] += 1
            except Exception as e:  # noqa: BLE001
                errors[f"recover: {describe(e)}"] += 1

        delay = max(0.0, warm - time.time())
        await deferLater(reactor, delay, lambda: None)
        from twisted.internet.defer import gatherResults

        await gatherResults([ensureDeferred(card_loop(s, ep)) for s, ep in cmd["cards"]], consumeErrors=True)
        return {"latencies": latencies, "errors": dict(errors), "busy": dict(busy), "attempted": attempted}

    class Control(LineReceiver):
        delimiter = b"\n"
        MAX_LENGTH = 1 << 20

        def connectionMade(self) -> None:
            self.sendLine(b'{"ready": true}')

        def lineReceived(self, line: bytes) -> None:
            cmd = json.loads(line)
            if cmd.get("cmd") == "quit":
                reactor.stop()
                return
            d = ensureDeferred(run_cell(cmd))
            d.addErrback(lambda f: {"latencies": [], "errors": {f"worker failure: {f.getErrorMessage()}": 1},
                                    "attempted": 0})
            d.addCallback(lambda res: self.sendLine(json.dumps(res).encode()))

        def connectionLost(self, reason=None) -> None:
            if reactor.running:
                reactor.stop()

    stdio.StandardIO(Control())
    reactor.run()


class Worker(Child):
    """
    A client process (``SCRIPT --worker``, this file unless told): one JSON
    command per stdin line, one JSON answer per stdout line, stderr in
    ``LOGDIR/NAME-INDEX.log``; started at once.
    """

    def __init__(self, logdir: Path, index: int, script: Path | None = None, name: str = "worker"):
        super().__init__([sys.executable, str(script or Path(__file__).resolve()), "--worker"],
                         logdir / f"{name}-{index}.log", name=f"client {name} {index}", cwd=ROOT, pipes=True)
        self.spawn()

    def wait_ready(self, timeout: float = 30.0) -> None:
        line = self.readline(timeout)
        if not line or not json.loads(line).get("ready"):
            raise RuntimeError(f"a client worker did not start (see {self.log_path})")

    def send(self, obj: dict) -> None:
        self.write_line(json.dumps(obj).encode())

    def stop(self, timeout: float = 5.0, sig: int = signal.SIGTERM, grace: float = 5.0) -> int | None:
        """Ask it to quit, then stop it (SIGTERM, SIGKILL) if it has not within ``grace`` seconds."""
        if self.running():
            with contextlib.suppress(OSError):
                self.send({"cmd": "quit"})
        return super().stop(timeout, sig, grace)


# ---------------------------------------------------------------- servers


class ServerProcess(VscServer):
    """One ``twistd -n vsc-server`` on 127.0.0.1 (port 0, read from its log), started at once."""

    def __init__(self, data_dir: Path, log_path: Path, launcher: list[str] | None = None, env: dict | None = None):
        super().__init__(data_dir, log_path, 0, launcher=launcher, env=env)
        self.spawn()

    def wait_port(self, *args, **kw) -> int:
        """``wait_port([timeout])``: wait until listening, return the port. (VscServer's own ``wait_port(port,
        timeout)``, which ``wait_listening`` calls on a restart, is passed through.)"""
        if len(args) + len(kw) >= 2 or "port" in kw:
            return super().wait_port(*args, **kw)
        timeout = args[0] if args else kw.get("timeout", 30.0)
        try:
            self.wait_listening(timeout)
        except ProcessFailed as e:
            raise RuntimeError(f"vsc-server did not start: {e.reason}\n{self.log_text()[-2000:]}") from None
        return self.port


def pg_cluster():
    """The benchmarks' private PostgreSQL cluster (not started): fsync and synchronous_commit on."""
    from vsc.devtools.pg import Cluster

    return Cluster(settings={"max_connections": "100", "shared_buffers": "64MB"}, prefix="vsc-bench-pg-")


# ---------------------------------------------------------------- data directories and cards


#: The benchmarks' many simulated machines all connect from 127.0.0.1: that one source must not be admitted
#: like a handshake flood (vsc.server.admission; tests/servers.py MANY_MACHINES). bench/flood.py floods on purpose
#: with the defaults.
MANY_MACHINES = {"handshakes_per_second": 100000, "handshake_burst": 100000,
                 "max_unauthenticated_per_source": 100000, "max_unauthenticated": 100000,
                 "max_pending_handshakes": 100000}


def write_settings(data_dir: Path, settings: dict) -> None:
    """``settings`` written into the [server] section of DIR/vsc-server.ini."""
    import configparser

    path = data_dir / "vsc-server.ini"
    parser = configparser.ConfigParser()
    parser.read(path)
    for k, v in settings.items():
        parser["server"][k] = str(v)
    with open(path, "w") as f:
        parser.write(f)


def make_data_dir(base: Path, name: str, key_pem: bytes | None, database: str, key_bits: int,
                  settings: dict | None = None) -> Path:
    """A server data directory; ``settings`` (default MANY_MACHINES) written into its vsc-server.ini."""
    d = _make_data_dir(base, name, key_pem, database, key_bits)
    write_settings(d, MANY_MACHINES if settings is None else settings)
    return d


def _make_data_dir(base: Path, name: str, key_pem: bytes | None, database: str, key_bits: int) -> Path:
    from vsc.server import config

    d = base / name
    if key_pem is None:
        config.init(d, database=database, key_bits=key_bits)
        return d
    # same key as the first data dir: copy it and write the config as init does
    config.init(d, database=database, key_bits=2048)  # writes the config; the key is replaced below
    key_path = d / config.KEY_NAME
    key_path.unlink()
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_pem)
    return d


def open_store(url: str):
    from vsc.server.store import Store

    store = Store(url, time.time)
    store.migrate()
    return store


def enrol_cards(store, serials: list[str]) -> None:
    """Enrol through the Store API (the server would do the same after an EnrolRequest)."""
    from vsc.card import ops
    from vsc.protocol import auth
    from vsc.protocol.cardstore import EnrolCard
    from vsc.server.policy import Policy, new_enrolment_code
    from vsc.wire.ops import Status

    info = Policy().initial_auth_info()
    for serial in serials:
        kdf = ops.new_kdf(os.urandom, log2_n=KDF_LOG2_N)
        keys = ops.derive_keys(PASSWORD, kdf)
        code = new_enrolment_code()
        store.issue(serial, auth.code_hash(code), info, 3600)
        outcome = store.enrol(EnrolCard(serial, auth.code_hash(code), auth.verifier_for(keys.auth_key, kdf.alg),
                                        kdf.encode(), os.urandom(PROTECTED_SIZE), b"", {}, "bench"))
        if outcome.status is not Status.OK:
            raise RuntimeError(f"enrolling {serial} through the Store failed")


def db_floor(store, serial: str, budget: float) -> tuple[float, float]:
    """(check-out+check-in pairs/s, whole per-cycle store sequences/s: load, check-out, check-in), single thread."""
    from vsc.protocol.cardstore import CheckIn, CheckOut, LoadCard
    from vsc.wire.ops import Status

    muk = os.urandom(32)
    blob = os.urandom(PROTECTED_SIZE)
    verifier = store.get(serial).verifier  # what the answer was checked against
    channel = {"suite": "bench", "peer": "bench"}

    def cycle(load: bool) -> None:
        session = os.urandom(32)
        if load:  # the plain read the challenge is made from
            assert store.load_card(LoadCard(serial)) is not None
        out = store.check_out(CheckOut(serial, muk, session, channel, "bench", verifier))
        assert out.status is Status.OK, out.status
        back = store.check_in(CheckIn(serial, session, out.version, blob, "bench"))
        assert back.status is Status.OK, back.status

    def pair() -> None:
        cycle(load=False)

    def sequence() -> None:
        cycle(load=True)

    return rate(pair, budget), rate(sequence, budget)


# ---------------------------------------------------------------- one cell


def run_cell(workers: list[Worker], servers: list[ServerProcess], fp: str, serials: list[str],
             warmup: float, window: float, extra_pids: list[int], suite: str | None = None) -> dict:
    """One cell; ``suite`` (a label such as "chacha20-poly1305"): the cards offer only that suite."""
    shares: list[list] = [[] for _ in workers]
    for i, serial in enumerate(serials):
        shares[i % len(workers)].append([serial, servers[i % len(servers)].endpoint])
    active = [(w, share) for w, share in zip(workers, shares) if share]
    warm = time.time() + 0.3
    start = warm + warmup
    end = start + window
    for w, share in active:
        w.send({"cmd": "run", "fp": fp, "warm": warm, "start": start, "end": end, "cards": share, "suite": suite})

    server_pids = [s.pid for s in servers]
    client_pids = [w.pid for w, _ in active]

    def sample():
        pg = [p for ppid in extra_pids for p in [ppid, *children_of(ppid)]]
        return ({p: proc_ticks(p) for p in server_pids}, {p: proc_ticks(p) for p in client_pids},
                {p: proc_ticks(p) for p in pg}, machine_ticks())

    time.sleep(max(0.0, start - time.time()))
    before = sample()
    time.sleep(max(0.0, end - time.time()))
    after = sample()

    latencies: list[float] = []
    errors: dict[str, int] = {}
    busy: dict[str, int] = {}
    attempted = 0
    lost = []
    for w, _ in active:
        line = w.readline(timeout=max(30.0, window * 4))
        if line is None:
            errors["client worker gave no result in time"] = errors.get("client worker gave no result in time", 0) + 1
            lost.append(w)
            continue
        res = json.loads(line)
        latencies += res["latencies"]
        attempted += res["attempted"]
        for k, v in res["errors"].items():
            errors[k] = errors.get(k, 0) + v
        for k, v in res.get("busy", {}).items():
            busy[k] = busy.get(k, 0) + v

    def spent(i: int) -> float:
        b, a = before[i], after[i]
        return sum(max(0, a.get(p, 0) - b.get(p, 0)) for p in a) / CLK_TCK

    latencies.sort()
    n = len(latencies)
    machine = (after[3][0] - before[3][0]) / max(1, after[3][1] - before[3][1])
    ours = (spent(0) + spent(1) + spent(2)) / (window * (os.cpu_count() or 1))
    return {
        "cycles": n,
        "rate": n / window,
        "p50": percentile(latencies, 0.50),
        "p95": percentile(latencies, 0.95),
        "server_cpu_ms": spent(0) * 1000 / n if n else None,
        "client_cpu_ms": spent(1) * 1000 / n if n else None,
        "db_cpu_ms": (spent(2) * 1000 / n if n else None) if extra_pids else None,
        "machine": machine,
        "ours": ours,
        "busy": busy,
        "errors": errors,
        "attempted": attempted,
        "lost": lost,
    }


# ---------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short windows (whole run under ~40 s)")
    ap.add_argument("--key-bits", type=int, default=3072, choices=(2048, 3072, 4096))
    ap.add_argument("--cards", default="1,10,50", help="comma-separated numbers of concurrent cards")
    ap.add_argument("--backends", default="sqlite,postgresql")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (logs) and print its path")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker_main()
        return 0

    cards = [int(x) for x in args.cards.split(",") if x.strip()]
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if args.quick:
        warmup, window, floor_budget, db_budget = 0.3, 1.2, 0.6, 0.4
    else:
        warmup, window, floor_budget, db_budget = 1.0, 6.0, 2.0, 1.0

    from vsc import crypto
    from vsc.server import config

    t_run = time.monotonic()
    base = Path(tempfile.mkdtemp(prefix="vsc-bench-server-"))
    workers: list[Worker] = []
    servers: list[ServerProcess] = []
    cluster = None
    stores = []
    rows: list[list[str]] = []
    notes: list[str] = []
    try:
        workers = [Worker(base, i) for i in range(WORKERS)]  # they import while we set up
        # ---- the server key and the RSA floor (nothing else running)
        first = make_data_dir(base, "sqlite", None, "", args.key_bits)
        key_pem = (first / config.KEY_NAME).read_bytes()
        key = crypto.RSAPrivateKey.from_pem(key_pem)
        fp = key.public_key().fingerprint()
        for w in workers:
            w.wait_ready()
        ct = key.public_key().oaep_encrypt(os.urandom(64), os.urandom)
        rsa_floor = rate(lambda: key.oaep_decrypt(ct), floor_budget, cpu=True)
        fsyncs = fsync_rate(base, db_budget)

        db_floors: list[str] = []
        for backend in backends:
            if backend == "sqlite":
                data_dir = first
                url = config.load(data_dir).database_url
                pg_pids: list[int] = []
            elif backend == "postgresql":
                from vsc.devtools.pg import unavailable

                why = unavailable()
                if why:
                    notes.append(f"PostgreSQL skipped: {why}")
                    continue
                cluster = pg_cluster().start()
                url = cluster.create_database("vsc_bench")
                data_dir = make_data_dir(base, "postgresql", key_pem, url, args.key_bits)
                pg_pids = [p for p in [cluster.postmaster_pid()] if p]
            else:
                raise SystemExit(f"unknown backend {backend!r}")

            # ---- enrol every card of every cell, and the bare database cost
            store = open_store(url)
            stores.append(store)
            plan = [(procs, n) for procs in (1, 2) for n in cards]
            serials = {(p, n): [f"{backend[:2]}{p}x{n}-{i:03d}" for i in range(n)] for p, n in plan}
            enrol_cards(store, [s for ss in serials.values() for s in ss] + ["floor"])
            pair_rate, seq_rate = db_floor(store, "floor", db_budget)
            store.close()
            db_floors.append(
                f"- {backend}: {pair_rate:,.0f} check-out+check-in pairs/s; {seq_rate:,.0f} whole per-cycle store "
                f"sequences/s (load, check-out, check-in), single thread"
            )

            for procs in (1, 2):
                label = f"{backend} x{procs}" + (" (same file)" if backend == "sqlite" and procs == 2 else "")
                servers = [ServerProcess(data_dir, base / f"{backend}-{procs}-{i}.log") for i in range(procs)]
                try:
                    for s in servers:
                        s.wait_port()
                    for n in cards:
                        r = run_cell(workers, servers, fp, serials[(procs, n)], warmup, window, pg_pids)
                        for w in r["lost"]:  # a stuck worker would hand its late answer to the next cell
                            i = workers.index(w)
                            w.stop()
                            workers[i] = Worker(base, len(workers) + i)
                            workers[i].wait_ready()
                        err = ", ".join(f"{k} x{v}" for k, v in sorted(r["errors"].items())) or "0"
                        busy = ", ".join(f"{k} {v}" for k, v in sorted(r["busy"].items())) or "0"
                        rows.append([
                            label, str(n), fmt(r["rate"]),
                            f"{fmt(r['p50'], 1)} / {fmt(r['p95'], 1)}",
                            f"{rsa_floor:,.0f}", fmt(r["rate"] / rsa_floor, 3),
                            fmt(r["server_cpu_ms"], 2), fmt(r["client_cpu_ms"], 2), fmt(r["db_cpu_ms"], 2),
                            f"{r['ours'] * 100:.0f}% / {r['machine'] * 100:.0f}%", busy, err,
                        ])
                        print(f"  {label}, {n} cards: {r['rate']:.1f} cycles/s", file=sys.stderr, flush=True)
                finally:
                    for s in servers:
                        s.stop()
                    servers = []
            if cluster is not None and backend == "postgresql":
                cluster.stop()
                cluster = None

        # ---- report
        headers = ["config", "cards", "cycles/s", "p50 / p95 cycle latency ms", "floor (RSA decrypts/s)", "ratio",
                   "server CPU ms/cycle", "client CPU ms/cycle", "postgres CPU ms/cycle",
                   "CPU used: bench / machine", "BUSY retries", "failed cycles"]
        print(f"# vsc server benchmark{' (--quick)' if args.quick else ''}\n")
        print(machine_line())
        print(f"server key RSA-{key.bits}; every cycle = new channel (forward secrecy 'prefer': X25519 used) + "
              f"insert + remove of a {PROTECTED_SIZE}-byte blob + close")
        print(f"password KDF: scrypt log2(N)={KDF_LOG2_N}, r=8, p=1 — a LOW cost chosen for the benchmark; it is "
              f"client-side (card) cost only (real cards default to log2(N)=15)")
        print(f"clients: {WORKERS} client processes, cards split round-robin; nothing pinned to a core "
              f"(clients, servers and PostgreSQL share the {os.cpu_count()} CPUs)")
        print(f"per cell: {warmup:g} s warm-up, {window:g} s measured window; ratio = cycles/s / RSA floor "
              f"(single thread, same key)\n")
        print(markdown_table(headers, rows))
        print("\nBare database cost through the Store API (no server), and the disk under it:")
        print("\n".join(db_floors))
        print(f"- the disk: {fsyncs:,.0f} fdatasync/s (4 KiB appends in the run's temporary directory)")
        if any(r[-2] != "0" for r in rows):
            print("\nBUSY retries: requests answered BUSY (the serial's operation lease was held), which the "
                  "cards retried after 1-20 ms, as a real card must; the retries are part of the cycle latency. "
                  "With one card per serial, a BUSY can only come from the lease of the card's own previous "
                  "operation still being held when its next request arrives.")
        print("\n'CPU used' is the share of all CPUs used during the window by this benchmark's processes "
              "(servers, clients, PostgreSQL) / by the whole machine: a gap means other load on the machine.")
        for note in notes:
            print(f"\n{note}")
        print(f"\n(total run time {time.monotonic() - t_run:.0f} s)")
        return 0
    finally:
        for s in servers:
            s.stop()
        for w in workers:
            w.stop()
        for st in stores:
            st.close()
        if cluster is not None:
            cluster.stop()
        if args.keep:
            print(f"logs kept in {base}", file=sys.stderr)
        else:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
