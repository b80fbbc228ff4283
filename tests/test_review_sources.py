"""
Review: who a "source" is, and what each source may hold (the network attacker's view).

vsc.protocol.lockout.source_of already keys IPv6 peers by their /64 and
IPv4-mapped peers by their IPv4 address (tests/test_review_server.py); these
tests cover what was still wrong around it.
"""

from __future__ import annotations

import socket
import struct

import pytest
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from vsc.protocol.lockout import LockoutPolicy, SourceLimits
from vsc.protocol.suites import ChannelConfig
from vsc.server.admission import Admission, AdmissionLimits
from vsc.server.service import ServerFactory

NOW = 1_800_000_000.0


def _factory(**limits) -> tuple[ServerFactory, Admission, Clock]:
    from tests.vectors.support import fixed_key

    clock = Clock()
    clock.advance(NOW)
    admission = Admission(AdmissionLimits(**limits), clock.seconds)
    return ServerFactory(ChannelConfig(), fixed_key(), clock, admission=admission), admission, clock


def _connect(factory: ServerFactory, addr, transport=None):
    p = factory.buildProtocol(addr)
    t = transport if transport is not None else StringTransport(peerAddress=addr)
    p.makeConnection(t)
    return p, t


# ---------------------------------------------------------------- 1. crowding out from many /64s of one site


def test_a_flood_from_many_64s_of_one_ipv6_site_does_not_keep_the_owner_out():
    """
    Rule (docs/admin.md §9a, vsc.server.admission): at the overall cap "a
    connection from an address holding fewer gets in by closing the oldest
    unauthenticated connection of the address holding the most, so a flood
    from many addresses crowds out itself, not the owner"; docs/security.md
    "descriptors": "at the cap a source with few connections gets in".

    Before the fix: an IPv6 source is a /64, and one end site is given a /48
    (65,536 /64s; a tunnel broker hands one out for free). A stranger who
    holds the whole cap with one connection from each of as many /64s of its
    /48 is, to the crowding-out logic, as many sources holding one
    connection each: nobody holds "more" than the owner's one to come, so
    the owner's connection was refused (SERVER_BUSY at accept) for as long
    as the stranger kept its connections alive. Now the crowding-out
    compares IPv6 sources by their /48 (an IPv4 address stays its own): the
    owner gets in by closing the stranger's oldest connection, and the
    stranger's next connection, from yet another /64 of its /48, cannot
    close the owner's.
    """
    factory, admission, _ = _factory(max_unauthenticated=8, max_unauthenticated_per_source=64)
    flood = [_connect(factory, IPv6Address("TCP", f"2001:db8:7:{i:x}::1", 40000 + i)) for i in range(8)]
    assert all(p._counted for p, _ in flood) and admission.unauthenticated == 8

    owner, t = _connect(factory, IPv4Address("TCP", "192.0.2.10", 50000))
    assert owner._counted and not t.disconnecting, "the owner was refused: the flood of /64s kept it out"
    assert flood[0][1].disconnected or flood[0][1].disconnecting, "the stranger's oldest connection was kept"

    again, t2 = _connect(factory, IPv6Address("TCP", "2001:db8:7:ff::1", 41000))
    assert not again._counted and owner._counted and not t.disconnecting

    # an IPv6 owner in a site of its own gets in the same way
    owner6, t6 = _connect(factory, IPv6Address("TCP", "2001:db8:99:1::5", 50001))
    assert owner6._counted and not t6.disconnecting


def test_crowding_out_a_site_closes_its_most_crowded_sources_connection_not_the_owners():
    """
    Rule (docs/admin.md §9a): room is made by closing a connection of
    whoever holds the most, never of a source with few connections such
    as the owner's. Guards the site-wide crowding-out above: an IPv6 site
    (/48) is often shared (a hosting provider gives each customer a /64 of
    one /48); the connection closed in the most crowded site is the oldest
    of its most crowded /64, not the site's oldest, which may be the
    owner's one connection beside a stranger's many.
    """
    factory, _, _ = _factory(max_unauthenticated=4, max_unauthenticated_per_source=64)
    owner, t = _connect(factory, IPv6Address("TCP", "2001:db8:7:1::1", 40000))
    stranger = [_connect(factory, IPv6Address("TCP", "2001:db8:7:2::1", 41000 + i)) for i in range(3)]
    newcomer, _ = _connect(factory, IPv4Address("TCP", "192.0.2.99", 50000))
    assert newcomer._counted
    assert owner._counted and not t.disconnecting, "the owner's one connection was closed, not the stranger's"
    assert stranger[0][1].disconnecting or stranger[0][1].disconnected


def test_a_source_at_its_own_cap_closes_nobody_elses_connection():
    """
    Rule (vsc.server.admission.Admission.crowded): room is made only for a
    connection that would then be admitted; one refused for its own
    source's cap (``max_unauthenticated_per_source``) closes nothing.
    Guards the site-wide crowding-out: a source at its own cap, in a site
    holding fewer connections than another, must not close a connection of
    that other site and then be refused all the same.
    """
    factory, admission, _ = _factory(max_unauthenticated=4, max_unauthenticated_per_source=1)
    others = [_connect(factory, IPv6Address("TCP", f"2001:db8:7:{i:x}::1", 40000 + i)) for i in range(3)]
    mine, _ = _connect(factory, IPv4Address("TCP", "192.0.2.10", 50000))
    assert mine._counted and admission.unauthenticated == 4
    second, _ = _connect(factory, IPv4Address("TCP", "192.0.2.10", 50001))
    assert not second._counted
    assert all(p._counted for p, _ in others), "a connection of another site was closed for nothing"
    assert admission.unauthenticated == 4


# ---------------------------------------------------------------- 2. UNIX-socket peers: every local user one source


class _Creds:
    """A UNIX socket's stand-in: SO_PEERCRED answers (pid, uid, gid)."""

    def __init__(self, uid: int):
        self.uid = uid

    def getsockopt(self, level, option, size=None):
        assert (level, option) == (socket.SOL_SOCKET, socket.SO_PEERCRED)
        return struct.pack("3i", 4242, self.uid, self.uid)

    def fileno(self) -> int:
        return -1


class _UnixTransport(StringTransport):
    def __init__(self, uid: int):
        super().__init__(peerAddress=UNIXAddress(None))
        self._handle = _Creds(uid)

    def getHandle(self):  # noqa: N802 - ITransport
        return self._handle


def test_one_local_user_cannot_use_up_every_local_users_share_on_a_unix_socket():
    """
    Rule (docs/admin.md §9/§9a): every per-source limit counts "one source
    address"; a stranger's share never becomes the owner's. A server may
    listen on ``unix:PATH`` (docs/protocol.md), which other local users
    reach through the socket's permissions.

    Before the fix: a UNIX-socket peer has no address (``UNIXAddress(None)``),
    so every local user was one source, "" (and "None" for the lockout
    buckets, another key than admission's): one local user holding
    ``max_unauthenticated_per_source`` idle connections made the server
    refuse every other local user's connection (SERVER_BUSY), spending the
    shared handshake tokens kept every local card out, and 50 wrong answers
    throttled every local user's authentications. Now a UNIX peer's source
    is its user id (SO_PEERCRED), the same key for admission, the handshake
    bucket and the lockout buckets, and the history names it.
    """
    factory, admission, _ = _factory(max_unauthenticated=100, max_unauthenticated_per_source=2, handshake_burst=2,
                                     handshakes_per_second=0.01)
    stranger = [_connect(factory, UNIXAddress(None), _UnixTransport(1001)) for _ in range(3)]
    assert [p._counted for p, _ in stranger] == [True, True, False]
    owner, t = _connect(factory, UNIXAddress(None), _UnixTransport(1000))
    assert owner._counted and not t.disconnecting, "one local user's connections kept another local user out"
    assert owner.source != stranger[0][0].source
    assert "1000" in owner.source and "1000" in owner.peer, (owner.source, owner.peer)


def test_a_unix_peer_without_credentials_is_one_source_for_every_limit():
    """
    Rule: admission and the lockout buckets count the same source
    (vsc.server.service passes ``source`` to ServerOps). Before the fix a
    UNIX peer was "" for admission and "None" (its peer name) for the
    lockout buckets. A peer whose credentials cannot be read (a transport
    without a socket) is one source, the same for both.
    """
    factory, _, _ = _factory()
    p, _ = _connect(factory, UNIXAddress(None), StringTransport(peerAddress=UNIXAddress(None)))
    assert p.source and p.source != "None"


def test_the_source_of_a_real_unix_socket_peer_is_its_user():
    """SO_PEERCRED on a real UNIX socket pair: the source names this process's user id."""
    import os

    from vsc.net.channel import peer_uid

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        class T(StringTransport):
            def getHandle(self):  # noqa: N802
                return a

        assert peer_uid(T()) == os.getuid()
        assert peer_uid(StringTransport()) is None
    finally:
        a.close()
        b.close()


# ---------------------------------------------------------------- 3. the peer an IPv6 history row names


def test_an_ipv6_peer_in_the_history_and_logs_is_unambiguous():
    """
    Rule (docs/admin.md §7 "history": each row's ``peer`` names the machine
    that made the request; RFC 5952 §6: an IPv6 address with a port is
    written ``[address]:port``).

    Before the fix the peer was ``f"{host}:{port}"`` for IPv6 too:
    ``2001:db8::1`` port 4433 was written ``2001:db8::1:4433``, which is
    itself another valid IPv6 address — an administrator blocking the
    address the history shows blocks the wrong machine. Now it is
    ``[2001:db8::1]:4433``; the source (the /64) is unchanged.
    """
    factory, _, _ = _factory()
    p, _ = _connect(factory, IPv6Address("TCP", "2001:db8::1", 4433))
    assert p.peer == "[2001:db8::1]:4433"
    assert p.source == "2001:db8::/64"
    q, _ = _connect(factory, IPv4Address("TCP", "192.0.2.1", 4433))
    assert q.peer == "192.0.2.1:4433"


# ---------------------------------------------------------------- 4. the source-wide bucket never forgets


def test_a_source_with_one_typo_a_day_is_not_throttled_for_an_hour_after_every_typo():
    """
    Rule (vsc.protocol.lockout docstring, docs/admin.md §9): a bucket counts
    *consecutive* failures ("A bucket with ``failures`` consecutive
    failures ..."), and a success resets the bucket it was counted in.

    The per-source bucket over all cards, ``(source, "")``, is never reset:
    a success resets only ``(source, serial)``, and nothing decays. An office
    behind one NAT (or one IPv6 /64) whose users make one failed answer a
    day from a machine that is not the card's last (a new laptop, a stale
    card process's sync with an old insert secret), each followed by a
    success, reaches ``lockout_source`` (50) in 50 days; from then on every
    single further failure closes that source for every card — 30 s, then
    60 s, ... and after two months a whole hour in which every other user
    behind it is refused unevaluated on any machine but their cards' last.

    Now that bucket forgets one failure per ``lockout_max`` (a success cannot
    reset it: an attacker's own card would buy that reset), so a failure a
    day never adds up.
    """
    clock = Clock()
    clock.advance(NOW)
    limits = SourceLimits(LockoutPolicy(), clock.seconds)
    office = "198.51.100.7"
    for day in range(60):
        clock.advance(86400)
        limits.failed(office, f"card{day}")
        limits.succeeded(office, f"card{day}")
    clock.advance(86400)
    limits.failed(office, "typo")  # one failed answer after a day without any
    clock.advance(60)
    assert not limits.throttled(office, "colleague"), "one typo closed the whole source for every card"


def test_the_source_bucket_that_forgets_still_stops_a_scan():
    """
    Rule (vsc.protocol.lockout): the source-wide bucket limits one source
    scanning many serials: ``lockout_source`` (50) free failures, then the
    doubling delays, and in the long run one evaluated failure per
    ``lockout_max``. Forgetting (one failure per ``lockout_max``) must not
    buy a scanner more than that: here a source guesses a NEW serial (so
    its per-card buckets never close) every 10 s for two days, taking every
    attempt the server evaluates. On the second day it gets at most one per
    hour (24, and one at the day's edge), as without forgetting.
    """
    clock = Clock()
    clock.advance(NOW)
    policy = LockoutPolicy()
    limits = SourceLimits(policy, clock.seconds)
    scanner = "203.0.113.9"
    evaluated = {0: 0, 1: 0}
    for step in range(2 * 86400 // 10):
        day = step * 10 // 86400
        serial = f"serial{step}"
        if not limits.throttled(scanner, serial):
            evaluated[day] += 1
            limits.failed(scanner, serial)
        clock.advance(10)
    assert evaluated[0] <= policy.guesses_per_day(policy.source_threshold) + 24, evaluated
    assert evaluated[0] >= policy.source_threshold, evaluated
    assert evaluated[1] <= 25, f"the scanner had {evaluated[1]} evaluated guesses on its second day"
    # and right after a burst the source is closed for every card
    limits2 = SourceLimits(policy, clock.seconds)
    for i in range(policy.source_threshold):
        limits2.failed(scanner, f"s{i}")
    assert limits2.throttled(scanner, "any-other-card")


def test_after_a_clock_step_back_the_source_bucket_forgets_by_the_time_that_really_passes():
    """
    Rule (vsc.protocol.lockout, SourceLimits._forget): the source-wide
    bucket forgets one failure per ``lockout_max`` of time that passes. A
    clock stepped back (NTP, a restored VM) puts the last counted point in
    the future: counted naively, the negative time would *add* failures
    (an office closed longer for the server's clock fault), and kept as it
    was it would forget nothing until the clock caught up again. Here: 51
    failures, a step back of ten hours, then nine hours and 59 minutes of
    real time: nine failures forgotten, no more and no fewer.
    """
    clock = Clock()
    clock.advance(NOW)
    policy = LockoutPolicy()
    limits = SourceLimits(policy, clock.seconds)
    src = "198.51.100.20"
    for i in range(policy.source_threshold):
        limits.failed(src, f"c{i}")
    back = Clock()
    back.advance(NOW - 10 * 3600)
    limits.now = back.seconds
    limits.failed(src, "c-back")  # counted at the stepped-back time: forgets nothing
    back.advance(10 * 3600 - 1)
    limits.failed(src, "c-forward")  # ten hours after the step, but not after the last counted point + 10 h
    bucket = limits._buckets[(src, "")]
    assert bucket.failures == policy.source_threshold + 2 - 9, bucket
