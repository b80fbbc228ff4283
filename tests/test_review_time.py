"""
Rules about time (timers, deadlines, expiries, clock checks, throttles) that
an adversarial review found broken, each with how it was broken; they hold
since the fix. Deterministic: an injected clock the test moves (also
backwards, as an NTP step or a restored VM does), a real SQLite Store on a
temporary file, twisted.internet.task.Clock for the reactor.
"""

from __future__ import annotations

from tests.test_review_server import _challenge, _drive, _store
from tests.test_server_ops import SERIAL, Now, answer, machine
from vsc.protocol.cardstore import CountFailure
from vsc.protocol.lifecycle import Operation, State
from vsc.protocol.lockout import LockoutPolicy, SourceLimits
from vsc.card.session import LifeState
from vsc.wire.ops import OpResult, Status

YEAR = 365 * 86400.0


# ---------------------------------------------------------------- 1. throttles and a wall clock stepped back


def test_a_clock_stepped_back_never_keeps_a_bucket_closed_longer_than_lockout_max(tmp_path):
    """
    Rule (vsc.protocol.lockout, docs/security.md "Lockout", docs/admin.md
    lockout_max): a bucket's next attempt is evaluated at most
    ``lockout_max`` (1 h) after its last failure; the owner is never kept
    out beyond that, and nothing is locked.

    Before the fix: the buckets store *when* they open again in wall-clock
    time (``locked_until``, ``next_allowed``: the reactor's seconds()), and
    compare it with the wall clock. A server whose clock ran ahead (a wrong
    RTC, a VM started with the wrong time) and was then stepped back by NTP
    keeps every bucket closed during that stretch for the whole size of the
    step: strangers' 20 guesses while the clock was a year ahead kept the
    owner's right answer from a new machine refused, unevaluated, for a year
    (and a source's buckets in server memory likewise).

    Now a wait further ahead than ``lockout_max`` cannot be one the schedule
    set at this clock: the first attempt that meets it brings it back to
    ``lockout_max`` from then (the per-card row in the database, with a
    history line; the source's bucket in memory). A step back still never
    shortens a wait (tests/test_store.py), and no longer keeps anyone out
    for longer than ``lockout_max``.
    """
    now = Now()
    store = _store(tmp_path, now)
    policy = LockoutPolicy()
    real = now.t
    now.t = real + YEAR  # the server's clock runs a year ahead ...
    for _ in range(policy.shared_threshold + 3):
        store.count_failure(CountFailure(SERIAL, Operation.INSERT, "x", "a stranger's guess", None, False))
    assert store.get(SERIAL).locked_until > now.t
    limits = SourceLimits(policy, now)
    for _ in range(policy.threshold + 3):  # ... and the owner mistypes from a café
        limits.failed("192.0.2.7", SERIAL)
    assert limits.throttled("192.0.2.7", SERIAL)

    now.t = real + 60  # NTP steps it back to the right time: the first attempts are still refused ...
    assert limits.throttled("192.0.2.7", SERIAL)
    owner = machine(now=now, limits=limits, peer="198.51.100.9:4000")  # the owner's new laptop
    assert _drive(owner, owner.message(answer(_challenge(owner, store), muk=b"L" * 32)), store) == \
        [OpResult(status=Status.REFUSED)]
    now.t += policy.maximum + 1  # ... but no longer than lockout_max
    assert not limits.throttled("192.0.2.7", SERIAL), "the café is still throttled, a year long"
    owner = machine(now=now, limits=limits, peer="198.51.100.9:4000")
    replies = _drive(owner, owner.message(answer(_challenge(owner, store), muk=b"L" * 32)), store)
    assert replies == [OpResult(status=Status.OK, version=1, protected=b"PROTECTED")], \
        f"the owner's right answer is still refused, a year long: {replies}"
    assert store.get(SERIAL).state is State.IN_USE


# ---------------------------------------------------------------- 2. the card waits for the server's answer


def test_a_card_request_the_server_never_answers_fails_within_the_answer_timeout(tmp_path):
    """
    Rule (docs/card.md "Reconnecting"; vsc.card.session ``remove``: "A
    failed check-in leaves the card in use" for a retry or a recover): a card
    operation that reaches the server either completes or fails with one
    line, and every change is stored before it is acknowledged; a sync whose
    channel broke is tried once more on a fresh one (ServerStorage.store).

    Before the fix: CardProtocol.request waited for the server's next message
    for ever. A server that stops answering — its database stuck on a lock,
    or a connection that died silently while a laptop slept (NAT state gone,
    no RST) — left the card's sync, remove or password change pending for
    ever, holding the card's operation lock: every PIV signature, ssh-agent
    request and ``vsc card`` command queued behind it, ``vsc card remove``
    never returned, and SIGTERM never ended the daemon (its stop awaits the
    remove). Here the server's store call never runs: a day later the card
    is still waiting.

    Now a request unanswered within ``CardProtocol.answerTimeout`` (60 s)
    fails with "the server did not answer within 60 s" and the channel is
    closed (IDLE_TIMEOUT), so the storage reconnects (a sync is retried) or
    the operation fails with one line; an answered request leaves no timer
    behind.
    """
    from twisted.python.failure import Failure

    from tests.test_server_ops import SECRET, Harness
    from vsc.net.channel import ChannelClosedError
    from vsc.net.errors import describe
    from vsc.wire import ErrorCode
    from vsc.wire.ops import Op, OpRequest

    h = Harness(tmp_path)
    client, _server, _pump = h.connect()
    h.enrol(client)
    assert not [c for c in h.clock.getDelayedCalls() if c.active()], "an answered request leaves a timer"

    d = client.request(OpRequest(op=Op.SYNC, serial=SERIAL, insert_secret=SECRET, version=1, protected=b"P2"))
    h.settle(pool=False)  # the server's database never answers
    out: list = []
    d.addBoth(out.append)
    h.clock.advance(59)
    assert out == [] and not client.channel.closed
    h.clock.advance(2)
    if not out:
        h.clock.advance(86400)
        assert out, "a day later the card is still waiting for the server's answer"
    assert isinstance(out[0], Failure) and out[0].check(ChannelClosedError), out
    assert out[0].value.code is ErrorCode.IDLE_TIMEOUT
    assert describe(out[0].value) == "channel closed: IDLE_TIMEOUT (the server did not answer within 60 s)"
    h.settle(pool=False)
    assert client.channel.closed
    assert not [c for c in h.clock.getDelayedCalls() if c.active() and c.func.__self__ is client
                and c.func.__name__ != "_abort"]


# ---------------------------------------------------------------- 3. the clock check's remove after a suspend


from tests.test_card_units import ec_der, world  # noqa: E402,F401  (fixtures: an in-use card on a FakeServer, a Clock)


def test_the_clock_checks_remove_after_a_suspend_reconnects_instead_of_failing_on_the_dead_channel(world):  # noqa: F811
    """
    Rule (docs/card.md "While in use"): after a gap of more than
    ``clock_tolerance`` between clock checks — "a suspended laptop triggers
    this" — the card removes itself (status 4); and "Reconnecting. If the
    connection to the server drops, the card opens a new channel ... Remove
    works after a reconnect."

    Before the fix: a suspend long enough for the clock check (over 30 min
    with the defaults) is always longer than the server's idle_timeout
    (600 s), so the server closed the card's channel while the machine slept
    and its CLOSE never arrived: the card's channel still looks open, and the
    remove the clock check starts goes out on it and meets a reset.
    ServerStorage.check_in tried only that channel (sync and password change
    retry once on a fresh one): the remove failed, the card stayed in use on
    the server, and the card exited 4 saying it had been removed (recover
    needed if the stop's own remove failed too).

    Now the check-in is tried once more on a fresh channel (the server
    answers a retried check-in of the same version OK), and the card is
    removed.
    """
    from twisted.internet.defer import fail

    from vsc.net.channel import ChannelClosedError
    from vsc.wire import ErrorCode

    proto = world.storage._proto
    assert proto is not None and not proto.channel.closed

    def dead(msg):  # the server closed it during the suspend: the first record out meets a reset
        proto.channel.closed = True
        return fail(ChannelClosedError(ErrorCode.CLOSE_NOTIFY, "connection lost"))

    world.clock.advance(3600)
    proto.request = dead
    world.clock.advance(3 * 3600)  # the laptop slept for two hours
    assert [c for c, _ in world.exits] == [4]
    assert len(world.server.removes) == 1, "the clock check's remove failed on the channel the server had closed"
    assert world.session.life is LifeState.IDLE and not world.lock.held


def test_a_clock_check_whose_remove_failed_does_not_say_the_card_was_removed(world):  # noqa: F811
    """
    Rule (the preamble of every review, docs/card.md "Exit status"): one
    true line for the user. Exit status 4 is "clock check failed: the card
    was removed" when it was.

    Before the fix: the clock check passed "clock check failed: the card was
    removed" to on_exit whatever the remove did. When the server could not be
    reached the card was still in use on the server (the daemon's stop then
    tried once more and, failing, printed "recover from this machine later"
    right under the line saying it had been removed), and the log got a
    traceback for an ordinary network failure.

    Now the line says the remove failed, and why, and the card is still in
    use on the server.
    """
    from vsc.net.channel import ChannelClosedError
    from vsc.wire import ErrorCode

    world.server.remove_error = ChannelClosedError(ErrorCode.INTERNAL_ERROR, "gone")
    world.clock.advance(3600)
    world.clock.advance(3 * 3600)
    assert world.server.removes == [] and world.session.life is LifeState.IN_USE
    [(code, why)] = world.exits
    assert code == 4
    assert "was removed" not in why, why
    assert why.startswith("clock check failed, and its remove failed") and "still in use on the server" in why, why
