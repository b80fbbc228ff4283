"""
Shared pieces of the fault suite (tests/faults/).

* ``within``/``sleep``: every wait on the reactor is bounded.
* ``replay``: a card's history replayed through Figure 4 ([0074]): every
  successful transition must start from the state it needs (insert from
  idle; sync, remove and recover from in-use; destroy from idle or in-use),
  every "repeat" line must be one the state explains, and every version the
  history names must follow from the ones before. It returns the state,
  version and MUK the history implies, which ``check_card`` compares with the
  record.
* ``CycleClient``: a simulated card running insert → sync × n → remove
  cycles over one protected channel, retrying an operation whose answer it
  did not get with EXACTLY the same request (same insert secret and MUK, same
  version and upload), and remembering what it saw acknowledged.
* ``check_clients``: nothing acknowledged is lost — each record holds the
  last upload its card saw acknowledged, or the one upload still awaiting
  its answer (committed, answer lost), exactly one version further.
* ``Relay``: an in-process TCP relay between a card and a real server that
  counts whole frames in both directions and cuts the connection at a chosen
  frame (tests/faults/test_drop_connection.py).
"""

from __future__ import annotations

import collections
import time

import attrs
from twisted.internet import protocol
from twisted.internet.defer import Deferred, ensureDeferred, succeed

from vsc import crypto
from vsc.card import ops
from vsc.card.connect import connect
from vsc.protocol.auth import DEFAULT_MASTER_KEY
from vsc.wire import HEADER_SIZE
from vsc.wire.codec import parse_header
from vsc.wire.ops import Status

PASSWORD = "fault password"
STEP = 10.0  # bound on one network step (connect, or one operation)


def within(d, seconds: float = STEP) -> Deferred:
    from twisted.internet import reactor

    if not isinstance(d, Deferred):
        d = ensureDeferred(d)
    return d.addTimeout(seconds, reactor)


def sleep(seconds: float) -> Deferred:
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    return deferLater(reactor, seconds, lambda: None)


async def wait_until(predicate, timeout: float, what: str, poll: float = 0.01) -> None:
    """Poll ``predicate`` on the reactor until true; AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await sleep(poll)


def cheap_keys() -> tuple[ops.PasswordKeys, object]:
    """Password keys with cheap scrypt (log2 N = 10), for simulated cards."""
    kdf = ops.new_kdf(crypto.system_random, log2_n=10)
    return ops.derive_keys(PASSWORD, kdf), kdf


async def enrol_cards(data_dir, endpoint: str, fingerprint: str, serials, keys, kdf) -> dict:
    """Issue codes straight into the store and enrol every serial over the network: {serial: first upload}."""
    from twisted.internet import reactor

    from tests.servers import open_store
    from vsc.protocol.auth import code_hash
    from vsc.server.policy import Policy, new_enrolment_code

    codes = {}
    store = open_store(data_dir)
    try:
        for serial in serials:
            codes[serial] = new_enrolment_code()
            store.issue(serial, code_hash(codes[serial]), Policy().initial_auth_info(), 3600)
    finally:
        store.close()
    first = {}
    p = await within(connect(reactor, endpoint, fingerprint))
    try:
        for serial in serials:
            first[serial] = f"{serial} enrolled".encode()
            result = await within(ops.enrol(p, serial, codes[serial], keys, kdf, first[serial]))
            assert result.status is Status.OK
    finally:
        p.transport.loseConnection()
    return first


# ---------------------------------------------------------------- Figure 4


class Unexplained(AssertionError):
    """A history line the card's state at that point cannot explain."""


def _detail_version(h) -> int:
    if not h.detail.startswith("version "):
        raise Unexplained(f"{h.op} {h.result} without a version: {h}")
    return int(h.detail.split()[1].rstrip(";"))


def replay(history) -> tuple[str | None, int, bytes | None]:
    """
    Replay one card's history through Figure 4; returns (state, version, muk)
    it implies. Raises Unexplained at the first line the state cannot explain.
    """
    state, version, muk = None, 0, None
    for h in history:
        where = f"history line {h.id} ({h.op} {h.result} {h.detail!r}) in state {state}, version {version}"
        if h.result == "ok":
            if h.op == "issue":
                continue
            if h.op == "enrol":
                if state is not None:
                    raise Unexplained(where)
                state, version = "idle", 1
            elif h.op == "insert":
                if state != "idle":
                    raise Unexplained(where)
                state, muk = "in-use", h.muk
            elif h.op == "sync" or h.op == "password":
                if state != "in-use" or _detail_version(h) != version + 1:
                    raise Unexplained(where)
                version += 1
            elif h.op == "remove":
                # a remove based on the stored version uploads one version further; the same
                # bytes as the last sync (its answer lost) leave the version as it is
                if state != "in-use" or _detail_version(h) not in (version, version + 1):
                    raise Unexplained(where)
                state, version, muk = "idle", _detail_version(h), None
            elif h.op == "recover":
                if state != "in-use" or h.muk != muk:
                    raise Unexplained(where)
                state, muk = "idle", None
            elif h.op == "destroy":
                if state not in ("idle", "in-use"):
                    raise Unexplained(where)
                state, muk = "destroyed", None
            elif h.op == "unlock":
                if state is None:
                    raise Unexplained(where)
            else:
                raise Unexplained(where)
        elif h.result == "repeat":
            # a retried request answered again without changing anything
            ok = {
                "enrol": state == "idle",
                "insert": state == "in-use" and h.muk == muk,
                "sync": state == "in-use" and h.detail == f"version {version} already stored",
                "password": state == "in-use",
                "remove": state == "idle",
                "recover": state == "idle",
            }.get(h.op, False)
            if not ok:
                raise Unexplained(where)
        # every other result is a refusal: logged, nothing changed
    return state, version, muk


def check_card(store, serial: str) -> tuple:
    """The record against its history replayed through Figure 4; returns (record, history)."""
    card = store.get(serial)
    history = store.history(serial)
    state, version, muk = replay(history)
    assert card is not None and state is not None, serial
    assert card.state.value == state, (serial, card.state, state)
    assert card.version == version, (serial, card.version, version)
    if state == "in-use":
        assert card.muk == muk, serial
    else:
        assert card.muk is None, serial
    return card, history


# ---------------------------------------------------------------- cycling cards


class Gate:
    """Closed while the server (or the database) is down and being checked; clients wait before reconnecting."""

    def __init__(self):
        self.open = True
        self._waiting: list[Deferred] = []

    def close(self) -> None:
        self.open = False

    def release(self) -> None:
        self.open = True
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)

    def wait(self) -> Deferred:
        if self.open:
            return succeed(None)
        d: Deferred = Deferred()
        self._waiting.append(d)
        return d


@attrs.define
class Pending:
    """An operation sent but not answered: retried exactly as it was."""

    op: str
    secret: bytes = b""
    version: int = 0
    protected: bytes = b""
    sends: int = 0


@attrs.define
class Budget:
    """How many cycles all clients together still start; ``done`` counts the finished ones."""

    target: int
    started: int = 0
    done: int = 0

    def take(self) -> bool:
        if self.started >= self.target:
            return False
        self.started += 1
        return True


@attrs.define
class CycleClient:
    """
    One simulated card: insert → sync × ``syncs`` → remove, over and over,
    until ``budget`` runs out. ``retry`` is the set of statuses that mean "not
    answered, send it again" (connection errors always do); any other refusal
    is recorded in ``bad``.
    """

    serial: str
    muk: bytes
    keys: ops.PasswordKeys
    endpoints: object  # () -> list[str]
    fingerprint: str
    gate: Gate
    budget: Budget
    syncs: int = 1
    retry: frozenset = frozenset()
    index: int = 0  # which endpoint it starts with
    reconnect_each_cycle: bool = False  # a new connection (the next endpoint) for every cycle
    # what the card saw acknowledged
    state: str = "idle"
    version: int = 1
    protected: bytes = b""
    secret: bytes = b""
    done_syncs: int = 0
    pending: Pending | None = None
    in_cycle: bool = False
    # statistics and anomalies
    acked: int = 0
    cycles: int = 0
    retries: int = 0
    connects: int = 0
    answers: collections.Counter = attrs.Factory(collections.Counter)
    log: list = attrs.Factory(list)  # (monotonic time, op, answer)
    bad: list = attrs.Factory(list)
    proto: object = None
    stop: bool = False
    counter: int = 0

    def next_upload(self) -> bytes:
        self.counter += 1
        return f"{self.serial} upload {self.counter} ".encode() * 8

    def _note(self, op: str, answer: str) -> None:
        self.answers[answer] += 1
        self.log.append((time.monotonic(), op, answer))

    def _drop(self) -> None:
        if self.proto is not None:
            self.proto.transport.abortConnection()
            self.proto = None

    async def run(self) -> None:
        from twisted.internet import reactor

        while True:
            if self.pending is None:
                if self.stop or (not self.in_cycle and not self.budget.take()):
                    self._drop()
                    return
                self.in_cycle = True
            try:
                if self.proto is None:
                    await self.gate.wait()
                    endpoints = self.endpoints()
                    endpoint = endpoints[(self.connects + self.index) % len(endpoints)]
                    self.connects += 1
                    self.proto = await within(connect(reactor, endpoint, self.fingerprint))
                await self.step()
            except ops.OperationRefused as e:
                op = self.pending.op if self.pending else "?"
                self._note(op, e.status.name)
                if e.status in self.retry:
                    self.retries += 1
                    self._drop()
                    await sleep(0.05)
                    continue
                self.bad.append((op, e.status.name, self.pending))
                self._drop()
                return  # a wrong answer: stop this card, the test fails on ``bad``
            except Exception as e:  # noqa: BLE001 - connection refused/lost, channel closed, timeout: retry
                if self.pending is not None:
                    self._note(self.pending.op, f"no answer ({type(e).__name__})")
                    self.retries += 1
                self._drop()
                await self.gate.wait()
                await sleep(0.02)

    async def step(self) -> None:
        p = self.proto
        if self.pending is None:
            if self.state == "idle":
                self.pending = Pending("insert", secret=crypto.system_random(32))
            elif self.done_syncs < self.syncs:
                self.pending = Pending("sync", self.secret, self.version, self.next_upload())
            else:
                self.pending = Pending("remove", self.secret, self.version, self.next_upload())
        job = self.pending
        job.sends += 1
        if job.op == "insert":
            result, _ = await within(ops.insert(p, self.serial, PASSWORD, self.muk, job.secret, DEFAULT_MASTER_KEY,
                                                keys=self.keys))
            # nothing acknowledged was lost: the download is the last upload acknowledged
            if (result.version, result.protected) != (self.version, self.protected):
                self.bad.append(("insert download", self.version, result.version))
            self.state, self.secret, self.done_syncs = "in-use", job.secret, 0
        elif job.op == "sync":
            result = await within(ops.sync(p, self.serial, job.secret, job.version, job.protected))
            if result.version != job.version + 1:
                self.bad.append(("sync version", job.version, result.version))
            self.version, self.protected, self.done_syncs = result.version, job.protected, self.done_syncs + 1
        else:
            result = await within(ops.remove(p, self.serial, job.secret, job.version, job.protected))
            if result.version != job.version + 1:
                self.bad.append(("remove version", job.version, result.version))
            self.version, self.protected, self.state = result.version, job.protected, "idle"
            self.cycles += 1
            self.budget.done += 1
            self.in_cycle = False
            if self.reconnect_each_cycle:
                p.closeChannel()
                self.proto = None
        self._note(job.op, "OK")
        self.pending = None
        self.acked += 1


def check_clients(store, clients: list[CycleClient], final: bool = False) -> dict:
    """
    Every card's record against its history (Figure 4) and against what its
    client saw acknowledged. Returns counts of what was found.
    """
    found = collections.Counter()
    for c in clients:
        card, history = check_card(store, c.serial)
        job = c.pending
        assert not (final and job is not None), (c.serial, job)
        if (card.protected, card.version) == (c.protected, c.version):
            committed = False  # the acknowledged upload is what is stored
        else:
            # only the upload still awaiting its answer can have been committed, one version on
            assert job is not None and job.op in ("sync", "remove"), (c.serial, job, card.version, c.version)
            assert (card.protected, card.version) == (job.protected, c.version + 1), c.serial
            committed = True
        expected_state = c.state
        if job is not None and job.op == "insert" and card.state.value == "in-use":
            assert card.session_hash == crypto.sha256(job.secret), c.serial
            expected_state, committed = "in-use", True
        if job is not None and job.op == "remove" and committed:
            expected_state = "idle"
        assert card.state.value == expected_state, (c.serial, card.state, expected_state, job)
        if card.state.value == "in-use":
            assert card.muk == c.muk
        # the history counts at least every check-out and check-in the card saw acknowledged
        oks = collections.Counter(h.op for h in history if h.result == "ok")
        assert oks["remove"] >= c.cycles, c.serial
        found["committed-unacknowledged"] += committed
        found["history-lines"] += len(history)
    return found


# ---------------------------------------------------------------- the relay


@attrs.frozen
class Cut:
    """
    Where a relayed connection is cut. ``after``: how many whole frames (both
    directions, in the order they reach the relay) are forwarded first.
    ``mode``: "eager" cuts right after forwarding frame ``after``; "drop"
    cuts when the next frame arrives, without forwarding it; "partial"
    forwards the first half of the next frame's bytes, then cuts.
    """

    after: int
    mode: str

    def label(self) -> str:
        return f"{self.mode}@{self.after}"


class _RelayConn:
    def __init__(self, relay: "Relay", cut: Cut | None):
        self.relay = relay
        self.cut = cut
        self.frames: list[tuple[str, int]] = []  # ("c"|"s", body length) forwarded
        self.fired = False
        self.closed = False
        self.client = None  # protocol towards the card
        self.server = None  # protocol towards the real server
        self.pending_to_server: list[bytes] = []

    def frame(self, direction: str, frame: bytes) -> None:
        if self.fired or self.closed:
            return
        cut = self.cut
        if cut is not None and cut.mode in ("drop", "partial") and len(self.frames) == cut.after:
            if cut.mode == "partial":
                self._write(direction, frame[: max(1, len(frame) // 2)])
            self.fire()
            return
        self._write(direction, frame)
        self.frames.append((direction, len(frame) - HEADER_SIZE))
        if cut is not None and cut.mode == "eager" and len(self.frames) == cut.after:
            self.fire()

    def _write(self, direction: str, data: bytes) -> None:
        if direction == "c":
            if self.server is not None and self.server.transport is not None:
                self.server.transport.write(data)
            else:
                self.pending_to_server.append(data)
        else:
            self.client.transport.write(data)

    def fire(self) -> None:
        """Cut: whatever was forwarded is delivered, then both connections close."""
        self.fired = True
        self.relay.cuts_fired += 1
        self.close()

    def close(self) -> None:
        self.closed = True
        for side in (self.client, self.server):
            if side is not None and side.transport is not None:
                side.transport.loseConnection()

    def server_ready(self, proto) -> None:
        self.server = proto
        if self.closed:
            proto.transport.loseConnection()
            return
        for data in self.pending_to_server:
            proto.transport.write(data)
        self.pending_to_server = []


class _Framer(protocol.Protocol):
    """Splits one direction of the stream into whole frames for the relay connection."""

    direction = "c"

    def __init__(self, conn: _RelayConn):
        self.conn = conn
        self.buf = b""

    def dataReceived(self, data: bytes) -> None:
        self.buf += data
        while len(self.buf) >= HEADER_SIZE:
            try:
                length = parse_header(self.buf[:HEADER_SIZE]).length
            except Exception:  # noqa: BLE001 - not a frame: pass the bytes through as they are
                self.conn.frame(self.direction, self.buf)
                self.buf = b""
                return
            if len(self.buf) < HEADER_SIZE + length:
                return
            frame, self.buf = self.buf[: HEADER_SIZE + length], self.buf[HEADER_SIZE + length :]
            self.conn.frame(self.direction, frame)

    def connectionLost(self, reason=None) -> None:
        self.conn.close()


class _ClientSide(_Framer):
    direction = "c"

    def connectionMade(self) -> None:
        from twisted.internet import reactor
        from twisted.internet.endpoints import TCP4ClientEndpoint
        from twisted.internet.protocol import Factory

        self.conn.client = self
        conn = self.conn

        class _ServerSide(_Framer):
            direction = "s"

        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.conn.relay.target_port, timeout=5)
        d = endpoint.connect(Factory.forProtocol(lambda: _ServerSide(conn)))
        d.addCallbacks(conn.server_ready, lambda f: conn.close())


class _RelayFactory(protocol.Factory):
    noisy = False

    def __init__(self, relay: "Relay"):
        self.relay = relay

    def buildProtocol(self, addr):
        relay = self.relay
        cut, relay.next_cut = relay.next_cut, None
        conn = _RelayConn(relay, cut)
        relay.conns.append(conn)
        return _ClientSide(conn)


class Relay:
    """
    A TCP relay on 127.0.0.1 in front of a server port. The next accepted
    connection is cut as ``arm(cut)`` says; every other one is passed through.
    ``conns[-1].frames`` is what the last connection carried.
    """

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.next_cut: Cut | None = None
        self.conns: list[_RelayConn] = []
        self.cuts_fired = 0
        self.port = None

    def listen(self) -> "Relay":
        from twisted.internet import reactor

        self.port = reactor.listenTCP(0, _RelayFactory(self), interface="127.0.0.1")
        return self

    @property
    def endpoint(self) -> str:
        return f"tcp:127.0.0.1:{self.port.getHost().port}"

    def arm(self, cut: Cut | None) -> None:
        self.next_cut = cut

    def close(self) -> Deferred:
        for conn in self.conns:
            conn.close()
        return self.port.stopListening() if self.port is not None else succeed(None)
