"""
The only tests that open real sockets: the channel over TCP on 127.0.0.1
with the real reactor (pytest-twisted), and the real ``twistd -n vsc-server``
and ``vsc ping`` processes. Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import re
import selectors
import subprocess
import sys
import time

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ConnectionDone

from vsc.card.connect import connect
from vsc.protocol.suites import ChannelConfig
from vsc.server.service import server_factory
from vsc.wire import ErrorCode
from vsc.wire.messages import EchoReply, EchoRequest, Suite

from tests.vectors.support import DRBG, fixed_fingerprint, fixed_key

pytestmark = pytest.mark.integration

WAIT = 5.0  # seconds, for any single network step
BIN = os.path.dirname(sys.executable)


def bounded(d: Deferred, reactor, seconds: float = WAIT) -> Deferred:
    return d.addTimeout(seconds, reactor)


@pytest.mark.parametrize("suite", list(Suite), ids=lambda s: s.label)
@pytest_twisted.ensureDeferred
async def test_tcp_loopback_channel(suite):
    """
    A server factory listening on 127.0.0.1 (port 0) and vsc.card.connect
    complete the handshake over a real socket with the given suite, exchange
    sealed echo records (small and large), and close in order on both ends.
    """
    from twisted.internet import reactor

    server_cfg = ChannelConfig(suites=tuple(Suite), allow_insecure=True)
    card_cfg = ChannelConfig(suites=(suite,), allow_insecure=suite is Suite.DES_CBC_MD5)
    factory = server_factory(server_cfg, fixed_key(), reactor, DRBG(b"loopback server " + suite.label.encode()))
    built, lost = [], Deferred()
    build = factory.buildProtocol

    def tracking_build(addr):
        proto = build(addr)
        built.append(proto)
        original = proto.connectionLost

        def connection_lost(reason=None):
            original(reason)
            if not lost.called:
                lost.callback(reason)  # a Failure: ConnectionDone for a clean close

        proto.connectionLost = connection_lost
        return proto

    factory.buildProtocol = tracking_build
    port = await bounded(serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(factory), reactor)
    try:
        endpoint = f"tcp:127.0.0.1:{port.getHost().port}:timeout=5"
        card = await bounded(
            connect(reactor, endpoint, fixed_fingerprint(), card_cfg, DRBG(b"loopback card " + suite.label.encode())),
            reactor,
        )
        assert card.info.suite is suite and card.info.forward_secret is (suite is not Suite.DES_CBC_MD5)
        assert card.info.server_fingerprint == fixed_fingerprint()
        (server,) = built
        assert (await bounded(server.whenEstablished(), reactor)) == card.info
        for data in (b"", b"hello over TCP", bytes(range(256)) * 200):
            reply = await bounded(card.request(EchoRequest(data)), reactor)
            assert reply == EchoReply(data)
        card.closeChannel()
        assert (await bounded(card.whenClosed(), reactor))[0] is ErrorCode.CLOSE_NOTIFY
        code, reason = await bounded(server.whenClosed(), reactor)
        assert (code, reason) == (ErrorCode.CLOSE_NOTIFY, "peer closed the channel")
        with pytest.raises(ConnectionDone):  # the TCP connection itself closed cleanly
            await bounded(lost, reactor)
        assert server.channel.closed and card.channel.closed
    finally:
        await bounded(port.stopListening(), reactor)


@pytest_twisted.ensureDeferred
async def test_tcp_loopback_wrong_pin():
    """Over a real socket, a card pinning another key fails with SERVER_KEY_MISMATCH and the server sees the alert."""
    from twisted.internet import reactor

    from vsc.net.channel import ChannelClosedError

    factory = server_factory(ChannelConfig(), fixed_key(), reactor, DRBG(b"loopback pin server"))
    built = []
    build = factory.buildProtocol
    factory.buildProtocol = lambda addr: built.append(build(addr)) or built[-1]
    port = await bounded(serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(factory), reactor)
    try:
        with pytest.raises(ChannelClosedError) as info:
            await bounded(
                connect(reactor, f"tcp:127.0.0.1:{port.getHost().port}", "SHA256:" + "C" * 43, ChannelConfig()),
                reactor,
            )
        assert info.value.code is ErrorCode.SERVER_KEY_MISMATCH
        (server,) = built
        code, _ = await bounded(server.whenClosed(), reactor)
        assert code is ErrorCode.SERVER_KEY_MISMATCH
    finally:
        await bounded(port.stopListening(), reactor)


# ---------------------------------------------------------------- real processes


def run(args: list[str], timeout: float = 20.0, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kw)


def wait_for_line(proc: subprocess.Popen, pattern: str, deadline: float) -> re.Match:
    """Read the process's raw output until a line matches ``pattern``; fail at ``deadline`` (no sleeping)."""
    fd = proc.stdout.fileno()
    seen = b""
    sel = selectors.DefaultSelector()
    sel.register(fd, selectors.EVENT_READ)
    try:
        while time.monotonic() < deadline:
            if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
                break
            chunk = os.read(fd, 65536)
            if not chunk:
                break  # the process exited
            seen += chunk
            m = re.search(pattern.encode(), seen)
            if m:
                return m
    finally:
        sel.close()
    pytest.fail(f"twistd did not log {pattern!r} in time; output so far:\n{seen.decode(errors='replace')}")


def test_twistd_server_and_vsc_ping(tmp_path):
    """
    The installed commands work end to end: ``vsc admin init`` creates a data
    dir, ``twistd -n vsc-server`` serves it on 127.0.0.1, and ``vsc ping
    --json`` reports a forward-secret aes256-gcm channel pinned to the key
    that init printed, with the sealed echo records answered; a wrong pin
    fails with SERVER_KEY_MISMATCH. The server is stopped at the end.
    """
    vsc, twistd = os.path.join(BIN, "vsc"), os.path.join(BIN, "twistd")
    data = tmp_path / "data"
    init = run([vsc, "admin", "--data-dir", str(data), "init", "--key-bits", "2048", "--json"])
    assert init.returncode == 0, init.stderr
    fingerprint = json.loads(init.stdout)["fingerprint"]
    assert fingerprint.startswith("SHA256:")

    server = subprocess.Popen(
        [twistd, "-n", "--pidfile=", "--logfile=-", "vsc-server", "--data-dir", str(data),
         "--listen", "tcp:0:interface=127.0.0.1"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        m = wait_for_line(server, r"starting on (\d+)", time.monotonic() + 15)
        endpoint = f"tcp:127.0.0.1:{int(m.group(1))}:timeout=5"
        ping = run([vsc, "ping", "--server", endpoint, "--server-key", fingerprint, "--json", "--count", "4", "--size", "100"])
        assert ping.returncode == 0, ping.stderr
        report = json.loads(ping.stdout)
        assert report["suite"] == "aes256-gcm"
        assert report["forward_secret"] is True
        assert report["server_key"] == fingerprint
        assert (report["records"], report["record_bytes"]) == (4, 100)
        assert report["handshake_ms"] > 0 and report["median_rtt_ms"] > 0

        wrong = run([vsc, "ping", "--server", endpoint, "--server-key", "SHA256:" + "D" * 43])
        assert wrong.returncode == 1
        assert "SERVER_KEY_MISMATCH" in wrong.stderr and "Traceback" not in wrong.stderr
        assert server.poll() is None, "the server must survive a failed client"
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=5)
        server.stdout.close()
