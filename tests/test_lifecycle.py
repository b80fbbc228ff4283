"""
Figure 4 as data (vsc.protocol.lifecycle): the table in docs/protocol.md
§10.13 is the table in the code, and ``classify`` finds each condition.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from vsc.protocol.lifecycle import (
    TABLE,
    CardFacts,
    Condition,
    NoRow,
    Operation,
    RequestFacts,
    State,
    classify,
    decide,
)
from vsc.wire.ops import Status

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"
S1, S2 = b"\x01" * 32, b"\x02" * 32
M1, M2 = b"A" * 32, b"B" * 32


def doc_rows() -> list[tuple]:
    """The rows of the Figure 4 table in docs/protocol.md §10.13, as tuples of cell text."""
    text = DOC.read_text()
    section = text[text.index("### 10.13"):text.index("### 10.14")]
    rows, in_table = [], False
    for line in section.splitlines():
        if line.startswith("| state | operation | condition |"):
            in_table = True
            continue
        if in_table:
            if not line.startswith("|"):
                break
            cells = [c.strip() for c in line.strip("|").split("|")]
            if set(cells[0]) <= {"-"}:
                continue
            rows.append(tuple(cells))
    return rows


def code_rows() -> list[tuple]:
    order = list(Operation)
    out = []
    for r in TABLE:
        d = r.decision
        out.append((
            r.state.value if r.state else "any",
            ", ".join(o.value for o in order if o in r.ops),
            r.condition.value,
            d.status.name,
            d.new_state.value if d.new_state else "unchanged",
            d.action.value,
            d.history,
        ))
    return out


def test_the_documented_table_is_the_code_table():
    """docs/protocol.md §10.13's Figure 4 table equals lifecycle.TABLE cell for cell, in the same order."""
    documented = doc_rows()
    assert len(documented) == len(TABLE) > 25, "the table was not found or is incomplete"
    assert documented == code_rows()


def test_every_state_and_operation_has_a_decision():
    """No (state, operation) pair falls through: each has at least one row for some condition."""
    covered = {(r.state, op) for r in TABLE for op in r.ops}
    for state in State:
        for op in Operation:
            assert (state, op) in covered or (op is not Operation.ENROL and (None, op) in covered and
                                               state is State.NONE), (state, op)


def test_destroyed_is_final_and_no_row_leaves_it():
    """[0034]: destroyed is final — no row starting there has another new state."""
    for r in TABLE:
        if r.state is State.DESTROYED:
            assert r.decision.new_state is None


def test_decide_refuses_a_missing_row():
    """A condition the table has no row for is a bug, reported as such, never a silent default."""
    with pytest.raises(NoRow):
        decide(State.IDLE, Operation.RECOVER, Condition.LAST_MACHINE)


def card(state: State, version: int = 3, session=S1, last=S1, muk=M1, protected=b"P3") -> CardFacts:
    return CardFacts(state=state, version=version, session_hash=session if state is State.IN_USE else None,
                     last_session=last, muk=muk if state is State.IN_USE else None, protected=protected,
                     verifier=b"v", kdf=b"k")


@pytest.mark.parametrize("op,facts,req,condition,status", [
    (Operation.INSERT, card(State.IN_USE), RequestFacts(session_hash=S1, muk=M1), Condition.RETRY, Status.OK),
    (Operation.INSERT, card(State.IN_USE), RequestFacts(session_hash=S1, muk=M2), Condition.OTHERWISE, Status.IN_USE),
    (Operation.INSERT, card(State.IN_USE), RequestFacts(session_hash=S2, muk=M1), Condition.OTHERWISE, Status.IN_USE),
    (Operation.SYNC, card(State.IN_USE), RequestFacts(session_hash=S1, version=3), Condition.CURRENT, Status.OK),
    (Operation.SYNC, card(State.IN_USE), RequestFacts(session_hash=S1, version=2, protected=b"P3"), Condition.RETRY,
     Status.OK),
    (Operation.SYNC, card(State.IN_USE), RequestFacts(session_hash=S1, version=2, protected=b"other"),
     Condition.CONFLICT, Status.VERSION_CONFLICT),
    (Operation.SYNC, card(State.IN_USE), RequestFacts(session_hash=S2, version=3), Condition.STRANGER,
     Status.REFUSED),
    (Operation.PASSWORD, card(State.IN_USE), RequestFacts(session_hash=S1, version=2, protected=b"P3", verifier=b"x",
                                                          kdf=b"k"), Condition.CONFLICT, Status.VERSION_CONFLICT),
    (Operation.REMOVE, card(State.IDLE), RequestFacts(session_hash=S1, version=2, protected=b"P3"), Condition.RETRY,
     Status.OK),
    (Operation.REMOVE, card(State.IDLE, last=None), RequestFacts(session_hash=S1, version=2, protected=b"P3"),
     Condition.OTHERWISE, Status.REFUSED),
    (Operation.REMOVE, card(State.IN_USE), RequestFacts(session_hash=S1, version=2, protected=b"P3"), Condition.RETRY,
     Status.OK),
    (Operation.RECOVER, card(State.IN_USE), RequestFacts(muk=M2), Condition.OTHER_MACHINE, Status.MUK_MISMATCH),
    (Operation.RECOVER, card(State.IN_USE), RequestFacts(muk=M1), Condition.LAST_MACHINE, Status.OK),
    (Operation.RECOVER, card(State.IDLE), RequestFacts(muk=M1), Condition.ANY, Status.NOT_IN_USE),
    (Operation.INSERT, card(State.DESTROYED), RequestFacts(session_hash=S1, muk=M1), Condition.ANY, Status.DESTROYED),
    (Operation.SYNC, None, RequestFacts(session_hash=S1), Condition.ANY, Status.REFUSED),
    (Operation.ENROL, None, RequestFacts(valid_code=True), Condition.VALID_CODE, Status.OK),
    (Operation.ENROL, card(State.IDLE), RequestFacts(identical_enrolment=False), Condition.OTHERWISE, Status.REFUSED),
])
def test_classify_then_decide(op, facts, req, condition, status):
    """Each machine-checkable rule (session hash, MUK, version, retry bytes) is found by classify and decided right."""
    assert classify(op, facts, req) is condition
    assert decide(facts.state if facts else State.NONE, op, condition).status is status
