"""
Issue 4, item 7: when the connection to the server drops while the card is in
use, the card opens a fresh channel and proves it holds this insert with its
per-insert secret — no password prompt — and remove still works afterwards.
Real server and card processes on 127.0.0.1.
"""

from __future__ import annotations

import signal

import pytest

from tests.cards import Cards
from tests.servers import Servers
from tests.test_card_e2e import PASSWORD, _deploy

pytestmark = pytest.mark.integration


def test_card_reconnects_after_the_server_restarts_and_remove_still_works(tmp_path):
    """
    The server is killed (SIGKILL: every channel drops) and restarted on the
    same port; the in-use card's next counter step reconnects by itself and is
    stored (the daemon reads no password: its stdin is /dev/null), and
    ``vsc card remove`` then uploads and sets the card idle with everything
    acknowledged before and after the drop.
    """
    servers = Servers(tmp_path / "logs")
    cards = Cards(tmp_path / "cards")
    try:
        dep = _deploy(tmp_path, servers)
        home, pw = cards.enrol(dep.server, dep.fingerprint, dep.data_dir, "rc-1", PASSWORD)
        daemon = cards.start(home, pw)
        assert cards.card(home, "counter", "c", "--add", "3").json()["value"] == 3
        version_before = dep.record("rc-1")["version"]

        port = dep.server.port
        dep.server.kill(signal.SIGKILL)
        dep.server.spawn(port)
        dep.server.wait_ready()

        assert cards.card(home, "counter", "c", "--sub", "1").json()["value"] == 2
        assert dep.record("rc-1")["version"] == version_before + 1  # synced through the new channel
        assert "reconnected to the server" in daemon.log_text()
        cards.card(home, "remove")
        assert daemon.wait_exit() == 0
        rec = dep.record("rc-1")
        assert rec["state"] == "idle" and rec["version"] == version_before + 2

        again = cards.start(home, pw)  # the value acknowledged after the reconnect is what comes back
        assert cards.card(home, "counter", "c").json()["value"] == 2
        cards.card(home, "remove")
        assert again.wait_exit() == 0
    finally:
        cards.close()
        servers.close()
