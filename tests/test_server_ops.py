"""
The server side of the card operations, without a reactor or a database.

Part 1 drives the sans-IO machine (vsc.protocol.server_ops.ServerOps) with
messages, loaded records, enrolment material and store outcomes, and asserts
the exact effects it asks for: the typed store effects of
vsc.protocol.cardstore, insert (Figure 6, [0077]), remove (Figure 11,
[0095]), recover (Figure 12, [0096]), destroy ([0098]), sync, enrolment
material, the 30 s implementation-authentication deadline, the guessing
limits of vsc.protocol.lockout (throttled answers refused unevaluated; the
owner's machine in its own bucket; per source), and indistinguishable
refusals. Nothing is held before authentication: an authenticated operation
starts with a plain read (LoadCard) and its one transaction runs only after
every answer passed.

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
from vsc.protocol import auth, implauth
from vsc.protocol.cardstore import (
    STORE_CALLS,
    CardRecord,
    CheckIn,
    CheckOut,
    CountFailure,
    DestroyCard,
    EnrolCard,
    LoadCard,
    LogRefusal,
    Outcome,
    RecoverCard,
    SyncCard,
)
from vsc.protocol.channel import card_channel
from vsc.protocol.lifecycle import Operation
from vsc.protocol.lifecycle import State as CardState
from vsc.protocol.lockout import LockoutPolicy, SourceLimits
from vsc.protocol.server_ops import (
    Authenticated,
    CancelDeadline,
    IssueMaterial,
    Logged,
    OpsPolicy,
    ProtocolViolation,
    Reply,
    ServerOps,
    StartDeadline,
)
from vsc.protocol.suites import ChannelConfig
from vsc.server.service import Backend, ServerFactory
from vsc.server.store import Store
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
SOURCE = "192.0.2.7"
STRANGER = "198.51.100.9:50000"
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
VERIFIER = auth.verifier_for(AUTH_KEY, KdfAlg.SCRYPT)
THROTTLED = "too many failed authentications: throttled, not evaluated"


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


class Now:
    """The injected clock of Part 1: a number the test moves."""

    def __init__(self, t: float = NOW):
        self.t = t

    def __call__(self) -> float:
        return self.t


def record(serial: str = SERIAL, state: CardState = CardState.IDLE, **kw) -> CardRecord:
    fields = dict(
        serial=serial, state=state, muk=None, protected=b"PROTECTED", channel_info=None,
        verifier=VERIFIER, kdf=KDF, auth_info=AUTH_INFO, version=4,
        failures=0, locked_until=0.0, created=NOW - 100, updated=NOW - 50,
    )
    fields.update(kw)
    return CardRecord(**fields)


def machine(policy: OpsPolicy = OpsPolicy(), rand=None, now=NOW, limits: SourceLimits | None = None,
            peer: str = PEER) -> ServerOps:
    clock = now if callable(now) else (lambda: now)
    return ServerOps(policy=policy, master=MASTER, decoy_secret=DECOY, peer=peer, suite=SUITE,
                     now=clock, rand=rand or Rand(), limits=limits)


def request(op: Op, serial: str = SERIAL, **kw) -> OpRequest:
    return OpRequest(op=op, serial=serial, **kw)


def challenged(m: ServerOps, req: OpRequest, card: CardRecord | None, deadline: float = 30.0) -> AuthChallenge:
    """Take ``m`` from idle to the challenge of an authenticated operation; check every effect on the way."""
    assert m.message(req) == [LoadCard(req.serial)]  # a plain read: nothing is held
    effects = m.loaded(card)
    assert len(effects) == 2 and isinstance(effects[0], Reply) and effects[1] == StartDeadline(deadline)
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


def check_out(muk: bytes = MUK, own_machine: bool = False, serial: str = SERIAL, peer: str = PEER) -> CheckOut:
    """The check-out the machine asks for after the right answers to ``record()``'s challenge."""
    return CheckOut(serial=serial, muk=muk, session=crypto.sha256(SECRET), channel={"suite": SUITE, "peer": peer},
                    peer=peer, verifier=VERIFIER, totp_step=None, own_machine=own_machine)


def failure(detail: str, op: Operation = Operation.INSERT, muk: bytes | None = MUK, own: bool = False) -> CountFailure:
    return CountFailure(SERIAL, op, PEER, detail, muk, own)


def refusal_effects(m: ServerOps, resp: AuthResponse, detail: str, op: Operation = Operation.INSERT) -> None:
    """An authentication failure: one CountFailure (the failure and its history line), then REFUSED."""
    effects = m.message(resp)
    assert effects == [CancelDeadline(), failure(detail, op, resp.muk or None)]
    assert m.stored(None) == replied(OpResult(status=Status.REFUSED))


def replied(result: OpResult, serial: str = SERIAL) -> list:
    """The effects of a store outcome's answer: an OK first tells the glue the channel is authenticated."""
    return ([Authenticated(serial)] if result.status is Status.OK else []) + [Reply(result)]


def unevaluated(effects: list, serial: str = SERIAL) -> None:
    """A throttled answer: no store effect at all, a log line, and the same REFUSED as a wrong answer."""
    assert effects == [CancelDeadline(), Logged("throttled", serial, THROTTLED), Reply(OpResult(status=Status.REFUSED))]


# ================================================================ Part 1: the machine


def test_insert_authenticates_then_checks_out():
    """Figure 6: a plain load, the challenge (password + Master key, 30 s), then ONE check-out carrying the MUK, the hashed insert secret and the verifier the answer was checked against; OK with the download."""
    m = machine()
    ch = challenged(m, request(Op.INSERT, insert_secret=SECRET), record())
    assert ch.kdf == KDF
    assert [i.method for i in ch.challenges] == [AuthMethod.PASSWORD, AuthMethod.MASTER_KEY]
    assert ch.challenges[0].data == b"" and len(ch.challenges[1].data) == 32
    assert m.message(answer(ch)) == [CancelDeadline(), check_out()]
    assert m.stored(Outcome(Status.OK, version=4, protected=b"DOWNLOAD")) == replied(OpResult(status=Status.OK, version=4, protected=b"DOWNLOAD"))


def test_an_in_use_card_is_challenged_and_the_store_decides_the_repeat():
    """The machine decides nothing from the read: a card already in use is challenged like an idle one, and the check-out's outcome (a retried insert: OK with the stored download) is answered as the store gave it."""
    m = machine()
    ch = challenged(m, request(Op.INSERT, insert_secret=SECRET), record(state=CardState.IN_USE, muk=MUK))
    assert m.message(answer(ch)) == [CancelDeadline(), check_out()]
    assert m.stored(Outcome(Status.OK, version=7, protected=b"V7")) == replied(OpResult(status=Status.OK, version=7, protected=b"V7"))


@pytest.mark.parametrize("status", [Status.IN_USE, Status.DESTROYED, Status.REFUSED])
def test_insert_mediation_refusals(status):
    """Mediation 305 fails in the check-out's transaction: in use elsewhere → IN_USE, destroyed → DESTROYED, vanished → REFUSED; no download."""
    m = machine()
    ch = challenged(m, request(Op.INSERT, insert_secret=SECRET), record())
    m.message(answer(ch))
    assert m.stored(Outcome(status)) == replied(OpResult(status=status))


@pytest.mark.parametrize("secret, muk", [(b"", MUK), (SECRET, b""), (SECRET, b"short")])
def test_insert_without_muk_or_secret_is_a_bad_request(secret, muk):
    """An authenticated insert lacking the 32-byte MUK or insert secret is logged as a refusal (LogRefusal) and answered BAD_REQUEST, never checked out."""
    m = machine()
    ch = challenged(m, request(Op.INSERT, insert_secret=secret), record())
    assert m.message(answer(ch, muk=muk)) == [
        CancelDeadline(),
        LogRefusal(SERIAL, Operation.INSERT, "bad-request", PEER, "insert needs a MUK and an insert secret", muk or None),
    ]
    assert m.stored(None) == replied(OpResult(status=Status.BAD_REQUEST))


@pytest.mark.parametrize("status", [Status.OK, Status.NOT_IN_USE, Status.MUK_MISMATCH, Status.DESTROYED,
                                    Status.REFUSED])
def test_recover(status):
    """Figure 12: authenticate like insert, then ONE RecoverCard (mediation 902 with the uploaded MUK); its outcome is the answer."""
    m = machine()
    ch = challenged(m, request(Op.RECOVER), record(state=CardState.IN_USE, muk=MUK))
    assert [i.method for i in ch.challenges] == [AuthMethod.PASSWORD, AuthMethod.MASTER_KEY]
    assert m.message(answer(ch)) == [CancelDeadline(), RecoverCard(SERIAL, MUK, PEER, VERIFIER, None, False)]
    assert m.stored(Outcome(status)) == replied(OpResult(status=status))


@pytest.mark.parametrize("muk", [MUK, b""])
@pytest.mark.parametrize("status", [Status.OK, Status.DESTROYED, Status.REFUSED])
def test_destroy(muk, status):
    """[0098]: destroy authenticates like insert; the MUK is optional (passed on as given); the outcome is the answer."""
    m = machine()
    ch = challenged(m, request(Op.DESTROY), record())
    assert m.message(answer(ch, muk=muk)) == [CancelDeadline(), DestroyCard(SERIAL, muk, PEER, VERIFIER, None, False)]
    assert m.stored(Outcome(status)) == replied(OpResult(status=status))


@pytest.mark.parametrize("op, effect", [(Op.SYNC, SyncCard), (Op.REMOVE, CheckIn)])
@pytest.mark.parametrize(
    "outcome, reply",
    [(Outcome(Status.OK, version=5), OpResult(status=Status.OK, version=5)),
     (Outcome(Status.VERSION_CONFLICT, version=9), OpResult(status=Status.VERSION_CONFLICT, version=9)),
     (Outcome(Status.REFUSED), OpResult(status=Status.REFUSED, version=0))],
)
def test_sync_and_remove_present_the_insert_secret(op, effect, outcome, reply):
    """Sync and remove (Figure 11) skip authentication: ONE store effect with the hashed insert secret, the version and the upload; its outcome is the answer."""
    m = machine()
    assert m.message(request(op, insert_secret=SECRET, version=4, protected=b"NEW")) == [
        effect(serial=SERIAL, session=crypto.sha256(SECRET), version=4, protected=b"NEW", peer=PEER)]
    assert m.stored(outcome) == replied(reply)


def test_sync_without_secret_asks_the_store_with_an_empty_session():
    """A sync with no insert secret matches no insert: the store is asked with an empty session (and refuses)."""
    m = machine()
    [effect] = m.message(request(Op.SYNC, version=1, protected=b"X"))
    assert isinstance(effect, SyncCard) and effect.session == b""
    assert m.stored(Outcome(Status.REFUSED)) == replied(OpResult(status=Status.REFUSED))


def test_an_op_request_for_a_password_change_is_a_bad_request():
    """Op.PASSWORD is its own message (ChangePassword): as an OpRequest it is logged and answered BAD_REQUEST, nothing else."""
    m = machine()
    assert m.message(request(Op.PASSWORD, insert_secret=SECRET)) == [
        LogRefusal(SERIAL, Operation.PASSWORD, "bad-request", PEER,
                   "a password change is a ChangePassword message, not an OpRequest")]
    assert m.stored(None) == replied(OpResult(status=Status.BAD_REQUEST))


ENROL = EnrolRequest(serial=SERIAL, code="abcde-fghij", verifier=b"V" * 32, kdf=KDF, protected=b"P", registration=b"R")


def enrol_card(auth_extra: dict | None = None) -> EnrolCard:
    return EnrolCard(serial=SERIAL, code_hash=auth.code_hash("ABCDEFGHIJ"), verifier=b"V" * 32, kdf=KDF,
                     protected=b"P", registration=b"R", auth_extra=auth_extra or {}, peer=PEER)


@pytest.mark.parametrize("outcome, reply", [(Outcome(Status.OK, version=1), OpResult(status=Status.OK, version=1)),
                                            (Outcome(Status.REFUSED), OpResult(status=Status.REFUSED))])
def test_enrol(outcome, reply):
    """Enrol without implementation material: ONE EnrolCard with the hashed code and the upload, answered OK (version 1) or REFUSED."""
    m = machine()
    assert m.message(ENROL) == [enrol_card()]
    assert m.stored(outcome) == replied(reply)


@pytest.mark.parametrize("impl_auth, needed", [
    ((AuthMethod.MASTER_KEY, AuthMethod.KEYFILE), (AuthMethod.KEYFILE,)),
    ((AuthMethod.TOTP,), (AuthMethod.TOTP,)),
    ((AuthMethod.KEYFILE, AuthMethod.MASTER_KEY, AuthMethod.TOTP), (AuthMethod.KEYFILE, AuthMethod.TOTP)),
], ids=["keyfile", "totp", "both"])
def test_enrol_issues_material_for_keyfile_and_totp_policies(impl_auth, needed):
    """A keyfile or TOTP policy makes enrolment ask for the material first (IssueMaterial: signed off the reactor by the glue); the server's side goes into the EnrolCard, the card's reply comes back only with OK."""
    m = machine(policy=OpsPolicy(impl_auth=impl_auth))
    assert m.message(ENROL) == [IssueMaterial(SERIAL, b"R", needed, auth.code_hash("abcde-fghij"), b"V" * 32, KDF,
                                              b"P")]
    extra = {"totp": {"secret": "00", "last_step": -1}}
    assert m.material(implauth.EnrolMaterial(extra, b"SEALED")) == [enrol_card(extra)]
    assert m.stored(Outcome(Status.OK, version=1)) == replied(OpResult(status=Status.OK, version=1, registration=b"SEALED"))
    # refused: the material is never handed out
    m = machine(policy=OpsPolicy(impl_auth=impl_auth))
    m.message(ENROL)
    m.material(implauth.EnrolMaterial(extra, b"SEALED"))
    assert m.stored(Outcome(Status.REFUSED)) == replied(OpResult(status=Status.REFUSED))


def test_material_refused_is_a_bad_request():
    """Material that cannot be made for this card (no registration for a keyfile) is logged and answered BAD_REQUEST; no card is created, and the machine takes the next request."""
    m = machine(policy=OpsPolicy(impl_auth=(AuthMethod.KEYFILE,)))
    m.message(ENROL)
    reason = "keyfile authentication is required, but the card sent no registration"
    assert m.material_refused(reason) == [LogRefusal(SERIAL, Operation.ENROL, "bad-request", PEER, reason)]
    assert m.stored(None) == replied(OpResult(status=Status.BAD_REQUEST))
    assert m.message(request(Op.INSERT, insert_secret=SECRET)) == [LoadCard(SERIAL)]


@pytest.mark.parametrize(
    "req, first",
    [(request(Op.INSERT, insert_secret=SECRET), LoadCard(SERIAL)),
     (request(Op.RECOVER), LoadCard(SERIAL)),
     (request(Op.DESTROY), LoadCard(SERIAL)),
     (request(Op.SYNC, insert_secret=SECRET), SyncCard(SERIAL, crypto.sha256(SECRET), 0, b"", PEER)),
     (request(Op.REMOVE, insert_secret=SECRET), CheckIn(SERIAL, crypto.sha256(SECRET), 0, b"", PEER)),
     (ENROL, enrol_card())],
    ids=["insert", "recover", "destroy", "sync", "remove", "enrol"],
)
def test_nothing_is_held_before_authentication(req, first):
    """
    [0081] without leases (issue 11, attack 2): every request's first effect
    is a plain read (authenticated operations) or its one transaction
    (sync, remove, enrol) — nothing is taken that another connection could
    wait for; a second machine on the same serial, while the first is still
    challenged, starts exactly the same way (it is never told BUSY).
    """
    a = machine()
    assert a.message(req) == [first]
    if isinstance(first, LoadCard):
        a.loaded(record())
    b = machine(peer=STRANGER)
    other = b.message(req)
    assert [type(e) for e in other] == [type(first)] and other[0].serial == SERIAL


def test_a_password_changed_during_authentication_is_busy():
    """The CHANGED row of Figure 4: the check-out carries the verifier the answer was checked against; when the store finds the password replaced meanwhile it answers BUSY (the answer proves the old password), and the machine passes it on and takes the next request."""
    m = machine()
    ch = challenged(m, request(Op.INSERT, insert_secret=SECRET), record())
    [_, effect] = m.message(answer(ch))
    assert isinstance(effect, CheckOut) and effect.verifier == VERIFIER
    assert m.stored(Outcome(Status.BUSY)) == replied(OpResult(status=Status.BUSY))
    assert m.message(request(Op.INSERT, insert_secret=SECRET)) == [LoadCard(SERIAL)]


def test_a_refusal_whose_history_line_fails_is_still_that_refusal():
    """If storing a failed authentication's count and history line fails, the card is still told REFUSED (nothing was changed), not INTERNAL."""
    m = machine()
    ch = challenged(m, request(Op.INSERT, insert_secret=SECRET), record())
    assert m.message(answer(ch, key=WRONG_KEY)) == [CancelDeadline(), failure("failed: password")]
    assert m.store_failed("database down") == replied(OpResult(status=Status.REFUSED))


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


def test_unknown_serial_wrong_password_wrong_master_and_throttle_look_the_same():
    """Wrong password, wrong Master key, unknown serial (each counted by a CountFailure) and a throttled card (right answers, not evaluated, nothing stored) all give the same REFUSED on the wire."""
    replies = []
    cases = [
        ("wrong password", record(), dict(key=WRONG_KEY), "failed: password"),
        ("wrong master", record(), dict(master=crypto.sha256(b"other")), "failed: master-key"),
        ("both wrong", record(), dict(key=WRONG_KEY, master=b"x" * 32), "failed: password, master-key"),
        ("unknown serial", None, dict(), "no such card"),
    ]
    for name, card, kw, detail in cases:
        m = machine()
        ch = challenged(m, request(Op.INSERT, insert_secret=SECRET), card)
        assert m.message(answer(ch, **kw)) == [CancelDeadline(), failure(detail)], name
        [done] = m.stored(None)
        replies.append(encode_inner(done.message))
    m = machine()
    ch = challenged(m, request(Op.INSERT, insert_secret=SECRET), record(failures=20, locked_until=NOW + 30))
    effects = m.message(answer(ch))
    unevaluated(effects)
    replies.append(encode_inner(effects[-1].message))
    assert len(set(replies)) == 1 and replies[0] == encode_inner(OpResult(status=Status.REFUSED))


def test_a_throttle_that_has_passed_lets_the_owner_in():
    """A card whose throttle window has passed evaluates the right answers again and checks out."""
    m = machine()
    ch = challenged(m, request(Op.INSERT, insert_secret=SECRET), record(failures=20, locked_until=NOW - 1))
    assert m.message(answer(ch)) == [CancelDeadline(), check_out()]


@pytest.mark.parametrize("key", [AUTH_KEY, WRONG_KEY], ids=["right", "wrong"])
@pytest.mark.parametrize("op", [Op.INSERT, Op.RECOVER, Op.DESTROY])
def test_throttled_answers_are_refused_unevaluated_with_no_store_effect(op, key):
    """
    Inside the card's throttle window an answer — right or wrong — is
    refused without being evaluated: no CountFailure, no check-out, no
    history line (only a Logged effect, so hammering neither extends the
    window nor floods the history), the same REFUSED at once, and the
    machine takes the next request.
    """
    m = machine()
    card = record(state=CardState.IN_USE, muk=MUK) if op is Op.RECOVER else record()
    card = attrs.evolve(card, failures=20, locked_until=NOW + 30)
    secret = SECRET if op is Op.INSERT else b""
    ch = challenged(m, request(op, insert_secret=secret), card)
    unevaluated(m.message(answer(ch, key=key)))
    assert m.message(request(Op.INSERT, insert_secret=SECRET)) == [LoadCard(SERIAL)]


def test_the_owners_machine_has_its_own_bucket():
    """
    An answer carrying the MUK of the card's last insert (last_muk) counts in
    the owner's machine bucket: strangers' throttling of the card does not
    stop it, and it is checked out with own_machine (so the owner's bucket is
    the one reset); another MUK on the same card is throttled. The other way
    round, a throttled owner's bucket stops only answers carrying last_muk.
    """
    strangers_throttled = record(failures=20, locked_until=NOW + 600, last_muk=MUK)
    m = machine()
    ch = challenged(m, request(Op.INSERT, insert_secret=SECRET), strangers_throttled)
    assert m.message(answer(ch, muk=MUK)) == [CancelDeadline(), check_out(own_machine=True)]
    m = machine()
    ch = challenged(m, request(Op.INSERT, insert_secret=SECRET), strangers_throttled)
    unevaluated(m.message(answer(ch, muk=OTHER_MUK)))

    owner_throttled = record(machine_failures=5, machine_locked_until=NOW + 600, last_muk=MUK)
    m = machine()
    ch = challenged(m, request(Op.INSERT, insert_secret=SECRET), owner_throttled)
    unevaluated(m.message(answer(ch, muk=MUK)))
    m = machine()
    ch = challenged(m, request(Op.INSERT, insert_secret=SECRET), owner_throttled)
    assert m.message(answer(ch, muk=OTHER_MUK)) == [CancelDeadline(), check_out(muk=OTHER_MUK)]


def test_a_wrong_answer_from_the_owners_machine_counts_in_its_bucket_only():
    """A wrong answer carrying last_muk is a CountFailure with own_machine=True, and the per-source limits in memory are not touched (a stranger's source bucket and the owner's are separate)."""
    limits = SourceLimits(LockoutPolicy(), Now())
    m = machine(limits=limits)
    ch = challenged(m, request(Op.INSERT, insert_secret=SECRET), record(last_muk=MUK))
    assert m.message(answer(ch, key=WRONG_KEY, muk=MUK)) == [CancelDeadline(), failure("failed: password", own=True)]
    assert len(limits) == 0
    m = machine(limits=limits)
    ch = challenged(m, request(Op.INSERT, insert_secret=SECRET), record(last_muk=MUK))
    assert m.message(answer(ch, key=WRONG_KEY, muk=OTHER_MUK)) == [CancelDeadline(), failure("failed: password",
                                                                                             muk=OTHER_MUK)]
    assert len(limits) == 2  # (source, serial) and (source, all cards)


def fail_once(limits: SourceLimits, now: Now, serial: str = SERIAL, peer: str = PEER) -> None:
    """One wrong answer from ``peer`` on ``serial``: evaluated and counted."""
    m = machine(limits=limits, now=now, peer=peer)
    ch = challenged(m, request(Op.INSERT, serial, insert_secret=SECRET), record(serial, last_muk=MUK))
    [_, counted] = m.message(answer(ch, serial, key=WRONG_KEY, muk=OTHER_MUK))
    assert isinstance(counted, CountFailure) and counted.own_machine is False


def attempt(limits: SourceLimits, now: Now, serial: str = SERIAL, peer: str = PEER, muk: bytes = OTHER_MUK) -> list:
    """The right answers from ``peer`` on ``serial``; returns the effects of the answer."""
    m = machine(limits=limits, now=now, peer=peer)
    ch = challenged(m, request(Op.INSERT, serial, insert_secret=SECRET), record(serial, last_muk=MUK))
    return m.message(answer(ch, serial, muk=muk))


def test_source_limits_per_source_and_serial():
    """
    Per (source, serial) in memory: after ``threshold`` failures from one
    source address on one serial, that source's next answer on that serial —
    even the right one — is refused unevaluated until the delay has passed;
    the same source on another serial, another source on the same serial, and
    the owner's machine (last_muk) from that very source are evaluated.
    """
    now = Now()
    limits = SourceLimits(LockoutPolicy(threshold=2, base=30.0, shared_threshold=20, source_threshold=50), now)
    fail_once(limits, now)
    assert isinstance(attempt(limits, now)[-1], CheckOut)  # one failure: still evaluated (and resets the pair)
    fail_once(limits, now)
    fail_once(limits, now)
    unevaluated(attempt(limits, now))
    assert isinstance(attempt(limits, now, serial="card-2")[-1], CheckOut)
    assert isinstance(attempt(limits, now, peer=STRANGER)[-1], CheckOut)
    now.t += 29
    unevaluated(attempt(limits, now))
    now.t += 1
    assert isinstance(attempt(limits, now)[-1], CheckOut)
    fail_once(limits, now)
    fail_once(limits, now)
    unevaluated(attempt(limits, now))
    assert attempt(limits, now, muk=MUK)[-1] == check_out(own_machine=True)


def test_source_limits_over_all_cards():
    """Per source over all cards: one source failing on ``source_threshold`` different serials is refused unevaluated on the next serial too; another source is not."""
    now = Now()
    limits = SourceLimits(LockoutPolicy(threshold=5, base=30.0, source_threshold=3), now)
    for i in range(3):
        fail_once(limits, now, serial=f"card-{i + 10}")
    unevaluated(attempt(limits, now, serial="card-99"), serial="card-99")
    assert isinstance(attempt(limits, now, serial="card-99", peer=STRANGER)[-1], CheckOut)


def test_deadline_gives_timeout_counts_a_failure_and_never_checks_out():
    """Implementation authentication must be answered within 30 s: the deadline counts a failure like a wrong answer (CountFailure, result "timeout", no MUK, other machines' bucket) and answers TIMEOUT; no check-out."""
    m = machine()
    challenged(m, request(Op.INSERT, insert_secret=SECRET), record())
    assert m.deadline() == [CountFailure(SERIAL, Operation.INSERT, PEER, "no answer within 30 s", None, False,
                                         result="timeout")]
    assert m.stored(None) == replied(OpResult(status=Status.TIMEOUT))


def test_unanswered_challenges_count_toward_the_source_limit():
    """Holding challenges open costs guesses: after ``threshold`` unanswered challenges from one source on a serial, that source's next (right) answer is refused unevaluated."""
    now = Now()
    limits = SourceLimits(LockoutPolicy(threshold=2, base=30.0), now)
    for _ in range(2):
        m = machine(limits=limits, now=now)
        challenged(m, request(Op.INSERT, insert_secret=SECRET), record())
        [counted] = m.deadline()
        assert (counted.result, counted.own_machine) == ("timeout", False)
        assert m.stored(None) == replied(OpResult(status=Status.TIMEOUT))
    unevaluated(attempt(limits, now))
    assert isinstance(attempt(limits, now, peer=STRANGER)[-1], CheckOut)


@pytest.mark.parametrize("op", [Op.RECOVER, Op.DESTROY])
def test_recover_and_destroy_refuse_bad_authentication(op):
    """Recover and destroy with a wrong password are REFUSED after a CountFailure, never reaching mediation."""
    m = machine()
    ch = challenged(m, request(op), record(state=CardState.IN_USE, muk=MUK))
    refusal_effects(m, answer(ch, key=WRONG_KEY), "failed: password", op=Operation(op.name.lower()))


@pytest.mark.parametrize(
    "mangle, detail",
    [(lambda r: AuthResponse(responses=r.responses[:1], muk=r.muk), "wrong number of answers"),
     (lambda r: AuthResponse(responses=tuple(reversed(r.responses)), muk=r.muk), "answers out of order"),
     (lambda r: AuthResponse(responses=(r.responses[0], AuthItem(AuthMethod.MASTER_KEY, b"junk")), muk=r.muk),
      "failed: master-key")],
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


def test_answer_after_the_deadline_is_a_violation_and_nothing_is_sent():
    """An answer arriving after the deadline (while the timeout is being counted) closes the channel; when the count returns nothing is sent, and the closed machine ignores everything."""
    m = machine()
    ch = challenged(m, request(Op.INSERT, insert_secret=SECRET), record())
    m.deadline()
    effects = m.message(answer(ch))
    assert [type(e) for e in effects] == [CancelDeadline, ProtocolViolation]
    assert m.stored(None) == []
    assert m.message(answer(ch)) == []  # closed: ignored


def test_configurable_deadline():
    """The deadline comes from the policy (auth_deadline)."""
    m = machine(policy=OpsPolicy(auth_deadline=5.0))
    challenged(m, request(Op.RECOVER), record(), deadline=5.0)


@pytest.mark.parametrize(
    "msg",
    [AuthResponse(responses=(AuthItem(AuthMethod.PASSWORD, b"k"),)), OpResult(status=Status.OK), EchoRequest(b"hi")],
    ids=["answer-without-challenge", "op-result", "echo"],
)
def test_unexpected_message_when_idle(msg):
    """A message that is not a request while idle is a protocol violation (close the channel); nothing is stored."""
    m = machine()
    effects = m.message(msg)
    assert [type(e) for e in effects] == [CancelDeadline, ProtocolViolation]
    assert m.message(request(Op.INSERT, insert_secret=SECRET)) == []  # closed for good


def test_request_while_challenged_is_a_violation():
    """A second request while waiting for the answers closes the channel (deadline cancelled); nothing is counted or sent afterwards."""
    m = machine()
    challenged(m, request(Op.INSERT, insert_secret=SECRET), record())
    effects = m.message(request(Op.DESTROY))
    assert [type(e) for e in effects] == [CancelDeadline, ProtocolViolation]
    assert m.deadline() == [] and m.stored(None) == []


def test_request_while_loading_is_a_violation_and_the_late_record_is_dropped():
    """A message while the record is being read closes the channel; when the read returns late no challenge is sent and no deadline started."""
    m = machine()
    m.message(request(Op.INSERT, insert_secret=SECRET))
    effects = m.message(request(Op.INSERT, insert_secret=SECRET))
    assert [type(e) for e in effects] == [CancelDeadline, ProtocolViolation]
    assert m.loaded(record()) == []


def test_request_while_a_store_call_runs_is_a_violation_and_no_reply_follows():
    """A message while a store call is in flight closes the channel; the call completes on its own and its result is not sent."""
    m = machine()
    ch = challenged(m, request(Op.INSERT, insert_secret=SECRET), record())
    m.message(answer(ch))  # check-out in flight
    effects = m.message(request(Op.REMOVE, insert_secret=SECRET))
    assert [type(e) for e in effects] == [CancelDeadline, ProtocolViolation]
    assert m.stored(Outcome(Status.OK, version=4, protected=b"P")) == []


def test_connection_lost_mid_operation_sends_nothing_when_the_store_call_returns():
    """Connection lost while the check-out commits: the deadline is cancelled; the store call's result, whenever it comes, has no one to go to."""
    m = machine()
    ch = challenged(m, request(Op.INSERT, insert_secret=SECRET), record())
    assert m.message(answer(ch)) == [CancelDeadline(), check_out()]
    assert m.connection_lost() == [CancelDeadline()]
    assert m.stored(Outcome(Status.OK, version=4, protected=b"P")) == []


@pytest.mark.parametrize("result", ["stored", "failed"])
def test_connection_lost_during_sync(result):
    """Same for a sync in flight, whether the store call returns or raises."""
    m = machine()
    m.message(request(Op.SYNC, insert_secret=SECRET, version=1, protected=b"x"))
    assert m.connection_lost() == [CancelDeadline()]
    late = m.stored(Outcome(Status.OK, version=2)) if result == "stored" else m.store_failed("boom")
    assert late == []


def test_connection_lost_while_loading_or_challenged():
    """Lost while the record is read: the late record starts nothing; lost while challenged: the deadline is cancelled and nothing is counted (nothing was held and nothing guessed)."""
    m = machine()
    m.message(request(Op.INSERT, insert_secret=SECRET))
    assert m.connection_lost() == [CancelDeadline()]
    assert m.loaded(record()) == []
    m = machine()
    challenged(m, request(Op.INSERT, insert_secret=SECRET), record())
    assert m.connection_lost() == [CancelDeadline()]
    assert m.deadline() == []


def test_connection_lost_when_idle():
    """Lost between operations: only the (idle) deadline timer is cancelled."""
    m = machine()
    assert m.connection_lost() == [CancelDeadline()]


def test_store_failure_is_internal():
    """A check-out that raises answers INTERNAL (its transaction changed nothing) and the channel takes the next request."""
    m = machine()
    ch = challenged(m, request(Op.INSERT, insert_secret=SECRET), record())
    m.message(answer(ch))
    assert m.store_failed("disk full") == replied(OpResult(status=Status.INTERNAL))
    assert m.message(request(Op.INSERT, insert_secret=SECRET)) == [LoadCard(SERIAL)]


def test_load_failure_is_internal():
    """When reading the record fails (database down) the card gets INTERNAL, no challenge, and the channel stays open."""
    m = machine()
    m.message(request(Op.INSERT, insert_secret=SECRET))
    assert m.store_failed("connection refused") == replied(OpResult(status=Status.INTERNAL))
    assert m.message(request(Op.SYNC, insert_secret=SECRET)) == [SyncCard(SERIAL, crypto.sha256(SECRET), 0, b"", PEER)]


def test_operations_follow_each_other_on_one_channel():
    """One channel carries several operations in turn: insert, sync, remove, each one typed store effect and one reply."""
    m = machine()
    ch = challenged(m, request(Op.INSERT, insert_secret=SECRET), record())
    m.message(answer(ch))
    assert m.stored(Outcome(Status.OK, version=1, protected=b"P")) == replied(OpResult(status=Status.OK, version=1, protected=b"P"))
    for op, effect in ((Op.SYNC, SyncCard), (Op.REMOVE, CheckIn)):
        assert m.message(request(op, insert_secret=SECRET, version=1, protected=b"P")) == [
            effect(SERIAL, crypto.sha256(SECRET), 1, b"P", PEER)]
        assert m.stored(Outcome(Status.OK, version=2)) == replied(OpResult(status=Status.OK, version=2))


# ================================================================ Part 2: the Twisted glue


@functools.lru_cache(maxsize=None)
def server_key() -> crypto.RSAPrivateKey:
    return crypto.RSAPrivateKey.generate(2048)


class InlineReactor:
    """The only reactor method deferToThreadPool uses: callFromThread, run at once."""

    def callFromThread(self, f, *args, **kwargs):
        f(*args, **kwargs)


def call_name(f, args: tuple) -> str:
    """A queued call's name: the typed store effect it carries out (Backend.run), or the function (Backend.work)."""
    if len(args) == 2 and type(args[1]) in STORE_CALLS:
        return type(args[1]).__name__
    return f.__name__


class ManualPool:
    """A thread pool stand-in: work queues up until the test runs it (``run``), in order, on this thread."""

    def __init__(self):
        self.queue: list = []
        self.calls: list[str] = []

    def callInThreadWithCallback(self, on_result, f, *args, **kwargs):
        self.queue.append((on_result, f, args, kwargs))

    def queued(self) -> list[str]:
        return [call_name(f, args) for _, f, args, _ in self.queue]

    def run_one(self) -> str:
        """Run the oldest queued call; returns its name."""
        on_result, f, args, kwargs = self.queue.pop(0)
        name = call_name(f, args)
        self.calls.append(name)
        try:
            result = f(*args, **kwargs)
        except Exception:
            on_result(False, Failure())
        else:
            on_result(True, result)
        return name

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
        self.store = Store(f"sqlite:///{tmp_path / 'vsc.sqlite3'}", self.clock.seconds, policy.lockout)
        self.store.migrate()
        self.pool = ManualPool()
        self.backend = Backend(InlineReactor(), self.store, self.pool)
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

    def challenge(self, client, op: Op = Op.INSERT, secret: bytes = SECRET) -> AuthChallenge:
        """Start an authenticated operation on ``client`` and return the challenge it got (left unanswered)."""
        ch = result_of(self.run(client.request(OpRequest(op=op, serial=SERIAL, insert_secret=secret))))
        assert isinstance(ch, AuthChallenge)
        return ch


def result_of(d: Deferred):
    """The result of a Deferred that must already have fired (failures are raised)."""
    out: list = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


def cli_enrolment(h: Harness, tmp_path, serial: str = "alice", password: str = "correct horse"):
    """
    ``vsc card enroll`` arguments for a code just issued on ``h``'s store:
    the code, password, PIN and PUK in files under ``tmp_path``, HOME
    ``tmp_path/home``, scrypt 2^10. The caller points vsc.card.connect.connect
    and vsc.cli.enrol.run_async at ``h``.
    """
    from vsc.cli import parse
    from vsc.server.policy import Policy, code_hash, new_enrolment_code

    code = new_enrolment_code()
    h.store.issue(serial, code_hash(code), Policy().initial_auth_info(), 3600)
    for name, text in (("code", code), ("password", password), ("pin", "123456"), ("puk", "12345678")):
        (tmp_path / name).write_text(text + "\n")
    return parse(["card", "--home", str(tmp_path / "home"), "enroll", "--server", "tcp:127.0.0.1:7390",
                  "--server-key", h.fingerprint, "--serial", serial, "--code-file", str(tmp_path / "code"),
                  "--password-file", str(tmp_path / "password"), "--pin-file", str(tmp_path / "pin"),
                  "--puk-file", str(tmp_path / "puk"), "--scrypt-log2n", "10"])


def route_cli_enrolment(h: Harness, monkeypatch) -> None:
    """Point ``vsc card enroll``'s connect and run_async at ``h`` (each connect a new in-memory channel)."""
    from vsc.cli import enrol as enrol_cli

    async def connect(reactor, endpoint, fingerprint, config, *rest, **kw):
        client, server, _ = h.connect()
        return client

    monkeypatch.setattr("vsc.card.connect.connect", connect)
    monkeypatch.setattr(enrol_cli, "run_async", lambda run: result_of(h.run(run(h.clock))))


def answers_to(challenge: AuthChallenge, keys, muk: bytes) -> AuthResponse:
    items, _ = card_ops.answer(challenge, SERIAL, "pw", MASTER, crypto.system_random, keys)
    return AuthResponse(responses=tuple(items), muk=muk)


def test_glue_life_cycle_over_a_real_store(tmp_path):
    """Through the real channel and a real SQLite store: enrol, insert, sync, remove, recover-refused, destroy; each operation is exactly its typed store effects, each run on the (stand-in) pool, never inline."""
    h = Harness(tmp_path)
    client, server, _ = h.connect()
    keys = h.enrol(client)
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
    assert h.pool.calls == ["EnrolCard", "LoadCard", "CheckOut", "SyncCard", "CheckIn", "LoadCard", "RecoverCard",
                            "LoadCard", "DestroyCard"]


def test_glue_enrolment_material_is_made_on_the_pool(tmp_path):
    """A TOTP policy: the enrolment material is made by Backend.work on the pool (not on the reactor), then the card is stored with it and its methods."""
    h = Harness(tmp_path, OpsPolicy(impl_auth=(AuthMethod.MASTER_KEY, AuthMethod.TOTP)))
    client, _, _ = h.connect()
    h.enrol(client)
    assert h.pool.calls == ["_enrol_material", "EnrolCard"]
    card = h.store.get(SERIAL)
    assert "totp" in implauth.stored_material(card.auth_info)


def test_glue_auth_deadline_with_clock(tmp_path):
    """Nobody answers the challenge: after Clock.advance(31) the card gets TIMEOUT, the record is unchanged except that the unanswered challenge is counted as a failure, the timeout is in the history; the channel then inserts (and the success resets the count)."""
    h = Harness(tmp_path)
    client, server, _ = h.connect()
    keys = h.enrol(client)
    before = h.store.get(SERIAL)
    h.challenge(client)
    h.clock.advance(29)
    h.settle()
    pending = client.nextMessage()
    h.settle()
    assert not pending.called  # still waiting at 29 s
    h.clock.advance(2)
    h.settle()
    assert result_of(pending) == OpResult(status=Status.TIMEOUT)
    after = h.store.get(SERIAL)
    assert (after.state, after.version, after.muk, after.failures) == (before.state, before.version, None, 1)
    last = h.store.history(SERIAL)[-1]
    assert (last.op, last.result, last.peer, last.at, last.detail) == (
        "insert", "timeout", server.peer, NOW + 31, "no answer within 30 s")
    result, _ = result_of(h.run(card_ops.insert(client, SERIAL, "pw", MUK, SECRET, MASTER, keys=keys)))
    assert result.status is Status.OK and h.store.get(SERIAL).failures == 0


def test_glue_late_answer_after_timeout_closes_only_that_channel(tmp_path):
    """An answer after the TIMEOUT is a protocol violation: that channel is closed (UNEXPECTED_MESSAGE) while another card's channel keeps working."""
    h = Harness(tmp_path)
    bad, _, _ = h.connect()
    good, _, _ = h.connect()
    keys = h.enrol(good)
    challenge = h.challenge(bad)
    h.clock.advance(31)
    h.settle()
    assert result_of(bad.nextMessage()).status is Status.TIMEOUT
    bad.sendMessage(answers_to(challenge, keys, MUK))
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


def test_glue_an_unanswered_challenge_holds_nothing(tmp_path):
    """
    Issue 11, attack 2: connections that ask to insert a victim serial and
    never answer hold nothing. While three such challenges are open, the
    owner's insert of the same serial succeeds and its sync is stored; when
    the attackers' deadlines pass they get TIMEOUT, each counted as a
    failure, and the owner's check-out is untouched.
    """
    h = Harness(tmp_path)
    owner, _, _ = h.connect()
    attackers = [h.connect()[0] for _ in range(3)]
    keys = h.enrol(owner)
    for a in attackers:
        h.challenge(a, secret=b"T" * 32)
    waiting = [a.nextMessage() for a in attackers]
    h.settle()
    result, _ = result_of(h.run(card_ops.insert(owner, SERIAL, "pw", MUK, SECRET, MASTER, keys=keys)))
    assert result.status is Status.OK
    assert result_of(h.run(card_ops.sync(owner, SERIAL, SECRET, 1, b"PROTECTED-2"))).version == 2
    assert not any(w.called for w in waiting)  # the attackers' challenges were still open all along
    h.clock.advance(31)
    h.settle()
    assert [result_of(w).status for w in waiting] == [Status.TIMEOUT] * 3
    card = h.store.get(SERIAL)
    assert (card.state, card.muk, card.version, card.failures) == (CardState.IN_USE, MUK, 2, 3)
    assert [(x.op, x.result) for x in h.store.history(SERIAL)][-5:] == [
        ("insert", "ok"), ("sync", "ok"), ("insert", "timeout"), ("insert", "timeout"), ("insert", "timeout")]


def test_glue_two_connections_racing_an_insert_get_ok_and_in_use(tmp_path):
    """[0081] without leases: two machines answer their challenges for one idle serial at the same moment; both check-outs are queued, and the first to commit gets OK while the other gets IN_USE from the same transaction's decision — never BUSY."""
    h = Harness(tmp_path)
    a, _, _ = h.connect()
    b, _, _ = h.connect()
    keys = h.enrol(a)
    ch_a, ch_b = h.challenge(a), h.challenge(b, secret=b"T" * 32)
    da = a.request(answers_to(ch_a, keys, MUK))
    db = b.request(answers_to(ch_b, keys, OTHER_MUK))
    h.settle(pool=False)
    assert h.pool.queued() == ["CheckOut", "CheckOut"]
    h.settle()
    assert (result_of(da).status, result_of(db).status) == (Status.OK, Status.IN_USE)
    assert h.store.get(SERIAL).muk == MUK
    assert [(x.op, x.result) for x in h.store.history(SERIAL) if x.op == "insert"] == [
        ("insert", "ok"), ("insert", "in-use")]


def test_glue_connection_lost_mid_checkout_commits_and_the_retry_gets_it(tmp_path):
    """Card A drops while its check-out is queued: the check-out still commits (one transaction), card B's insert meanwhile is IN_USE (not BUSY), and A's retry on a new connection gets the SAME check-out."""
    h = Harness(tmp_path)
    a, _, _ = h.connect()
    b, _, _ = h.connect()
    keys = h.enrol(a)
    challenge = h.challenge(a)
    a.sendMessage(answers_to(challenge, keys, MUK))
    h.settle(pool=False)
    assert h.pool.queued() == ["CheckOut"]
    a.transport.loseConnection()
    h.settle(pool=False)
    assert a.channel.closed
    d = ensureDeferred(card_ops.insert(b, SERIAL, "pw", OTHER_MUK, b"T" * 32, MASTER, keys=keys))
    h.settle()
    with pytest.raises(card_ops.OperationRefused) as e:
        result_of(d)
    assert e.value.status is Status.IN_USE
    assert h.store.get(SERIAL).state is CardState.IN_USE
    a2, _, _ = h.connect()
    result, _ = result_of(h.run(card_ops.insert(a2, SERIAL, "pw", MUK, SECRET, MASTER, keys=keys)))
    assert (result.status, result.protected) == (Status.OK, b"PROTECTED-1")
    assert [x.result for x in h.store.history(SERIAL) if x.op == "insert"] == ["ok", "in-use", "repeat"]


def test_glue_a_password_changed_during_authentication_is_busy(tmp_path):
    """The CHANGED row, end to end: A's recover is challenged with the card's verifier; the in-use card (B) then changes its password; A's answer with the old password is BUSY — the store saw the verifier replaced — and nothing changes."""
    h = Harness(tmp_path)
    a, _, _ = h.connect()
    b, _, _ = h.connect()
    keys = h.enrol(a)
    assert result_of(h.run(card_ops.insert(b, SERIAL, "pw", OTHER_MUK, SECRET, MASTER, keys=keys)))[0].status is Status.OK
    challenge = h.challenge(a, op=Op.RECOVER, secret=b"")
    kdf = card_ops.new_kdf(crypto.system_random, log2_n=10)
    new = card_ops.derive_keys("new pw", kdf)
    changed = h.run(card_ops.change_password(b, SERIAL, SECRET, 1, auth.verifier_for(new.auth_key, kdf.alg), kdf,
                                             b"PROTECTED-2"))
    assert result_of(changed).version == 2
    assert result_of(h.run(a.request(answers_to(challenge, keys, OTHER_MUK)))) == OpResult(status=Status.BUSY)
    card = h.store.get(SERIAL)
    assert (card.state, card.muk, card.version) == (CardState.IN_USE, OTHER_MUK, 2)
    last = h.store.history(SERIAL)[-1]
    assert (last.op, last.result, last.detail) == ("recover", "busy", "the password changed during authentication")


def test_glue_throttled_answer_leaves_no_history(tmp_path):
    """Through the glue, one source with lockout threshold 2: two wrong answers are counted; the third answer (the right one) is refused unevaluated — same REFUSED bytes, no store call for it, no history row — and after the delay the right answer checks out."""
    h = Harness(tmp_path, OpsPolicy(lockout=LockoutPolicy(threshold=2, base=30.0)))
    client, _, _ = h.connect()
    keys = h.enrol(client)
    wrong = card_ops.derive_keys("nope", KdfParams(alg=KdfAlg.SCRYPT, salt=b"x" * 16, log2_n=10))
    replies = []
    for k in (wrong, wrong, keys):
        ch = h.challenge(client)
        replies.append(encode_inner(result_of(h.run(client.request(answers_to(ch, k, MUK))))))
    assert replies == [encode_inner(OpResult(status=Status.REFUSED))] * 3
    assert h.pool.calls[1:] == ["LoadCard", "CountFailure", "LoadCard", "CountFailure", "LoadCard"]
    assert [(x.op, x.result) for x in h.store.history(SERIAL)][-2:] == [("insert", "refused")] * 2
    h.clock.advance(30)
    result, _ = result_of(h.run(card_ops.insert(client, SERIAL, "pw", MUK, SECRET, MASTER, keys=keys)))
    assert result.status is Status.OK


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


def test_glue_reply_follows_the_commit_and_the_next_operation_goes_through(tmp_path):
    """The card hears the insert's result only once its check-out has committed (the last store call), and its very next operation on the channel (a sync) is stored at once."""
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
    assert order == [("LoadCard", False), ("CheckOut", True)]
    result, _ = result_of(d)
    assert result.status is Status.OK
    assert result_of(h.run(card_ops.sync(client, SERIAL, SECRET, 1, b"P2"))).status is Status.OK


def test_source_of_counts_ipv4_addresses_and_ipv6_slash_64s_and_caches_the_answer():
    """The address limits count: IPv4 as is, IPv6 by its /64, anything else as given; the same answer every time."""
    from vsc.protocol.lockout import source_of

    for _ in range(2):  # the second round comes from the cache
        assert source_of("192.0.2.7") == "192.0.2.7"
        assert source_of("2001:db8:1:2:3:4:5:6") == "2001:db8:1:2::/64"
        assert source_of("2001:db8:1:2::ffff") == "2001:db8:1:2::/64"
        assert source_of("not an address") == "not an address"
    assert source_of.cache_info().hits >= 4
