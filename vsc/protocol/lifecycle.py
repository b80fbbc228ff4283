"""
Figure 4 as data: the card life cycle ([0074], [0034]) as one table from
(state, operation, condition) to a decision (status, new state, what to
write, the history result).

    idle 101 --insert 104--> in-use 102 --remove 105 / recover 106--> idle
    idle, in-use --destroy 107--> destroyed 103 (final)

vsc adds creation by enrolment (no card -> idle, version 1) and two in-use
operations, sync and password change.

Two pure steps, both run by the server's store inside the one transaction
that also carries out the decision (vsc.server.store), on the row it has
just locked, so the decision is taken on the state it changes:

* ``classify(op, card, request)`` says which condition of the table holds
  (the request's insert secret against the stored session hash, its version
  against the stored one, its MUK against the last insert's ...);
* ``decide(state, op, condition)`` looks the row up.

docs/protocol.md §10.13 prints the same table; tests/test_lifecycle.py parses
that page and checks it against ``TABLE`` row for row.
"""

from __future__ import annotations

import enum
from typing import Iterable

import attrs

from vsc.wire.ops import Status


class State(str, enum.Enum):
    """Where a serial is in Figure 4 (NONE: no card of that serial exists)."""

    NONE = "no card"
    IDLE = "idle"
    IN_USE = "in-use"
    DESTROYED = "destroyed"


class Operation(str, enum.Enum):
    ENROL = "enrol"
    INSERT = "insert"
    SYNC = "sync"
    PASSWORD = "password"
    REMOVE = "remove"
    RECOVER = "recover"
    DESTROY = "destroy"
    ATTACH = "attach"


class Condition(str, enum.Enum):
    """What ``classify`` found; the text is the table's condition column."""

    ANY = "-"
    VALID_CODE = "valid code"
    NO_VALID_CODE = "no valid code"
    RETRY = "identical retry"
    CURRENT = "current insert, version = stored"
    CONFLICT = "current insert, other version"
    STRANGER = "another insert secret"
    OTHERWISE = "otherwise"
    HOLDER = "current insert"
    LAST_MACHINE = "MUK of the last insert"
    OTHER_MACHINE = "another MUK"
    # decided before a transaction (vsc.protocol.server_ops), listed so the table is whole
    AUTH_FAILED = "authentication failed"
    NO_ANSWER = "no answer within the deadline"
    CHANGED = "credentials changed during authentication"


class Action(enum.Enum):
    """What the store writes when the decision is carried out."""

    NOTHING = "nothing"
    CREATE = "create the card, version 1"
    CHECK_OUT = "in-use: MUK, session, failures 0"
    STORE = "store the upload, version + 1"
    STORE_PASSWORD = "store verifier, KDF, upload, version + 1"
    CHECK_IN = "idle: store the upload, version + 1"
    CHECK_IN_AGAIN = "idle: keep the stored upload and version"
    RELEASE = "idle: forget MUK and session"
    WIPE = "destroyed: wipe the protected information"


#: New-state text for "the state does not change".
UNCHANGED = "unchanged"


@attrs.frozen
class Decision:
    status: Status
    new_state: State | None  # None: unchanged
    action: Action
    history: str  # the history line's result


@attrs.frozen
class Row:
    state: State | None  # None: any state
    ops: frozenset[Operation]
    condition: Condition
    decision: Decision


def _row(state: State | None, ops: str, condition: Condition, status: Status, new: State | None,
         action: Action = Action.NOTHING, history: str = "") -> Row:
    names = frozenset(Operation(o.strip()) for o in ops.split(","))
    if not history:
        history = "ok" if status is Status.OK else status.name.lower().replace("_", "-")
    return Row(state, names, condition, Decision(status, new, action, history))


S, O, C, A = State, Operation, Condition, Action
AUTH_OPS = "insert, recover, destroy"
SESSION_OPS = "sync, password, remove"

#: Figure 4, every state x operation. Order matters only for docs; lookups are exact.
TABLE: tuple[Row, ...] = (
    _row(None, AUTH_OPS, C.AUTH_FAILED, Status.REFUSED, None, history="refused"),
    _row(None, AUTH_OPS, C.NO_ANSWER, Status.TIMEOUT, None, history="timeout"),
    _row(None, AUTH_OPS, C.CHANGED, Status.BUSY, None, history="busy"),
    _row(S.NONE, "enrol", C.VALID_CODE, Status.OK, S.IDLE, A.CREATE),
    _row(S.NONE, "enrol", C.NO_VALID_CODE, Status.REFUSED, None),
    _row(S.NONE, AUTH_OPS, C.ANY, Status.REFUSED, None),
    _row(S.NONE, SESSION_OPS, C.ANY, Status.REFUSED, None),
    _row(S.IDLE, "enrol", C.RETRY, Status.OK, None, history="repeat"),
    _row(S.IDLE, "enrol", C.OTHERWISE, Status.REFUSED, None),
    _row(S.IN_USE, "enrol", C.ANY, Status.REFUSED, None),
    _row(S.DESTROYED, "enrol", C.ANY, Status.REFUSED, None),
    _row(S.IDLE, "insert", C.ANY, Status.OK, S.IN_USE, A.CHECK_OUT),
    _row(S.IDLE, "sync, password", C.ANY, Status.REFUSED, None),
    _row(S.IDLE, "remove", C.RETRY, Status.OK, None, history="repeat"),
    _row(S.IDLE, "remove", C.OTHERWISE, Status.REFUSED, None),
    _row(S.IDLE, "recover", C.ANY, Status.NOT_IN_USE, None),
    _row(S.IDLE, "destroy", C.ANY, Status.OK, S.DESTROYED, A.WIPE),
    _row(S.IN_USE, "insert", C.RETRY, Status.OK, None, history="repeat"),
    _row(S.IN_USE, "insert", C.OTHERWISE, Status.IN_USE, None),
    _row(S.IN_USE, "sync", C.CURRENT, Status.OK, None, A.STORE),
    _row(S.IN_USE, "password", C.CURRENT, Status.OK, None, A.STORE_PASSWORD),
    _row(S.IN_USE, "sync, password", C.RETRY, Status.OK, None, history="repeat"),
    _row(S.IN_USE, "sync, password, remove", C.CONFLICT, Status.VERSION_CONFLICT, None, history="conflict"),
    _row(S.IN_USE, SESSION_OPS, C.STRANGER, Status.REFUSED, None),
    _row(S.IN_USE, "remove", C.CURRENT, Status.OK, S.IDLE, A.CHECK_IN),
    _row(S.IN_USE, "remove", C.RETRY, Status.OK, S.IDLE, A.CHECK_IN_AGAIN),
    _row(S.IN_USE, "recover", C.LAST_MACHINE, Status.OK, S.IDLE, A.RELEASE),
    _row(S.IN_USE, "recover", C.OTHER_MACHINE, Status.MUK_MISMATCH, None),
    _row(S.IN_USE, "destroy", C.ANY, Status.OK, S.DESTROYED, A.WIPE),
    _row(S.DESTROYED, AUTH_OPS, C.ANY, Status.DESTROYED, None, history="destroyed"),
    _row(S.DESTROYED, SESSION_OPS, C.ANY, Status.REFUSED, None),
    _row(S.NONE, "attach", C.ANY, Status.REFUSED, None),
    _row(S.IDLE, "attach", C.ANY, Status.REFUSED, None),
    _row(S.IN_USE, "attach", C.HOLDER, Status.OK, None, history="-"),
    _row(S.IN_USE, "attach", C.STRANGER, Status.REFUSED, None),
    _row(S.DESTROYED, "attach", C.ANY, Status.REFUSED, None),
)


def _index(rows: Iterable[Row]) -> dict[tuple[State | None, Operation, Condition], Decision]:
    out: dict[tuple[State | None, Operation, Condition], Decision] = {}
    for row in rows:
        for op in row.ops:
            key = (row.state, op, row.condition)
            if key in out:
                raise ValueError(f"Figure 4 table: {key} appears twice")
            out[key] = row.decision
    return out


_DECISIONS = _index(TABLE)


class NoRow(LookupError):
    """The table has no row for this (state, operation, condition): a bug in ``classify``."""


def decide(state: State, op: Operation, condition: Condition) -> Decision:
    """The row for (state, op, condition), or the any-state row for the condition."""
    decision = _DECISIONS.get((state, op, condition)) or _DECISIONS.get((None, op, condition))
    if decision is None:
        raise NoRow(f"no Figure 4 row for {state.value} / {op.value} / {condition.value}")
    return decision


# ---------------------------------------------------------------- classify


@attrs.frozen
class CardFacts:
    """What the table looks at in a card's row (read under the transaction's lock)."""

    state: State
    version: int
    session_hash: bytes | None  # the current insert's SHA-256(insert secret), while in use
    last_session: bytes | None  # the last insert's, kept after remove (a retried remove)
    muk: bytes | None  # the last insert's MUK, while in use
    protected: bytes = attrs.field(repr=False)
    verifier: bytes = attrs.field(repr=False, default=b"")
    kdf: bytes = b""


@attrs.frozen
class RequestFacts:
    """What the table looks at in a request (already authenticated where the op needs it)."""

    session_hash: bytes = b""  # SHA-256 of the request's insert secret
    muk: bytes = b""
    version: int = 0
    protected: bytes = attrs.field(repr=False, default=b"")
    verifier: bytes = attrs.field(repr=False, default=b"")  # password change: the new verifier
    kdf: bytes = b""  # password change: the new KDF parameters
    valid_code: bool = False  # enrol: the code matches, unexpired
    identical_enrolment: bool = False  # enrol: the stored card is exactly this enrolment, untouched


def classify(op: Operation, card: CardFacts | None, req: RequestFacts) -> Condition:
    """Which condition of the table holds for this request against this row."""
    if card is None:
        if op is Operation.ENROL:
            return Condition.VALID_CODE if req.valid_code else Condition.NO_VALID_CODE
        return Condition.ANY
    state = card.state
    if op is Operation.ENROL:
        if state is State.IDLE:
            return Condition.RETRY if req.identical_enrolment else Condition.OTHERWISE
        return Condition.ANY
    if state is State.DESTROYED:
        return Condition.ANY
    if op is Operation.INSERT:
        if state is State.IN_USE:
            same = card.session_hash == req.session_hash and card.muk == req.muk
            return Condition.RETRY if same else Condition.OTHERWISE
        return Condition.ANY
    if op is Operation.RECOVER:
        if state is State.IN_USE:
            return Condition.LAST_MACHINE if card.muk == req.muk else Condition.OTHER_MACHINE
        return Condition.ANY
    if op is Operation.DESTROY:
        return Condition.ANY
    if op is Operation.ATTACH:
        if state is State.IN_USE:
            same = card.session_hash is not None and card.session_hash == req.session_hash
            return Condition.HOLDER if same else Condition.STRANGER
        return Condition.ANY
    # sync, password, remove: the insert secret is the authority
    if state is State.IDLE:
        if op is Operation.REMOVE:
            retried = (card.last_session is not None and card.last_session == req.session_hash
                       and req.protected == card.protected and req.version == card.version - 1)
            return Condition.RETRY if retried else Condition.OTHERWISE
        return Condition.ANY
    if card.session_hash is None or card.session_hash != req.session_hash:
        return Condition.STRANGER
    if req.version == card.version:
        return Condition.CURRENT
    if req.version == card.version - 1 and req.protected == card.protected:
        if op is Operation.PASSWORD and (req.verifier, req.kdf) != (card.verifier, card.kdf):
            return Condition.CONFLICT
        return Condition.RETRY
    return Condition.CONFLICT
