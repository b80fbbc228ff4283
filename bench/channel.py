"""
Benchmark of the protected channel (Figure 7, [0078]) over real loopback TCP,
with the cryptographic floor measured in the same run.

    .venv/bin/python bench/channel.py [--quick] [--key-bits 3072] [--in-process]

This is a benchmark, not a test: it asserts only that every channel got the
suite and forward-secrecy mode it asked for.

Set-up. The VSC Server (``vsc.server.service.server_factory``) runs in a
separate Python process started by this script, listening on
``tcp:0:interface=127.0.0.1``; it enables all four suites (``allow_insecure``)
with forward secrecy ``prefer``. The cards (``vsc.card.connect.connect``) run in
this process under the Twisted reactor and offer exactly one suite, with
forward secrecy ``off`` or ``require``, so every cell of the table is one
(suite, forward secrecy) pair. Card and server thus use one core each, as they
would on two machines. ``--in-process`` puts the server in the card's reactor
instead (one core does both ends' work). Nothing leaves 127.0.0.1.

Measured per (suite, forward secrecy), each for a fixed time budget:

* handshakes/s, sequential (connect, handshake, close; one at a time) and with
  4 concurrent connections (4 such loops interleaved);
* sealed-record round trips/s on one established channel: card sends an
  EchoRequest of 64 bytes or 4 KiB, the server's channel answers EchoReply;
* the same handshake and 64-byte round trip in memory through the sans-IO
  channels alone (no Twisted, no TCP), to separate protocol cost from I/O cost.

The floor, measured in this process before the server starts:

* RSA-OAEP-SHA256 decryptions/s (``vsc.crypto``, OpenSSL) at the server's key
  size and at 2048 bits, and the card's OAEP encryptions/s (pycryptodome);
* record seals/s and opens/s of each suite's record cipher (``vsc.crypto``)
  for 64-byte and 4 KiB plaintexts, from which the cipher-only round-trip
  floor is 1 / (2 x seal + 2 x open);
* X25519 key generation + exchange per second.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``bench`` and ``vsc`` importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._util import fmt_rate, fmt_ratio, machine_line, markdown_table, rate  # noqa: E402

CONCURRENCY = 4
REPEATS = 3  # every figure is the median of this many windows
ECHO_SIZES = (64, 4096)


# ---------------------------------------------------------------- configuration


def suites():
    from vsc.wire.messages import Suite

    return (Suite.AES256_GCM, Suite.CHACHA20_POLY1305, Suite.AES256_CBC_HMAC_SHA256, Suite.DES_CBC_MD5)


def server_config():
    from vsc.protocol.suites import ChannelConfig, ForwardSecrecy

    return ChannelConfig(suites=suites(), allow_insecure=True, forward_secrecy=ForwardSecrecy.PREFER)


def card_config(suite, forward_secret: bool):
    from vsc.protocol.suites import INSECURE_SUITES, ChannelConfig, ForwardSecrecy

    return ChannelConfig(
        suites=(suite,),
        allow_insecure=suite in INSECURE_SUITES,
        forward_secrecy=ForwardSecrecy.REQUIRE if forward_secret else ForwardSecrecy.OFF,
    )


class Budgets:
    def __init__(self, quick: bool):
        if quick:
            self.tcp, self.sansio, self.floor = 0.22, 0.08, 0.08
        else:
            self.tcp, self.sansio, self.floor = 1.4, 0.4, 0.3


# ---------------------------------------------------------------- the floor


def measure_floor(key_bits_list, keys, budget: float) -> dict:
    from vsc import crypto
    from vsc.wire import CARD_TO_SERVER, record_aad, seq_bytes

    out: dict = {"rsa_decrypt": {}, "rsa_encrypt": {}, "seal": {}, "open": {}}
    plaintext = os.urandom(128)  # the size of r1 || r2 || s1 || s2
    for bits in key_bits_list:
        key = keys[bits]
        pub = key.public_key()
        ct = pub.oaep_encrypt(plaintext, os.urandom)
        out["rsa_decrypt"][bits] = rate(lambda: key.oaep_decrypt(ct), budget * 2, cpu=True)
        out["rsa_encrypt"][bits] = rate(lambda: pub.oaep_encrypt(plaintext, os.urandom), budget, cpu=True)

    seq, aad = seq_bytes(7), record_aad(CARD_TO_SERVER, 7)
    for suite in suites():
        cipher = make_record_cipher(suite)
        for size in ECHO_SIZES:
            pt = os.urandom(size)
            sealed = cipher.seal(seq, pt, aad)
            out["seal"][(suite, size)] = rate(lambda: cipher.seal(seq, pt, aad), budget, cpu=True)
            out["open"][(suite, size)] = rate(lambda: cipher.open(seq, sealed, aad), budget, cpu=True)

    peer = crypto.X25519Ephemeral(os.urandom).public
    out["x25519"] = rate(lambda: crypto.X25519Ephemeral(os.urandom).exchange(peer), budget, cpu=True)
    return out


def make_record_cipher(suite):
    """One direction's record cipher for ``suite``, keyed at random, as derive_keys builds it."""
    from vsc import crypto
    from vsc.wire.messages import Suite

    if suite in (Suite.AES256_GCM, Suite.CHACHA20_POLY1305):
        return crypto.AEADRecordCipher(suite.label, os.urandom(32), os.urandom(12))
    if suite is Suite.AES256_CBC_HMAC_SHA256:
        return crypto.CBCHMACRecordCipher(os.urandom(32), os.urandom(32), os.urandom)
    return crypto.LegacyDESMD5RecordCipher(os.urandom(32), os.urandom(32), os.urandom)


def cipher_rtt_floor(floor: dict, suite, size: int) -> float:
    """Round trips/s if sealing and opening were all a round trip cost: 2 seals + 2 opens."""
    seal, opn = floor["seal"][(suite, size)], floor["open"][(suite, size)]
    return 1.0 / (2.0 / seal + 2.0 / opn)


# ---------------------------------------------------------------- sans-IO (no I/O at all)


def _pump(first_to_card, server, card):
    """Deliver Send effects between two sans-IO channels until quiet; return the card's other effects."""
    from vsc.protocol.channel import Send

    pending = [(card, e) for e in first_to_card]
    others = []
    while pending:
        target, effect = pending.pop(0)
        if isinstance(effect, Send):
            peer = server if target is card else card
            # each Send is one whole frame; receive_frame is the path the Twisted glue uses
            pending += [(peer, e) for e in target.receive_frame(effect.data)]
        elif target is server:  # effects produced by the card
            others.append(effect)
    return others


def sansio_pair(key, fingerprint, suite, forward_secret):
    from vsc.protocol.channel import card_channel, server_channel

    s = server_channel(server_config(), key)
    c = card_channel(card_config(suite, forward_secret), fingerprint)
    c.start()
    _pump(s.start(), s, c)
    if not (s.established and c.established):
        raise RuntimeError(f"in-memory handshake for {suite.label} failed")
    return s, c


def measure_sansio(key, suite, forward_secret, budget: float) -> dict:
    from vsc.protocol.channel import Received
    from vsc.wire.messages import EchoReply, EchoRequest

    fp = key.public_key().fingerprint()
    out = {"handshake": rate(lambda: sansio_pair(key, fp, suite, forward_secret), budget, cpu=True)}
    s, c = sansio_pair(key, fp, suite, forward_secret)
    payload = os.urandom(64)

    def echo():
        (send,) = c.send(EchoRequest(payload))
        (reply,) = s.receive_frame(send.data)
        (got,) = c.receive_frame(reply.data)
        if not isinstance(got, Received) or not isinstance(got.message, EchoReply):
            raise RuntimeError(f"in-memory echo failed: {got}")

    out["echo64"] = rate(echo, budget, cpu=True)
    return out


# ---------------------------------------------------------------- the server process


def serve(key_file: str) -> int:
    """``--serve KEYFILE``: run the benchmark server until stdin closes."""
    from twisted.internet import reactor, stdio
    from twisted.internet.endpoints import serverFromString
    from twisted.internet.protocol import Protocol

    from vsc import crypto
    from vsc.server.service import server_factory

    key = crypto.RSAPrivateKey.from_pem(Path(key_file).read_bytes())
    factory = server_factory(server_config(), key, reactor)

    class StopOnEOF(Protocol):
        def connectionLost(self, reason=None):
            if reactor.running:
                reactor.stop()

    def listening(port):
        sys.stdout.write(f"READY {port.getHost().port}\n")
        sys.stdout.flush()
        stdio.StandardIO(StopOnEOF())

    def failed(f):
        sys.stderr.write(f"bench server: {f.getErrorMessage()}\n")
        reactor.stop()

    serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(factory).addCallbacks(listening, failed)
    reactor.run()
    return 0


class ServerProcess:
    """The benchmark server in a child process (``--serve``), stopped by closing its stdin (then SIGTERM, SIGKILL)."""

    def __init__(self, key):
        from vsc.devtools.process import Child

        self._dir = tempfile.TemporaryDirectory(prefix="vsc-bench-")
        key_path = Path(self._dir.name) / "server-key.pem"
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key.to_pem())
        self.child = Child([sys.executable, str(Path(__file__).resolve()), "--serve", str(key_path)],
                           Path(self._dir.name) / "server.log", name="benchmark server", pipes=True).spawn()
        line = (self.child.readline(60.0) or b"").decode(errors="replace")
        if not line.startswith("READY "):
            said = self.child.tail()
            self.stop()
            raise RuntimeError(f"benchmark server did not start (said {line!r}; {said or 'nothing on stderr'})")
        self.port = int(line.split()[1])

    def stop(self) -> None:
        self.child.close_stdin()
        self.child.stop(timeout=5.0, grace=5.0)
        self._dir.cleanup()


# ---------------------------------------------------------------- over TCP


async def _handshake(reactor, endpoint, fp, cfg, suite, forward_secret):
    from vsc.card.connect import connect
    from vsc.protocol.suites import INSECURE_SUITES

    proto = await connect(reactor, endpoint, fp, cfg)
    # the legacy suite is never forward secret: X25519 only guards its key confirmation (SessionKeys.forward_secret)
    expected_fs = forward_secret and suite not in INSECURE_SUITES
    if proto.info.suite is not suite or proto.info.forward_secret is not expected_fs:
        raise RuntimeError(f"asked for {suite.label} fs={forward_secret}, got {proto.info}")
    return proto


async def _handshake_loop(reactor, endpoint, fp, cfg, suite, forward_secret, deadline) -> int:
    n = 0
    while time.perf_counter() < deadline:
        proto = await _handshake(reactor, endpoint, fp, cfg, suite, forward_secret)
        proto.closeChannel()
        n += 1
    return n


async def _handshakes_per_second(reactor, endpoint, fp, suite, forward_secret, budget, concurrency) -> float:
    """Median over REPEATS windows of ``concurrency`` interleaved connect-handshake-close loops."""
    from twisted.internet.defer import ensureDeferred, gatherResults

    cfg = card_config(suite, forward_secret)
    # warm up: one handshake outside the clock
    (await _handshake(reactor, endpoint, fp, cfg, suite, forward_secret)).closeChannel()
    rates = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        deadline = start + budget / REPEATS
        loops = [
            ensureDeferred(_handshake_loop(reactor, endpoint, fp, cfg, suite, forward_secret, deadline))
            for _ in range(concurrency)
        ]
        counts = await gatherResults(loops, consumeErrors=True)
        rates.append(sum(counts) / (time.perf_counter() - start))
    return statistics.median(rates)


async def _echo_per_second(reactor, endpoint, fp, suite, forward_secret, size, budget) -> float:
    """Median over REPEATS windows of sequential EchoRequest/EchoReply round trips on one channel."""
    from vsc.wire.messages import EchoReply, EchoRequest

    proto = await _handshake(reactor, endpoint, fp, card_config(suite, forward_secret), suite, forward_secret)
    payload = os.urandom(size)
    request = EchoRequest(payload)

    async def one():
        reply = await proto.request(request)
        if not isinstance(reply, EchoReply) or reply.data != payload:
            raise RuntimeError(f"echo over {suite.label} returned {reply!r:.80}")

    for _ in range(3):  # warm up (and get past any first-write Nagle/delayed-ACK stall)
        await one()
    rates = []
    for _ in range(REPEATS):
        n = 0
        start = time.perf_counter()
        deadline = start + budget / REPEATS
        while True:
            await one()
            n += 1
            now = time.perf_counter()
            if now >= deadline:
                break
        rates.append(n / (now - start))
    proto.closeChannel()
    return statistics.median(rates)


def _proc_cpu_s(pid: int) -> float:
    """utime + stime of a process, in seconds (/proc; clock ticks)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def paced_decrypt_ms(reactor, key, count: int, gap: float = 0.005) -> float:
    """
    The RSA-OAEP decrypt floor measured the way the server meets it in
    ``measure_wall_cpu``: one decryption every ``gap`` seconds (the reactor
    idle in between, other processes free to run), thread CPU time per
    decryption in ms. The hot-loop floor (``measure_floor``: back to back,
    caches and the core's vector units warm) is the lower bound; this is
    what one decryption costs at the handshakes' pace on the same machine
    in the same minute (here 1.0-1.3x the hot figure, more under load).
    """
    from twisted.internet import task

    ct = key.public_key().oaep_encrypt(os.urandom(128), os.urandom)
    key.oaep_decrypt(ct)
    spent = 0.0
    for _ in range(count):
        await task.deferLater(reactor, gap, lambda: None)
        t0 = time.thread_time()
        key.oaep_decrypt(ct)
        spent += time.thread_time() - t0
    return spent / count * 1000


async def measure_wall_cpu(reactor, endpoint, fp, server_pid: int, count: int, paced_key=None) -> dict:
    """
    ``count`` sequential handshakes on an idle loopback (connect + the Figure 7
    handshake with the default card settings, X25519 on + close, one at a
    time, 5 ms apart): the median wall time of one, and the CPU time both
    ends spent per handshake over the same span — this process (the card
    side: ``time.process_time``) and the server process (/proc). A wall time
    much above the CPU time is a stall (Nagle + delayed ACK, a timer).
    With ``paced_key`` (the server's key), right after: ``paced_decrypt_ms``
    for as many decryptions (at most 300), as ``paced_decrypt_ms``.
    """
    from twisted.internet import task

    from vsc.card.connect import connect

    for _ in range(3):  # warm up
        (await connect(reactor, endpoint, fp)).closeChannel()
    walls = []
    server0, card0 = _proc_cpu_s(server_pid), time.process_time()
    for _ in range(count):
        t0 = time.perf_counter()
        proto = await connect(reactor, endpoint, fp)
        proto.closeChannel()
        walls.append(time.perf_counter() - t0)
        await task.deferLater(reactor, 0.005, lambda: None)  # let the close finish: the next one starts idle
    server_cpu = (_proc_cpu_s(server_pid) - server0) / count
    card_cpu = (time.process_time() - card0) / count
    walls.sort()
    out = {"count": count, "wall_ms": statistics.median(walls) * 1000, "wall_p90_ms": walls[int(0.9 * count)] * 1000,
           "server_cpu_ms": server_cpu * 1000, "card_cpu_ms": card_cpu * 1000,
           "ratio": statistics.median(walls) / (server_cpu + card_cpu) if server_cpu + card_cpu > 0 else None}
    if paced_key is not None:
        out["paced_decrypt_ms"] = await paced_decrypt_ms(reactor, paced_key, min(count, 300))
    return out


async def measure_tcp(reactor, endpoint, fp, budget: float, progress) -> dict:
    out = {}
    for suite in suites():
        for fs in (False, True):
            cell = {}
            cell["hs_seq"] = await _handshakes_per_second(reactor, endpoint, fp, suite, fs, budget, 1)
            cell["hs_conc"] = await _handshakes_per_second(reactor, endpoint, fp, suite, fs, budget, CONCURRENCY)
            for size in ECHO_SIZES:
                cell[f"echo{size}"] = await _echo_per_second(reactor, endpoint, fp, suite, fs, size, budget)
            out[(suite, fs)] = cell
            progress(f"  tcp {suite.label:<24} fs={'on ' if fs else 'off'} "
                     f"hs {cell['hs_seq']:.0f}/{cell['hs_conc']:.0f}/s  echo64 {cell['echo64']:.0f}/s")
    return out


def run_in_reactor(async_fn):
    """Run ``async_fn(reactor)`` under a (once-only) reactor.run(); return its result or raise."""
    from twisted.internet import reactor
    from twisted.internet.defer import ensureDeferred

    box: dict = {}

    def start():
        d = ensureDeferred(async_fn(reactor))

        def done(result):
            box["result"] = result
            reactor.stop()

        def failed(f):
            box["failure"] = f
            reactor.stop()

        d.addCallbacks(done, failed)

    reactor.callWhenRunning(start)
    reactor.run()
    if "failure" in box:
        box["failure"].raiseException()
    return box["result"]


# ---------------------------------------------------------------- report


def report(args, key_bits_list, floor, sansio, tcp, elapsed) -> str:
    bits = args.key_bits
    mode = "card and server in one process (one core)" if args.in_process else "server in a separate process"
    lines = [
        f"# vsc channel benchmark — RSA-{bits} server key, {mode}",
        "",
        machine_line(),
        f"Budget per cell: {Budgets(args.quick).tcp:g} s over TCP, {Budgets(args.quick).sansio:g} s in memory; "
        f"floor {Budgets(args.quick).floor:g} s per primitive. Concurrent = {CONCURRENCY} connections. "
        f"Each figure is the median of {REPEATS} windows. FS on = X25519 mixed in (card requires it).",
        "",
        "## Handshakes (connect + Figure 7 handshake + close) vs the RSA-OAEP decryption floor",
        "",
    ]
    rsa = floor["rsa_decrypt"][bits]
    rows = []
    for suite in suites():
        for fs in (False, True):
            cell, mem = tcp[(suite, fs)], sansio[(suite, fs)]
            rows.append([
                suite.label, "on" if fs else "off",
                fmt_rate(cell["hs_seq"]), fmt_rate(cell["hs_conc"]), fmt_rate(mem["handshake"]),
                fmt_rate(rsa), fmt_ratio(cell["hs_conc"], rsa), fmt_ratio(mem["handshake"], rsa),
            ])
    lines.append(markdown_table(
        ["suite", "FS", "handshakes/s seq", f"handshakes/s x{CONCURRENCY}", "in-memory handshakes/s",
         f"RSA-{bits} decrypts/s floor", f"ratio x{CONCURRENCY}/floor", "ratio in-memory/floor"],
        rows,
    ))
    lines += [
        "",
        "## Sealed-record round trips (EchoRequest -> EchoReply) vs the record-cipher floor",
        "",
        "Cipher floor RTT/s = 1 / (2 seals + 2 opens) of that size through vsc.crypto, single thread.",
        "",
    ]
    rows = []
    for suite in suites():
        for fs in (False, True):
            cell, mem = tcp[(suite, fs)], sansio[(suite, fs)]
            f64, f4k = cipher_rtt_floor(floor, suite, 64), cipher_rtt_floor(floor, suite, 4096)
            rows.append([
                suite.label, "on" if fs else "off",
                fmt_rate(cell["echo64"]), fmt_rate(mem["echo64"]), fmt_rate(f64), fmt_ratio(cell["echo64"], f64),
                fmt_rate(cell["echo4096"]), fmt_rate(f4k), fmt_ratio(cell["echo4096"], f4k),
            ])
    lines.append(markdown_table(
        ["suite", "FS", "64 B RTT/s TCP", "64 B RTT/s in-memory", "64 B cipher floor RTT/s", "ratio",
         "4 KiB RTT/s TCP", "4 KiB cipher floor RTT/s", "ratio"],
        rows,
    ))
    lines += ["", "## The floor (single thread, this process)", ""]
    rows = []
    for b in key_bits_list:
        rows.append([f"RSA-{b} OAEP-SHA256 decrypt (server, OpenSSL)", fmt_rate(floor["rsa_decrypt"][b])])
        rows.append([f"RSA-{b} OAEP-SHA256 encrypt (card, pycryptodome)", fmt_rate(floor["rsa_encrypt"][b])])
    rows.append(["X25519 keygen + exchange", fmt_rate(floor["x25519"])])
    for suite in suites():
        for size in ECHO_SIZES:
            rows.append([f"{suite.label} seal, {size} B", fmt_rate(floor["seal"][(suite, size)])])
            rows.append([f"{suite.label} open, {size} B", fmt_rate(floor["open"][(suite, size)])])
    lines.append(markdown_table(["primitive", "ops/s"], rows))
    lines += ["", f"Total run time {elapsed:.1f} s."]
    return "\n".join(lines)


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/channel.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="about 15 s instead of about 80 s")
    p.add_argument("--key-bits", type=int, default=3072, choices=(2048, 3072, 4096), help="server RSA key size")
    p.add_argument("--in-process", action="store_true", help="run the server in this process's reactor")
    p.add_argument("--serve", metavar="KEYFILE", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        return serve(args.serve)

    from vsc import crypto

    t0 = time.perf_counter()
    budgets = Budgets(args.quick)

    def progress(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    key_bits_list = [args.key_bits] + ([2048] if args.key_bits != 2048 else [])
    progress(f"generating RSA keys ({', '.join(map(str, key_bits_list))} bits)...")
    keys = {b: crypto.RSAPrivateKey.generate(b) for b in key_bits_list}
    key = keys[args.key_bits]
    fp = key.public_key().fingerprint()

    progress("measuring the floor...")
    floor = measure_floor(key_bits_list, keys, budgets.floor)

    progress("measuring in memory (sans-IO)...")
    sansio = {(s, fs): measure_sansio(key, s, fs, budgets.sansio) for s in suites() for fs in (False, True)}

    progress("measuring over loopback TCP...")
    if args.in_process:
        async def go(reactor):
            from twisted.internet.endpoints import serverFromString

            from vsc.server.service import server_factory

            port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(
                server_factory(server_config(), key, reactor)
            )
            try:
                return await measure_tcp(reactor, f"tcp:127.0.0.1:{port.getHost().port}", fp, budgets.tcp, progress)
            finally:
                await port.stopListening()

        tcp = run_in_reactor(go)
    else:
        server = ServerProcess(key)
        try:
            endpoint = f"tcp:127.0.0.1:{server.port}"
            tcp = run_in_reactor(lambda reactor: measure_tcp(reactor, endpoint, fp, budgets.tcp, progress))
        finally:
            server.stop()

    print(report(args, key_bits_list, floor, sansio, tcp, time.perf_counter() - t0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
