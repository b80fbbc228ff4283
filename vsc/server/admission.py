"""
Who may hold the server's resources before authenticating (issue 11;
docs/protocol.md §9.3, docs/admin.md "Limits").

A TCP connection, a finished handshake and even a started operation prove
nothing: anyone can make them. Until an operation on a channel has passed
its authority (Figure 8 authentication, an insert secret, an enrolment
code), the connection is *unauthenticated*, and:

* there are at most ``max_unauthenticated`` such connections in all and
  ``max_unauthenticated_per_source`` from one source address — one more is
  closed as soon as it is accepted, so accepting stays fast and descriptors
  are not exhausted; at the overall cap, a source with few connections
  (the owner's) gets in by closing the oldest connection of the site (an
  IPv6 /48, else the source: vsc.protocol.lockout.site_of) that holds the
  most (``crowded``);
* its frames are capped (vsc.protocol.channel: 4 KiB before the handshake,
  ``max_unauthenticated_body`` after) and it closes after
  ``unauthenticated_idle`` seconds without a record;
* once an operation on it passed its authority for a serial, it counts
  among that serial's authenticated channels, of which at most
  ``max_channels_per_card`` stay open (the oldest is closed past it: a card
  uses one channel at a time, and its reconnection is the newest), so
  whoever holds one card's credentials cannot hold descriptors without
  bound either;
* its handshake's RSA decryption (the one private-key operation a stranger
  can make the server do) runs on a bounded worker pool, admitted only if the
  source has a token left (``handshakes_per_second`` per source, bursts of
  ``handshake_burst``) and fewer than ``max_pending_handshakes`` are
  waiting; otherwise the handshake is refused with SERVER_BUSY before any
  RSA work.

Established cards' polls and syncs never wait for handshakes: they run on
the reactor, and the RSA decryptions run on their own threads (OpenSSL
releases the GIL while it works).
"""

from __future__ import annotations

import collections
import math
from typing import Callable

import attrs
from twisted.internet.defer import Deferred, fail
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from vsc.protocol.lockout import site_of


def _finite(lo: float, hi: float):
    def check(inst, attribute, value) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or not lo <= value <= hi:
            raise ValueError(f"{attribute.name.replace('_', ' ')} must be a number from {lo:g} to {hi:g}, "
                             f"not {value!r}")
    return check


@attrs.frozen
class AdmissionLimits:
    max_unauthenticated: int = attrs.field(default=1024, validator=_finite(1, 1_000_000))
    max_unauthenticated_per_source: int = attrs.field(default=64, validator=_finite(1, 1_000_000))
    max_unauthenticated_body: int = attrs.field(default=64 * 1024, validator=_finite(4096, 1 << 20))
    unauthenticated_idle: float = attrs.field(default=60.0, validator=_finite(1, 3600))
    idle_timeout: float = attrs.field(default=600.0, validator=_finite(0, 86400))
    handshakes_per_second: float = attrs.field(default=20.0, validator=_finite(0.01, 100_000))
    handshake_burst: int = attrs.field(default=40, validator=_finite(1, 100_000))
    max_pending_handshakes: int = attrs.field(default=64, validator=_finite(1, 100_000))
    handshake_threads: int = attrs.field(default=2, validator=_finite(1, 256))
    #: authenticated channels of one serial kept open at once (a card uses one; the oldest is closed past this)
    max_channels_per_card: int = attrs.field(default=4, validator=_finite(1, 1000))


class Refused(Exception):
    """The server will not spend this resource on this source now."""


class Admission:
    """Counts unauthenticated connections and admits handshake decryptions. Reactor thread only."""

    def __init__(self, limits: AdmissionLimits, now: Callable[[], float], reactor=None, pool: ThreadPool | None = None,
                 capacity: int = 65536):
        self.limits = limits
        self.now = now
        self.reactor = reactor
        self.pool = pool
        self.capacity = capacity
        self.unauthenticated = 0
        self._per_source: collections.Counter[str] = collections.Counter()
        self._per_site: collections.Counter[str] = collections.Counter()
        self._tokens: collections.OrderedDict[str, tuple[float, float]] = collections.OrderedDict()
        self.pending = 0
        self.refused_connections = 0
        self.refused_handshakes = 0

    # -- connections

    def opened(self, source: str) -> bool:
        """A connection was accepted; False: close it at once (over a cap)."""
        lim = self.limits
        if self.unauthenticated >= lim.max_unauthenticated or \
                self._per_source[source] >= lim.max_unauthenticated_per_source:
            self.refused_connections += 1
            return False
        self.unauthenticated += 1
        self._per_source[source] += 1
        self._per_site[site_of(source)] += 1
        return True

    def crowded(self, source: str) -> str | None:
        """
        At the overall cap, for a connection from ``source`` that is under
        its own cap: the site (``site_of``) holding the most unauthenticated
        connections, if it holds more than ``source``'s site would after one
        more (so one of its oldest may be closed to make room); None
        otherwise. Strangers flooding from many addresses (or from many /64s
        of one IPv6 site) then crowd out each other, never a source with few
        connections, such as the owner's.
        """
        lim = self.limits
        if not self._per_site or self.unauthenticated < lim.max_unauthenticated or \
                self._per_source[source] >= lim.max_unauthenticated_per_source:
            return None
        mine = site_of(source)
        top, n = max(self._per_site.items(), key=lambda kv: kv[1])
        return top if top != mine and n > self._per_site[mine] + 1 else None

    def authenticated(self, source: str) -> None:
        """An operation on the connection passed its authority: it no longer counts as unauthenticated."""
        self._release(source)

    def closed(self, source: str, was_unauthenticated: bool) -> None:
        if was_unauthenticated:
            self._release(source)

    def _release(self, source: str) -> None:
        self.unauthenticated -= 1
        self._per_source[source] -= 1
        if self._per_source[source] <= 0:
            del self._per_source[source]
        site = site_of(source)
        self._per_site[site] -= 1
        if self._per_site[site] <= 0:
            del self._per_site[site]

    def count(self, source: str) -> int:
        return self._per_source[source]

    # -- handshakes

    def _take_token(self, source: str) -> bool:
        now, lim = self.now(), self.limits
        tokens, at = self._tokens.pop(source, (float(lim.handshake_burst), now))
        tokens = min(float(lim.handshake_burst), tokens + max(0.0, now - at) * lim.handshakes_per_second)
        ok = tokens >= 1.0
        self._tokens[source] = (tokens - 1.0 if ok else tokens, now)
        while len(self._tokens) > self.capacity:
            self._tokens.popitem(last=False)
        return ok

    def handshake_allowed(self, source: str) -> bool:
        """
        A new connection is a handshake to come: it takes one of the source's
        tokens at accept time, so a source over its rate is closed before the
        server spends anything on it (no HELLO, no X25519 key, no RSA).
        """
        if self._take_token(source):
            return True
        self.refused_handshakes += 1
        return False

    def decrypt(self, source: str, fn: Callable[[], object]) -> Deferred:
        """Run the handshake's private-key operation ``fn`` on the worker pool, or fail with Refused."""
        if self.pending >= self.limits.max_pending_handshakes:
            self.refused_handshakes += 1
            return fail(Refused("too many handshakes are waiting"))
        self.pending += 1
        if self.pool is None:  # tests: run inline
            d = Deferred()
            try:
                d.callback(fn())
            except Exception as e:  # noqa: BLE001 - handed to the caller as a failure
                d.errback(e)
        else:
            d = deferToThreadPool(self.reactor, self.pool, fn)

        def done(result):
            self.pending -= 1
            return result

        return d.addBoth(done)
