"""
The server side of the card operations, without a reactor or a database.

Part 1 drives the sans-IO machine (vsc.protocol.server_ops.ServerOps) with
messages, lease results, loaded records and store outcomes, and asserts the
exact effects it asks for: mediation and exclusion [0081], insert (Figure 6,
[0077]), remove (Figure 11, [0095]), recover (Figure 12, [0096]), destroy
([0098]), sync, BUSY, the 30 s implementation-authentication deadline, and
indistinguishable refusals.

Part 2 is the Twisted glue (vsc.server.service.ServerProtocol/ServerFactory)
with a real Store on a temporary SQLite file, a thread pool replaced by a
queue the test runs by hand, a task.Clock, and twisted.test.iosim pumping
bytes to a real card-side CardProtocol.
"""

from __future__ import annotations

import functools
import hashlib

import attrs
import pytest
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.test import iosim

from vsc import crypto
from vsc.card import ops as card_ops
from vsc.card.connect import CardProtocol
from vsc.net.channel import ChannelClosedError, ChannelFactory
from vsc.protocol import auth
from vsc.protocol.channel import card_channel
from vsc.protocol.server_ops import (
    AcquireLease,
    CancelDeadline,
    LoadCard,
    OpsPolicy,
    ProtocolViolation,
    ReleaseLease,
    Reply,
    ServerOps,
    StartDeadline,
    StoreCall,
)
from vsc.protocol.suites import ChannelConfig
from vsc.server.service import Backend, ServerFactory
from vsc.server.store import CardRecord, CardState, Store
from vsc.wire import ErrorCode, encode_inner
from vsc.wire.messages import EchoRequest
from vsc.wire.ops import (
    AuthChallenge,
    AuthItem,
    AuthMethod,
    AuthResponse,
    EnrolRequest,
    KdfAlg,
    KdfParams,
    Op,
    OpRequest,
    OpResult,
    Status,
)

MASTER = crypto.sha256(b"test Master key")
DECOY = crypto.sha256(b"test decoy secret")
PEER = "192.0.2.7:40000"
SUITE = "aes256-gcm"
NOW = 1_000_000.0
SERIAL = "card-1"
AUTH_KEY = crypto.sha256(b"the owner's authentication key")
WRONG_KEY = crypto.sha256(b"a guess")
MUK = b"M" * 32
OTHER_MUK = b"N" * 32
SECRET = b"S" * 32
KDF = KdfParams(alg=KdfAlg.SCRYPT, salt=b"s" * 16).encode()  # what a card makes with ops.new_kdf()
AUTH_INFO = '{"methods": ["master-key", "password"]}'


class Rand:
    """Deterministic rand(n): SHA-256 counter stream."""

    def __init__(self, seed: bytes = b"rand"):
        self.seed, self.n = seed, 0

    def __call__(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            out += hashlib.sha256(self.seed + self.n.to_bytes(8, "big")).digest()
            self.n += 1
        return out[:n]


def record(serial: str = SERIAL, state: CardState = CardState.IDLE, **kw) -> CardRecord:
    fields = dict(
        serial=serial, state=state, muk=None, protected=b"PROTECTED", channel_info=None,
        verifier=auth.verifier_for(AUTH_KEY, KdfAlg.SCRYPT), kdf=KDF, auth_info=AUTH_INFO, version=4,
        failures=0, locked_until=0.0, created=NOW - 100, updated=NOW - 50,
    )
    fields.update(kw)
    return CardRecord(**fields)


def machine(policy: OpsPolicy = OpsPolicy(), rand=None, now: float = NOW) -> ServerOps:
    return ServerOps(policy=policy, master=MASTER, decoy_secret=DECOY, peer=PEER, suite=SUITE,
                     now=lambda: now, rand=rand or Rand())


def request(op: Op, serial: str = SERIAL, **kw) -> OpRequest:
    return OpRequest(op=op, serial=serial, **kw)


def challenged(m: ServerOps, req: OpRequest, card: CardRecord | None) -> AuthChallenge:
    """Take ``m`` from idle to the challenge of an authenticated operation; check every effect on the way."""
    assert m.message(req) == [AcquireLease(req.serial)]
    assert m.lease(True) == [LoadCard(req.serial)]
    effects = m.loaded(card)
    assert len(effects) == 2 and isinstance(effects[0], Reply) and effects[1] == StartDeadline(30.0)
    challenge = effects[0].message
    assert isinstance(challenge, AuthChallenge)
    return challenge


def answer(challenge: AuthChallenge, serial: str = SERIAL, key: bytes = AUTH_KEY, master: bytes = MASTER,
           muk: bytes = MUK) -> AuthResponse:
    items = []
    for item in challenge.challenges:
        if item.method is AuthMethod.PASSWORD:
            items.append(AuthItem(item.method, key))
        elif item.method is AuthMethod.MASTER_KEY:
            items.append(AuthItem(item.method, auth.master_answer(master, item.data, serial, Rand(b"card"))))
        else:
            items.append(AuthItem(item.method, b""))
    return AuthResponse(responses=tuple(items), muk=muk)


def store_call(effects: list) -> StoreCall:
    calls = [e for e in effects if isinstance(e, StoreCall)]
    assert len(calls) == 1, effects
    return calls[0]


def refusal_effects(m: ServerOps, resp: AuthResponse, detail: str, op: str = "insert") -> None:
    """An authentication failure: an auth_failed call, then REFUSED, then the lease goes back."""
    effects = m.message(resp)
    assert effects == [CancelDeadline(), StoreCall("auth_failed", dict(serial=SERIAL, op=op, peer=PEER, detail=detail,
                                                                       muk=resp.muk or None))]
    assert m.stored(None) == [Reply(OpResult(status=Status.REFUSED)), ReleaseLease(SERIAL)]


# ================================================================ Part 1: the machine


def test_insert_authenticates_then_checks_out():
    """Figure 6: lease, load, challenge (password + Master key, 30 s), check-out with the MUK and the hashed insert secret, OK with the download, lease released."""
    m = machine()
    ch = challenged(m, request(Op.INSERT, insert_secret=SECRET), record())
    assert ch.kdf == KDF
    assert [i.method for i in ch.challenges] == [AuthMethod.PASSWORD, AuthMethod.MASTER_KEY]
    assert ch.challenges[0].data == b"" and len(ch.challenges[1].data) == 32
    effects = m.message(answer(ch))
    assert effects == [
        CancelDeadline(),
        StoreCall("checkout", dict(serial=SERIAL, muk=MUK, session=crypto.sha256(SECRET),
                                   channel={"suite": SUITE, "peer": PEER}, peer=PEER)),
    ]
    in_use = record(state=CardState.IN_USE, muk=MUK, protected=b"DOWNLOAD", version=4)
    assert m.stored(("ok", in_use)) == [
        Reply(OpResult(status=Status.OK, version=4, protected=b"DOWNLOAD")),
        ReleaseLease(SERIAL),
    ]


def test_repeated_insert_returns_the_same_checkout():
    """A retried insert (store says "repeat": same secret, same MUK) is OK with the stored download, like the first."""
    m = machine()
    ch = challenged(m, request(Op.INSERT, insert_secret=SECRET), record(state=CardState.IN_USE, muk=MUK))
    assert store_call(m.message(answer(ch))).method == "checkout"
    in_use = record(state=CardState.IN_USE, muk=MUK, version=7, protected=b"V7")
    assert m.stored(("repeat", in_use)) == [Reply(OpResult(status=Status.OK, version=7, protected=b"V7")),
                                            ReleaseLease(SERIAL)]


@pytest.mark.parametrize(
    "outcome, status",
    [
        (("in-use", record(state=CardState.IN_USE, muk=OTHER_MUK)), Status.IN_USE),
        (("destroyed", record(state=CardState.DESTROYED)), Status.DESTROYED),
        (("refused", None), Status.REFUSED),
    ],
)
def test_insert_mediation_refusals(outcome, status):
    """Mediation 305 fails: in use elsewhere → IN_USE, destroyed → DESTROYED, vanished → REFUSED; no download, lease released."""
    m = machine()
    ch = challenged(m, request(Op.INSERT, insert_secret=SECRET), record())
    m.message(answer(ch))
    assert m.stored(outcome) == [Reply(OpResult(status=status)), ReleaseLease(SERIAL)]


@pytest.mark.parametrize("secret, muk", [(b"", MUK), (SECRET, b""), (SECRET, b"short")])
def test_insert_without_muk_or_secret_is_a_bad_request(secret, muk):
    """An authenticated insert lacking the 32-byte MUK or insert secret is logged as a refusal and answered BAD_REQUEST, never checked out."""
    m = machine()
    ch = challenged(m, request(Op.INSERT, insert_secret=secret), record())
    effects = m.message(answer(ch, muk=muk))
    assert effects[0] == CancelDeadline()
    call = store_call(effects)
    assert call.method == "refused" and call.kwargs["result"] == "bad-request"
    assert m.stored(None) == [Reply(OpResult(status=Status.BAD_REQUEST)), ReleaseLease(SERIAL)]


@pytest.mark.parametrize(
    "outcome, status",
    [("ok", Status.OK), ("not-in-use", Status.NOT_IN_USE), ("muk-mismatch", Status.MUK_MISMATCH),
     ("destroyed", Status.DESTROYED), ("refused", Status.REFUSED)],
)
def test_recover(outcome, status):
    """Figure 12: authenticate like insert, then mediation 902 with the uploaded MUK; each store outcome maps to its status."""
    m = machine()
    ch = challenged(m, request(Op.RECOVER), record(state=CardState.IN_USE, muk=MUK))
    assert [i.method for i in ch.challenges] == [AuthMethod.PASSWORD, AuthMethod.MASTER_KEY]
    assert m.message(answer(ch)) == [CancelDeadline(), StoreCall("recover", dict(serial=SERIAL, muk=MUK, peer=PEER))]
    assert m.stored(outcome) == [Reply(OpResult(status=status)), ReleaseLease(SERIAL)]


@pytest.mark.parametrize("muk, stored_muk", [(MUK, MUK), (b"", None)])
@pytest.mark.parametrize("outcome, status", [("ok", Status.OK), ("destroyed", Status.DESTROYED), ("refused", Status.REFUSED)])
def test_destroy(muk, stored_muk, outcome, status):
    """[0098]: destroy authenticates like insert; the MUK is optional (logged when given); outcomes map to OK/DESTROYED/REFUSED."""
    m = machine()
    ch = challenged(m, request(Op.DESTROY), record())
    assert m.message(answer(ch, muk=muk)) == [
        CancelDeadline(), StoreCall("destroy", dict(serial=SERIAL, peer=PEER, muk=stored_muk))]
    assert m.stored(outcome) == [Reply(OpResult(status=status)), ReleaseLease(SERIAL)]


@pytest.mark.parametrize("op, method", [(Op.SYNC, "sync"), (Op.REMOVE, "checkin")])
@pytest.mark.parametrize(
    "outcome, reply",
    [(("ok", 5), OpResult(status=Status.OK, version=5)),
     (("conflict", 9), OpResult(status=Status.VERSION_CONFLICT, version=9)),
     (("refused", 0), OpResult(status=Status.REFUSED, version=0))],
)
def test_sync_and_remove_present_the_insert_secret(op, method, outcome, reply):
    """Sync and remove (Figure 11) skip authentication: they present the insert secret (hashed) with the version and the upload."""
    m = machine()
    assert m.message(request(op, insert_secret=SECRET, version=4, protected=b"NEW")) == [AcquireLease(SERIAL)]
    assert m.lease(True) == [
        StoreCall(method, dict(serial=SERIAL, session=crypto.sha256(SECRET), version=4, protected=b"NEW", peer=PEER))]
    assert m.stored(outcome) == [Reply(reply), ReleaseLease(SERIAL)]


def test_sync_without_secret_asks_the_store_with_an_empty_session():
    """A sync with no insert secret matches no insert: the store is asked with an empty session (and refuses)."""
    m = machine()
    m.message(request(Op.SYNC, version=1, protected=b"X"))
    assert m.lease(True)[0].kwargs["session"] == b""
    assert m.stored(("refused", 0)) == [Reply(OpResult(status=Status.REFUSED)), ReleaseLease(SERIAL)]


@pytest.mark.parametrize("outcome, reply", [(True, OpResult(status=Status.OK, version=1)),
                                            ((True, b"REG"), OpResult(status=Status.OK, version=1, registration=b"REG")),
                                            (False, OpResult(status=Status.REFUSED))])
def test_enrol(outcome, reply):
    """Enrol takes the lease, hands the store the hashed code and the upload, and answers OK (version 1) or REFUSED."""
    m = machine()
    req = EnrolRequest(serial=SERIAL, code="abcde-fghij", verifier=b"V" * 32, kdf=KDF, protected=b"P",
                       registration=b"R")
    assert m.message(req) == [AcquireLease(SERIAL)]
    assert m.lease(True) == [StoreCall("enrol", dict(serial=SERIAL, code_hash=auth.code_hash("ABCDEFGHIJ"),
                                                     verifier=b"V" * 32, kdf=KDF, protected=b"P",
                                                     registration=b"R", peer=PEER))]
    assert m.stored(outcome) == [Reply(reply), ReleaseLease(SERIAL)]


@pytest.mark.parametrize(
    "req",
    [request(Op.INSERT, insert_secret=SECRET), request(Op.REMOVE, insert_secret=SECRET), request(Op.RECOVER),
     request(Op.DESTROY), request(Op.SYNC, insert_secret=SECRET),
     EnrolRequest(serial=SERIAL, code="c", verifier=b"V" * 32, kdf=KDF, protected=b"P")],
    ids=["insert", "remove", "recover", "destroy", "sync", "enrol"],
)
def test_busy_when_the_lease_is_taken(req):
    """[0081]: while another operation holds the serial's lease every operation is refused BUSY (logged), without touching the record or releasing a lease it does not hold."""
    m = machine()
    assert m.message(req) == [AcquireLease(SERIAL)]
    op = "enrol" if isinstance(req, EnrolRequest) else req.op.name.lower()
    assert m.lease(False) == [StoreCall("refused", dict(serial=SERIAL, op=op, result="busy", peer=PEER,
                                                        detail="another operation on this serial is running"))]
    assert m.stored(None) == [Reply(OpResult(status=Status.BUSY))]
    # the machine is idle again: the next operation starts normally
    assert m.message(request(Op.SYNC, insert_secret=SECRET)) == [AcquireLease(SERIAL)]


def test_busy_log_failure_still_answers_busy():
    """If logging the BUSY refusal fails, the card is still told BUSY (nothing was changed) and no lease is released."""
    m = machine()
    m.message(request(Op.INSERT, insert_secret=SECRET))
    m.lease(False)
    assert m.store_failed("database down") == [Reply(OpResult(status=Status.BUSY))]


def test_unknown_serial_gets_a_challenge_like_a_real_one():
    """A serial that does not exist gets decoy KDF parameters shaped like a card's (scrypt, 16-byte salt, same cost) and the same challenge methods."""
    real = challenged(machine(), request(Op.INSERT, insert_secret=SECRET), record())
    decoy = challenged(machine(), request(Op.INSERT, "no-such-card", insert_secret=SECRET), None)
    assert [(i.method, len(i.data)) for i in decoy.challenges] == [(i.method, len(i.data)) for i in real.challenges]
    real_kdf, decoy_kdf = KdfParams.decode(real.kdf), KdfParams.decode(decoy.kdf)
    assert attrs.evolve(decoy_kdf, salt=real_kdf.salt) == real_kdf
    assert len(decoy.kdf) == len(real.kdf) and len(encode_inner(decoy)) == len(encode_inner(real))
    # a real card's KDF as the card makes it by default
    made = card_ops.new_kdf(Rand(b"x"))
    assert attrs.evolve(decoy_kdf, salt=made.salt) == made


def test_decoy_kdf_is_stable_per_serial():
    """The decoy KDF is the same every time for one serial (across connections), and differs between serials."""
    first = challenged(machine(rand=Rand(b"1")), request(Op.RECOVER, "ghost"), None)
    again = challenged(machine(rand=Rand(b"2")), request(Op.INSERT, "ghost", insert_secret=SECRET), None)
    other = challenged(machine(), request(Op.INSERT, "ghost-2", insert_secret=SECRET), None)
    assert first.kdf == again.kdf == auth.decoy_kdf(DECOY, "ghost")
    assert other.kdf != first.kdf
    assert first.challenges[1].data != again.challenges[1].data  # the Master-key challenge is fresh each time


def test_unknown_serial_wrong_password_wrong_master_and_lockout_look_the_same():
    """Wrong password, wrong Master key, unknown serial and a locked-out card (even with the right answers) all give the same REFUSED and an auth_failed call."""
    replies = []
    cases = [
        ("wrong password", record(), dict(key=WRONG_KEY), "failed: password"),
        ("wrong master", record(), dict(master=crypto.sha256(b"other")), "failed: master key"),
        ("both wrong", record(), dict(key=WRONG_KEY, master=b"x" * 32), "failed: password, master key"),
        ("unknown serial", None, dict(), "no such card"),
        ("locked out", record(failures=5, locked_until=NOW + 30), dict(), "locked out"),
    ]
    for _name, card, kw, detail in cases:
        m = machine()
        ch = challenged(m, request(Op.INSERT, insert_secret=SECRET), card)
        resp = answer(ch, **kw)
        effects = m.message(resp)
        assert effects == [CancelDeadline(), StoreCall("auth_failed", dict(serial=SERIAL, op="insert", peer=PEER,
                                                                           detail=detail, muk=MUK))], _name
        done = m.stored(None)
        assert done[1:] == [ReleaseLease(SERIAL)]
        replies.append(encode_inner(done[0].message))
    assert len(set(replies)) == 1 and replies[0] == encode_inner(OpResult(status=Status.REFUSED))


def test_lockout_expired_lets_the_owner_in():
    """A lockout whose time has passed no longer refuses the right answers."""
    m = machine()
    ch = challenged(m, request(Op.INSERT, insert_secret=SECRET), record(failures=5, locked_until=NOW - 1))
    assert store_call(m.message(answer(ch))).method == "checkout"


@pytest.mark.parametrize("op", [Op.RECOVER, Op.DESTROY])
def test_recover_and_destroy_refuse_bad_authentication(op):
    """Recover and destroy with a wrong password are REFUSED after an auth_failed call, never reaching mediation."""
    m = machine()
    ch = challenged(m, request(op), record(state=CardState.IN_USE, muk=MUK))
    refusal_effects(m, answer(ch, key=WRONG_KEY), "failed: password", op=op.name.lower())


@pytest.mark.parametrize(
    "mangle, detail",
    [(lambda r: AuthResponse(responses=r.responses[:1], muk=r.muk), "wrong number of answers"),
     (lambda r: AuthResponse(responses=tuple(reversed(r.responses)), muk=r.muk), "answers out of order"),
     (lambda r: AuthResponse(responses=(r.responses[0], AuthItem(AuthMethod.MASTER_KEY, b"junk")), muk=r.muk),
      "failed: master key")],
    ids=["missing", "reordered", "malformed-master"],
)
def test_malformed_answers_are_failed_authentications(mangle, detail):
    """Missing, reordered or undecodable answers count as failed authentication (REFUSED), not as a crash."""
    m = machine()
    ch = challenged(m, request(Op.INSERT, insert_secret=SECRET), record())
    refusal_effects(m, mangle(answer(ch)), detail)


def test_card_with_more_methods_than_the_policy_is_challenged_for_all():
    """All configured methods must pass ([0084]): a card registered for a method this server cannot check is refused."""
    m = machine()
    card = record(auth_info='{"methods": ["password", "keyfile", "master-key"]}')
    ch = challenged(m, request(Op.INSERT, insert_secret=SECRET), card)
    assert [i.method for i in ch.challenges] == [AuthMethod.PASSWORD, AuthMethod.KEYFILE, AuthMethod.MASTER_KEY]
    refusal_effects(m, answer(ch), "failed: keyfile")


def test_deadline_gives_timeout_and_never_checks_out():
    """Implementation authentication must be answered within 30 s: the deadline logs a timeout refusal, answers TIMEOUT and releases the lease; no check-out."""
    m = machine()
    challenged(m, request(Op.INSERT, insert_secret=SECRET), record())
    effects = m.deadline()
    assert effects == [StoreCall("refused", dict(serial=SERIAL, op="insert", result="timeout", peer=PEER,
                                                 detail="no answer within 30 s"))]
    assert m.stored(None) == [Reply(OpResult(status=Status.TIMEOUT)), ReleaseLease(SERIAL)]


def test_answer_after_the_deadline_is_a_violation_and_the_lease_waits_for_the_log():
    """An answer arriving after the deadline (while the timeout is being logged) closes the channel; the lease is released only when the store call returns, and no reply is sent."""
    m = machine()
    ch = challenged(m, request(Op.INSERT, insert_secret=SECRET), record())
    m.deadline()
    effects = m.message(answer(ch))
    assert [type(e) for e in effects] == [CancelDeadline, ProtocolViolation]
    assert ReleaseLease(SERIAL) not in effects
    assert m.stored(None) == [ReleaseLease(SERIAL)]
    assert m.message(answer(ch)) == []  # closed: ignored


def test_configurable_deadline():
    """The deadline comes from the policy (auth_deadline)."""
    m = machine(policy=OpsPolicy(auth_deadline=5.0))
    m.message(request(Op.RECOVER))
    m.lease(True)
    assert m.loaded(record())[1] == StartDeadline(5.0)


@pytest.mark.parametrize(
    "msg",
    [AuthResponse(responses=(AuthItem(AuthMethod.PASSWORD, b"k"),)), OpResult(status=Status.OK), EchoRequest(b"hi")],
    ids=["answer-without-challenge", "op-result", "echo"],
)
def test_unexpected_message_when_idle(msg):
    """A message that is not a request while idle is a protocol violation (close the channel); no lease is involved."""
    m = machine()
    effects = m.message(msg)
    assert [type(e) for e in effects] == [CancelDeadline, ProtocolViolation]
    assert m.message(request(Op.INSERT, insert_secret=SECRET)) == []  # closed for good


def test_request_while_challenged_is_a_violation_and_releases_the_lease():
    """A second request while waiting for the answers closes the channel and releases the lease at once (nothing in flight)."""
    m = machine()
    challenged(m, request(Op.INSERT, insert_secret=SECRET), record())
    effects = m.message(request(Op.DESTROY))
    assert [type(e) for e in effects] == [CancelDeadline, ProtocolViolation, ReleaseLease]
    assert m.deadline() == [] and m.stored(None) == []


def test_request_while_leasing_is_a_violation_and_the_late_lease_is_released():
    """A message during the lease acquisition closes the channel; when the lease arrives late it is released at once (and a late BUSY needs nothing)."""
    m = machine()
    m.message(request(Op.INSERT, insert_secret=SECRET))
    effects = m.message(request(Op.INSERT, insert_secret=SECRET))
    assert [type(e) for e in effects] == [CancelDeadline, ProtocolViolation]
    assert m.lease(True) == [ReleaseLease(SERIAL)]
    m2 = machine()
    m2.message(request(Op.INSERT, insert_secret=SECRET))
    m2.message(EchoRequest(b"x"))
    assert m2.lease(False) == []


def test_request_while_a_store_call_runs_is_a_violation_and_the_lease_waits():
    """A message while a store call is in flight closes the channel; the lease stays held until the call returns, then is released with no reply."""
    m = machine()
    ch = challenged(m, request(Op.INSERT, insert_secret=SECRET), record())
    m.message(answer(ch))  # checkout in flight
    effects = m.message(request(Op.REMOVE, insert_secret=SECRET))
    assert [type(e) for e in effects] == [CancelDeadline, ProtocolViolation]
    assert m.stored(("ok", record(state=CardState.IN_USE))) == [ReleaseLease(SERIAL)]


def test_connection_lost_mid_operation_keeps_the_lease_until_the_store_call_returns():
    """Connection lost while the check-out commits: the lease is kept until the store call returns, then released; nothing is sent."""
    m = machine()
    ch = challenged(m, request(Op.INSERT, insert_secret=SECRET), record())
    assert store_call(m.message(answer(ch))).method == "checkout"
    assert m.connection_lost() == [CancelDeadline()]
    assert m.stored(("ok", record(state=CardState.IN_USE))) == [ReleaseLease(SERIAL)]


@pytest.mark.parametrize("result", ["stored", "failed"])
def test_connection_lost_during_sync_releases_after_the_result(result):
    """Same for a sync in flight, whether the store call returns or raises."""
    m = machine()
    m.message(request(Op.SYNC, insert_secret=SECRET, version=1, protected=b"x"))
    m.lease(True)
    assert m.connection_lost() == [CancelDeadline()]
    late = m.stored(("ok", 2)) if result == "stored" else m.store_failed("boom")
    assert late == [ReleaseLease(SERIAL)]


def test_connection_lost_while_leasing_or_loading():
    """Lost while the lease is being taken: a late grant is released, a late BUSY needs nothing; lost while loading: released when the record arrives."""
    m = machine()
    m.message(request(Op.INSERT, insert_secret=SECRET))
    assert m.connection_lost() == [CancelDeadline()]
    assert m.lease(True) == [ReleaseLease(SERIAL)]
    m = machine()
    m.message(request(Op.INSERT, insert_secret=SECRET))
    m.connection_lost()
    assert m.lease(False) == []
    m = machine()
    m.message(request(Op.INSERT, insert_secret=SECRET))
    m.lease(True)
    assert m.connection_lost() == [CancelDeadline()]
    assert m.loaded(record()) == [ReleaseLease(SERIAL)]


def test_connection_lost_while_challenged_releases_at_once():
    """Lost while waiting for the answers (nothing in flight): cancel the deadline and release the lease immediately."""
    m = machine()
    challenged(m, request(Op.INSERT, insert_secret=SECRET), record())
    assert m.connection_lost() == [CancelDeadline(), ReleaseLease(SERIAL)]
    assert m.deadline() == []


def test_connection_lost_when_idle():
    """Lost between operations: nothing to release."""
    m = machine()
    assert m.connection_lost() == [CancelDeadline()]


def test_store_failure_is_internal_and_releases():
    """A store call that raises answers INTERNAL (nothing was changed) and releases the lease."""
    m = machine()
    ch = challenged(m, request(Op.INSERT, insert_secret=SECRET), record())
    m.message(answer(ch))
    assert m.store_failed("disk full") == [Reply(OpResult(status=Status.INTERNAL)), ReleaseLease(SERIAL)]


def test_lease_failure_is_internal():
    """When taking the lease itself fails (database down) the card gets INTERNAL, the channel stays open and no lease is released."""
    m = machine()
    m.message(request(Op.INSERT, insert_secret=SECRET))
    assert m.store_failed("connection refused") == [Reply(OpResult(status=Status.INTERNAL))]
    assert m.message(request(Op.SYNC, insert_secret=SECRET)) == [AcquireLease(SERIAL)]


def test_operations_follow_each_other_on_one_channel():
    """One channel carries several operations in turn: insert, sync, remove, each with its own lease."""
    m = machine()
    ch = challenged(m, request(Op.INSERT, insert_secret=SECRET), record())
    m.message(answer(ch))
    assert m.stored(("ok", record(state=CardState.IN_USE, version=1)))[-1] == ReleaseLease(SERIAL)
    for op, method in ((Op.SYNC, "sync"), (Op.REMOVE, "checkin")):
        assert m.message(request(op, insert_secret=SECRET, version=1, protected=b"P")) == [AcquireLease(SERIAL)]
        assert m.lease(True)[0].method == method
        assert m.stored(("ok", 2)) == [Reply(OpResult(status=Status.OK, version=2)), ReleaseLease(SERIAL)]


# ================================================================ Part 2: the Twisted glue


@functools.lru_cache(maxsize=None)
def server_key() -> crypto.RSAPrivateKey:
    return crypto.RSAPrivateKey.generate(2048)


class InlineReactor:
    """The only reactor method deferToThreadPool uses: callFromThread, run at once."""

    def callFromThread(self, f, *args, **kwargs):
        f(*args, **kwargs)


class ManualPool:
    """A thread pool stand-in: work queues up until the test runs it (``run``), in order, on this thread."""

    def __init__(self):
        self.queue: list = []
        self.calls: list[str] = []

    def callInThreadWithCallback(self, on_result, f, *args, **kwargs):
        self.queue.append((on_result, f, args, kwargs))

    def run_one(self) -> str:
        """Run the oldest queued call; returns its name."""
        on_result, f, args, kwargs = self.queue.pop(0)
        self.calls.append(f.__name__)
        try:
            result = f(*args, **kwargs)
        except Exception:
            on_result(False, Failure())
        else:
            on_result(True, result)
        return f.__name__

    def run(self) -> bool:
        ran = False
        while self.queue:
            self.run_one()
            ran = True
        return ran


class Harness:
    """A ServerFactory on a real SQLite Store, a manual pool, a Clock, and iosim connections to CardProtocols."""

    def __init__(self, tmp_path, policy: OpsPolicy = OpsPolicy()):
        self.clock = Clock()
        self.clock.advance(NOW)
        self.store = Store(f"sqlite:///{tmp_path / 'vsc.sqlite3'}", self.clock.seconds)
        self.store.migrate()
        self.pool = ManualPool()
        self.backend = Backend(InlineReactor(), self.store, self.pool, lease_ttl=90.0, owner="test:1:glue")
        self.factory = ServerFactory(ChannelConfig(), server_key(), self.clock, backend=self.backend,
                                     ops_policy=policy, master=MASTER)
        self.fingerprint = server_key().public_key().fingerprint()
        self.pumps: list[iosim.IOPump] = []

    def connect(self):
        """A new card connection; returns (card protocol, server protocol, pump) after the handshake."""
        card_factory = ChannelFactory(lambda: card_channel(ChannelConfig(), self.fingerprint), self.clock, CardProtocol)
        client, server, pump = iosim.connectedServerAndClient(
            lambda: self.factory.buildProtocol(None), lambda: card_factory.buildProtocol(None), greet=False)
        self.pumps.append(pump)
        self.settle()
        assert client.info is not None and server.info is not None
        return client, server, pump

    def settle(self, pool: bool = True) -> None:
        """Move bytes and (with ``pool``) run queued store calls until nothing moves."""
        for _ in range(1000):
            moved = any([p.flush(advanceClock=False) for p in self.pumps])
            ran = self.pool.run() if pool else False
            if not moved and not ran:
                return
        raise AssertionError("did not settle")

    def run(self, coro) -> Deferred:
        d = ensureDeferred(coro)
        self.settle()
        return d

    def enrol(self, client, serial: str = SERIAL, keys=None):
        from vsc.server.policy import Policy, code_hash, new_enrolment_code

        code = new_enrolment_code()
        self.store.issue(serial, code_hash(code), Policy().initial_auth_info(), 3600)
        kdf = card_ops.new_kdf(crypto.system_random, log2_n=10)
        keys = card_ops.derive_keys("pw", kdf)
        d = self.run(card_ops.enrol(client, serial, code, keys, kdf, b"PROTECTED-1"))
        assert result_of(d).status is Status.OK
        return keys


def result_of(d: Deferred):
    """The result of a Deferred that must already have fired (failures are raised)."""
    out: list = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


def test_glue_life_cycle_over_a_real_store(tmp_path):
    """Through the real channel and a real SQLite store: enrol, insert, sync, remove, recover-refused, destroy; each store call runs on the (stand-in) pool, never inline."""
    h = Harness(tmp_path)
    client, server, _ = h.connect()
    keys = h.enrol(client)
    assert "enrol" in h.pool.calls and "acquire" in h.pool.calls and "release" in h.pool.calls
    result, _ = result_of(h.run(card_ops.insert(client, SERIAL, "pw", MUK, SECRET, MASTER, keys=keys)))
    assert (result.status, result.version, result.protected) == (Status.OK, 1, b"PROTECTED-1")
    assert h.store.get(SERIAL).state is CardState.IN_USE
    assert result_of(h.run(card_ops.sync(client, SERIAL, SECRET, 1, b"PROTECTED-2"))).version == 2
    assert result_of(h.run(card_ops.remove(client, SERIAL, SECRET, 2, b"PROTECTED-3"))).version == 3
    card = h.store.get(SERIAL)
    assert (card.state, card.version, card.protected) == (CardState.IDLE, 3, b"PROTECTED-3")
    with pytest.raises(card_ops.OperationRefused) as e:
        result_of(h.run(card_ops.recover(client, SERIAL, "pw", MUK, MASTER, keys=keys)))
    assert e.value.status is Status.NOT_IN_USE
    result, _ = result_of(h.run(card_ops.destroy(client, SERIAL, "pw", MASTER, keys=keys)))
    assert result.status is Status.OK and h.store.get(SERIAL).state is CardState.DESTROYED
    # every operation released its lease
    assert h.store.acquire(SERIAL, "someone-else", 1.0)


def test_glue_auth_deadline_with_clock(tmp_path):
    """Nobody answers the challenge: after Clock.advance(31) the card gets TIMEOUT, the record is unchanged, the timeout is in the history, and the lease is free."""
    h = Harness(tmp_path)
    client, server, _ = h.connect()
    keys = h.enrol(client)
    before = h.store.get(SERIAL)
    challenge = result_of(h.run(client.request(OpRequest(op=Op.INSERT, serial=SERIAL, insert_secret=SECRET))))
    assert isinstance(challenge, AuthChallenge)
    h.clock.advance(29)
    h.settle()
    pending = client.nextMessage()
    h.settle()
    assert not pending.called  # still waiting at 29 s
    h.clock.advance(2)
    h.settle()
    assert result_of(pending) == OpResult(status=Status.TIMEOUT)
    after = h.store.get(SERIAL)
    assert (after.state, after.version, after.muk, after.failures) == (before.state, before.version, None, 0)
    last = h.store.history(SERIAL)[-1]
    assert (last.op, last.result, last.peer, last.at) == ("insert", "timeout", server.peer, NOW + 31)
    # the channel is still usable and the lease is free: the insert goes through now
    result, _ = result_of(h.run(card_ops.insert(client, SERIAL, "pw", MUK, SECRET, MASTER, keys=keys)))
    assert result.status is Status.OK


def test_glue_late_answer_after_timeout_closes_only_that_channel(tmp_path):
    """An answer after the TIMEOUT is a protocol violation: that channel is closed (UNEXPECTED_MESSAGE) while another card's channel keeps working."""
    h = Harness(tmp_path)
    bad, _, _ = h.connect()
    good, _, _ = h.connect()
    keys = h.enrol(good)
    challenge = result_of(h.run(bad.request(OpRequest(op=Op.INSERT, serial=SERIAL, insert_secret=SECRET))))
    h.clock.advance(31)
    h.settle()
    assert result_of(bad.nextMessage()).status is Status.TIMEOUT
    answers, _ = card_ops.answer(challenge, SERIAL, "pw", MASTER, crypto.system_random, keys)
    bad.sendMessage(AuthResponse(responses=tuple(answers), muk=MUK))
    h.settle()
    assert bad.channel.closed and bad.closeCode is ErrorCode.UNEXPECTED_MESSAGE
    result, _ = result_of(h.run(card_ops.insert(good, SERIAL, "pw", MUK, SECRET, MASTER, keys=keys)))
    assert result.status is Status.OK


def test_glue_misbehaving_connection_does_not_disturb_another(tmp_path):
    """One card sends an answer with no challenge (closed with UNEXPECTED_MESSAGE); a second card on the same server completes insert and remove."""
    h = Harness(tmp_path)
    bad, _, _ = h.connect()
    good, _, _ = h.connect()
    keys = h.enrol(good)
    bad.sendMessage(AuthResponse(responses=(AuthItem(AuthMethod.PASSWORD, b"x"),), muk=MUK))
    h.settle()
    assert bad.channel.closed and bad.closeCode is ErrorCode.UNEXPECTED_MESSAGE
    result, _ = result_of(h.run(card_ops.insert(good, SERIAL, "pw", MUK, SECRET, MASTER, keys=keys)))
    assert result.status is Status.OK
    assert result_of(h.run(card_ops.remove(good, SERIAL, SECRET, 1, b"P2"))).status is Status.OK


def test_glue_busy_while_another_connection_holds_the_lease(tmp_path):
    """[0081] across connections: while card A sits in the challenge, card B's insert of the same serial is BUSY; after A is done B proceeds (and finds it IN_USE)."""
    h = Harness(tmp_path)
    a, _, _ = h.connect()
    b, _, _ = h.connect()
    keys = h.enrol(a)
    challenge = result_of(h.run(a.request(OpRequest(op=Op.INSERT, serial=SERIAL, insert_secret=SECRET))))
    with pytest.raises(card_ops.OperationRefused) as e:
        result_of(h.run(card_ops.insert(b, SERIAL, "pw", OTHER_MUK, b"T" * 32, MASTER, keys=keys)))
    assert e.value.status is Status.BUSY
    answers, _ = card_ops.answer(challenge, SERIAL, "pw", MASTER, crypto.system_random, keys)
    assert result_of(h.run(a.request(AuthResponse(responses=tuple(answers), muk=MUK)))).status is Status.OK
    with pytest.raises(card_ops.OperationRefused) as e:
        result_of(h.run(card_ops.insert(b, SERIAL, "pw", OTHER_MUK, b"T" * 32, MASTER, keys=keys)))
    assert e.value.status is Status.IN_USE
    assert [(x.op, x.result) for x in h.store.history(SERIAL)][-3:] == [
        ("insert", "busy"), ("insert", "ok"), ("insert", "in-use")]


def test_glue_connection_lost_mid_checkout_releases_after_commit(tmp_path):
    """Card A drops while its check-out is queued: the lease stays held (B is BUSY) until the check-out commits, then it is released and A's retry gets the SAME check-out."""
    h = Harness(tmp_path)
    a, _, pump_a = h.connect()
    b, _, _ = h.connect()
    keys = h.enrol(a)
    challenge = result_of(h.run(a.request(OpRequest(op=Op.INSERT, serial=SERIAL, insert_secret=SECRET))))
    answers, _ = card_ops.answer(challenge, SERIAL, "pw", MASTER, crypto.system_random, keys)
    a.sendMessage(AuthResponse(responses=tuple(answers), muk=MUK))
    h.settle(pool=False)
    assert [q[1].__name__ for q in h.pool.queue] == ["checkout"]
    a.transport.loseConnection()
    h.settle(pool=False)
    assert a.channel.closed
    # B asks while the check-out is still queued: its acquire runs after the check-out but before the release
    d = ensureDeferred(card_ops.insert(b, SERIAL, "pw", OTHER_MUK, b"T" * 32, MASTER, keys=keys))
    h.settle(pool=False)
    h.pool.run()  # checkout commits, then B's acquire (BUSY: the lease is still held), then the release
    h.settle()
    with pytest.raises(card_ops.OperationRefused) as e:
        result_of(d)
    assert e.value.status is Status.BUSY
    assert h.store.get(SERIAL).state is CardState.IN_USE
    assert h.store.acquire(SERIAL, "probe", 1.0)  # released after the commit
    h.store.release(SERIAL, "probe")
    a2, _, _ = h.connect()
    result, _ = result_of(h.run(card_ops.insert(a2, SERIAL, "pw", MUK, SECRET, MASTER, keys=keys)))
    assert (result.status, result.protected) == (Status.OK, b"PROTECTED-1")
    assert [x.result for x in h.store.history(SERIAL) if x.op == "insert"] == ["ok", "busy", "repeat"]


def test_glue_refusals_are_identical_on_the_wire(tmp_path):
    """Through the glue: wrong password, wrong Master key and an unknown serial give byte-identical REFUSED results, and the unknown serial's challenge is shaped like the real one (same methods, same encoded size)."""
    h = Harness(tmp_path)
    client, _, _ = h.connect()
    keys = h.enrol(client)
    wrong = card_ops.derive_keys("nope", KdfParams(alg=KdfAlg.SCRYPT, salt=b"x" * 16, log2_n=10))
    challenges, replies = [], []
    for serial, k, master in ((SERIAL, wrong, MASTER), (SERIAL, keys, b"m" * 32), ("ghost", keys, MASTER)):
        ch = result_of(h.run(client.request(OpRequest(op=Op.INSERT, serial=serial, insert_secret=SECRET))))
        challenges.append(ch)
        answers, _ = card_ops.answer(ch, serial, "pw", master, crypto.system_random, k)
        replies.append(encode_inner(result_of(h.run(client.request(AuthResponse(responses=tuple(answers), muk=MUK))))))
    assert replies == [encode_inner(OpResult(status=Status.REFUSED))] * 3
    assert [[i.method for i in c.challenges] for c in challenges] == [[AuthMethod.PASSWORD, AuthMethod.MASTER_KEY]] * 3
    assert len({len(encode_inner(c)) for c in challenges}) == 1
    assert KdfParams.decode(challenges[2].kdf).alg is KdfAlg.SCRYPT
    assert [(x.op, x.result, x.muk) for x in h.store.history(SERIAL)][-2:] == [("insert", "refused", MUK)] * 2
    assert [(x.op, x.result, x.muk, x.detail) for x in h.store.history("ghost")] == [
        ("insert", "refused", MUK, "no such card")]


def test_glue_violation_fails_the_cards_waiting_request(tmp_path):
    """A card that sends the server an OpResult is cut off: the channel closes with UNEXPECTED_MESSAGE and the card's waiting request fails with ChannelClosedError instead of hanging."""
    h = Harness(tmp_path)
    client, server, _ = h.connect()
    d = client.request(OpResult(status=Status.OK))
    h.settle()
    assert server.channel.closed and client.channel.closed
    with pytest.raises(ChannelClosedError) as e:
        result_of(d)
    assert e.value.code is ErrorCode.UNEXPECTED_MESSAGE


def test_glue_reply_waits_for_the_lease_release(tmp_path):
    """The card hears an operation's result only after its lease is released, so its next operation (here a sync right after the insert) never meets its own lease: no spurious BUSY."""
    h = Harness(tmp_path)
    client, _, _ = h.connect()
    keys = h.enrol(client)
    d = ensureDeferred(card_ops.insert(client, SERIAL, "pw", MUK, SECRET, MASTER, keys=keys))
    order = []
    for _ in range(50):
        h.settle(pool=False)
        if not h.pool.queue:
            break
        name = h.pool.run_one()
        h.settle(pool=False)
        order.append((name, d.called))
    assert order[-2:] == [("checkout", False), ("release", True)]
    result, _ = result_of(d)
    assert result.status is Status.OK
    # the very next operation on the channel: not BUSY
    assert result_of(h.run(card_ops.sync(client, SERIAL, SECRET, 1, b"P2"))).status is Status.OK
