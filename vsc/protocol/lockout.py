"""
Online guessing limits that cannot be turned against the owner (issue 11;
docs/security.md "Lockout").

A hard lock ("12 wrong passwords lock the card for an hour, and every further
try extends it") hands anyone who knows a serial a way to keep its owner out.
vsc throttles instead, in separate buckets, so that what a stranger does
never uses up the owner's chances:

* **the owner's last machine** — an answer carrying the MUK of the card's
  last insert counts in its own bucket (``CardRecord.machine_failures``),
  which nobody without that MUK can touch;
* **everyone else, per card** (``CardRecord.failures``), with a higher
  threshold: it bounds the guesses all sources together get;
* **everyone else, per source address and card**, in server memory
  (``SourceLimits``): one source reaches its own limit long before the
  per-card one, so a single attacker never throttles the owner anywhere;
* **per source address, all cards** (``SourceLimits``): one source scanning
  many serials.

A bucket with ``failures`` consecutive failures, from ``threshold`` on, lets
the next attempt be *evaluated* only ``delay(failures)`` seconds after the
last failure (``base`` doubling to ``maximum``). Attempts inside that window
are refused without being evaluated or counted, so hammering does not extend
it. A success resets the bucket it was counted in. The one bucket no success
resets -- one source over all cards, which an attacker's own card must not be
able to clear -- forgets instead: one failure for every ``maximum`` seconds
(``SourceLimits``). Its long-run rate is then what the schedule allows
anyway, one evaluated failure per ``maximum``, but an office behind one
address whose users make a failure a day never accumulates fifty of them.

A bucket keeps *when* it opens again, in wall-clock time (the reactor's
``seconds()``; the per-card buckets are in the database and outlive the
process). A wall clock stepped back (NTP correcting a clock that ran ahead, a
VM started with the wrong time) would keep every closed bucket closed for the
whole size of the step, owner's included. So a bucket found to open further
ahead than ``maximum`` is brought back to ``maximum`` from then
(``LockoutPolicy.bound``): a step back never shortens a wait, and never
makes one longer than ``maximum`` from the first attempt that meets it.
"""

from __future__ import annotations

import collections
import functools
import ipaddress
from typing import Callable

import attrs


@attrs.frozen
class LockoutPolicy:
    """The throttle schedule (docs/admin.md: lockout_threshold, lockout_base, lockout_max, lockout_shared)."""

    #: free failures per bucket (the owner's machine, and one source on one card)
    threshold: int = 5
    #: seconds of the first delay; it doubles with every further failure ...
    base: float = 30.0
    #: ... up to this many seconds
    maximum: float = 3600.0
    #: free failures of one card from all other sources together
    shared_threshold: int = 20
    #: free failures of one source address over all cards
    source_threshold: int = 50

    def delay(self, failures: int, threshold: int | None = None) -> float:
        """Seconds after the last failure before the next attempt is evaluated (0: at once)."""
        t = self.threshold if threshold is None else threshold
        if failures < t:
            return 0.0
        return min(self.maximum, self.base * (2.0 ** min(failures - t, 64)))

    def bound(self, until: float, now: float) -> float:
        """
        ``until`` (when a bucket opens again), no further ahead of ``now``
        than ``maximum``: a wait longer than that was not set by this schedule
        at this clock, which has been stepped back since (module docstring).
        """
        return min(until, now + self.maximum)

    def next_allowed(self, failures: int, last_failure: float, threshold: int | None = None) -> float:
        """When an attempt may next be evaluated (0.0: now)."""
        d = self.delay(failures, threshold)
        return last_failure + d if d else 0.0

    def guesses_per_day(self, threshold: int | None = None) -> int:
        """Evaluated guesses one bucket allows in its first 24 hours of maximal-rate guessing."""
        return self.guesses_within(86400.0, threshold)

    def guesses_within(self, seconds: float, threshold: int | None = None) -> int:
        """Evaluated guesses one bucket allows in its first ``seconds`` of maximal-rate guessing."""
        t = self.threshold if threshold is None else threshold
        at, n = 0.0, 0
        while True:
            at += self.delay(n, t)
            if at > seconds:
                return n
            n += 1


@functools.lru_cache(maxsize=4096)  # twice per accepted connection (admission, then the protocol); a pure function
def source_of(host: str) -> str:
    """
    A source address as limits count it: the IPv4 address, or the /64 of an
    IPv6 one. An IPv4-mapped address (``::ffff:a.b.c.d``, what a dual-stack
    ``tcp6`` listener sees of an IPv4 client) is its IPv4 address: its /64
    would make every IPv4 client one source.
    """
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return host
    if addr.version == 6 and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    if addr.version == 6:
        return str(ipaddress.ip_network(f"{addr}/64", strict=False))
    return str(addr)


@functools.lru_cache(maxsize=4096)
def site_of(source: str) -> str:
    """
    The end site a source (``source_of``) belongs to, for the crowding-out
    at the unauthenticated-connection cap (vsc.server.admission): the /48 of
    an IPv6 source, any other source itself. One end site is usually given
    a /48 (65,536 /64s, each its own source): without this a stranger
    holding the cap with one connection from each of many /64s would hold
    no more than the owner, and never be the one crowded out.
    """
    if not source.endswith("/64"):
        return source
    try:
        return str(ipaddress.ip_network(source).supernet(new_prefix=48))
    except ValueError:
        return source


@attrs.define
class _Bucket:
    failures: int = 0
    next_allowed: float = 0.0
    #: (the source-wide bucket) the time from which its next forgotten failure is counted
    since: float = 0.0


class SourceLimits:
    """
    Per-source buckets in server memory (one per server process; a restart
    forgets them, the per-card buckets in the database stay). Bounded: the
    least recently used entries go first past ``capacity``. Pure: the clock
    is injected, nothing is logged.
    """

    def __init__(self, policy: LockoutPolicy, now: Callable[[], float], capacity: int = 65536):
        self.policy = policy
        self.now = now
        self.capacity = capacity
        self._buckets: collections.OrderedDict[tuple[str, str], _Bucket] = collections.OrderedDict()

    def _get(self, key: tuple[str, str]) -> _Bucket | None:
        b = self._buckets.get(key)
        if b is not None:
            self._buckets.move_to_end(key)
        return b

    def throttled(self, source: str, serial: str) -> bool:
        """True: refuse this source's attempt on ``serial`` without evaluating it."""
        now = self.now()
        for key in ((source, serial), (source, "")):
            b = self._get(key)
            if b is not None:
                b.next_allowed = self.policy.bound(b.next_allowed, now)
                if b.next_allowed > now:
                    return True
        return False

    def _forget(self, b: _Bucket, now: float) -> None:
        """
        The source-wide bucket forgets one failure per ``maximum`` seconds
        since ``since``. A clock stepped back forgets nothing and counts on
        from the new time (the wait itself is bounded in ``throttled``).
        """
        if now <= b.since:
            b.since = now
            return
        gone = int((now - b.since) // self.policy.maximum)
        if gone:
            b.failures = max(0, b.failures - gone)
            b.since = now if b.failures == 0 else b.since + gone * self.policy.maximum

    def failed(self, source: str, serial: str) -> None:
        now = self.now()
        for key, threshold in (((source, serial), self.policy.threshold), ((source, ""), self.policy.source_threshold)):
            b = self._get(key)
            if b is None:
                b = self._buckets[key] = _Bucket(since=now)
            elif key[1] == "":
                self._forget(b, now)
            b.failures += 1
            b.next_allowed = self.policy.next_allowed(b.failures, now, threshold)
        while len(self._buckets) > self.capacity:
            self._buckets.popitem(last=False)

    def succeeded(self, source: str, serial: str) -> None:
        self._buckets.pop((source, serial), None)

    def __len__(self) -> int:
        return len(self._buckets)
