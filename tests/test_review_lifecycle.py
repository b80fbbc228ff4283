"""
Rules of the card life cycle and the machine binding (vsc.card.machine,
vsc.card.session, vsc.protocol.lifecycle, vsc.protocol.server_ops) that an
adversarial review found broken, each with how it was broken; they hold
since the fix.
"""

from __future__ import annotations

import os
import pwd
import stat

import pytest
from twisted.internet.task import Clock

from tests.cardfakes import MemoryStorage, done, release
from vsc.card import machine
from vsc.card.config import CardConfig
from vsc.card.machine import MachineLock, compute_muk, muk_sources
from vsc.card.protected import PlainItem, seal_envelope
from vsc.card.session import CardError, CardSession
from vsc.wire.protected import ItemKind, encode_counter

SERIAL = "review-life-1"
KEY = bytes(range(32))


def _envelope() -> bytes:
    return seal_envelope(SERIAL, KEY, [PlainItem(ItemKind.COUNTER, "runs", encode_counter(3))], os.urandom)


def _config(home) -> CardConfig:
    return CardConfig(home=home, server="", server_key="", serial=SERIAL, muk_poll=60.0, clock_poll=0)


# ================================================================ 1. the MUK is not public


def test_another_local_user_cannot_compute_the_owners_muk(tmp_path):
    """
    Recover (Figure 12) needs "the MUK recorded at the last insert, taken
    while holding the machine lock" (docs/security.md, "A second machine"),
    and answers carrying that MUK count in the owner's own lockout bucket,
    the one "nobody else can fill" (docs/admin.md §9). Another user of the
    same host is another machine to the server. Broken: the MUK hashed only
    world-readable facts — /sys/class/net/*/address, /sys/block/*/size,
    /proc/meminfo, the host name — and the owner's login name, which
    /etc/passwd shows to every local user. So any local user computed the
    owner's MUK exactly as below, and with it (a) recovered the owner's card
    while it was in use here, without the owner's machine lock (with the
    password: a second machine taking the card), and (b) sent wrong answers
    in the owner's own bucket until the owner's insert was refused
    unevaluated (a denial of service without the password). The MUK must
    mix in something only the owner can read.
    """
    owner = pwd.getpwuid(os.geteuid()).pw_name
    # what another local user computes: the very same world-readable sources, the owner's login name
    forged = compute_muk(dict(muk_sources(), user=owner))

    storage = MemoryStorage(SERIAL, _envelope(), KEY, os.urandom)
    session = CardSession(_config(tmp_path), Clock(), storage, rand=os.urandom, pid=lambda: 1,
                          lock=MachineLock(str(tmp_path / "lock")))  # the default MUK: the daemon's
    done(session.insert("pw"))
    try:
        assert len(session.muk) == 32
        assert session.muk != forged
        # stable for this machine and home: the CLI's recover sends what the daemon's insert sent
        assert machine.machine_muk(tmp_path) == session.muk
    finally:
        release(session)


def test_the_machine_secret_is_the_owners_alone(tmp_path):
    """
    The secret mixed into the MUK is created 0600 with O_EXCL; one that is a
    symbolic link, not the user's, or readable by others (it may have been
    read) is refused with one line and never used or repaired.
    """
    home = tmp_path / "home"
    first = machine.machine_muk(home)
    path = home / machine.SECRET_NAME
    st = os.lstat(path)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert machine.machine_muk(home) == first

    os.chmod(path, 0o644)
    with pytest.raises(machine.MachineKeyError, match="readable by others"):
        machine.machine_muk(home)
    os.chmod(path, 0o600)

    other = tmp_path / "other"
    other.mkdir()
    os.symlink(path, other / machine.SECRET_NAME)
    with pytest.raises(machine.MachineKeyError, match="not a file of yours"):
        machine.machine_muk(other)
    assert machine.machine_muk(home) == first


# ================================================================ 2. one generation, one copy


class KeepingServer(MemoryStorage):
    """A malicious storage: keeps every upload, also those it answers with a failure; hands out what it likes."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.sent: list[bytes] = []

    async def store(self, envelope: bytes) -> None:
        self.sent.append(envelope)  # kept, whatever the answer
        await super().store(envelope)

    async def hand_back(self) -> None:
        pass


def _runs_envelope(runs: int) -> bytes:
    return seal_envelope(SERIAL, KEY, [PlainItem(ItemKind.COUNTER, "lic:app", encode_counter(runs))], os.urandom)


def _card(home, storage) -> CardSession:
    return CardSession(_config(home), Clock(), storage, rand=os.urandom, muk=lambda: b"m" * 32, pid=lambda: 1,
                       lock=MachineLock(str(home / "lock")))


@pytest.mark.parametrize("where", ["one card process", "a later card process"])
def test_a_failed_upload_of_the_same_generation_is_no_way_back(tmp_path, where):
    """
    docs/security.md "Rollback": the generation sealed in the protected
    information and the HOME/freshness record cover "a malicious server
    that hands back any older copy", and even an accepted rollback refunds
    no rental run. Broken: a generation number was reused. A sync the
    server answers with a failure is undone on the card, but the server
    keeps the upload; the card's next upload carried the same generation
    (in the same process, because a failed export did not use its number
    up; in a later process, because it starts from the copy it is given).
    Here the malicious server fails a ``data put`` (kept: 3 runs), then
    stores a spent run (2 runs, acknowledged and recorded), and at the next
    insert hands back the failed upload: same generation as the record, so
    it was accepted — the acknowledged change silently gone and the run
    refunded. A copy of the recorded generation that is not the recorded
    copy must be refused like an older one.
    """
    storage = KeepingServer(SERIAL, _runs_envelope(3), KEY, os.urandom)
    card = _card(tmp_path, storage)
    done(card.insert("pw"))
    base = storage.envelope
    storage.fail_store = "the server failed"
    with pytest.raises(CardError):
        done(card.data_put("note", b"x"))
    kept = storage.sent[-1]  # failed for the card, kept by the server
    storage.fail_store = None
    if where == "a later card process":
        card.abort("the owner gives up on this process", code=None)  # nothing acknowledged since the insert
        card = _card(tmp_path, storage)
        storage.envelope = base  # the server hands out the copy before the failed upload
        done(card.insert("pw"))
    assert done(card.counter("lic:app", -1)) == 2  # acknowledged: HOME/freshness records it
    card.abort("the process ends without remove", code=None)

    storage.envelope = kept
    again = _card(tmp_path, storage)
    try:
        with pytest.raises(CardError, match="older copy|another copy"):
            done(again.insert("pw"))
    finally:
        release(again)


# ================================================================ 3. the card's home is the owner's


NOBODY = 65534


def _squatted_home(tmp_path):
    """A HOME another local user made first (as in /tmp, where anyone may): theirs, open to all."""
    home = tmp_path / "card"
    home.mkdir()
    os.chmod(home, 0o777)
    return home


def test_a_card_home_another_user_can_write_is_refused(tmp_path):
    """
    The card's HOME holds what decides where the password goes: card.ini's
    server, its pinned ``server_key`` and ``kdf_floor``; and the machine
    secret, the keyfile and the freshness record. Broken: neither enrolment
    (``config.save``) nor any use (``config.load``: the daemon, ``vsc card
    recover``) looked at who can write HOME. Another local user who made the
    directory first (``--home /tmp/card``), or any HOME writable by others,
    can swap card.ini for one naming their own server and key and
    ``kdf_floor = legacy``: the owner's next insert then answers that
    server's challenge with an MD5-derived authentication key, a fast
    offline guess of the password. HOME must be a directory of the user (or
    root) that nobody else can write, like the lock's directory; anything
    else is refused with one line, never repaired.
    """
    from vsc.card import config as cc

    home = _squatted_home(tmp_path)
    with pytest.raises(cc.CardConfigError, match="writable by others"):
        cc.save(home, server="tcp:127.0.0.1:9", server_key="SHA256:x", serial=SERIAL)

    os.chmod(home, 0o700)
    cc.save(home, server="tcp:127.0.0.1:9", server_key="SHA256:x", serial=SERIAL)  # the owner's own: fine
    assert cc.load(home).serial == SERIAL
    os.chmod(home, 0o777)  # later opened up to others: the squatter may have replaced card.ini
    with pytest.raises(cc.CardConfigError, match="writable by others"):
        cc.load(home)

    os.chmod(home, 0o755)
    os.chown(home, NOBODY, NOBODY)  # made by another user, not writable by us or others: still theirs
    with pytest.raises(cc.CardConfigError, match="belongs to"):
        cc.load(home)


def test_a_card_home_made_by_another_user_between_the_check_and_the_mkdir_is_refused(tmp_path, monkeypatch):
    """
    ``config.save`` checked HOME and then made it with ``mkdir(exist_ok=True)``:
    a HOME another user made in between (under /tmp, say) was used, and
    card.ini written into it. The race is made deterministic by creating
    the other user's directory right after the first check returns; save
    must check again once the directory exists.
    """
    import stat

    import pytest

    from vsc.card import config as cc

    if os.getuid() != 0:
        from tests.integration import missing

        missing("making a directory of another user needs root (CI runs as root)")
    home = tmp_path / "card"
    real = cc.check_home
    calls = []

    def check_then_squat(path):
        real(path)
        if not calls:
            calls.append(path)
            home.mkdir(mode=0o755)
            os.chown(home, NOBODY, NOBODY)

    monkeypatch.setattr(cc, "check_home", check_then_squat)
    with pytest.raises(cc.CardConfigError, match="not to you"):
        cc.save(home, serial="s", server="tcp:127.0.0.1:1", server_key="SHA256:x")
    assert not (home / cc.CARD_INI).exists()
    assert stat.S_IMODE(home.stat().st_mode) == 0o755
