"""
End to end against real ``twistd -n vsc-server`` processes on 127.0.0.1, on
both backends (SQLite in the data dir, and a fresh PostgreSQL database of
the session's private cluster): ``vsc admin init --key-bits 2048``, ``vsc
admin issue`` for enrolment codes, and simulated cards (vsc.card.connect +
vsc.card.ops) in this pytest process on the real reactor (pytest-twisted).

What it shows: the life cycle of Figure 4 [0074] through insert (Figure 6,
[0077]), sync, remove (Figure 11, [0095]), recover (Figure 12, [0096]) and
destroy ([0098]); exclusion and mediation [0081] (never BUSY: nothing is
held before authentication); refusals an outsider cannot tell apart;
throttling (a source refused unevaluated, the owner's last machine let in)
and ``vsc admin unlock``; and that ``vsc admin show/history --json`` agree
with what happened.
"""

from __future__ import annotations

import os
import time

import attrs
import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, ensureDeferred

from tests.servers import MANY_MACHINES, admin, init_data_dir, open_store, servers  # noqa: F401  (servers is a fixture)
from vsc import crypto
from vsc.card import ops
from vsc.card.connect import connect
from vsc.protocol.auth import DEFAULT_MASTER_KEY, code_hash
from vsc.server.policy import Policy, new_enrolment_code
from vsc.wire import encode_inner
from vsc.wire.ops import AuthChallenge, AuthResponse, KdfParams, Op, OpRequest, OpResult, Status

pytestmark = pytest.mark.integration

WAIT = 20.0  # seconds: the bound on any single network step
LOCKOUT = 3
PASSWORD = "correct horse battery staple"
MUK_A, MUK_B = crypto.sha256(b"machine A"), crypto.sha256(b"machine B")


def within(d, seconds: float = WAIT) -> Deferred:
    from twisted.internet import reactor

    if not isinstance(d, Deferred):
        d = ensureDeferred(d)
    return d.addTimeout(seconds, reactor)


@attrs.define
class Deployment:
    data_dir: object
    server: object
    fingerprint: str
    database_url: str

    async def card(self):
        """A fresh protected channel to the server (a card on some machine)."""
        from twisted.internet import reactor

        return await within(connect(reactor, self.server.endpoint, self.fingerprint))

    def admin(self, *args):
        return admin(self.data_dir, *args)

    def store(self):
        return open_store(self.data_dir)


@pytest.fixture
def deployment(tmp_path, database_url, servers):  # noqa: F811
    """An initialised data dir (2048-bit key, throttling after 3 failures per bucket) on the parametrized backend, with its server running.
    Its cards are many machines on one address: a fast run makes more handshakes per second than one source may (MANY_MACHINES)."""
    data_dir = tmp_path / "server"
    info = init_data_dir(data_dir, database_url, settings={"lockout_threshold": LOCKOUT, **MANY_MACHINES})
    server = servers.start(data_dir)
    yield Deployment(data_dir, server, info["fingerprint"], database_url)


async def authenticated_raw(proto, req: OpRequest, keys: ops.PasswordKeys, muk: bytes = b"",
                            master: bytes = DEFAULT_MASTER_KEY) -> tuple[AuthChallenge, OpResult]:
    """Send ``req``, answer its challenge, return the challenge and the raw OpResult (whatever its status)."""
    challenge = await within(proto.request(req))
    assert isinstance(challenge, AuthChallenge), challenge
    answers, _ = ops.answer(challenge, req.serial, "", master, crypto.system_random, keys)
    result = await within(proto.request(AuthResponse(responses=tuple(answers), muk=muk)))
    assert isinstance(result, OpResult), result
    return challenge, result


async def refused(coro) -> Status:
    """The status of an operation the server refuses."""
    with pytest.raises(ops.OperationRefused) as e:
        await within(coro)
    return e.value.status


def local_peer(proto) -> str:
    """What the server logs as this card's peer: the card's side of the TCP connection."""
    host = proto.transport.getHost()
    return f"{host.host}:{host.port}"


async def enrolled(dep: Deployment, serial: str, kdf: KdfParams | None = None, via_admin: bool = True,
                   protected: bytes = b"PROTECTED-1") -> ops.PasswordKeys:
    """Issue a code (``vsc admin issue`` or the store directly) and enrol ``serial`` over the network."""
    if via_admin:
        code = dep.admin("issue", serial)["code"]
    else:
        code = new_enrolment_code()
        store = dep.store()
        try:
            store.issue(serial, code_hash(code), Policy().initial_auth_info(), 3600)
        finally:
            store.close()
    kdf = kdf or ops.new_kdf(crypto.system_random)
    keys = ops.derive_keys(PASSWORD, kdf)
    p = await dep.card()
    try:
        result = await within(ops.enrol(p, serial, code, keys, kdf, protected))
        assert (result.status, result.version) == (Status.OK, 1)
    finally:
        p.transport.loseConnection()
    return keys


# ================================================================ the life cycle


@pytest_twisted.ensureDeferred
async def test_life_cycle_through_real_servers(deployment):
    """
    enrol → insert → sync → (connection dropped) → the same insert repeated
    returns the SAME check-out → another machine is IN_USE → remove → insert
    from the second machine → recover only with the MUK of the last insert →
    destroy is final; ``admin show`` and ``admin history`` agree, every line
    with op, result, MUK, peer and time.
    """
    dep = deployment
    t0 = time.time()
    issued = dep.admin("issue", "alice")
    assert issued["serial"] == "alice" and issued["expires"] > t0 and issued["code"]
    kdf = ops.new_kdf(crypto.system_random)
    keys = ops.derive_keys(PASSWORD, kdf)
    p = await dep.card()
    peers = {"first": local_peer(p)}
    result = await within(ops.enrol(p, "alice", issued["code"], keys, kdf, b"PROTECTED-1"))
    assert (result.status, result.version) == (Status.OK, 1)
    # the code works once
    assert await refused(ops.enrol(p, "alice", issued["code"], keys, kdf, b"AGAIN")) is Status.REFUSED

    # machine A inserts (Figure 6) and syncs
    secret_a = os.urandom(32)
    result, _ = await within(ops.insert(p, "alice", PASSWORD, MUK_A, secret_a, DEFAULT_MASTER_KEY, keys=keys))
    assert (result.status, result.version, result.protected) == (Status.OK, 1, b"PROTECTED-1")
    result = await within(ops.sync(p, "alice", secret_a, 1, b"PROTECTED-2"))
    assert (result.status, result.version) == (Status.OK, 2)
    shown = dep.admin("show", "alice")
    assert (shown["state"], shown["muk"], shown["version"]) == ("in-use", MUK_A.hex(), 2)
    assert shown["channel"]["peer"] == peers["first"]

    # the connection drops; the card retries the same insert: the same check-out, not a second one
    p.transport.abortConnection()
    p = await dep.card()
    peers["retry"] = local_peer(p)
    result, _ = await within(ops.insert(p, "alice", PASSWORD, MUK_A, secret_a, DEFAULT_MASTER_KEY, keys=keys))
    assert (result.status, result.version, result.protected) == (Status.OK, 2, b"PROTECTED-2")

    # machine B: in use elsewhere
    b = await dep.card()
    peers["b"] = local_peer(b)
    secret_b = os.urandom(32)
    assert await refused(ops.insert(b, "alice", PASSWORD, MUK_B, secret_b, DEFAULT_MASTER_KEY, keys=keys)) is Status.IN_USE
    # machine B cannot sync or remove without A's insert secret
    assert await refused(ops.sync(b, "alice", secret_b, 2, b"EVIL")) is Status.REFUSED
    assert await refused(ops.remove(b, "alice", secret_b, 2, b"EVIL")) is Status.REFUSED

    # A removes (Figure 11); B inserts and gets what A uploaded
    result = await within(ops.remove(p, "alice", secret_a, 2, b"PROTECTED-3"))
    assert (result.status, result.version) == (Status.OK, 3)
    assert dep.admin("show", "alice")["state"] == "idle"
    result, _ = await within(ops.insert(b, "alice", PASSWORD, MUK_B, secret_b, DEFAULT_MASTER_KEY, keys=keys))
    assert (result.status, result.version, result.protected) == (Status.OK, 3, b"PROTECTED-3")

    # recover (Figure 12) only with the MUK of the last insert
    assert await refused(ops.recover(p, "alice", PASSWORD, MUK_A, DEFAULT_MASTER_KEY, keys=keys)) is Status.MUK_MISMATCH
    assert dep.admin("show", "alice")["state"] == "in-use"
    result, _ = await within(ops.recover(b, "alice", PASSWORD, MUK_B, DEFAULT_MASTER_KEY, keys=keys))
    assert result.status is Status.OK
    shown = dep.admin("show", "alice")
    assert (shown["state"], shown["muk"], shown["channel"], shown["version"]) == ("idle", None, None, 3)
    assert await refused(ops.recover(b, "alice", PASSWORD, MUK_B, DEFAULT_MASTER_KEY, keys=keys)) is Status.NOT_IN_USE

    # destroy ([0098]) is final: every later authenticated operation is DESTROYED, session ones REFUSED
    result, _ = await within(ops.destroy(b, "alice", PASSWORD, DEFAULT_MASTER_KEY, muk=MUK_B, keys=keys))
    assert result.status is Status.OK
    assert await refused(ops.insert(b, "alice", PASSWORD, MUK_B, secret_b, DEFAULT_MASTER_KEY, keys=keys)) is Status.DESTROYED
    assert await refused(ops.recover(b, "alice", PASSWORD, MUK_B, DEFAULT_MASTER_KEY, keys=keys)) is Status.DESTROYED
    assert await refused(ops.destroy(b, "alice", PASSWORD, DEFAULT_MASTER_KEY, muk=MUK_B, keys=keys)) is Status.DESTROYED
    assert await refused(ops.sync(b, "alice", secret_b, 3, b"X")) is Status.REFUSED
    assert await refused(ops.remove(b, "alice", secret_b, 3, b"X")) is Status.REFUSED
    for proto in (p, b):
        proto.transport.loseConnection()
    t1 = time.time()

    shown = dep.admin("show", "alice")
    assert (shown["state"], shown["protected_bytes"], shown["muk"]) == ("destroyed", 0, None)

    history = dep.admin("history", "alice")["history"]
    A, B = MUK_A.hex(), MUK_B.hex()
    first, retry, pb = peers["first"], peers["retry"], peers["b"]
    expected = [
        ("issue", "ok", None, "admin"),
        ("enrol", "ok", None, first),
        ("enrol", "refused", None, first),
        ("insert", "ok", A, first),
        ("sync", "ok", A, first),
        ("insert", "repeat", A, retry),
        ("insert", "in-use", B, pb),
        ("sync", "refused", None, pb),
        ("remove", "refused", None, pb),
        ("remove", "ok", A, retry),
        ("insert", "ok", B, pb),
        ("recover", "muk-mismatch", A, retry),
        ("recover", "ok", B, pb),
        ("recover", "not-in-use", B, pb),
        ("destroy", "ok", B, pb),
        ("insert", "destroyed", B, pb),
        ("recover", "destroyed", B, pb),
        ("destroy", "destroyed", B, pb),
        ("sync", "refused", None, pb),
        ("remove", "refused", None, pb),
    ]
    assert [(h["op"], h["result"], h["muk"], h["peer"]) for h in history] == expected
    times = [h["at"] for h in history]
    assert times == sorted(times) and t0 - 1 <= times[0] and times[-1] <= t1 + 1
    assert all(h["serial"] == "alice" for h in history)
    # exactly one check-out per insert that changed the state
    assert sum(1 for h in history if (h["op"], h["result"]) == ("insert", "ok")) == 2


@pytest_twisted.ensureDeferred
async def test_lost_insert_reply_retried_gets_the_same_checkout(deployment):
    """The insert's reply is lost (the card hangs up right after answering the challenge): its immediate retry with the same insert secret and MUK gets the same check-out at once (never BUSY: nothing is held); history has exactly one check-out and one repeat."""
    dep = deployment
    keys = await enrolled(dep, "carol")
    secret = os.urandom(32)
    p = await dep.card()
    challenge = await within(p.request(OpRequest(op=Op.INSERT, serial="carol", insert_secret=secret)))
    answers, _ = ops.answer(challenge, "carol", PASSWORD, DEFAULT_MASTER_KEY, crypto.system_random, keys)
    p.sendMessage(AuthResponse(responses=tuple(answers), muk=MUK_A))
    p.transport.loseConnection()  # the answer is flushed, the reply never read
    q = await dep.card()
    try:
        result, _ = await within(ops.insert(q, "carol", PASSWORD, MUK_A, secret, DEFAULT_MASTER_KEY, keys=keys))
    finally:
        q.transport.loseConnection()
    assert (result.status, result.version, result.protected) == (Status.OK, 1, b"PROTECTED-1")
    history = dep.admin("history", "carol")["history"]
    # whichever of the two check-outs commits first is "ok", the other the same check-out repeated
    assert [h["result"] for h in history if h["op"] == "insert"] == ["ok", "repeat"]
    assert dep.admin("show", "carol")["muk"] == MUK_A.hex()


# ================================================================ indistinguishable refusals, throttling


@pytest_twisted.ensureDeferred
async def test_refusals_are_identical_and_lockout_unlock(deployment):
    """
    A wrong password, a wrong Master key, an unknown serial and a throttled
    source (with the right password) give byte-identical REFUSED results; the
    unknown serial's AuthChallenge is shaped exactly like a real one (and its
    decoy KDF is stable). With ``lockout_threshold`` = 3, one source address
    is throttled on a card after 3 failures: its 4th answer — the right one —
    is refused WITHOUT being evaluated (no history row, the failure count
    stays 3), while the owner's last machine (the MUK of the card's last
    insert) is let in at once from that very address. ``vsc admin show``
    reports the counts of both buckets and ``vsc admin unlock`` clears them.
    """
    dep = deployment
    keys = await enrolled(dep, "bob")
    wrong = ops.derive_keys("wrong password", ops.new_kdf(crypto.system_random, log2_n=10))
    p = await dep.card()
    # the owner's machine A inserts and removes: MUK_A is the card's last MUK
    owner_secret = os.urandom(32)
    result, _ = await within(ops.insert(p, "bob", PASSWORD, MUK_A, owner_secret, DEFAULT_MASTER_KEY, keys=keys))
    assert result.status is Status.OK
    assert (await within(ops.remove(p, "bob", owner_secret, 1, b"PROTECTED-2"))).status is Status.OK
    secret = os.urandom(32)

    def insert_req(serial: str) -> OpRequest:
        return OpRequest(op=Op.INSERT, serial=serial, insert_secret=secret)

    # an attacker (machine B) on the same address guesses
    real, r_wrong_pw = await authenticated_raw(p, insert_req("bob"), wrong, MUK_B)
    ghost, r_unknown = await authenticated_raw(p, insert_req("nobody"), keys, MUK_B)
    ghost2, _ = await authenticated_raw(p, insert_req("nobody"), keys, MUK_B)
    _, r_wrong_master = await authenticated_raw(p, insert_req("bob"), keys, MUK_B, master=b"\x00" * 32)
    # shape of the challenge: same methods, same sizes, same KDF parameters except the salt
    assert [(c.method, len(c.data)) for c in ghost.challenges] == [(c.method, len(c.data)) for c in real.challenges]
    assert len(encode_inner(ghost)) == len(encode_inner(real))
    real_kdf, ghost_kdf = KdfParams.decode(real.kdf), KdfParams.decode(ghost.kdf)
    assert attrs.evolve(ghost_kdf, salt=real_kdf.salt) == real_kdf and len(ghost_kdf.salt) == len(real_kdf.salt)
    assert ghost2.kdf == ghost.kdf  # stable per serial, so asking twice reveals nothing
    # third failure: this source is throttled on bob
    _, r_third = await authenticated_raw(p, insert_req("bob"), wrong, MUK_B)
    rows_before = len(dep.admin("history", "bob")["history"])
    _, r_throttled = await authenticated_raw(p, insert_req("bob"), keys, MUK_B)  # the right password
    encodings = {encode_inner(r) for r in (r_wrong_pw, r_unknown, r_wrong_master, r_third, r_throttled)}
    assert encodings == {encode_inner(OpResult(status=Status.REFUSED))}
    assert len(dep.admin("history", "bob")["history"]) == rows_before  # not evaluated: no history row
    shown = dep.admin("show", "bob")
    assert (shown["state"], shown["failures"], shown["machine_failures"]) == ("idle", LOCKOUT, 0)
    assert shown["locked_out"] is False  # the card's shared bucket (20) is far away: only the source is throttled

    # the owner's machine: its own bucket, untouched by the attacker, from the same address
    result, _ = await within(ops.insert(p, "bob", PASSWORD, MUK_A, secret, DEFAULT_MASTER_KEY, keys=keys))
    assert (result.status, result.protected) == (Status.OK, b"PROTECTED-2")
    p.transport.loseConnection()
    shown = dep.admin("show", "bob")
    assert (shown["state"], shown["muk"], shown["failures"], shown["machine_failures"], shown["locked_out"]) == (
        "in-use", MUK_A.hex(), LOCKOUT, 0, False)

    unlocked = dep.admin("unlock", "bob")
    assert unlocked["failures_cleared"] == LOCKOUT
    shown = dep.admin("show", "bob")
    assert (shown["failures"], shown["machine_failures"], shown["locked_out"]) == (0, 0, False)

    history = dep.admin("history", "bob")["history"]
    rows = [(h["op"], h["result"], h["muk"]) for h in history]
    A, B = MUK_A.hex(), MUK_B.hex()
    assert rows == [("issue", "ok", None), ("enrol", "ok", None), ("insert", "ok", A), ("remove", "ok", A)] + [
        ("insert", "refused", B)] * 3 + [("insert", "ok", A), ("unlock", "ok", None)]
    details = [h["detail"] for h in history if h["result"] == "refused"]
    assert details == ["failed: password", "failed: master-key", "failed: password"]
    assert [(h["op"], h["result"], h["muk"], h["detail"]) for h in dep.admin("history", "nobody")["history"]] == [
        ("insert", "refused", B, "no such card")] * 2


# ================================================================ Figure 4, every (state, operation)

STATES = ("idle", "in-use", "destroyed")
OPS = ("insert", "remove", "recover", "destroy", "sync")
#: Figure 4 [0074]: insert idle→in-use; remove/recover in-use→idle; destroy idle|in-use→destroyed; sync keeps
#: in-use. Everything else leaves the state alone: NOT_IN_USE/IN_USE/DESTROYED after authentication, REFUSED
#: for a sync/remove whose insert secret is not the card's current insert.
FIGURE_4 = {
    ("idle", "insert"): (Status.OK, "in-use"),
    ("idle", "remove"): (Status.REFUSED, "idle"),
    ("idle", "recover"): (Status.NOT_IN_USE, "idle"),
    ("idle", "destroy"): (Status.OK, "destroyed"),
    ("idle", "sync"): (Status.REFUSED, "idle"),
    ("in-use", "insert"): (Status.IN_USE, "in-use"),
    ("in-use", "remove"): (Status.OK, "idle"),
    ("in-use", "recover"): (Status.OK, "idle"),
    ("in-use", "destroy"): (Status.OK, "destroyed"),
    ("in-use", "sync"): (Status.OK, "in-use"),
    ("destroyed", "insert"): (Status.DESTROYED, "destroyed"),
    ("destroyed", "remove"): (Status.REFUSED, "destroyed"),
    ("destroyed", "recover"): (Status.DESTROYED, "destroyed"),
    ("destroyed", "destroy"): (Status.DESTROYED, "destroyed"),
    ("destroyed", "sync"): (Status.REFUSED, "destroyed"),
}


@pytest_twisted.ensureDeferred
async def test_every_state_and_operation_follows_figure_4(deployment):
    """For each state (idle, in-use, destroyed) × operation (insert, remove, recover, destroy, sync), over the network: the status and the resulting state are those of Figure 4, the version moves only on a successful sync or remove, and the history records the operation with its result."""
    dep = deployment
    kdf = ops.new_kdf(crypto.system_random, log2_n=10)
    owner_secret = {}
    for state in STATES:
        for op in OPS:
            serial = f"{state}-{op}"
            keys = await enrolled(dep, serial, kdf, via_admin=False)
            p = await dep.card()
            secret = os.urandom(32)
            if state == "in-use":
                await within(ops.insert(p, serial, PASSWORD, MUK_A, secret, DEFAULT_MASTER_KEY, keys=keys))
            elif state == "destroyed":
                await within(ops.destroy(p, serial, PASSWORD, DEFAULT_MASTER_KEY, keys=keys))
            owner_secret[serial] = secret
            p.transport.loseConnection()
    store = dep.store()
    try:
        seen = {}
        for state in STATES:
            for op in OPS:
                serial = f"{state}-{op}"
                before = store.get(serial)
                assert before.state.value == state
                secret = owner_secret[serial]
                p = await dep.card()
                if op == "insert":  # a second machine when in use; the owner's machine otherwise
                    muk, sec = (MUK_B, os.urandom(32)) if state == "in-use" else (MUK_A, secret)
                    coro = ops.insert(p, serial, PASSWORD, muk, sec, DEFAULT_MASTER_KEY, keys=keys)
                elif op == "recover":
                    coro = ops.recover(p, serial, PASSWORD, MUK_A, DEFAULT_MASTER_KEY, keys=keys)
                elif op == "destroy":
                    coro = ops.destroy(p, serial, PASSWORD, DEFAULT_MASTER_KEY, muk=MUK_A, keys=keys)
                elif op == "sync":
                    coro = ops.sync(p, serial, secret, before.version, b"NEW")
                else:
                    coro = ops.remove(p, serial, secret, before.version, b"NEW")
                try:
                    result = await within(coro)
                    status = (result[0] if isinstance(result, tuple) else result).status
                except ops.OperationRefused as e:
                    status = e.status
                p.transport.loseConnection()
                after = store.get(serial)
                seen[(state, op)] = (status, after.state.value)
                changed = (status is Status.OK and op in ("sync", "remove"))
                assert after.version == before.version + (1 if changed else 0), (state, op)
                last = store.history(serial)[-1]
                assert last.op == op and last.result == (
                    "ok" if status is Status.OK else {Status.IN_USE: "in-use", Status.NOT_IN_USE: "not-in-use",
                                                       Status.DESTROYED: "destroyed"}.get(status, "refused")), (state, op)
    finally:
        store.close()
    assert seen == FIGURE_4
