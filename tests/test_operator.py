"""
Operator flows of issue 13, end to end with real processes (a twistd
vsc-server, twistd vsc-card daemons, the vsc CLI):

* ``vsc admin revoke``: an issued code stops working, with a history row;
* a change of ``impl_auth`` reaches a card enrolled before it: its next insert
  is issued a keyfile (history ``reissue``), and the insert after that is
  challenged with it;
* a duplicated keyfile card is issued a keyfile for its new serial at its
  first insert, and both cards keep working.
"""

from __future__ import annotations

import configparser

import pytest

from tests.cards import cards, copy_home  # noqa: F401 - fixture
from tests.servers import admin, init_data_dir, open_store, servers  # noqa: F401 - fixture

pytestmark = pytest.mark.integration
PASSWORD = "operator flows 13"


def _history(data, serial):
    store = open_store(data)
    try:
        return [(h.op, h.result, h.detail) for h in store.history(serial)]
    finally:
        store.close()


def _auth(data, serial):
    return admin(data, "show", serial)["auth"]


def _insert_and_remove(cards, home, pw):  # noqa: F811
    daemon = cards.start(home, pw)
    assert cards.card(home, "status").json()["state"] == "in-use"
    cards.card(home, "remove", json_out=False)
    assert daemon.wait_exit() == 0, daemon.describe()
    return daemon


def _set(data, **settings):
    path = data / "vsc-server.ini"
    parser = configparser.ConfigParser()
    parser.read(path)
    for k, v in settings.items():
        parser["server"][k] = v
    with open(path, "w") as f:
        parser.write(f)


def test_revoke_a_pending_code(servers, cards, tmp_path):  # noqa: F811
    """A revoked code no longer enrols its card; the history shows issue then revoke; revoke of an enrolled card is refused."""
    data = tmp_path / "srv"
    info = init_data_dir(data)
    server = servers.start(data)
    code = admin(data, "issue", "eve")["code"]
    out = admin(data, "revoke", "eve")
    assert out["serial"] == "eve" and out["state"] == "revoked"
    pw = cards.password_file("eve", PASSWORD)
    res = cards.card(tmp_path / "home-eve", "enroll", "--server", server.endpoint, "--server-key", info["fingerprint"],
                     "--serial", "eve", "--code", code, "--password-file", str(pw), "--scrypt-log2n", "10",
                     check=False)
    assert res.returncode != 0 and "enrolment refused" in res.stderr
    assert [(op, result) for op, result, _ in _history(data, "eve")][:2] == [("issue", "ok"), ("revoke", "ok")]
    home, pw = cards.enrol(server, info["fingerprint"], data, "frank", PASSWORD)
    refused = admin(data, "revoke", "frank", check=False)
    assert refused.returncode != 0 and "there is no code to revoke" in refused.stderr


def test_impl_auth_change_reaches_a_card_enrolled_before_it(servers, cards, tmp_path):  # noqa: F811
    """
    A card enrolled under impl_auth = master-key; the server restarts with
    master-key,keyfile: the card's next insert succeeds and brings it a
    keyfile (saved in HOME, history 'reissue ok'); the insert after that is
    challenged with the keyfile and succeeds; `show` lists keyfile.
    """
    data = tmp_path / "srv"
    info = init_data_dir(data, settings={"impl_auth": "master-key"})
    server = servers.start(data)
    home, pw = cards.enrol(server, info["fingerprint"], data, "grace", PASSWORD)
    assert not (home / "keyfile.vsc").exists()
    server.stop()
    _set(data, impl_auth="master-key,keyfile")
    server.start()  # the same port: the card's card.ini names it
    first = _insert_and_remove(cards, home, pw)
    assert (home / "keyfile.vsc").exists(), first.describe()
    assert "the server issued this card a new keyfile" in first.log_text()
    history = _history(data, "grace")
    assert ("reissue", "ok", "keyfile issued with this insert") in history
    assert "keyfile" in _auth(data, "grace")
    _insert_and_remove(cards, home, pw)
    inserts = [h for h in _history(data, "grace") if h[0] == "insert"]
    assert [r for _, r, _ in inserts] == ["ok", "ok"]
    assert sum(1 for h in _history(data, "grace") if h[0] == "reissue") == 1  # issued once, used after


def test_a_duplicated_keyfile_card_gets_a_keyfile_for_its_new_serial(servers, cards, tmp_path):  # noqa: F811
    """
    A card with a keyfile (impl_auth keyfile) is duplicated; the copy, in a
    home naming the new serial, inserts: it is issued a keyfile naming its
    own serial (history of the copy: duplicate, reissue); its next insert
    passes the keyfile challenge; the original still inserts with its own.
    """
    data = tmp_path / "srv"
    info = init_data_dir(data, settings={"impl_auth": "master-key,keyfile"})
    server = servers.start(data)
    home, pw = cards.enrol(server, info["fingerprint"], data, "heidi", PASSWORD)
    original_keyfile = (home / "keyfile.vsc").read_bytes()
    admin(data, "duplicate", "heidi", "heidi-2")
    copy = copy_home(home, tmp_path / "home-copy", serial="heidi-2")
    first = _insert_and_remove(cards, copy, pw)
    assert (copy / "keyfile.vsc").read_bytes() != original_keyfile, first.describe()
    ops = [(op, result) for op, result, _ in _history(data, "heidi-2")]
    assert ops[:3] == [("duplicate", "ok"), ("insert", "ok"), ("reissue", "ok")], ops
    _insert_and_remove(cards, copy, pw)
    assert [r for op, r, _ in _history(data, "heidi-2") if op == "insert"] == ["ok", "ok"]
    _insert_and_remove(cards, home, pw)
    assert (home / "keyfile.vsc").read_bytes() == original_keyfile
    assert [r for op, r, _ in _history(data, "heidi") if op == "insert"] == ["ok"]
