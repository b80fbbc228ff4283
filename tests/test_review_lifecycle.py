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
from vsc.card.session import CardSession
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
