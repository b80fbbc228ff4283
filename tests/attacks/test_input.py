"""
Validated input (issue 11, point 7): every ``vsc`` value is checked before
anything is stored, every error a person sees is one line of plain words
(never a Python class name), and a serial means one card — NFC-normalised
wherever it enters (``vsc admin``, the card's card.ini and --serial, the
server's wire requests), restricted to the alphabet of docs/admin.md
"Serials", and refused when it looks like an existing serial.
"""

from __future__ import annotations

import re
import sqlite3
import unicodedata

import pytest
import pytest_twisted
from twisted.internet import reactor

from tests.servers import VSC, _env, admin, init_data_dir, servers  # noqa: F401  (fixture)
from vsc.card import config as cc
from vsc.protocol import serials

NFC_CAFE = unicodedata.normalize("NFC", "café")
NFD_CAFE = unicodedata.normalize("NFD", "café")
CYRILLIC_ALICE = "\u0430lice"  # Cyrillic small a, then Latin "lice"

#: what a Python class name looks like in a message (CamelCase, or a known exception suffix)
CLASS_NAME = re.compile(r"\b[A-Z][a-z]+(?:[A-Z][a-z]*)+\b|\b\w+(?:Error|Exception)\b|Traceback")


def _run(*args: str):
    import subprocess

    return subprocess.run([str(VSC), *args], env=_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=60)


def _one_plain_line(proc) -> str:
    """The failure's one stderr line: non-zero exit, nothing else on stderr, no class name."""
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert proc.returncode != 0 and len(lines) == 1, (proc.returncode, proc.stderr)
    assert not CLASS_NAME.search(lines[0]), lines[0]
    return lines[0]


# ---------------------------------------------------------------- the alphabet and the skeleton


def test_nfc_and_nfd_are_one_serial_and_the_alphabet_is_enforced():
    """NFD "café" checks to the NFC form; spaces, '/', controls, a leading '-', 65 bytes are refused (one line)."""
    assert NFC_CAFE != NFD_CAFE and serials.check(NFD_CAFE) == NFC_CAFE == serials.check(NFC_CAFE)
    assert serials.check("card-1_a.b@c") == "card-1_a.b@c"
    for bad in ("", "a b", "a/b", "a\x00b", "-x", ".x", "x" * 65, "\u0301a", "a\u202eb"):
        with pytest.raises(serials.SerialError) as e:
            serials.check(bad)
        assert "\n" not in str(e.value) and "\x00" not in str(e.value) and "\u202e" not in str(e.value)


def test_look_alikes_share_a_skeleton():
    """Cyrillic "аlice", "ALICE", "alicé", "аlicе" look like "alice"; "bob", "alice2" do not; 0/o and 1/l fold."""
    same = [CYRILLIC_ALICE, "ALICE", "Alice", "alicé", "\u0430lic\u0435", "\uff41lice"]
    for s in same:
        assert serials.skeleton(s) == serials.skeleton("alice"), s
        assert serials.confusable_with(s, ["bob", "alice"]) == "alice"
    assert serials.confusable_with("alice2", ["alice", "bob"]) is None
    assert serials.confusable_with("card-1", ["card-l"]) == "card-l"
    assert serials.confusable_with("c0de", ["code"]) == "code"
    assert serials.confusable_with("alice", ["alice"]) is None  # itself is not a look-alike


# ---------------------------------------------------------------- vsc admin


@pytest.fixture
def data_dir(tmp_path):
    d = tmp_path / "srv"
    init_data_dir(d)
    return d


def _serials_stored(data_dir) -> list[str]:
    return [r["serial"] for r in admin(data_dir, "list")["cards"]]


def test_admin_issue_normalises_and_refuses_confusables(data_dir):
    """
    `vsc admin issue` stores NFD "café" as NFC (show finds it by either form);
    then a Cyrillic "аlice" after "alice", "ALICE", and "café" typed again are
    refused with one plain line, and nothing more is stored.
    """
    out = admin(data_dir, "issue", NFD_CAFE)
    assert out["serial"] == NFC_CAFE
    assert admin(data_dir, "show", NFD_CAFE)["serial"] == NFC_CAFE
    admin(data_dir, "issue", "alice")
    for look_alike, needle in ((CYRILLIC_ALICE, "looks like the existing serial 'alice'"),
                               ("ALICE", "looks like the existing serial 'alice'"),
                               ("cafe", "looks like the existing serial 'café'")):
        line = _one_plain_line(_run("admin", "--data-dir", str(data_dir), "issue", look_alike))
        assert needle in line, line
    # issuing the very same serial again replaces the pending code (not a look-alike of itself)
    assert admin(data_dir, "issue", NFC_CAFE)["replaced"] is True
    assert sorted(_serials_stored(data_dir)) == sorted([NFC_CAFE, "alice"])


@pytest.mark.parametrize("args, needle", [
    (["issue", "x1", "--ttl", "999999999999999999999"], "must be from 60 to 31622400 seconds"),
    (["issue", "x1", "--ttl", "nan"], "must be from 60 to 31622400 seconds"),
    (["issue", "x1", "--ttl", "-5"], "must be from 60 to 31622400 seconds"),
    (["issue", "x1", "--ttl", "banana"], "is not a number of seconds"),
    (["issue", "a b"], "character 2 is a space"),
    (["issue", "--", "-x"], "it starts with '-'"),
    (["issue", "x/../../y"], "is not a letter, a digit"),
    (["issue", "x" * 65], "at most 64 bytes"),
    (["issue", "a\u202eb"], "U+202E"),
    (["duplicate", "nosuch", "new"], "no card nosuch"),
    (["duplicate", "nosuch", "new card"], "character 4 is a space"),
    (["replace", "nosuch", "--new-serial", "a\tb"], None),
    (["show", "nosuch"], "no card nosuch"),
])
def test_admin_values_are_checked_before_anything_is_stored(data_dir, args, needle):
    """Each bad value: one plain line (no class name), non-zero exit, and no card or code stored."""
    line = _one_plain_line(_run("admin", "--data-dir", str(data_dir), *args))
    if needle:
        assert needle in line, line
    assert _serials_stored(data_dir) == []


def test_list_and_show_never_crash_on_stored_values(data_dir):
    """
    Whatever a database holds (a code valid for 1e300 s, a negative or
    absurd time, as an old vsc could store), `list` and `show` answer with
    their tables, not a traceback.
    """
    admin(data_dir, "issue", "weird-1")
    admin(data_dir, "issue", "weird-2")
    db = sqlite3.connect(data_dir / "vsc.sqlite3")
    db.execute("UPDATE enrolment_codes SET expires = 1e300 WHERE serial = 'weird-1'")
    db.execute("UPDATE enrolment_codes SET expires = -1e300 WHERE serial = 'weird-2'")
    db.commit()
    db.close()
    for args in (["list"], ["show", "weird-1"], ["show", "weird-2"]):
        for json_out in (True, False):
            proc = _run("admin", "--data-dir", str(data_dir), *args, *(["--json"] if json_out else []))
            assert proc.returncode == 0 and proc.stderr == "", (args, proc.stderr)
    assert "weird-1" in _run("admin", "--data-dir", str(data_dir), "list").stdout


# ---------------------------------------------------------------- the card and the wire


def test_the_cards_serial_is_nfc_and_in_the_alphabet(tmp_path):
    """card.ini with NFD "café" loads as NFC; a serial outside the alphabet is one line naming the file."""
    home = tmp_path / "home"
    cc.save(home, server="tcp:127.0.0.1:1", server_key="SHA256:x", serial=NFD_CAFE)
    assert cc.load(home).serial == NFC_CAFE
    cc.save(home, server="tcp:127.0.0.1:1", server_key="SHA256:x", serial="a/b")
    with pytest.raises(cc.CardConfigError) as e:
        cc.load(home)
    assert str(e.value).startswith(str(home / cc.CARD_INI)) and "is not a letter, a digit" in str(e.value)


def test_card_enroll_refuses_a_serial_outside_the_alphabet(tmp_path):
    """`vsc card enroll --serial "a b"` is one plain line and writes no card.ini."""
    home = tmp_path / "home"
    proc = _run("card", "--home", str(home), "enroll", "--server", "tcp:127.0.0.1:1", "--server-key", "SHA256:x",
                "--serial", "a b", "--code", "X", "--password-file", "/nonexistent")
    assert "character 2 is a space" in _one_plain_line(proc)
    assert not (home / cc.CARD_INI).exists()


@pytest_twisted.ensureDeferred
async def test_the_server_normalises_the_serial_of_every_request(tmp_path, servers):  # noqa: F811
    """
    A card whose request spells the serial in NFD (issued as NFC) enrols,
    inserts and removes: the server compares NFC forms, and the history is
    under the one NFC serial.
    """
    import os

    from tests.servers import open_store
    from vsc.card import ops
    from vsc.card.connect import connect
    from vsc.protocol.auth import DEFAULT_MASTER_KEY

    data = tmp_path / "srv"
    fp = init_data_dir(data)["fingerprint"]
    server = servers.start(data)
    code = admin(data, "issue", NFC_CAFE)["code"]
    kdf = ops.new_kdf(os.urandom, log2_n=10)
    keys = ops.derive_keys("pw", kdf)
    proto = await connect(reactor, server.endpoint, fp)
    await ops.enrol(proto, NFD_CAFE, code, keys, kdf, b"first")
    secret = os.urandom(32)
    r, _ = await ops.insert(proto, NFD_CAFE, "pw", os.urandom(32), secret, DEFAULT_MASTER_KEY, keys=keys)
    assert r.status is ops.Status.OK and r.protected == b"first"
    assert (await ops.remove(proto, NFD_CAFE, secret, r.version, b"second")).version == 2
    proto.closeChannel()
    store = open_store(data)
    assert [c.serial for c in store.list_cards()] == [NFC_CAFE]
    assert {h.serial for h in store.history()} == {NFC_CAFE}
    store.close()
