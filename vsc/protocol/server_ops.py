"""
The server's side of the card operations, one machine per channel
(sans-IO, Automat). Messages, loaded records and store outcomes go in as
inputs; effects come out: replies, typed store calls
(vsc.protocol.cardstore), the enrolment material to sign, deadline timers.
The glue (vsc.server.service) carries them out and feeds results back.

    idle --insert/recover/destroy--> loading --loaded--> challenged --answer--> committing --stored--> idle
      |                                                       |deadline             ^
      +--sync/remove/password change-------------------------)---------------------+
      +--enrol--> issuing --material--------------------------------------------->-+

Nothing is held while a peer has not authenticated: the challenge is sent
from a plain read, and the operation's one transaction (check-out, recover,
destroy) runs only after every answer passed. The store decides that
transaction's outcome with Figure 4's table (vsc.protocol.lifecycle) on the
row it locks, so two machines racing for one serial get one winner and the
other the state it lost to (IN_USE, ...), never BUSY.

Mediation follows the patent: insert (Figure 6, 8) authenticates every
configured method (all must pass, [0084]) before the check-out; remove
(Figure 11), sync and a password change present the per-insert secret;
recover (Figure 12) and destroy authenticate like insert. Refusals to an
unauthenticated peer are all Status.REFUSED.

Guessing limits (vsc.protocol.lockout): an answer carrying the MUK of the
card's last insert counts in the owner's own bucket; others count per card
and, in memory, per source. A throttled answer is refused without being
evaluated or counted. An unanswered challenge counts like a wrong answer.

One responsibility (and so one module despite its length): the server's operation machine.
"""

from __future__ import annotations

import json
from typing import Callable, Protocol

import attrs
from automat import NoTransition, TypeMachineBuilder

from vsc import crypto
from vsc.protocol import auth, implauth, serials
from vsc.protocol.cardstore import (
    AttachCard,
    ChangeCardPassword,
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
from vsc.protocol.lifecycle import Condition, Operation, decide
from vsc.protocol.machines import indexed
from vsc.protocol.lockout import LockoutPolicy, SourceLimits
from vsc.protocol.methods import METHODS, Issued, ServerSide
from vsc.wire import WireError
from vsc.wire.implauth import Registration
from vsc.wire.ops import (
    AuthChallenge,
    AuthItem,
    AuthMethod,
    AuthResponse,
    ChangePassword,
    EnrolRequest,
    KdfAlg,
    KdfParams,
    Op,
    OpRequest,
    OpResult,
    Status,
)

AUTH_OPS = (Op.INSERT, Op.RECOVER, Op.DESTROY)
SESSION_OPS = (Op.SYNC, Op.REMOVE, Op.ATTACH)
OPERATION = {Op.INSERT: Operation.INSERT, Op.REMOVE: Operation.REMOVE, Op.RECOVER: Operation.RECOVER,
             Op.DESTROY: Operation.DESTROY, Op.SYNC: Operation.SYNC, Op.PASSWORD: Operation.PASSWORD,
             Op.ATTACH: Operation.ATTACH}


# ---------------------------------------------------------------- effects (besides vsc.protocol.cardstore's)


@attrs.frozen
class Reply:
    message: object


@attrs.frozen
class IssueMaterial:
    """
    Make (and sign: a private-key operation, off the reactor) what the policy's methods need at enrolment,
    once a plain read shows the request may enrol (``Store.may_enrol``: the code is valid, or the stored card
    is this very enrolment, retried: the same verifier, KDF parameters, upload and registration); for any
    other request nothing is made (the EnrolCard is then refused). Not the verifier alone: a signature made
    for a request then refused would cost the server for nothing, and its time would tell a stranger that
    the password behind a guessed verifier is right.
    """

    serial: str
    registration: bytes
    methods: tuple[AuthMethod, ...]
    code_hash: bytes = b""
    verifier: bytes = attrs.field(default=b"", repr=False)
    kdf: bytes = b""
    protected: bytes = attrs.field(default=b"", repr=False)


@attrs.frozen
class StartDeadline:
    seconds: float


@attrs.frozen
class CancelDeadline:
    pass


@attrs.frozen
class ProtocolViolation:
    """The peer broke the operation protocol: close the channel."""

    reason: str


@attrs.frozen
class Authenticated:
    """An operation on this channel passed its authority: the glue may raise the channel's limits."""

    serial: str


@attrs.frozen
class Logged:
    """Something only the log hears of (an answer refused unevaluated: no history row, so no flood)."""

    event: str
    serial: str
    detail: str


# ---------------------------------------------------------------- core


@attrs.frozen
class OpsPolicy:
    """What the machine needs of the server policy."""

    impl_auth: tuple = (AuthMethod.MASTER_KEY,)
    auth_deadline: float = 30.0
    lockout: LockoutPolicy = LockoutPolicy()


@attrs.define
class OpsCore:
    policy: OpsPolicy
    master: bytes = attrs.field(repr=False)
    decoy_secret: bytes = attrs.field(repr=False)
    rand: crypto.RandomBytes
    peer: str
    source: str
    suite: str
    now: Callable[[], float]
    limits: SourceLimits
    outbox: list = attrs.Factory(list)
    pending: Status | None = None  # the answer decided before the store call that logs it
    serial: str = ""
    op: Op | None = None
    request: object = None
    card: object = None
    issued: tuple = ()  # ((AuthItem, Issued), ...) in challenge order
    own_machine: bool = False
    enrol_reply: bytes = b""
    due: tuple = ()  # methods whose material is issued with this insert (not challenged now)
    record: bool = True  # a session operation's refusal to a non-holder goes to the history (source not throttled)

    def emit(self, effect) -> None:
        self.outbox.append(effect)

    def start(self, serial: str, op: Op | None, request) -> None:
        self.serial, self.op, self.request = serial, op, request

    def finish(self) -> None:
        self.serial, self.op, self.request, self.card, self.issued = "", None, None, None, ()
        self.pending, self.own_machine, self.enrol_reply, self.due, self.record = None, False, b"", (), True

    def refuse(self, status: Status, result: str, detail: str, muk: bytes | None = None) -> None:
        """Answer ``status`` once the refusal's history line is stored (nothing else changes)."""
        self.pending = status
        op = OPERATION[self.op] if self.op is not None else Operation.ENROL
        self.emit(LogRefusal(self.serial, op, result, self.peer, detail, muk))


class OpsInputs(Protocol):
    def enrol_requested(self, req: EnrolRequest) -> None:
        "The card asks to enrol."

    def auth_op_requested(self, req: OpRequest) -> None:
        "The card starts an insert, recover or destroy."

    def session_op_requested(self, req: OpRequest) -> None:
        "The card syncs or removes (it presents its insert secret)."

    def bad_op_requested(self, req: OpRequest) -> None:
        "An OpRequest that cannot be served (Op.PASSWORD is its own message)."

    def password_change_requested(self, req: ChangePassword) -> None:
        "The card changes its password (while in use)."

    def material_issued(self, material: implauth.EnrolMaterial) -> None:
        "The enrolment material is made."

    def material_refused(self, reason: str) -> None:
        "The enrolment material cannot be made for this card."

    def card_loaded(self, card: object) -> None:
        "The record (or None) was read."

    def auth_answered(self, resp: AuthResponse) -> None:
        "The card answered the challenges."

    def unevaluated(self, detail: str) -> None:
        "The answer is refused without being evaluated (throttled)."

    def stored(self, outcome: object) -> None:
        "A store call returned."

    def store_failed(self, reason: str, full: bool) -> None:
        "A store call raised (``full``: the database cannot store, e.g. its disk is full)."

    def deadline(self) -> None:
        "The answer deadline passed."

    def unexpected(self, what: str) -> None:
        "A message that is not valid now."

    def connection_lost(self) -> None:
        "The channel is gone."


def _build():
    b = TypeMachineBuilder(OpsInputs, OpsCore)
    idle = b.state("idle")
    issuing = b.state("issuing")
    loading = b.state("loading")
    challenged = b.state("challenged")
    committing = b.state("committing")
    closed = b.state("closed")

    # ---- starting an operation

    @idle.upon(OpsInputs.enrol_requested).to(issuing)
    def enrol(m: OpsInputs, core: OpsCore, req: EnrolRequest) -> None:
        core.start(req.serial, None, req)
        needed = tuple(x for x in core.policy.impl_auth if x in (AuthMethod.KEYFILE, AuthMethod.TOTP))
        if needed:
            core.emit(IssueMaterial(req.serial, req.registration, needed, auth.code_hash(req.code), req.verifier,
                                    req.kdf, req.protected))
        else:
            m.material_issued(implauth.EnrolMaterial({}, b""))

    @issuing.upon(OpsInputs.material_issued).to(committing)
    def issued(m: OpsInputs, core: OpsCore, material: implauth.EnrolMaterial) -> None:
        req = core.request
        core.enrol_reply = material.reply
        core.record = not core.limits.throttled(core.source, req.serial)  # see stored
        core.emit(EnrolCard(serial=req.serial, code_hash=auth.code_hash(req.code), verifier=req.verifier, kdf=req.kdf,
                            protected=req.protected, registration=req.registration,
                            auth_extra=dict(material.auth_info), peer=core.peer, record=core.record))

    @issuing.upon(OpsInputs.material_refused).to(committing)
    def not_issued(m: OpsInputs, core: OpsCore, reason: str) -> None:
        # nothing is proven yet (the code is checked with the EnrolCard)
        _refuse_unproven(m, core, Status.BAD_REQUEST, reason)

    @idle.upon(OpsInputs.auth_op_requested).to(loading)
    def start(m: OpsInputs, core: OpsCore, req: OpRequest) -> None:
        core.start(req.serial, req.op, req)
        core.emit(LoadCard(req.serial))

    @idle.upon(OpsInputs.session_op_requested).to(committing)
    def session_op(m: OpsInputs, core: OpsCore, req: OpRequest) -> None:
        core.start(req.serial, req.op, req)
        session = crypto.sha256(req.insert_secret) if req.insert_secret else b""
        record = core.record = not core.limits.throttled(core.source, req.serial)  # see stored
        if req.op is Op.ATTACH:
            core.emit(AttachCard(serial=req.serial, session=session, peer=core.peer, record=record))
            return
        cls = SyncCard if req.op is Op.SYNC else CheckIn
        core.emit(cls(serial=req.serial, session=session, version=req.version, protected=req.protected,
                      peer=core.peer, record=record))

    @idle.upon(OpsInputs.bad_op_requested).to(committing)
    def bad_op(m: OpsInputs, core: OpsCore, req: OpRequest) -> None:
        core.start(req.serial, req.op, req)
        _refuse_unproven(m, core, Status.BAD_REQUEST, "a password change is a ChangePassword message, not an OpRequest")

    @idle.upon(OpsInputs.password_change_requested).to(committing)
    def password(m: OpsInputs, core: OpsCore, req: ChangePassword) -> None:
        core.start(req.serial, Op.PASSWORD, req)
        problem = _password_change_problem(req)
        if problem:  # refused before its insert secret is looked at: it proved nothing
            _refuse_unproven(m, core, Status.BAD_REQUEST, problem)
            return
        core.record = not core.limits.throttled(core.source, req.serial)  # see stored
        core.emit(ChangeCardPassword(serial=req.serial, session=crypto.sha256(req.insert_secret), version=req.version,
                                     verifier=req.verifier, kdf=req.kdf, protected=req.protected, peer=core.peer,
                                     record=core.record))

    # ---- authentication (Figure 8)

    @loading.upon(OpsInputs.card_loaded).to(challenged)
    def loaded(m: OpsInputs, core: OpsCore, card: object) -> None:
        core.card = card
        if card is not None:
            kdf = card.kdf
            methods = required_methods(card.auth_info, core.policy)
            due = material_due(card.auth_info, methods)
            methods = tuple(x for x in methods if x not in due)
            core.due = due if core.op is Op.INSERT else ()
        else:  # a decoy: shaped like a real card's challenge, refused after the answer
            kdf = auth.decoy_kdf(core.decoy_secret, core.serial)
            methods = (AuthMethod.PASSWORD,) + tuple(core.policy.impl_auth)
        issued = []
        for method in methods:
            it = METHODS[method].challenge(core.serial, core.rand)
            issued.append((AuthItem(method, it.data), it))
        core.issued = tuple(issued)
        core.emit(Reply(AuthChallenge(kdf=kdf, challenges=tuple(item for item, _ in issued))))
        core.emit(StartDeadline(core.policy.auth_deadline))

    @challenged.upon(OpsInputs.auth_answered).to(committing)
    def answered(m: OpsInputs, core: OpsCore, resp: AuthResponse) -> None:
        core.emit(CancelDeadline())
        card, now, op = core.card, core.now(), OPERATION[core.op]
        own = _own_machine(card, resp.muk)
        core.own_machine = own
        if own:
            throttled = card.throttled(now, True)
        else:
            throttled = core.limits.throttled(core.source, core.serial) or (card is not None
                                                                            and card.throttled(now, False))
        if throttled:
            m.unevaluated("too many failed authentications: throttled, not evaluated")
            return
        good, why, totp_step = _verify(core, resp, now)
        if not good:
            if not own:
                core.limits.failed(core.source, core.serial)
            core.pending = decide_any(op, Condition.AUTH_FAILED)
            core.emit(CountFailure(core.serial, op, core.peer, why, resp.muk or None, own))
            return
        core.limits.succeeded(core.source, core.serial)
        req = core.request
        if req.op is Op.INSERT:
            if len(resp.muk) != 32 or len(req.insert_secret) != 32:
                core.refuse(Status.BAD_REQUEST, "bad-request", "insert needs a MUK and an insert secret",
                            resp.muk or None)
                return
            info = implauth.stored_material(card.auth_info)
            core.emit(CheckOut(serial=core.serial, muk=resp.muk, session=crypto.sha256(req.insert_secret),
                               channel={"suite": core.suite, "peer": core.peer}, peer=core.peer,
                               verifier=card.verifier, totp_step=totp_step, own_machine=own, reissue=core.due,
                               registration=bytes.fromhex(info.get("registration", "")) if core.due else b"",
                               registered_as=str(info.get("registered_as", core.serial)) if core.due else ""))
        elif req.op is Op.RECOVER:
            core.emit(RecoverCard(serial=core.serial, muk=resp.muk, peer=core.peer, verifier=card.verifier,
                                  totp_step=totp_step, own_machine=own))
        else:
            core.emit(DestroyCard(serial=core.serial, muk=resp.muk, peer=core.peer, verifier=card.verifier,
                                  totp_step=totp_step, own_machine=own))

    @challenged.upon(OpsInputs.deadline).to(committing)
    def too_late(m: OpsInputs, core: OpsCore) -> None:
        # an unanswered challenge counts like a wrong answer: holding challenges open costs guesses. From a
        # source already throttled on this serial it is a throttled attempt: not counted, no history row
        # (the log has a line), so a stranger who keeps asking cannot grow the history without bound
        op = OPERATION[core.op]
        core.pending = decide_any(op, Condition.NO_ANSWER)
        if core.limits.throttled(core.source, core.serial):
            m.unevaluated(f"no answer within {core.policy.auth_deadline:g} s from a throttled source: not counted")
            return
        core.limits.failed(core.source, core.serial)
        core.emit(CountFailure(core.serial, op, core.peer, f"no answer within {core.policy.auth_deadline:g} s",
                               None, False, result="timeout"))

    # ---- results

    @committing.upon(OpsInputs.unevaluated).to(idle)
    def unevaluated(m: OpsInputs, core: OpsCore, detail: str) -> None:
        core.emit(Logged("throttled", core.serial, detail))
        status = core.pending if core.pending is not None else decide_any(OPERATION[core.op], Condition.AUTH_FAILED)
        core.emit(Reply(OpResult(status=status)))
        core.finish()

    @committing.upon(OpsInputs.stored).to(idle)
    def stored(m: OpsInputs, core: OpsCore, outcome: object) -> None:
        if not getattr(outcome, "holder", True):  # (some store calls return nothing: None)
            # a session operation refused to a requester without the card's insert secret (or for no card), an
            # enrolment refused for want of a valid code (whichever serial it names): counted for its source
            # like a failed authentication, so once the source is throttled its
            # refusals are only logged (the request's ``record``), and the history stays bounded. The answer
            # is the same either way, and a holder's requests are never throttled or unrecorded
            core.limits.failed(core.source, core.serial)
            if not core.record:
                what = core.op.name.lower() if core.op is not None else "enrolment"
                core.emit(Logged("throttled", core.serial, f"{what} refused; not recorded"))
        if core.pending is not None:
            core.emit(Reply(OpResult(status=core.pending)))
        else:
            registration = core.enrol_reply if isinstance(core.request, EnrolRequest) else outcome.registration
            if outcome.status is Status.OK:
                core.emit(Authenticated(core.serial))
            core.emit(Reply(OpResult(status=outcome.status, version=outcome.version, protected=outcome.protected,
                                     registration=registration if outcome.status is Status.OK else b"")))
        core.finish()

    @committing.upon(OpsInputs.store_failed).to(idle)
    def failed(m: OpsInputs, core: OpsCore, reason: str, full: bool) -> None:
        # a refusal whose history line failed is still that refusal (nothing was changed); a change the
        # database could not store for want of space is STORAGE_FULL, so the card can say so
        failure = Status.STORAGE_FULL if full else Status.INTERNAL
        core.emit(Reply(OpResult(status=core.pending if core.pending is not None else failure)))
        core.finish()

    # the reads before an answer: the record (loading), the enrolment code before its material is made (issuing)
    @issuing.upon(OpsInputs.store_failed).to(idle)
    @loading.upon(OpsInputs.store_failed).to(idle)
    def load_failed(m: OpsInputs, core: OpsCore, reason: str, full: bool) -> None:
        core.emit(Reply(OpResult(status=Status.STORAGE_FULL if full else Status.INTERNAL)))
        core.finish()

    # ---- protocol violations and loss

    for state in (idle, issuing, loading, challenged, committing):

        @state.upon(OpsInputs.unexpected).to(closed)
        def violation(m: OpsInputs, core: OpsCore, what: str) -> None:
            core.emit(CancelDeadline())
            core.emit(ProtocolViolation(what))
            core.finish()

        @state.upon(OpsInputs.connection_lost).to(closed)
        def lost(m: OpsInputs, core: OpsCore) -> None:
            core.emit(CancelDeadline())
            core.finish()

    # a store call in flight completes (commits or rolls back) on its own; its result has no one to go to
    for inp in (OpsInputs.material_issued, OpsInputs.material_refused, OpsInputs.card_loaded, OpsInputs.stored,
                OpsInputs.store_failed, OpsInputs.deadline, OpsInputs.unexpected, OpsInputs.connection_lost,
                OpsInputs.enrol_requested, OpsInputs.auth_op_requested, OpsInputs.session_op_requested,
                OpsInputs.bad_op_requested, OpsInputs.password_change_requested, OpsInputs.auth_answered,
                OpsInputs.unevaluated):
        closed.upon(inp).loop().returns(None)

    return b.build()


def decide_any(op: Operation, condition: Condition) -> Status:
    """The status Figure 4 gives ``condition`` in any state (authentication failed, no answer)."""
    from vsc.protocol.lifecycle import State

    return decide(State.IDLE, op, condition).status


def _own_machine(card, muk: bytes) -> bool:
    """Whether the answer carries the MUK of the card's last insert (the owner's own bucket)."""
    last = getattr(card, "last_muk", None) if card is not None else None
    return bool(last) and len(muk) == len(last) and crypto.constant_time_equal(muk, last)


def _refuse_unproven(m: OpsInputs, core: OpsCore, status: Status, detail: str) -> None:
    """
    Refuse a request that proved nothing (no code, no insert secret looked
    at): it counts for its source, and once the source is throttled the
    refusal is only logged, never a history row, so a stranger cannot grow
    the history without bound. The answer is the same either way.
    """
    if core.limits.throttled(core.source, core.serial):
        core.pending = status
        m.unevaluated(f"{detail}; not recorded")
        return
    core.limits.failed(core.source, core.serial)
    core.refuse(status, "bad-request", detail)


def _password_change_problem(req: ChangePassword) -> str:
    try:
        kdf = KdfParams.decode(req.kdf)
    except WireError as e:
        return f"new KDF parameters: {e}"
    want = auth.LEGACY_VERIFIER_SIZE if kdf.alg is KdfAlg.LEGACY_MD5 else auth.VERIFIER_SIZE
    if len(req.verifier) != want:
        return f"a {kdf.alg.name} verifier is {want} bytes, not {len(req.verifier)}"
    return ""


def required_methods(auth_info: str, policy: OpsPolicy) -> tuple[AuthMethod, ...]:
    """Every method stored with the card plus every method the policy requires now (docs §10.6.1)."""
    try:
        names = json.loads(auth_info or "{}").get("methods", [])
    except (ValueError, AttributeError):
        names = []
    methods = [AuthMethod.PASSWORD]
    for name in names if isinstance(names, list) else []:
        m = auth.METHOD_NAMES.get(name)
        if m is not None and m not in methods:
            methods.append(m)
    # a card given a keyfile or a TOTP seed at enrolment keeps having to use it
    material = implauth.stored_material(auth_info)
    for key, m in (("keyfile", AuthMethod.KEYFILE), ("totp", AuthMethod.TOTP)):
        if key in material and m not in methods:
            methods.append(m)
    for m in policy.impl_auth:
        if m not in methods:
            methods.append(m)
    return tuple(methods)


def material_due(auth_info: str, methods: tuple) -> tuple[AuthMethod, ...]:
    """
    The methods among ``methods`` the card must pass but holds no material
    for, which the server re-issues with its next insert (issue 13): a keyfile
    when ``impl_auth`` gained ``keyfile`` after the card enrolled, or for a
    duplicate (whose keyfile named the old serial). Such a method is not
    challenged at that insert (the card cannot answer it; it never could), the
    others are, and the material comes with the insert's result. Only a card
    with a registration (its seal key, sent at enrolment) can be issued one;
    TOTP is not re-issued (its seed belongs on a device the card process cannot
    show it to): such a card keeps failing that method until replaced.
    """
    material = implauth.stored_material(auth_info)
    if AuthMethod.KEYFILE not in methods or "keyfile" in material:
        return ()
    try:  # a registration without a seal key (not one vsc's card makes) never escapes the keyfile challenge
        reg = Registration.decode(bytes.fromhex(material.get("registration", "")))
    except (WireError, ValueError, TypeError):
        return ()
    return (AuthMethod.KEYFILE,) if reg.seal_key else ()


def _verify(core: OpsCore, resp: AuthResponse, now: float) -> tuple[bool, str, int | None]:
    """All configured methods must succeed [0084]. Returns (good, why for the history, the TOTP step)."""
    card = core.card
    if len(resp.responses) != len(core.issued):
        return False, "wrong number of answers", None
    if card is not None:
        server = ServerSide(core.serial, card.verifier, core.master, implauth.stored_material(card.auth_info), now)
    else:
        server = ServerSide(core.serial, auth.decoy_verifier(core.decoy_secret, core.serial), core.master, {}, now)
    failed, totp_step = [], None
    for (item, issued), answer in zip(core.issued, resp.responses):
        if answer.method is not item.method:
            return False, "answers out of order", None
        method = METHODS[item.method]
        verdict = method.check(server, issued, answer.data)
        if verdict.totp_step is not None:
            totp_step = verdict.totp_step
        if not verdict.good:
            failed.append(method.label)
    if card is None:
        return False, "no such card", None
    if failed:
        return False, "failed: " + ", ".join(failed), None
    return True, "", totp_step


_Machine = indexed(_build())  # dispatch by table (vsc.protocol.machines)


class ServerOps:
    """Wrapper: decode first, then each call fires one input and returns the effects."""

    def __init__(self, policy: OpsPolicy, master: bytes, decoy_secret: bytes, peer: str, suite: str,
                 now: Callable[[], float], rand: crypto.RandomBytes = crypto.system_random,
                 limits: SourceLimits | None = None, source: str = ""):
        limits = limits if limits is not None else SourceLimits(policy.lockout, now)
        self._core = OpsCore(policy=policy, master=master, decoy_secret=decoy_secret, rand=rand, peer=peer,
                             source=source or peer.rsplit(":", 1)[0].strip("[]"), suite=suite, now=now, limits=limits)
        self._m: OpsInputs = _Machine(self._core)

    def _drain(self) -> list:
        out, self._core.outbox = self._core.outbox, []
        return out

    def _fire(self, fn) -> list:
        try:
            fn()
        except NoTransition as e:
            self._m.unexpected(f"message not valid now ({e})")
        return self._drain()

    def message(self, msg: object) -> list:
        """One input per kind of message; a request's serial in NFC first (vsc.protocol.serials)."""
        m = self._m
        serial = getattr(msg, "serial", None)
        if serial is not None and not serial.isascii():
            nfc = serials.normalise(serial)
            if nfc != serial:
                msg = attrs.evolve(msg, serial=nfc)
        if isinstance(msg, EnrolRequest):
            return self._fire(lambda: m.enrol_requested(msg))
        if isinstance(msg, OpRequest):
            if msg.op in AUTH_OPS:
                return self._fire(lambda: m.auth_op_requested(msg))
            if msg.op in SESSION_OPS:
                return self._fire(lambda: m.session_op_requested(msg))
            return self._fire(lambda: m.bad_op_requested(msg))
        if isinstance(msg, ChangePassword):
            return self._fire(lambda: m.password_change_requested(msg))
        if isinstance(msg, AuthResponse):
            return self._fire(lambda: m.auth_answered(msg))
        return self._fire(lambda: m.unexpected(f"{type(msg).__name__} is not a request"))

    def material(self, material: implauth.EnrolMaterial) -> list:
        return self._fire(lambda: self._m.material_issued(material))

    def material_refused(self, reason: str) -> list:
        return self._fire(lambda: self._m.material_refused(reason))

    def loaded(self, card: object) -> list:
        return self._fire(lambda: self._m.card_loaded(card))

    def stored(self, outcome: object) -> list:
        return self._fire(lambda: self._m.stored(outcome))

    def store_failed(self, reason: str, full: bool = False) -> list:
        """A store call raised; ``full``: it could not store for want of space (vsc.server.store.StorageFull)."""
        return self._fire(lambda: self._m.store_failed(reason, full))

    def deadline(self) -> list:
        return self._fire(self._m.deadline)

    def connection_lost(self) -> list:
        return self._fire(self._m.connection_lost)


__all__ = ["ServerOps", "OpsPolicy", "Reply", "IssueMaterial", "StartDeadline", "CancelDeadline",
           "ProtocolViolation", "Logged", "Authenticated", "required_methods", "Outcome"]
