"""
Memory and descriptors (issue 11, point 4), against real ``twistd
vsc-server`` processes.

Before: after a finished handshake the server buffered frames up to 1 MiB
and never timed out an idle connection (300 such connections: 66 → 382 MB
RSS, 126 MB after they closed), and under ``ulimit -n 1024``, 1,200
one-byte connections made it refuse everyone for 30 s.

Now: frames are capped per state (4 KiB before the handshake,
``max_unauthenticated_body`` = 64 KiB after it until an operation
authenticates), unauthenticated connections close after
``unauthenticated_idle`` (and before the handshake after
``handshake_timeout``), their number is capped in all and per source, and
the cap is fitted to the open-file limit at start (vsc/server/tap.py).
"""

from __future__ import annotations

import os
import resource
import struct
import time

import pytest_twisted
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectError

from tests.faults.common import sleep, wait_until
from tests.servers import TWISTD, Server, Servers, admin, init_data_dir
from vsc.card import ops
from vsc.card.connect import connect
from vsc.protocol.auth import DEFAULT_MASTER_KEY
from vsc.wire import HEADER_SIZE

CONNECTIONS = 300
IDLE = 5.0
RECORD = 0x10  # the RECORD frame type (docs/protocol.md §3)


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _header(frame_type: int, length: int) -> bytes:
    out = b"VS\x01" + bytes([frame_type]) + struct.pack(">I", length)
    assert len(out) == HEADER_SIZE
    return out


class Partial(protocol.Protocol):
    """A raw connection that sends ``data`` and then nothing; records when the server closed it."""

    def __init__(self, data: bytes):
        self.data, self.closed_at = data, None

    def connectionMade(self):
        self.transport.write(self.data)

    def connectionLost(self, reason=None):
        self.closed_at = time.monotonic()


def _raise_own_fd_limit(want: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(want, soft)), hard))


@pytest_twisted.ensureDeferred
async def test_300_connections_holding_maximal_partial_frames_cost_little_and_are_closed(tmp_path):
    """
    150 connections that finished the handshake each hold a 64 KiB record
    frame less one byte (the largest an unauthenticated channel accepts), and
    150 that did not each hold a 4 KiB frame less one byte, all from a few
    source addresses. Asserted: server RSS growth (VmRSS, /proc/PID/status)
    at most 64 MiB while they are held; every one of them closed by the
    server (idle timeout, handshake timeout) without the client closing it;
    the descriptors come back.
    """
    _raise_own_fd_limit(4096)
    data = tmp_path / "srv"
    fp = init_data_dir(data, settings={"unauthenticated_idle": IDLE, "handshake_timeout": IDLE,
                                       "auth_deadline": 2})["fingerprint"]
    servers = Servers(tmp_path / "logs")
    try:
        server = servers.start(data)
        pid = server.proc.pid
        # warm up: one full handshake and a refused operation, so the baseline has the code paths loaded
        p = await connect(reactor, server.endpoint, fp)
        p.transport.loseConnection()
        await sleep(0.5)
        base_rss, base_fds = _rss_kib(pid), _fds(pid)
        established, raw = [], []
        t0 = time.monotonic()
        for i in range(CONNECTIONS // 2):  # a handshake per connection: 5 sources keep under the per-source rate
            src = f"127.0.0.{10 + i % 5}"
            proto = await connect(reactor, f"tcp:host=127.0.0.1:port={server.port}:bindAddress={src}", fp)
            proto.transport.write(_header(RECORD, 65536) + b"\0" * 65535)
            established.append(proto)
        for i in range(CONNECTIONS // 2):
            src = f"127.0.0.{20 + i % 5}"
            p = Partial(_header(RECORD, 4096) + b"\0" * 4095)
            await TCP4ClientEndpoint(reactor, "127.0.0.1", server.port, bindAddress=(src, 0)).connect(
                protocol.Factory.forProtocol(lambda p=p: p))
            raw.append(p)
        await sleep(0.5)
        held_rss, held_fds = _rss_kib(pid), _fds(pid)
        open_now = sum(1 for p in established if not p.channel.closed) + sum(1 for p in raw if p.closed_at is None)
        growth = (held_rss - base_rss) / 1024
        await wait_until(lambda: all(p.channel.closed for p in established) and all(p.closed_at for p in raw),
                         IDLE * 4 + 30, "the server to close every idle connection")
        closed_after = time.monotonic() - t0
        await sleep(0.5)
        after_rss, after_fds = _rss_kib(pid), _fds(pid)
        print(f"\nmemory: {CONNECTIONS} connections holding maximal partial frames ({CONNECTIONS // 2} after the "
              f"handshake x 64 KiB, {CONNECTIONS // 2} before it x 4 KiB): server RSS {base_rss / 1024:.1f} -> "
              f"{held_rss / 1024:.1f} MiB (growth {growth:.1f} MiB), {after_rss / 1024:.1f} MiB after the idle "
              f"timeouts closed them all ({closed_after:.1f} s after the first); descriptors {base_fds} -> "
              f"{held_fds} -> {after_fds}")
        assert open_now == CONNECTIONS and held_fds >= base_fds + CONNECTIONS
        assert growth <= 64, growth
        assert after_fds <= base_fds + 2
    finally:
        servers.close()


class LimitedServer(Server):
    """A server started under ``prlimit --nofile=1024:1024`` (soft and hard: it cannot raise it)."""

    def __init__(self, data_dir, log_path):
        super().__init__(data_dir, log_path)
        self.launcher = ["prlimit", "--nofile=1024:1024", str(TWISTD)]


@pytest_twisted.ensureDeferred
async def test_under_ulimit_1024_a_descriptor_flood_does_not_keep_the_owner_out(tmp_path):
    """
    A server limited to 1024 descriptors (soft = hard) and 1,200 one-byte
    connections from 20 source addresses (60 each, under the per-source cap):
    the server lowers max_unauthenticated to fit (logged: 768), closes the
    excess at once, and the owner (127.0.0.1, one connection) enrols and
    inserts while the cap is full: its connection gets in by closing the
    oldest of the most crowded source (vsc.server.admission.crowded).
    """
    from tests.integration import need_program

    need_program("prlimit")
    _raise_own_fd_limit(4096)
    data = tmp_path / "srv"
    fp = init_data_dir(data)["fingerprint"]
    server = LimitedServer(data, tmp_path / "limited.log").start()
    try:
        pid = server.proc.pid
        code = admin(data, "issue", "fd-owner")["code"]
        conns = []
        for i in range(1200):
            p = Partial(b"V")
            conns.append(p)
            try:
                await TCP4ClientEndpoint(reactor, "127.0.0.1", server.port,
                                         bindAddress=(f"127.0.1.{10 + i % 20}", 0)).connect(
                    protocol.Factory.forProtocol(lambda p=p: p))
            except ConnectError:  # closed (reset) by the server as soon as it was accepted
                p.closed_at = time.monotonic()
        await sleep(1.0)
        closed_at_once = sum(1 for p in conns if p.closed_at is not None)
        fds = _fds(pid)
        t0 = time.monotonic()
        kdf = ops.new_kdf(os.urandom, log2_n=10)
        keys = ops.derive_keys("pw", kdf)
        proto = await connect(reactor, server.endpoint, fp)
        await ops.enrol(proto, "fd-owner", code, keys, kdf, b"p")
        r, _ = await ops.insert(proto, "fd-owner", "pw", os.urandom(32), os.urandom(32), DEFAULT_MASTER_KEY, keys=keys)
        owner_seconds = time.monotonic() - t0
        proto.transport.loseConnection()
        log = server.log_text()
        print(f"\ndescriptors: 1,200 one-byte connections under ulimit -n 1024: {closed_at_once} closed at once, "
              f"server holds {fds} descriptors; the owner enrolled and inserted in {owner_seconds * 1000:.0f} ms")
        assert "max_unauthenticated lowered from 1024 to 768" in log
        assert r.status is ops.Status.OK
        assert closed_at_once >= 1200 - 768 and fds < 1024
        for p in conns:
            if p.closed_at is None and p.transport is not None:
                p.transport.abortConnection()
    finally:
        server.kill()
