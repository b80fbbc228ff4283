"""vsc.server.tap: the listen description the server gives Twisted."""

from __future__ import annotations

from vsc.server.tap import LISTEN_BACKLOG, with_backlog


def test_tcp_and_ssl_endpoints_get_a_long_listen_queue_unless_they_name_one():
    """tcp/tcp6/ssl descriptions get backlog=LISTEN_BACKLOG appended; one naming its backlog, or another kind, is kept."""
    assert with_backlog("tcp:7390:interface=127.0.0.1") == f"tcp:7390:interface=127.0.0.1:backlog={LISTEN_BACKLOG}"
    assert with_backlog("tcp6:7390") == f"tcp6:7390:backlog={LISTEN_BACKLOG}"
    assert with_backlog("ssl:7391:privateKey=k.pem") == f"ssl:7391:privateKey=k.pem:backlog={LISTEN_BACKLOG}"
    assert with_backlog("tcp:7390:backlog=10") == "tcp:7390:backlog=10"
    assert with_backlog("unix:/run/vsc.sock") == "unix:/run/vsc.sock"
