"""
The server's side of the card operations, one machine per channel
(sans-IO, Automat). Messages, lease results, loaded records and store
outcomes go in as inputs; effects come out: replies, lease and store calls,
deadline timers. The glue (vsc.server.service) runs store calls on a thread
pool and feeds their results back.

    idle --request--> leasing --granted--> working --loaded--> challenged
      ^                  |busy: log it, then   |stored              |answer/deadline
      |                  +--> working (BUSY)   |                    |
      +----------------------------------------+<------ working <---+

Mediation follows the patent: insert (Figure 6, 8) authenticates every
configured method (all must pass, [0084]) before the check-out; remove
(Figure 11), sync and a password change present the per-insert secret;
recover (Figure 12) and destroy authenticate like insert. Refusals to an
unauthenticated peer are all Status.REFUSED.

Implementation authentication (vsc.protocol.implauth): Master key (Figure
10), keyfile (ri1, answered with as1 [0046]), the one-time agent (a fresh
program f, y and w = E[x, f(y)] per challenge [0050]; the expected x stays
in this machine), and TOTP (checked against ``now``; the accepted step is
consumed atomically with the operation by the store). Enrolment material
(a signed keyfile, a TOTP seed) comes from the injected ``registrar``, a
pure function of the server key and the injected randomness and clock.
"""

from __future__ import annotations

import json
from typing import Protocol

import attrs
from automat import TypeMachineBuilder

from vsc import crypto
from vsc.protocol import auth, implauth
from vsc.wire import WireError
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
SESSION_OPS = (Op.SYNC, Op.REMOVE)


# ---------------------------------------------------------------- effects


@attrs.frozen
class Reply:
    message: object


@attrs.frozen
class AcquireLease:
    serial: str


@attrs.frozen
class ReleaseLease:
    serial: str


@attrs.frozen
class LoadCard:
    serial: str


@attrs.frozen
class StoreCall:
    """Call ``Store.<method>(**kwargs)`` on a worker thread; feed the return value to ``stored``."""

    method: str
    kwargs: dict


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


# ---------------------------------------------------------------- core


@attrs.frozen
class OpsPolicy:
    """What the machine needs of the server policy."""

    impl_auth: tuple = (AuthMethod.MASTER_KEY,)
    auth_deadline: float = 30.0


@attrs.define
class _Core:
    policy: OpsPolicy
    master: bytes
    decoy_secret: bytes
    rand: crypto.RandomBytes
    peer: str
    suite: str
    now: object
    outbox: list = attrs.Factory(list)
    forced: Status | None = None
    serial: str = ""
    op: Op | None = None
    request: object = None
    leased: bool = False
    card: object = None
    challenges: tuple = ()
    session: bytes = b""
    registrar: object = None
    expected: dict = attrs.Factory(dict)  # per method: what the answer must be (the agent's x)
    totp_step: int | None = None  # the TOTP step the answer matched, consumed with the operation
    enrol_reply: bytes = b""

    def emit(self, effect) -> None:
        self.outbox.append(effect)

    def reply(self, status: Status, **kw) -> None:
        self.emit(Reply(OpResult(status=status, **kw)))

    def finish(self) -> None:
        if self.leased:
            self.emit(ReleaseLease(self.serial))
            self.leased = False
        self.serial, self.op, self.request, self.card, self.challenges = "", None, None, None, ()
        self.forced = None
        self.expected, self.totp_step, self.enrol_reply = {}, None, b""


class OpsInputs(Protocol):
    def enrol_requested(self, req: EnrolRequest) -> None:
        "The card asks to enrol."

    def op_requested(self, req: OpRequest) -> None:
        "The card starts an operation."

    def password_change_requested(self, req: ChangePassword) -> None:
        "The card changes its password (while in use)."

    def auth_answered(self, resp: AuthResponse) -> None:
        "The card answered the challenges."

    def lease_granted(self) -> None:
        "The per-serial lease is ours."

    def lease_busy(self) -> None:
        "Another operation holds the lease."

    def card_loaded(self, card: object) -> None:
        "The record (or None) was read."

    def stored(self, outcome: object) -> None:
        "A store call returned."

    def store_failed(self, reason: str) -> None:
        "A store call raised."

    def deadline(self) -> None:
        "The answer deadline passed."

    def unexpected(self, what: str) -> None:
        "A message that is not valid now."

    def connection_lost(self) -> None:
        "The channel is gone."


def _build():
    b = TypeMachineBuilder(OpsInputs, _Core)
    idle = b.state("idle")
    leasing = b.state("leasing")
    working = b.state("working")
    challenged = b.state("challenged")
    closed = b.state("closed")

    # ---- starting an operation

    @idle.upon(OpsInputs.enrol_requested).to(leasing)
    def enrol(m: OpsInputs, core: _Core, req: EnrolRequest) -> None:
        core.serial, core.op, core.request = req.serial, None, req
        core.emit(AcquireLease(req.serial))

    @idle.upon(OpsInputs.op_requested).to(leasing)
    def start(m: OpsInputs, core: _Core, req: OpRequest) -> None:
        core.serial, core.op, core.request = req.serial, req.op, req
        core.emit(AcquireLease(req.serial))

    @idle.upon(OpsInputs.password_change_requested).to(leasing)
    def start_password(m: OpsInputs, core: _Core, req: ChangePassword) -> None:
        core.serial, core.op, core.request = req.serial, Op.PASSWORD, req
        core.emit(AcquireLease(req.serial))

    @leasing.upon(OpsInputs.lease_busy).to(working)
    def busy(m: OpsInputs, core: _Core) -> None:
        # [0081]: refused; logged like every other refusal, then answered BUSY (no lease to release)
        core.forced = Status.BUSY
        core.emit(
            StoreCall(
                "refused",
                dict(serial=core.serial, op=core.op.name.lower() if core.op is not None else "enrol", result="busy",
                     peer=core.peer, detail="another operation on this serial is running"),
            )
        )

    @leasing.upon(OpsInputs.store_failed).to(idle)
    def lease_failed(m: OpsInputs, core: _Core, reason: str) -> None:
        # taking the lease failed (database down): nothing was changed and no lease is held
        core.reply(Status.INTERNAL)
        core.finish()

    @leasing.upon(OpsInputs.lease_granted).to(working)
    def granted(m: OpsInputs, core: _Core) -> None:
        core.leased = True
        req = core.request
        if isinstance(req, EnrolRequest):
            try:
                material = _enrol_material(core, req)
            except implauth.ImplAuthError as e:
                _bad_request(core, "enrol", str(e))
                return
            kwargs = dict(
                serial=req.serial,
                code_hash=_code_hash(req.code),
                verifier=req.verifier,
                kdf=req.kdf,
                protected=req.protected,
                registration=req.registration,
                peer=core.peer,
            )
            if material.auth_info:
                kwargs["auth_extra"] = material.auth_info
                core.enrol_reply = material.reply
            core.emit(StoreCall("enrol", kwargs))
        elif isinstance(req, ChangePassword):
            problem = _password_change_problem(req)
            if problem:
                _bad_request(core, "password", problem)
                return
            core.emit(
                StoreCall(
                    "change_password",
                    dict(serial=req.serial, session=crypto.sha256(req.insert_secret), version=req.version,
                         verifier=req.verifier, kdf=req.kdf, protected=req.protected, peer=core.peer),
                )
            )
        elif req.op is Op.PASSWORD:
            _bad_request(core, "password", "a password change is a ChangePassword message, not an OpRequest")
        elif req.op in AUTH_OPS:
            core.emit(LoadCard(req.serial))
        elif req.op is Op.SYNC:
            core.emit(StoreCall("sync", _session_args(core, req)))
        elif req.op is Op.REMOVE:
            core.emit(StoreCall("checkin", _session_args(core, req)))

    # ---- authentication (Figure 8)

    @working.upon(OpsInputs.card_loaded).to(challenged)
    def loaded(m: OpsInputs, core: _Core, card: object) -> None:
        core.card = card
        if card is not None:
            kdf = card.kdf
            methods = _required_methods(card.auth_info, core.policy)
        else:
            kdf = auth.decoy_kdf(core.decoy_secret, core.serial)
            methods = (AuthMethod.PASSWORD,) + tuple(core.policy.impl_auth)
        items = []
        for method in methods:
            if method in (AuthMethod.MASTER_KEY, AuthMethod.KEYFILE):
                items.append(AuthItem(method, core.rand(32)))  # rm1 / ri1 (Figure 10, [0046])
            elif method is AuthMethod.ONE_TIME_AGENT:
                issued = implauth.agent_challenge(core.serial, core.rand)  # a new f for every challenge [0051]
                core.expected[method] = issued.x
                items.append(AuthItem(method, issued.data))
            else:
                items.append(AuthItem(method, b""))
        core.challenges = tuple(items)
        core.emit(Reply(AuthChallenge(kdf=kdf, challenges=core.challenges)))
        core.emit(StartDeadline(core.policy.auth_deadline))

    @challenged.upon(OpsInputs.auth_answered).to(working)
    def answered(m: OpsInputs, core: _Core, resp: AuthResponse) -> None:
        core.emit(CancelDeadline())
        req = core.request
        ok, why = _verify(core, resp)
        if not ok:
            core.emit(StoreCall("auth_failed", dict(serial=core.serial, op=req.op.name.lower(), peer=core.peer, detail=why,
                                                   muk=resp.muk or None)))
            return
        muk = resp.muk
        if req.op is Op.INSERT:
            if len(muk) != 32 or len(req.insert_secret) != 32:
                core.forced = Status.BAD_REQUEST
                core.emit(StoreCall("refused", dict(serial=core.serial, op="insert", result="bad-request", peer=core.peer, detail="insert needs a MUK and an insert secret")))
                return
            core.emit(
                StoreCall(
                    "checkout",
                    dict(
                        serial=core.serial,
                        muk=muk,
                        session=crypto.sha256(req.insert_secret),
                        channel={"suite": core.suite, "peer": core.peer},
                        peer=core.peer,
                        **_totp_kwargs(core),
                    ),
                )
            )
        elif req.op is Op.RECOVER:
            core.emit(StoreCall("recover", dict(serial=core.serial, muk=muk, peer=core.peer, **_totp_kwargs(core))))
        elif req.op is Op.DESTROY:
            core.emit(StoreCall("destroy", dict(serial=core.serial, peer=core.peer, muk=muk or None, **_totp_kwargs(core))))

    @challenged.upon(OpsInputs.deadline).to(working)
    def too_late(m: OpsInputs, core: _Core) -> None:
        core.forced = Status.TIMEOUT
        core.emit(
            StoreCall(
                "refused",
                dict(serial=core.serial, op=core.op.name.lower(), result="timeout", peer=core.peer,
                     detail=f"no answer within {core.policy.auth_deadline:g} s"),
            )
        )

    # ---- results

    @working.upon(OpsInputs.stored).to(idle)
    def stored(m: OpsInputs, core: _Core, outcome: object) -> None:
        core.emit(Reply(_result(core, outcome)))
        core.finish()

    @working.upon(OpsInputs.store_failed).to(idle)
    def failed(m: OpsInputs, core: _Core, reason: str) -> None:
        # a refusal whose log line failed is still that refusal (nothing was changed)
        core.reply(core.forced if core.forced is not None else Status.INTERNAL)
        core.finish()

    # ---- protocol violations and loss

    # While a lease or store call is in flight, keep the lease until its
    # result arrives (late_* below), so nothing else starts on the serial
    # before the transaction has committed or rolled back.
    for state, settled in ((idle, True), (leasing, False), (working, False), (challenged, True)):

        @state.upon(OpsInputs.unexpected).to(closed)
        def violation(m: OpsInputs, core: _Core, what: str, _settled: bool = settled) -> None:
            core.emit(CancelDeadline())
            core.emit(ProtocolViolation(what))
            if _settled:
                core.finish()

        @state.upon(OpsInputs.connection_lost).to(closed)
        def lost(m: OpsInputs, core: _Core, _settled: bool = settled) -> None:
            core.emit(CancelDeadline())
            if _settled:
                core.finish()

    @closed.upon(OpsInputs.lease_granted).loop()
    def late_lease(m: OpsInputs, core: _Core) -> None:
        core.leased = True
        core.finish()

    @closed.upon(OpsInputs.stored).loop()
    def late_store(m: OpsInputs, core: _Core, outcome: object) -> None:
        core.finish()

    @closed.upon(OpsInputs.store_failed).loop()
    def late_fail(m: OpsInputs, core: _Core, reason: str) -> None:
        core.finish()

    @closed.upon(OpsInputs.card_loaded).loop()
    def late_load(m: OpsInputs, core: _Core, card: object) -> None:
        core.finish()

    for inp in (OpsInputs.lease_busy, OpsInputs.deadline, OpsInputs.unexpected, OpsInputs.connection_lost,
                OpsInputs.enrol_requested, OpsInputs.op_requested, OpsInputs.password_change_requested,
                OpsInputs.auth_answered):
        closed.upon(inp).loop().returns(None)

    return b.build()


def _code_hash(code: str) -> bytes:
    return auth.code_hash(code)


def _bad_request(core: _Core, op: str, detail: str) -> None:
    """Refuse a request that makes no sense: logged, answered BAD_REQUEST, nothing changed."""
    core.forced = Status.BAD_REQUEST
    core.emit(StoreCall("refused", dict(serial=core.serial, op=op, result="bad-request", peer=core.peer, detail=detail)))


def _enrol_material(core: _Core, req: EnrolRequest) -> implauth.EnrolMaterial:
    """What the policy's keyfile/TOTP methods need at enrolment (ImplAuthError: the card cannot have it)."""
    needed = [m for m in core.policy.impl_auth if m in (AuthMethod.KEYFILE, AuthMethod.TOTP)]
    if not needed:
        return implauth.EnrolMaterial({}, b"")
    registrar = core.registrar or implauth.Registrar(None, b"", core.rand, core.now)
    return registrar.enrol(req.serial, req.registration, needed)


def _password_change_problem(req: ChangePassword) -> str:
    try:
        kdf = KdfParams.decode(req.kdf)
    except WireError as e:
        return f"new KDF parameters: {e}"
    want = auth.LEGACY_VERIFIER_SIZE if kdf.alg is KdfAlg.LEGACY_MD5 else auth.VERIFIER_SIZE
    if len(req.verifier) != want:
        return f"a {kdf.alg.name} verifier is {want} bytes, not {len(req.verifier)}"
    return ""


def _totp_kwargs(core: _Core) -> dict:
    return {} if core.totp_step is None else {"totp_step": core.totp_step}


def _session_args(core: _Core, req: OpRequest) -> dict:
    return dict(
        serial=req.serial,
        session=crypto.sha256(req.insert_secret) if req.insert_secret else b"",
        version=req.version,
        protected=req.protected,
        peer=core.peer,
    )


def _required_methods(auth_info: str, policy: OpsPolicy) -> tuple[AuthMethod, ...]:
    """Every method stored with the card plus every method the policy requires now."""
    try:
        names = json.loads(auth_info or "{}").get("methods", [])
    except ValueError:
        names = []
    methods = [AuthMethod.PASSWORD]
    for name in names:
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


def _verify(core: _Core, resp: AuthResponse) -> tuple[bool, str]:
    """All configured methods must succeed [0084]; the reason is for the log only."""
    card = core.card
    if len(resp.responses) != len(core.challenges):
        return False, "wrong number of answers"
    material = implauth.stored_material(card.auth_info) if card is not None else {}
    verdicts = []
    for challenge, answer in zip(core.challenges, resp.responses):
        if answer.method is not challenge.method:
            return False, "answers out of order"
        if challenge.method is AuthMethod.PASSWORD:
            verifier = card.verifier if card is not None else auth.decoy_verifier(core.decoy_secret, core.serial)
            verdicts.append(("password", auth.check_password(verifier, answer.data)))
        elif challenge.method is AuthMethod.MASTER_KEY:
            try:
                good = auth.check_master(core.master, challenge.data, core.serial, answer.data)
            except WireError:
                good = False
            verdicts.append(("master key", good))
        elif challenge.method is AuthMethod.KEYFILE:
            as1 = _hex(_section(material, "keyfile").get("as1"))
            good = as1 is not None and implauth.check_keyfile(as1, challenge.data, core.serial, answer.data)
            verdicts.append(("keyfile", good))
        elif challenge.method is AuthMethod.ONE_TIME_AGENT:
            expected = core.expected.get(AuthMethod.ONE_TIME_AGENT)
            verdicts.append(("one-time agent", expected is not None and implauth.check_agent(expected, answer.data)))
        elif challenge.method is AuthMethod.TOTP:
            totp = _section(material, "totp")
            secret = _hex(totp.get("secret"))
            step = None
            if secret is not None:
                step = implauth.check_totp(secret, answer.data, core.now(), int(totp.get("last_step", -1)),
                                           int(totp.get("period", implauth.TOTP_PERIOD)),
                                           int(totp.get("digits", implauth.TOTP_DIGITS)))
            core.totp_step = step
            verdicts.append(("totp", step is not None))
        else:
            verdicts.append((challenge.method.name.lower(), False))
    if card is None:
        return False, "no such card"
    if card.locked_out(core.now()):
        return False, "locked out"
    failed = [name for name, good in verdicts if not good]
    if failed:
        return False, "failed: " + ", ".join(failed)
    return True, ""


def _section(material: dict, key: str) -> dict:
    value = material.get(key)
    return value if isinstance(value, dict) else {}


def _hex(value) -> bytes | None:
    try:
        return bytes.fromhex(value) if isinstance(value, str) and value else None
    except ValueError:
        return None


def _result(core: _Core, outcome: object) -> OpResult:
    """Map a store outcome to what the card is told."""
    op = core.op
    if core.forced is not None:
        return OpResult(status=core.forced)
    if isinstance(core.request, EnrolRequest):
        ok, registration = outcome if isinstance(outcome, tuple) else (outcome, b"")
        registration = core.enrol_reply or registration or b""
        return OpResult(status=Status.OK, version=1, registration=registration) if ok else OpResult(status=Status.REFUSED)
    if outcome is None:  # auth_failed / refused return nothing
        return OpResult(status=Status.REFUSED)
    if op is Op.INSERT:
        result, card = outcome
        if result in ("ok", "repeat"):
            return OpResult(status=Status.OK, version=card.version, protected=card.protected)
        return OpResult(status={"in-use": Status.IN_USE, "destroyed": Status.DESTROYED}.get(result, Status.REFUSED))
    if op in (Op.SYNC, Op.REMOVE, Op.PASSWORD):
        result, version = outcome
        return OpResult(
            status={"ok": Status.OK, "conflict": Status.VERSION_CONFLICT}.get(result, Status.REFUSED),
            version=version,
        )
    mapping = {
        "ok": Status.OK,
        "destroyed": Status.DESTROYED,
        "not-in-use": Status.NOT_IN_USE,
        "muk-mismatch": Status.MUK_MISMATCH,
    }
    return OpResult(status=mapping.get(outcome, Status.REFUSED))


_Machine = _build()


class ServerOps:
    """Wrapper: each method fires one input and returns the effects."""

    def __init__(self, policy: OpsPolicy, master: bytes, decoy_secret: bytes, peer: str, suite: str,
                 now, rand: crypto.RandomBytes = crypto.system_random,
                 registrar: implauth.Registrar | None = None):
        self._core = _Core(policy=policy, master=master, decoy_secret=decoy_secret, rand=rand, peer=peer,
                           suite=suite, now=now, registrar=registrar)
        self._m: OpsInputs = _Machine(self._core)

    def _drain(self) -> list:
        out, self._core.outbox = self._core.outbox, []
        return out

    def message(self, msg: object) -> list:
        """Decode-first dispatch: one input per kind of message."""
        if isinstance(msg, EnrolRequest):
            self._fire(lambda: self._m.enrol_requested(msg))
        elif isinstance(msg, OpRequest):
            self._fire(lambda: self._m.op_requested(msg))
        elif isinstance(msg, ChangePassword):
            self._fire(lambda: self._m.password_change_requested(msg))
        elif isinstance(msg, AuthResponse):
            self._fire(lambda: self._m.auth_answered(msg))
        else:
            self._m.unexpected(f"{type(msg).__name__} is not a request")
        return self._drain()

    def _fire(self, fn) -> None:
        from automat import NoTransition

        try:
            fn()
        except NoTransition as e:
            self._m.unexpected(f"message not valid now ({e})")

    def lease(self, granted: bool) -> list:
        self._fire(self._m.lease_granted if granted else self._m.lease_busy)
        return self._drain()

    def loaded(self, card: object) -> list:
        self._fire(lambda: self._m.card_loaded(card))
        return self._drain()

    def stored(self, outcome: object) -> list:
        self._fire(lambda: self._m.stored(outcome))
        return self._drain()

    def store_failed(self, reason: str) -> list:
        self._fire(lambda: self._m.store_failed(reason))
        return self._drain()

    def deadline(self) -> list:
        self._fire(self._m.deadline)
        return self._drain()

    def connection_lost(self) -> list:
        self._fire(self._m.connection_lost)
        return self._drain()
