"""
Rules of the card's control socket (vsc.card.client, vsc.card.control)
that an adversarial review found broken, each with how it was broken; they
hold since the fix.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
from pathlib import Path

import pytest

from tests.fakecard import FakeCardSocket, fake_home  # noqa: F401  (a fixture)
from vsc.card import client, paths
from vsc.wire import control as wc

NOBODY = 65534


# ================================================================ 1. the control client: check, then use


def test_client_never_talks_to_a_runtime_dir_another_user_made_after_its_check(fake_home, monkeypatch):
    """
    ControlClient.connect checks the runtime directory only while it is
    missing-or-private (a missing one passes), then tests the socket path
    and connects by name. Another local user who creates the directory (in
    /tmp, sticky: anyone may) with a listening socket in the window between
    that check and the connect receives the request: here the PIN of
    ``vsc card verify-pin`` (``vsc card passwd`` would send the card
    password). The race is made deterministic by creating the squatter's
    directory right after the real check returns. The client must refuse to
    use a directory that is not the user's own 0700 one at the moment it
    connects (re-check after connecting / check the peer with SO_PEERCRED).
    """
    shared = Path(tempfile.mkdtemp(prefix="vsc-rv-", dir="/tmp"))  # a /tmp-like TMPDIR: 1777, sticky
    os.chmod(shared, 0o1777)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setenv("TMPDIR", str(shared))
    real_check = paths.check_private_dir
    squatter: list[FakeCardSocket] = []
    runtime = Path(paths.runtime_dir())  # TMPDIR/vsc-UID
    assert not runtime.exists()

    def check_then_race(path, *a, **kw):
        result = real_check(path, *a, **kw)  # the directory is missing: the check passes
        if os.fspath(path) == os.fspath(runtime) and not squatter:
            # the other user's move: their own directory, open to all, and a socket that answers every request
            os.mkdir(runtime, 0o777)
            os.chmod(runtime, 0o777)
            squatter.append(FakeCardSocket(fake_home, lambda command, args: {}))
            os.chown(runtime, NOBODY, NOBODY)
        return result

    monkeypatch.setattr(paths, "check_private_dir", check_then_race)
    try:
        with pytest.raises(client.ControlError):
            client.call(fake_home, wc.VERIFY_PIN, 2.0, pin=b"123456", keep=True)
        assert squatter and squatter[0].requests == [], "the PIN went to another user's socket"
    finally:
        for s in squatter:
            s.close()
        shutil.rmtree(shared, ignore_errors=True)


def test_client_bounds_what_it_buffers_for_one_answer(fake_home, monkeypatch):
    """
    The daemon's side refuses a box longer than _RX_MAX (~263 KB); the
    client has no bound at all: ``_read_box`` appends every chunk to
    ``self._buf`` (a bytes re-copied on each append) and re-parses it from
    the start, until the box ends, the peer closes, or the timeout. A peer
    that sends distinct keys without the terminating empty key makes a
    ``vsc card`` command (or a protected program's licence check) buffer
    everything it is sent. Here the peer sends 8 MB and closes; the client
    must give up (ControlError) long before it holds megabytes of one
    answer — no answer of the schema comes near 2 MB.
    """
    seen = []
    real_decode = client.decode_box

    def measuring(data):
        seen.append(len(data))
        return real_decode(data)

    monkeypatch.setattr(client, "decode_box", measuring)
    chunk = b"".join((2).to_bytes(2, "big") + i.to_bytes(2, "big") + (65000).to_bytes(2, "big") + bytes(65000)
                     for i in range(128))  # 128 distinct keys, never the empty key that ends a box: ~8.3 MB
    path = paths.control_socket_for(fake_home)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)

    def peer():  # reads the request, sends the endless box, closes
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            try:
                conn.sendall(chunk)
            except OSError:
                pass  # the client gave up: what a fixed client does

    thread = threading.Thread(target=peer, daemon=True)
    thread.start()
    try:
        with pytest.raises(client.ControlError):
            client.call(fake_home, wc.STATUS, 10.0)
        assert max(seen) <= 2 * 1024 * 1024, f"the client buffered {max(seen)} bytes of one answer"
    finally:
        thread.join(10)
        listener.close()


# ================================================================ 2. the control socket's server: a refusal too long to send


def test_a_refusal_naming_a_long_name_is_still_answered():
    """
    A refusal's text quotes what the client sent (``no data object {name!r}``);
    ``repr`` of a name of 20000 control characters is 80000 characters, over
    AMP's 65535-byte value, so ``ampbox.encode_box`` raises Malformed inside
    ``ControlProtocol._answer`` after its except clauses: the error goes to
    an unhandled Deferred and the request is never answered (the client
    waits out its timeout). Every request must get an answer (or the
    connection closed).
    """
    from twisted.internet.testing import StringTransport

    from tests.test_control_memory import Session
    from vsc.card import control as daemon
    from vsc.wire import ampbox

    proto = daemon.ControlProtocol(Session())
    transport = StringTransport()
    proto.makeConnection(transport)
    proto.dataReceived(ampbox.encode_box(wc.request(wc.DATA_GET, 1, {"name": "\x01" * 20000})))
    assert transport.value() or transport.disconnecting, "no answer and the connection left open"
