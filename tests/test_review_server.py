"""
Rules of the server (vsc.server.store, vsc.server.admission,
vsc.server.service, vsc.protocol.server_ops) that an adversarial review
found broken, each with how it was broken; they hold since the fix. Deterministic: a fixed clock, a real
SQLite Store on a temporary file driven by hand, StringTransport connections.
"""

from __future__ import annotations

from twisted.internet.address import IPv6Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from tests.test_server_ops import (
    AUTH_INFO,
    KDF,
    MASTER,
    NOW,
    SECRET,
    SERIAL,
    VERIFIER,
    WRONG_KEY,
    Now,
    answer,
    machine,
    request,
)
from vsc import crypto
from vsc.protocol import auth
from vsc.protocol.cardstore import STORE_CALLS, CountFailure, EnrolCard
from vsc.protocol.lifecycle import Operation, State
from vsc.protocol.lockout import LockoutPolicy, SourceLimits, source_of
from vsc.protocol.server_ops import OpsPolicy, Reply
from vsc.protocol.suites import ChannelConfig
from vsc.server.admission import Admission, AdmissionLimits
from vsc.server.service import ServerFactory
from vsc.server.store import Store
from vsc.wire.ops import Op, OpResult, Status

# ---------------------------------------------------------------- helpers


def _store(tmp_path, now) -> Store:
    store = Store(f"sqlite:///{tmp_path / 'vsc.sqlite3'}", now, LockoutPolicy())
    store.migrate()
    code_hash = auth.code_hash("CODE-1")
    store.issue(SERIAL, code_hash, AUTH_INFO, 3600)
    out = store.enrol(EnrolCard(serial=SERIAL, code_hash=code_hash, verifier=VERIFIER, kdf=KDF,
                                protected=b"PROTECTED", registration=b"", auth_extra={}, peer="enrol"))
    assert out.status is Status.OK
    return store


def _drive(m, effects: list, store: Store) -> list:
    """Carry out the machine's store effects on ``store`` as the glue does (one at a time, in order); the replies."""
    replies = []
    for e in effects:
        if isinstance(e, Reply):
            replies.append(e.message)
        elif type(e) in STORE_CALLS:
            replies += _drive(m, m.stored(STORE_CALLS[type(e)](store, e)), store)
    return replies


def _challenge(m, store: Store):
    """An insert on ``m`` up to its challenge, from a load of the store's row as the glue makes it."""
    (load,) = m.message(request(Op.INSERT, insert_secret=SECRET))
    effects = m.loaded(STORE_CALLS[type(load)](store, load))
    return effects[0].message


# ---------------------------------------------------------------- 1. the per-card guessing bucket


def test_a_challenge_loaded_before_the_card_bucket_closed_is_refused_unevaluated_after_it_closed(tmp_path):
    """
    Rule (vsc.protocol.lockout, docs/security.md "Lockout"): from the
    per-card threshold on, an answer from a machine other than the owner's
    last is evaluated only ``delay`` seconds after the last failure; attempts
    inside that window are refused unevaluated. That bucket "bounds the
    guesses all sources together get" (49 a day per card).

    Before the fix: the throttle is read from the row loaded when the challenge was
    sent (server_ops ``answered``: ``card.throttled`` on ``core.card``), and
    neither ``Store.check_out`` nor ``Store.count_failure`` looks at
    ``locked_until`` under the row lock. A stranger with many source
    addresses loads one challenge per source while the bucket is open and
    answers them all after it closed: every answer is evaluated, and a right
    one checks the card out. Here the card is one failure below the shared
    threshold; source A's wrong answer closes the bucket (locked_until = now
    + 30 s, as a fresh load confirms), and source B's right answer to a
    challenge it loaded a moment before is accepted inside the window.
    """
    now = Now()
    store = _store(tmp_path, now)
    policy = LockoutPolicy()
    for _ in range(policy.shared_threshold - 1):
        store.count_failure(CountFailure(SERIAL, Operation.INSERT, "x", "earlier guess", None, False))
    assert store.get(SERIAL).locked_until == 0.0  # still open

    limits = SourceLimits(policy, now)
    a = machine(now=now, limits=limits, peer="192.0.2.1:1000")
    b = machine(now=now, limits=limits, peer="198.51.100.2:2000")
    ch_a, ch_b = _challenge(a, store), _challenge(b, store)  # both loaded while the bucket is open

    assert _drive(a, a.message(answer(ch_a, key=WRONG_KEY)), store) == [OpResult(status=Status.REFUSED)]
    card = store.get(SERIAL)
    assert card.failures == policy.shared_threshold and card.locked_until == NOW + policy.base  # now closed

    c = machine(now=now, limits=limits, peer="203.0.113.3:3000")  # a challenge loaded now is throttled
    assert _drive(c, c.message(answer(_challenge(c, store))), store) == [OpResult(status=Status.REFUSED)]
    assert store.get(SERIAL).state is State.IDLE

    # B answers (rightly) inside the window A's failure opened: it must be refused unevaluated, like C
    replies = _drive(b, b.message(answer(ch_b)), store)
    assert replies == [OpResult(status=Status.REFUSED)], replies
    assert store.get(SERIAL).state is State.IDLE


def test_stale_challenges_are_not_counted_inside_the_window(tmp_path):
    """
    Rule (vsc.protocol.lockout): "Attempts inside that window are refused
    without being evaluated or counted, so hammering does not extend it."

    Before the fix: ten challenges loaded from ten sources while the per-card bucket
    was open, answered wrongly after the first failure closed it, are all
    evaluated and counted (Store.count_failure does not look at
    locked_until): 19 + 10 = 29 failures, and the window grows from 30 s to
    an hour (30 s doubling per failure, capped), where only the first of the
    ten should have counted.
    """
    now = Now()
    store = _store(tmp_path, now)
    policy = LockoutPolicy()
    for _ in range(policy.shared_threshold - 1):
        store.count_failure(CountFailure(SERIAL, Operation.INSERT, "x", "earlier guess", None, False))
    limits = SourceLimits(policy, now)
    ms = [machine(now=now, limits=limits, peer=f"192.0.2.{i}:1000") for i in range(1, 11)]
    challenges = [_challenge(m, store) for m in ms]
    for m, ch in zip(ms, challenges):
        assert _drive(m, m.message(answer(ch, key=WRONG_KEY)), store) == [OpResult(status=Status.REFUSED)]
    card = store.get(SERIAL)
    assert (card.failures, card.locked_until) == (policy.shared_threshold, NOW + policy.base), \
        f"{card.failures} failures counted, next answer evaluated after {card.locked_until - NOW:g} s"


# ---------------------------------------------------------------- 2. IPv4 clients of a dual-stack listener


def test_ipv4_clients_of_a_dual_stack_listener_are_not_one_source():
    """
    Rule (vsc.protocol.lockout.source_of, used by every per-source limit):
    a source is the IPv4 address, or the /64 of an IPv6 one.

    Before the fix: a server listening on ``tcp6:PORT`` (vsc.server.tap names tcp6;
    Linux sockets are dual-stack by default) sees IPv4 clients as
    IPv4-mapped addresses (``::ffff:192.0.2.1``; checked with a real tcp6
    listener and a TCP4 client), and source_of takes their /64, ``::/64``:
    every IPv4 client on the Internet is one source.
    """
    assert source_of("::ffff:192.0.2.1") != source_of("::ffff:198.51.100.9")


def test_one_ipv4_client_of_a_dual_stack_listener_cannot_use_up_other_ipv4_clients_slots():
    """
    Rule (vsc.server.admission): at most ``max_unauthenticated_per_source``
    unauthenticated connections *from one source address*; a source with
    few connections (the owner's) gets in.

    Before the fix, on a tcp6 (dual-stack) listener: one IPv4 stranger holding its
    per-source share of unauthenticated connections (here 1) makes the
    server refuse every other IPv4 client, the owner included (SERVER_BUSY
    at accept), and _make_room cannot help (it is the owner's own "source").
    The handshake token bucket and the in-memory lockout buckets
    (SourceLimits) are shared the same way.
    """
    clock = Clock()
    clock.advance(NOW)
    from tests.vectors.support import fixed_key

    admission = Admission(AdmissionLimits(max_unauthenticated=100, max_unauthenticated_per_source=1), clock.seconds)
    factory = ServerFactory(ChannelConfig(), fixed_key(), clock, admission=admission)

    def connect(host: str):
        addr = IPv6Address("TCP", host, 40000)
        p = factory.buildProtocol(addr)
        t = StringTransport(peerAddress=addr)
        p.makeConnection(t)
        return p, t

    stranger, _ = connect("::ffff:198.51.100.9")
    assert stranger._counted
    owner, t = connect("::ffff:192.0.2.1")
    assert owner._counted and not t.disconnecting, "the owner's connection was refused (SERVER_BUSY)"


# ---------------------------------------------------------------- 3. history rows written for strangers, unthrottled


def test_a_stranger_cannot_grow_the_history_without_bound_with_session_requests(tmp_path):
    """
    Rule (vsc.protocol.server_ops, ``too_late``; docs/security.md
    "holding"): a stranger who keeps asking cannot grow the history without
    bound; refusals of a throttled source are only logged ("no history row,
    so no flood").

    The session operations (sync, remove, attach, password change) need no
    authentication but the card's insert secret. Before the fix every
    refusal was a permanent history row (Store._session): one
    unauthenticated channel wrote a row per request (120 rows for 60
    requests on the owner's card and 60 for serials that do not exist).
    Now a refusal to a non-holder counts for its source like a failed
    authentication, and once the source is throttled its refusals are only
    logged: here 300 requests write at most ``source_threshold`` rows, each
    gets the same answer, and the holder's own requests from the same
    (throttled) address are served and recorded.
    """
    now = Now()
    store = _store(tmp_path, now)
    policy = LockoutPolicy()
    limits = SourceLimits(policy, now)
    owner = machine(now=now, peer="198.51.100.7:1000", limits=limits)  # behind the stranger's address
    assert _drive(owner, owner.message(answer(_challenge(owner, store))), store)[0].status is Status.OK
    before = len(store.history())
    stranger = machine(now=now, peer="198.51.100.7:2000", limits=limits)
    for i in range(150):
        for serial in (SERIAL, f"no-such-{i}"):
            wrong = crypto.sha256(b"a guess %d" % i)
            assert wrong != SECRET
            effects = stranger.message(request(Op.SYNC, serial=serial, insert_secret=wrong, version=1, protected=b"x"))
            assert _drive(stranger, effects, store)[0].status is Status.REFUSED  # recorded or not, the same answer
    grown = len(store.history()) - before
    assert grown <= policy.source_threshold, f"{grown} history rows written for one unauthenticated source"
    # the holder's own requests from the same, now throttled, address are served and recorded as ever
    effects = owner.message(request(Op.SYNC, serial=SERIAL, insert_secret=SECRET, version=1, protected=b"new"))
    assert _drive(owner, effects, store)[0].status is Status.OK
    assert store.get(SERIAL).protected == b"new" and len(store.history()) == before + grown + 1
