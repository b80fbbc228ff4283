"""
A card pins the scrypt salt it chose at enrolment (card.ini ``kdf_salt``,
kept across password changes) and refuses a server that names another one,
before it derives or sends anything. Without the pin, a malicious server
could send every card the same salt and test one dictionary pass against
all their answers at once (tests/test_review_secrets.py). A card enrolled
before the pin existed pins the salt of its first insert the server
accepts (trust on first use).
"""

from __future__ import annotations

import os

import pytest
from twisted.internet.task import Clock

from vsc.card import config as cc
from vsc.card import ops
from vsc.card.machine import MachineLock
from vsc.card.session import CardSession, LifeState, explain
from vsc.card.storage import ServerStorage
from vsc.wire.ops import AuthChallenge, AuthItem, AuthMethod, AuthResponse, KdfAlg, KdfParams
from tests.cardfakes import SCRYPT_CHEAP, FakeServer, done, inline_worker, release
from tests.test_card_storage import _envelope

SERIAL = "store-1"
OWN = b"s" * 16  # FakeServer's salt: the card's own


@pytest.mark.parametrize(
    "kdf",
    [
        KdfParams(alg=KdfAlg.SCRYPT, salt=b"S" * 16, log2_n=15),
        KdfParams(alg=KdfAlg.SCRYPT, salt=OWN + b"x", log2_n=15),
        KdfParams(alg=KdfAlg.SCRYPT, salt=OWN[:15], log2_n=15),
        KdfParams(alg=KdfAlg.LEGACY_MD5, salt=b"", log2_n=0, r=0, p=0),
    ],
    ids=["other-salt", "longer", "shorter", "legacy"],
)
def test_a_pinned_card_refuses_any_salt_but_its_own(kdf):
    """Another salt of the same cost, one that starts with the card's own or is cut short, or no salt at all
    (legacy) are refused whatever the floor, even with none; the card's own salt passes."""
    for floor in ("scrypt:15", ""):
        with pytest.raises(ops.KdfSaltRefused, match="another salt"):
            ops.check_kdf(kdf, floor, OWN)
    ops.check_kdf(KdfParams(alg=KdfAlg.SCRYPT, salt=OWN, log2_n=15), "scrypt:15", OWN)
    ops.check_kdf(kdf, "", b"")  # not pinned (a card enrolled before the pin): the floor alone decides


def test_the_pin_does_not_replace_the_floor():
    """A card's own salt with a cheaper N is still refused by its floor."""
    with pytest.raises(ops.WeakKdfRefused, match="weaker"):
        ops.check_kdf(KdfParams(alg=KdfAlg.SCRYPT, salt=OWN, log2_n=14), "scrypt:15", OWN)


# ---------------------------------------------------------------- card.ini


def _home(tmp_path, **extra) -> cc.CardConfig:
    home = tmp_path / "home"
    cc.save(home, server="tcp:127.0.0.1:9", server_key="SHA256:x", serial=SERIAL, muk_poll="0", clock_poll="0",
            reconnect_attempts="1", **extra)
    return cc.load(home)


@pytest.mark.parametrize("text", ["zz" * 16, "73" * 15, "73" * 65, "0x" + "73" * 16])
def test_a_kdf_salt_that_is_not_one_is_refused_with_one_line(tmp_path, text):
    """card.ini ``kdf_salt`` must be 16 to 64 bytes of hex: anything else stops the card with one line naming
    the file and the setting (never silently unpinned)."""
    with pytest.raises(cc.CardConfigError, match=r"card\.ini: kdf_salt = .* is not accepted \(hex, 16 to 64 bytes\)"):
        _home(tmp_path, kdf_salt=text)


def test_pin_adds_only_what_card_ini_lacks_and_keeps_the_rest(tmp_path):
    """``pin`` adds missing settings, never replaces one card.ini holds, keeps every other setting, writes the
    file 0600, and does nothing without a card.ini."""
    config = _home(tmp_path, kdf_floor="scrypt:15", applications="piv")
    assert cc.pin(config.home, kdf_salt="73" * 16, kdf_floor="scrypt:10") == {"kdf_salt": "73" * 16}
    again = cc.load(config.home)
    assert again.settings["kdf_floor"] == "scrypt:15" and again.settings["applications"] == "piv"
    assert cc.kdf_salt(again.settings) == OWN and again.serial == SERIAL
    assert cc.pin(config.home, kdf_salt="00" * 16) == {} and cc.kdf_salt(cc.load(config.home).settings) == OWN
    assert (config.home / cc.CARD_INI).stat().st_mode & 0o777 == 0o600
    assert cc.pin(tmp_path / "none", kdf_salt="00" * 16) == {}


# ---------------------------------------------------------------- the card against a server


class Watched(FakeServer):
    """A FakeServer that records whether the card sent an AUTH_RESPONSE."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.responses = 0

    def answer(self, msg):
        if isinstance(msg, AuthResponse):
            self.responses += 1
        return super().answer(msg)


def _session(config, server) -> CardSession:
    storage = ServerStorage(config, Clock(), b"M" * 32, rand=os.urandom, worker=inline_worker,
                            connect=server.connect)
    return CardSession(config, Clock(), storage, rand=os.urandom, muk=lambda: b"m" * 32, pid=lambda: 1,
                       lock=MachineLock(str(config.home / "lock")), on_exit=lambda code, why: None)


def test_a_card_enrolled_before_the_pin_pins_its_salt_at_its_first_accepted_insert(tmp_path):
    """No kdf_salt or kdf_floor in card.ini (an older card): a refused insert pins nothing; the first insert the
    server accepts pins the salt and floor it derived with; after that, a server naming another salt is refused
    before the card answers."""
    server = Watched(SERIAL, "pw", _envelope)
    config = _home(tmp_path)
    session = _session(config, server)
    with pytest.raises(ops.OperationRefused):
        done(session.insert("wrong"))
    assert "kdf_salt" not in cc.load(config.home).settings
    done(session.insert("pw"))
    pinned = cc.load(config.home).settings
    assert pinned["kdf_salt"] == OWN.hex() and pinned["kdf_floor"] == f"scrypt:{SCRYPT_CHEAP}"
    assert config.settings["kdf_salt"] == OWN.hex()  # this process checks with it too
    done(session.remove("test"))
    server.kdf = KdfParams(alg=KdfAlg.SCRYPT, salt=b"S" * 16, log2_n=SCRYPT_CHEAP)
    answered = server.responses
    with pytest.raises(ops.KdfSaltRefused) as refused:
        done(session.insert("pw"))
    assert server.responses == answered and session.life is LifeState.IDLE
    assert "another salt" in explain(refused.value)
    release(session)


def test_a_pinned_card_on_another_machine_still_inserts_after_a_password_change(tmp_path):
    """The salt is kept across a password change: a second HOME with the same pinned card.ini (another machine)
    inserts with the new password afterwards, while a server that changed the salt would be refused there."""
    server = Watched(SERIAL, "pw", _envelope)
    here = _home(tmp_path / "a", kdf_salt=OWN.hex(), kdf_floor=f"scrypt:{SCRYPT_CHEAP}")
    there = _home(tmp_path / "b", kdf_salt=OWN.hex(), kdf_floor=f"scrypt:{SCRYPT_CHEAP}")
    session = _session(here, server)
    done(session.insert("pw"))
    done(session.change_password("pw", "new pw"))
    done(session.remove("test"))
    other = _session(there, server)
    done(other.insert("new pw"))
    assert done(other.counter("runs")) == 3
    release(other)
    release(session)


def test_enrolment_pins_the_salt_it_chose(tmp_path, monkeypatch):
    """``vsc card enroll`` writes the salt it derived with into card.ini (the one the server stores), with the
    floor; a later challenge naming another salt is refused by the card's credentials."""
    from tests.test_server_ops import Harness, cli_enrolment, route_cli_enrolment
    from vsc.cli import enrol as enrol_cli

    h = Harness(tmp_path)
    args = cli_enrolment(h, tmp_path)
    route_cli_enrolment(h, monkeypatch)
    home = tmp_path / "home"
    assert enrol_cli.cmd_enroll(args) == 0
    stored = KdfParams.decode(h.store.get("alice").kdf)
    config = cc.load(home)
    assert len(stored.salt) == 16 and cc.kdf_salt(config.settings) == stored.salt
    assert config.settings["kdf_floor"] == "scrypt:10"
    creds = enrol_cli._credentials(args, config)
    assert creds.kdf_salt == stored.salt
    other = AuthChallenge(kdf=KdfParams(alg=KdfAlg.SCRYPT, salt=b"S" * 16, log2_n=10).encode(),
                          challenges=(AuthItem(AuthMethod.PASSWORD),))
    with pytest.raises(ops.KdfSaltRefused):
        ops.answer(other, "alice", "correct horse", b"m" * 32, os.urandom, creds=creds)
