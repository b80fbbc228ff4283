"""
The PIN policy on the local paths with a card enrolled ``--local-pin pin``
(the owner verifies with ``vsc card verify-pin``), through the real things:
a real ``twistd vsc-server``, ``vsc card enroll``, a real ``twistd
vsc-card`` and its ssh-agent, and a real ``ssh`` to a headless sshd
(tests/sshd.py). The PC/SC side of the policy, and the blocked PIN on every
path, are in tests/test_pcsc.py.
"""

from __future__ import annotations

import os
import signal

import pytest

from tests.cards import cards  # noqa: F401  (a fixture)
from tests.servers import admin, init_data_dir, servers  # noqa: F401  (a fixture)

pytestmark = pytest.mark.integration

SERIAL = "pin-paths-1"
PIN = "864213"
PUK = "97531246"


@pytest.fixture
def card(cards, servers, tmp_path):  # noqa: F811
    """A card enrolled with --local-pin pin and 9a once, 9c always, 9d never, 9e never; inserted."""
    data_dir = tmp_path / "server"
    fingerprint = init_data_dir(data_dir)["fingerprint"]
    server = servers.start(data_dir)
    code = admin(data_dir, "issue", SERIAL)["code"]
    home = tmp_path / "home"
    pw = cards.password_file("pw", "pin paths password")
    (tmp_path / "pin").write_text(PIN + "\n")
    (tmp_path / "puk").write_text(PUK + "\n")
    (tmp_path / "bad").write_text("000000\n")
    out = cards.card(home, "enroll", "--server", server.endpoint, "--server-key", fingerprint, "--serial", SERIAL,
                     "--code", code, "--password-file", str(pw), "--pin-file", str(tmp_path / "pin"),
                     "--puk-file", str(tmp_path / "puk"), "--scrypt-log2n", "10",
                     "--pin-policy", "9a=once,9c=always,9d=never,9e=never", "--local-pin", "pin",
                     json_out=False).stdout
    assert "PIN policy 9a=once,9c=always,9d=never,9e=never, local paths: vsc card verify-pin" in out
    daemon = cards.start(home, pw)
    return dict(cards=cards, home=home, pw=pw, daemon=daemon, tmp=tmp_path)


def _sign(card, slot: str, *extra: str):
    msg = card["tmp"] / "msg"
    msg.write_bytes(b"local paths\n")
    return card["cards"].card(card["home"], "sign", "--slot", slot, "--in", str(msg), "--out",
                              str(card["tmp"] / f"{slot}.sig"), *extra, json_out=False, check=False)


def test_verify_pin_opens_the_local_paths_until_remove(card):
    """
    --local-pin pin: 9A (once) is refused by vsc card sign and by the agent
    (a real ssh cannot log in) until vsc card verify-pin; then both work; 9D
    (never) works throughout; 9C (always) needs --pin-file even after
    verify-pin; after remove and insert the verification is closed again.
    """
    from tests.sshd import Sshd

    cards, home, tmp = card["cards"], card["home"], card["tmp"]
    line = cards.card(home, "ssh-pubkey", "--slot", "9a").json()["keys"][0]["line"]
    sshd = Sshd(tmp / "sshd", [line])
    try:
        env = dict(os.environ, SSH_AUTH_SOCK=cards.card(home, "ssh-agent-env").json()["SSH_AUTH_SOCK"])
        status = cards.card(home, "status").json()
        assert (status["pin_local"], status["pin_verified"], status["pin_tries"]) == ("pin", False, 3)
        refused = _sign(card, "9a")
        assert refused.returncode != 0 and "run vsc card verify-pin first" in refused.stderr
        assert not sshd.logged_in(env)
        assert _sign(card, "9d").returncode == 0
        cards.card(home, "verify-pin", "--pin-file", str(tmp / "pin"))
        assert cards.card(home, "status").json()["pin_verified"] is True
        assert _sign(card, "9a").returncode == 0
        assert sshd.logged_in(env)
        assert "every use" in _sign(card, "9c").stderr
        assert _sign(card, "9c", "--pin-file", str(tmp / "pin")).returncode == 0
        card["daemon"].send(signal.SIGTERM)
        assert card["daemon"].wait_exit() == 0
        card["daemon"] = cards.start(home, card["pw"])
        assert cards.card(home, "status").json()["pin_verified"] is False
        assert _sign(card, "9a").returncode != 0
        env = dict(os.environ, SSH_AUTH_SOCK=cards.card(home, "ssh-agent-env").json()["SSH_AUTH_SOCK"])
        assert not sshd.logged_in(env)
    finally:
        sshd.stop()


def test_wrong_pins_on_the_cli_and_the_puk(card):
    """Wrong PINs through verify-pin count down (2, 1, 0); blocked, 9A is refused even with the right --pin-file; unblock-pin restores it; change-pin takes the new PIN."""
    cards, home, tmp = card["cards"], card["home"], card["tmp"]
    for left in (2, 1, 0):
        r = cards.card(home, "verify-pin", "--pin-file", str(tmp / "bad"), json_out=False, check=False)
        assert f"wrong PIN ({left} tries left)" in r.stderr
    blocked = _sign(card, "9a", "--pin-file", str(tmp / "pin"))
    assert blocked.returncode != 0 and "the PIN is blocked" in blocked.stderr
    assert "BLOCKED" in cards.card(home, "status", json_out=False).stdout
    (tmp / "new").write_text("11223344\n")
    cards.card(home, "unblock-pin", "--puk-file", str(tmp / "puk"), "--new-file", str(tmp / "new"))
    assert _sign(card, "9a", "--pin-file", str(tmp / "new")).returncode == 0
    cards.card(home, "change-pin", "--old-file", str(tmp / "new"), "--new-file", str(tmp / "pin"))
    assert _sign(card, "9a", "--pin-file", str(tmp / "pin")).returncode == 0
    assert cards.card(home, "status").json()["pin_tries"] == 3
