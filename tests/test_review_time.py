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
