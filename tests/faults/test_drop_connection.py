"""
Connections dropped in the middle of EVERY operation (enrol, insert, sync,
remove, recover, destroy), at every frame of the exchange.

The card talks to a real ``twistd -n vsc-server`` through an in-process TCP
relay (tests/faults/common.py ``Relay``) that counts whole frames in both
directions. A calibration run of each operation gives the frames of its
whole exchange on a fresh connection: the handshake (server hello, key
transport, server finished, client finished), then the request, the
challenge and the answer (insert, recover and destroy), the result, and the
card's close. The sweep then cuts one connection per trial at EVERY frame
of that exchange, three ways: right after forwarding frame k ("eager": the
server sees the request and then the end of the connection before it could
answer); when frame k+1 arrives, without forwarding it ("drop": e.g. the
server computed and sent the result, and it is lost); and with only the
first half of frame k+1 forwarded ("partial": a truncated frame, then the
end). The card then reconnects and sends exactly the same request again.

What must hold after every trial:

* the retry is answered, and never BUSY (nothing is held before an
  operation's one transaction: a dropped connection leaves nothing behind
  that the retry could wait for, even while its database call still runs):
  OK for enrol, insert, sync and remove (an exact repeat of one that was
  committed is answered OK again: the same check-out and download, the
  version the first stored); recover and destroy answer OK, or NOT_IN_USE /
  DESTROYED exactly when the history shows the first attempt committed;
* an operation answered OK before the cut, sent again, is answered OK again
  (enrol, insert, sync, remove) and changes nothing;
* exactly one transition per trial in the history (never a second
  check-out), the record is what that history replayed through Figure 4
  explains, and the protected information is the last upload acknowledged;
* the server keeps serving other connections throughout: a canary card
  syncs over direct connections during the whole sweep and never fails or
  stalls, and the server process is still running at the end.
"""

from __future__ import annotations

import collections
import time

import attrs
import pytest
import pytest_twisted
from twisted.internet.defer import ensureDeferred

from tests.faults.common import (
    PASSWORD,
    STEP,
    Cut,
    Relay,
    check_card,
    cheap_keys,
    enrol_cards,
    sleep,
    wait_until,
    within,
)
from tests.servers import MANY_MACHINES, init_data_dir, open_store, servers  # noqa: F401  (servers is a fixture)
from vsc import crypto
from vsc.card import ops
from vsc.card.connect import connect
from vsc.protocol.auth import DEFAULT_MASTER_KEY, code_hash
from vsc.server.policy import Policy, new_enrolment_code
from vsc.wire.ops import Status

pytestmark = pytest.mark.integration

OPS = ("enrol", "insert", "sync", "remove", "recover", "destroy")
MODES = ("eager", "drop", "partial")
ATTEMPTS = 8
CANARY_STALL = 3.0  # the longest a canary operation may take


@attrs.define
class Model:
    """What the test's card saw acknowledged for one serial."""

    serial: str
    state: str = "idle"
    version: int = 1
    protected: bytes = b""
    secret: bytes = b""
    muk: bytes = b""
    uploads: int = 0

    def upload(self) -> bytes:
        self.uploads += 1
        return f"{self.serial} upload {self.uploads} ".encode() * 4


def status_of(answer) -> Status:
    """The status of an answer from ``Sweep.once``: ("ok", result or (result, keys)) or ("refused", status)."""
    kind, value = answer
    if kind == "refused":
        return value
    return (value[0] if isinstance(value, tuple) else value).status


class Sweep:
    def __init__(self, data_dir, server, fingerprint: str, relay: Relay, keys, kdf):
        self.data_dir = data_dir
        self.server = server
        self.fp = fingerprint
        self.relay = relay
        self.keys, self.kdf = keys, kdf
        self.store = open_store(data_dir)
        self.ctl = None  # a direct connection for setting up each trial
        self.lost = collections.Counter()
        self.answers = collections.Counter()
        self.serials = 0
        self.cycle = Model("cut-cycle")

    # -- plumbing

    async def direct(self):
        from twisted.internet import reactor

        if self.ctl is None or self.ctl.channel.closed:
            self.ctl = await within(connect(reactor, self.server.endpoint, self.fp))
        return self.ctl

    async def once(self, call, endpoint: str):
        """One connection, one send: ("ok", result) | ("refused", status) | ("lost", exception name)."""
        from twisted.internet import reactor

        try:
            p = await within(connect(reactor, endpoint, self.fp))
        except Exception as e:  # noqa: BLE001
            return "lost", type(e).__name__
        try:
            result = await within(call(p))
            p.closeChannel()
            return "ok", result
        except ops.OperationRefused as e:
            p.closeChannel()
            return "refused", e.status
        except Exception as e:  # noqa: BLE001 - the cut
            p.transport.abortConnection()
            return "lost", type(e).__name__

    async def until_answered(self, call):
        """Send the same request until answered (a lost send is sent again); BUSY is never an answer."""
        for _ in range(ATTEMPTS):
            kind, value = await self.once(call, self.relay.endpoint)
            assert (kind, value) != ("refused", Status.BUSY), "BUSY: a dropped connection left something held"
            if kind == "lost":
                self.lost[value] += 1
                await sleep(0.02)
                continue
            return kind, value
        raise AssertionError(f"not answered in {ATTEMPTS} attempts")

    def new_lines(self, serial: str, before: int) -> list:
        return self.store.history(serial)[before:]

    # -- setting up a trial over the direct connection

    async def enrolled(self, prefix: str) -> Model:
        self.serials += 1
        m = Model(f"{prefix}-{self.serials}")
        m.protected = f"{m.serial} enrolled".encode()
        code = new_enrolment_code()
        self.store.issue(m.serial, code_hash(code), Policy().initial_auth_info(), 3600)
        p = await self.direct()
        assert (await within(ops.enrol(p, m.serial, code, self.keys, self.kdf, m.protected))).status is Status.OK
        return m

    async def insert(self, m: Model) -> None:
        p = await self.direct()
        m.secret, m.muk = crypto.system_random(32), crypto.sha256(f"machine of {m.serial}".encode())
        result, _ = await within(ops.insert(p, m.serial, PASSWORD, m.muk, m.secret, DEFAULT_MASTER_KEY, keys=self.keys))
        assert (result.version, result.protected) == (m.version, m.protected)
        m.state = "in-use"

    async def remove(self, m: Model) -> None:
        p = await self.direct()
        upload = m.upload()
        result = await within(ops.remove(p, m.serial, m.secret, m.version, upload))
        m.state, m.version, m.protected = "idle", result.version, upload

    async def cycle_in_state(self, state: str) -> Model:
        m = self.cycle
        if m.state != state:
            await (self.insert(m) if state == "in-use" else self.remove(m))
        return m

    # -- one trial

    async def trial(self, op: str, cut: Cut) -> dict:
        m, call, extra = await self.prepare(op)
        before = len(self.store.history(m.serial))
        self.relay.arm(cut)
        first = await self.once(call, self.relay.endpoint)
        conn = self.relay.conns[-1]
        assert conn.cut == cut
        await wait_until(lambda: conn.closed, STEP, "the relayed connection to end")
        outcome = {"op": op, "cut": cut.label(), "fired": conn.fired, "first": first[0]}
        if first[0] == "ok":
            answer = first
            if op in ("enrol", "insert", "sync", "remove"):
                # the same request again after it was answered: an exact repeat is answered OK again
                again = await self.until_answered(call)
                assert again[0] == "ok", (op, cut, again)
                self.same_result(op, first[1], again[1])
                outcome["repeat"] = "OK"
        else:
            if first[0] == "lost":
                self.lost[first[1]] += 1
            answer = await self.until_answered(call)
        lines = self.new_lines(m.serial, before)
        self.check(op, m, answer, lines, extra)
        self.answers[f"{op} {status_of(answer).name}"] += 1
        return outcome

    def same_result(self, op: str, a, b) -> None:
        if isinstance(a, tuple):  # insert, recover, destroy: (result, password keys)
            a, b = a[0], b[0]
        assert (a.status, a.version, a.protected) == (b.status, b.version, b.protected), op

    async def prepare(self, op: str):
        """The card in the state the operation needs; the request as a callable sending it."""
        keys = self.keys
        if op == "enrol":
            self.serials += 1
            m = Model(f"cut-enrol-{self.serials}")
            m.protected = f"{m.serial} enrolled".encode()
            code = new_enrolment_code()
            self.store.issue(m.serial, code_hash(code), Policy().initial_auth_info(), 3600)
            return m, (lambda p: ops.enrol(p, m.serial, code, keys, self.kdf, m.protected)), code
        if op == "destroy":
            m = await self.enrolled("cut-destroy")
            if self.serials % 2:
                await self.insert(m)  # destroy from in-use every other trial, from idle otherwise
            muk = m.muk or crypto.sha256(b"any machine")
            return m, (lambda p: ops.destroy(p, m.serial, PASSWORD, DEFAULT_MASTER_KEY, muk, keys=keys)), None
        if op == "insert":
            m = await self.cycle_in_state("idle")
            secret, muk = crypto.system_random(32), crypto.sha256(b"the relayed machine")
            m.secret, m.muk = secret, muk
            return m, (lambda p: ops.insert(p, m.serial, PASSWORD, muk, secret, DEFAULT_MASTER_KEY, keys=keys)), None
        m = await self.cycle_in_state("in-use")
        if op == "recover":
            muk = m.muk
            return m, (lambda p: ops.recover(p, m.serial, PASSWORD, muk, DEFAULT_MASTER_KEY, keys=keys)), None
        secret, version, upload = m.secret, m.version, m.upload()
        if op == "sync":
            return m, (lambda p: ops.sync(p, m.serial, secret, version, upload)), upload
        return m, (lambda p: ops.remove(p, m.serial, secret, version, upload)), upload

    def check(self, op: str, m: Model, answer, lines, extra) -> None:
        """The answer, the new history lines and the record after one trial."""
        oks = [h for h in lines if h.result == "ok" and h.op == op]
        assert len(oks) == 1, (op, m.serial, [(h.op, h.result) for h in lines])
        kind, value = answer
        result = value[0] if kind == "ok" and isinstance(value, tuple) else value
        status = status_of(answer)
        if status is not Status.OK:
            # only recover and destroy may be told the state the first (committed) attempt left
            expected = {"recover": Status.NOT_IN_USE, "destroy": Status.DESTROYED}.get(op)
            assert status is expected, (op, status)
            assert lines.index(oks[0]) < len(lines) - 1, "refused without the first attempt having committed"
        card, _ = check_card(self.store, m.serial)
        if op == "enrol":
            assert (card.state.value, card.version, card.protected) == ("idle", 1, m.protected)
            assert card.kdf == self.kdf.encode()
            m.state = "idle"
        elif op == "insert":
            # the same check-out, and the download is the last upload acknowledged
            assert (result.version, result.protected) == (m.version, m.protected)
            assert card.state.value == "in-use" and card.session_hash == crypto.sha256(m.secret) and card.muk == m.muk
            m.state = "in-use"
        elif op == "sync":
            assert result.version == m.version + 1
            assert (card.state.value, card.version, card.protected) == ("in-use", m.version + 1, extra)
            m.version, m.protected = m.version + 1, extra
        elif op == "remove":
            assert result.version == m.version + 1
            assert (card.state.value, card.version, card.protected) == ("idle", m.version + 1, extra)
            m.state, m.version, m.protected = "idle", m.version + 1, extra
        elif op == "recover":
            assert (card.state.value, card.version, card.protected) == ("idle", m.version, m.protected)
            m.state = "idle"
        else:
            assert card.state.value == "destroyed" and card.protected == b""
        if op != "destroy":
            assert (card.version, card.protected) == (m.version, m.protected)  # nothing acknowledged lost


async def canary(server, fingerprint: str, keys, stop: list, stats: dict) -> None:
    """Another card, straight to the server: syncs (a new connection every 10) until stopped; any failure fails the test."""
    from twisted.internet import reactor

    serial = stats["serial"]
    secret, muk = crypto.system_random(32), crypto.sha256(b"canary machine")
    p = await within(connect(reactor, server.endpoint, fingerprint))
    result, _ = await within(ops.insert(p, serial, PASSWORD, muk, secret, DEFAULT_MASTER_KEY, keys=keys))
    version = result.version
    while not stop:
        if stats["ops"] % 10 == 9:
            p.closeChannel()
            p = await within(connect(reactor, server.endpoint, fingerprint), CANARY_STALL)
        t0 = time.monotonic()
        result = await within(ops.sync(p, serial, secret, version, f"canary {version}".encode()), CANARY_STALL)
        stats["worst"] = max(stats["worst"], time.monotonic() - t0)
        version = result.version
        stats["ops"] += 1
        await sleep(0.02)
    result = await within(ops.remove(p, serial, secret, version, b"canary done"))
    assert result.status is Status.OK
    p.closeChannel()


@pytest_twisted.ensureDeferred
async def test_cut_every_operation_at_every_frame(tmp_path, servers):  # noqa: F811
    """Every operation cut at every frame of its exchange (eager, drop, partial): the exact retry is answered consistently (never a second check-out, never BUSY), nothing acknowledged is lost, every record matches its history, and other connections are served throughout."""
    t0 = time.monotonic()
    data_dir = tmp_path / "server"
    fp = init_data_dir(data_dir, settings=MANY_MACHINES)["fingerprint"]
    server = servers.start(data_dir, "server")
    relay = Relay(server.port).listen()
    keys, kdf = cheap_keys()
    sweep = Sweep(data_dir, server, fp, relay, keys, kdf)
    stop: list = []
    stats = {"serial": "canary", "ops": 0, "worst": 0.0}
    running = None
    try:
        first = await enrol_cards(data_dir, server.endpoint, fp, ["cut-cycle", "canary"], keys, kdf)
        sweep.cycle.protected = first["cut-cycle"]
        running = ensureDeferred(canary(server, fp, keys, stop, stats))

        # calibration: the frames of each operation's whole exchange on a fresh connection
        frames = {}
        for op in OPS:
            m, call, extra = await sweep.prepare(op)
            before = len(sweep.store.history(m.serial))
            answer = await sweep.once(call, relay.endpoint)
            assert answer[0] == "ok", (op, answer)
            await sleep(0.05)  # the card's close frame
            frames[op] = list(relay.conns[-1].frames)
            sweep.check(op, m, answer, sweep.new_lines(m.serial, before), extra)

        outcomes = []
        for op in OPS:
            n = len(frames[op])
            cuts = [Cut(k, "eager") for k in range(1, n + 1)] + [Cut(k, mode) for mode in ("drop", "partial") for k in range(n)]
            for cut in cuts:
                outcomes.append(await sweep.trial(op, cut))
                assert not running.called or running.result is None, "the canary failed"
        stop.append(True)
        await within(running, 30)
    finally:
        stop.append(True)
        if running is not None and not running.called:
            running.addErrback(lambda f: None)  # the test already failed; the server goes away at teardown
        sweep.store.close()
        await relay.close()
    elapsed = time.monotonic() - t0

    per_op = collections.Counter(o["op"] for o in outcomes)
    fired = sum(o["fired"] for o in outcomes)
    print(f"\ncut connections: {len(outcomes)} trials ({dict(per_op)}), {fired} cuts fired, "
          f"{sum(1 for o in outcomes if o['first'] == 'ok')} answered before the cut (then repeated), "
          f"{sum(sweep.lost.values())} lost sends {dict(sweep.lost)}; "
          f"canary {stats['ops']} syncs, slowest {stats['worst'] * 1000:.0f} ms; {elapsed:.1f} s")
    for op in OPS:
        print(f"  {op:8} exchange {''.join(d for d, _ in frames[op])} ({len(frames[op])} frames)")
    print(f"  retry answers: {dict(sweep.answers)}")
    assert server.running()
    assert fired == len(outcomes), [(o["op"], o["cut"]) for o in outcomes if not o["fired"]]
    assert stats["ops"] > 0
    assert "Unhandled" not in server.log_text(), server.log_text()[-3000:]


def test_only_the_same_untouched_enrolment_is_answered_again(tmp_path):
    """Store level, for the enrol retry above: once an enrolment committed, the identical request is answered OK again (a "repeat" line, the material issued with the new answer replacing the first, which the card never got); any other verifier, KDF parameters, protected information or registration, or the same request once the card has been used, is refused as before and changes nothing."""
    import json

    from vsc.protocol.cardstore import CheckIn, CheckOut, EnrolCard
    from vsc.server.store import Store

    store = Store(f"sqlite:///{tmp_path / 'vsc.sqlite3'}", time.time)
    try:
        store.migrate()
        code = new_enrolment_code()
        store.issue("e-1", code_hash(code), Policy().initial_auth_info(), 3600)
        args = dict(serial="e-1", code_hash=code_hash(code), verifier=b"v" * 32, kdf=b"kdf", protected=b"first",
                    peer="test", registration=b"reg", auth_extra={"totp": {"secret": "01"}})

        def enrol(**kw) -> Status:
            return store.enrol(EnrolCard(**kw)).status

        assert enrol(**args) is Status.OK
        enrolled = store.get("e-1")
        assert enrol(**dict(args, auth_extra={"totp": {"secret": "02"}})) is Status.OK  # the answer was lost
        again = store.get("e-1")
        assert json.loads(again.auth_info)["totp"] == {"secret": "02"}
        assert (again.state, again.version, again.protected, again.verifier) == \
               (enrolled.state, enrolled.version, enrolled.protected, enrolled.verifier)
        for change in (dict(verifier=b"w" * 32), dict(kdf=b"other"), dict(protected=b"other"),
                       dict(registration=b"other"), dict(registration=b""),
                       dict(verifier=b"x" * 32, code_hash=code_hash("WRONG"))):
            assert enrol(**dict(args, **change)) is Status.REFUSED, change
        # once used (in use, then idle at version 2) the same request is no longer a repeat
        session = crypto.sha256(b"secret")
        assert store.check_out(CheckOut("e-1", crypto.sha256(b"muk"), session, {}, "test", b"v" * 32)).status is Status.OK
        assert enrol(**args) is Status.REFUSED
        removed = store.check_in(CheckIn("e-1", session, 1, b"second", "test"))
        assert (removed.status, removed.version) == (Status.OK, 2)
        assert enrol(**args) is Status.REFUSED
        card, history = check_card(store, "e-1")
        assert (card.state.value, card.version, card.protected) == ("idle", 2, b"second")
        assert [h.result for h in history if h.op == "enrol"] == ["ok", "repeat"] + ["refused"] * 8
    finally:
        store.close()
