"""
The card's life cycle (vsc.protocol.card_lifecycle) on its own — every state
× every input: allowed inputs move, the others are refused with one
CardError line and change nothing — and as the CardSession runs it: every
service of the card asks the one ``require_usable`` and refuses the same
way in every state but in use.
"""

from __future__ import annotations

import os

import pytest
from twisted.internet.defer import Deferred, ensureDeferred, maybeDeferred
from twisted.internet.task import Clock

from vsc.card import vpcd
from vsc.card.config import CardConfig
from vsc.card.machine import MachineLock
from vsc.card.protected import PlainItem, seal_envelope
from vsc.card.session import CardError, CardSession
from vsc.protocol.card_lifecycle import CardLifecycle, LifeState
from vsc.wire.protected import ItemKind, encode_counter
from tests.cardfakes import MemoryStorage, done, in_use_session, leave_use, release

SERIAL = "life-1"
KEY = bytes(range(32))


class FakeMemory:
    wiped = False


#: how to reach each state from a new machine
PATHS = {
    LifeState.IDLE: (),
    LifeState.INSERTING: ("insert",),
    LifeState.IN_USE: ("insert", "inserted"),
    LifeState.REMOVING: ("insert", "inserted", "remove"),
    LifeState.EXITED: ("insert", "inserted", "abort"),
}

#: (state, input) → the state it moves to; every pair not here is refused
MOVES = {
    (LifeState.IDLE, "insert"): LifeState.INSERTING,
    (LifeState.INSERTING, "inserted"): LifeState.IN_USE,
    (LifeState.INSERTING, "insert_failed"): LifeState.IDLE,
    (LifeState.IN_USE, "remove"): LifeState.REMOVING,
    (LifeState.IN_USE, "abort"): LifeState.EXITED,
    (LifeState.REMOVING, "removed"): LifeState.IDLE,
    (LifeState.REMOVING, "remove_failed"): LifeState.IN_USE,
}

INPUTS = ("insert", "inserted", "insert_failed", "remove", "removed", "remove_failed", "abort")


def _fire(machine: CardLifecycle, name: str, memory: FakeMemory) -> None:
    event = getattr(machine, name)
    if name == "inserted":
        event(memory)
    else:
        event()


def _machine_in(state: LifeState) -> tuple[CardLifecycle, FakeMemory]:
    machine, memory = CardLifecycle(), FakeMemory()
    for name in PATHS[state]:
        _fire(machine, name, memory)
    assert machine.state is state
    return machine, memory


@pytest.mark.parametrize("state", list(LifeState), ids=lambda s: s.value)
@pytest.mark.parametrize("name", INPUTS)
def test_every_state_and_input(state, name):
    """An input the table allows moves the machine to the table's state; any other is refused with one
    CardError line in plain words ("cannot remove: the card is not inserted") and the state is unchanged."""
    machine, memory = _machine_in(state)
    target = MOVES.get((state, name))
    if target is not None:
        _fire(machine, name, memory)
        assert machine.state is target
        return
    with pytest.raises(CardError) as refused:
        _fire(machine, name, memory)
    line = str(refused.value)
    assert machine.state is state
    assert line.startswith("cannot ") and ": the card is " in line and "\n" not in line
    assert "NoTransition" not in line and "LifeState" not in line and "_" not in line


@pytest.mark.parametrize("state", list(LifeState), ids=lambda s: s.value)
def test_usable_only_in_use_with_live_memory(state):
    """usable is true in use only; require_usable returns the memory then, and otherwise refuses with one line
    that starts "the card is not inserted"; the memory is held in use and while removing (for the check-in)."""
    machine, memory = _machine_in(state)
    assert machine.usable is (state is LifeState.IN_USE)
    held = state in (LifeState.IN_USE, LifeState.REMOVING)
    assert (machine.memory is memory) is held and (machine.memory is None) is (not held)
    if state is LifeState.IN_USE:
        assert machine.require_usable() is memory
        memory.wiped = True  # wiped memory is never usable, whatever the state says
        assert not machine.usable
    with pytest.raises(CardError, match=r"^the card is not inserted") as refused:
        machine.require_usable()
    assert "\n" not in str(refused.value)


def test_a_full_cycle_and_a_failed_remove():
    """idle → inserting → in use → removing → in use (failed check-in) → removing → idle → inserting again."""
    machine, memory = CardLifecycle(), FakeMemory()
    seen = [machine.state]
    for name in ("insert", "inserted", "remove", "remove_failed", "remove", "removed", "insert"):
        _fire(machine, name, memory)
        seen.append(machine.state)
    assert [s.value for s in seen] == ["idle", "inserting", "in-use", "removing", "in-use", "removing", "idle",
                                       "inserting"]
    assert machine.memory is None


# ---------------------------------------------------------------- the session runs it


def _envelope() -> bytes:
    items = [PlainItem(ItemKind.COUNTER, "runs", encode_counter(3)), PlainItem(ItemKind.DATA, "note", b"n")]
    return seal_envelope(SERIAL, KEY, items, os.urandom)


def _config(tmp_path) -> CardConfig:
    return CardConfig(home=tmp_path, server="", server_key="", serial=SERIAL, muk_poll=60.0, clock_poll=0)


@pytest.fixture
def session(tmp_path):
    s = in_use_session(_config(tmp_path), MemoryStorage(SERIAL, _envelope(), KEY, os.urandom), os.urandom)
    yield s
    release(s)


SERVICES = {
    "public_key": lambda s: maybeDeferred(s.public_key, "9a"),
    "sign_digest": lambda s: ensureDeferred(s.sign_digest("9a", b"d" * 32)),
    "decrypt": lambda s: ensureDeferred(s.decrypt("9a", b"c" * 256)),
    "with_key": lambda s: ensureDeferred(s.with_key("9a", lambda key: b"")),
    "counter": lambda s: ensureDeferred(s.counter("runs", -1)),
    "data_get": lambda s: ensureDeferred(s.data_get("note")),
    "data_put": lambda s: ensureDeferred(s.data_put("note", b"x")),
    "put_item": lambda s: ensureDeferred(s.put_item(ItemKind.DATA, "note", b"x")),
    "change_password": lambda s: ensureDeferred(s.change_password("pw", "new")),
    "certificate": lambda s: maybeDeferred(vpcd.get_certificate, s, "9a"),
}


@pytest.mark.parametrize("state", [LifeState.REMOVING, LifeState.IDLE, LifeState.EXITED], ids=lambda s: s.value)
def test_every_service_asks_the_life_cycle(session, state):
    """Out of use, every service of the session (and the local API's certificate read) refuses with the life
    cycle's one line and stores nothing — while removing, the calls queued behind the check-in refuse once it
    is done; in use the same calls reach the memory (a counter reads 3)."""
    assert done(session.counter("runs")) == 3
    leave_use(session, state)
    calls = {name: call(session) for name, call in SERVICES.items()}
    if state is LifeState.REMOVING:
        session.storage.hold_checkin.callback(None)
    for name, d in calls.items():
        with pytest.raises(CardError) as refused:
            done(d)
        assert str(refused.value).startswith("the card is not inserted") and "\n" not in str(refused.value), name
    assert session.storage.stored == []


def test_status_in_every_state_says_where_the_card_is(session):
    """status() answers in every state with the life cycle's label; slots and counters only while memory is held."""
    assert session.status()["state"] == "in-use" and session.status()["counters"] == ["runs"]
    session.storage.hold_checkin = Deferred()
    removing = ensureDeferred(session.remove("test"))
    assert session.status()["state"] == "removing"
    session.storage.hold_checkin.callback(None)
    done(removing)
    assert session.status()["state"] == "idle" and session.status()["counters"] == []


def test_insert_twice_and_remove_when_idle_are_refused(session):
    """A second insert while in use, and a remove of an idle card, are one-line refusals that change nothing."""
    with pytest.raises(CardError, match="^cannot insert: the card is in use$"):
        done(session.insert("pw"))
    assert session.usable and session.lock.held
    done(session.remove("test"))
    with pytest.raises(CardError, match="^cannot remove: the card is not inserted$"):
        done(session.remove("again"))
    assert session.life is LifeState.IDLE and session.storage.checked_in and len(session.storage.checked_in) == 1


def test_a_refused_insert_leaves_the_card_idle_and_the_lock_free(tmp_path):
    """The storage refuses (wrong password): the session is idle again, the machine lock released, and a
    later insert with the right password succeeds."""
    storage = MemoryStorage(SERIAL, _envelope(), KEY, os.urandom)
    s = CardSession(_config(tmp_path), Clock(), storage, rand=os.urandom, muk=lambda: b"m" * 32, pid=lambda: 1,
                    lock=MachineLock(str(tmp_path / "lock")))
    with pytest.raises(CardError, match="wrong password"):
        done(s.insert("wrong"))
    assert s.life is LifeState.IDLE and not s.lock.held and s.memory is None
    done(s.insert("pw"))
    assert s.usable and s.lock.held
    release(s)


def test_a_failed_checkin_keeps_the_card_in_use_and_checking(tmp_path):
    """A server card whose check-in fails stays in use, memory intact, and its [0031] MUK check runs again."""
    storage = MemoryStorage(SERIAL, _envelope(), KEY, os.urandom)
    storage.fail_checkin = CardError("the server failed")
    clock, exits, muk = Clock(), [], [b"m" * 32]
    s = CardSession(_config(tmp_path), clock, storage, rand=os.urandom, muk=lambda: muk[0], pid=lambda: 1,
                    lock=MachineLock(str(tmp_path / "lock")), on_exit=lambda code, why: exits.append(code))
    done(s.insert("pw"))
    with pytest.raises(CardError, match="the server failed"):
        done(s.remove("test"))
    assert s.usable and done(s.counter("runs")) == 3
    muk[0] = b"n" * 32
    clock.advance(60)
    assert exits == [3] and s.life is LifeState.EXITED and not s.lock.held


def test_a_storage_that_is_safe_without_checkin_removes_anyway(tmp_path):
    """When the storage says the card is safe without the check-in (a token), a failed check-in still wipes
    the card, makes it idle, refuses the remove with the storage's line, and exits 5 after answering."""
    storage = MemoryStorage(SERIAL, _envelope(), KEY, os.urandom)
    storage.fail_checkin = CardError("the token is gone")
    storage.remove_anyway = "the token is gone; the card was removed anyway"
    clock, exits = Clock(), []
    s = in_use_session(_config(tmp_path), storage, os.urandom, clock, on_exit=lambda code, why: exits.append((code, why)))
    memory = s.memory
    with pytest.raises(CardError, match="^the token is gone; the card was removed anyway$"):
        done(s.remove("test"))
    assert s.life is LifeState.IDLE and memory.wiped and not s.lock.held and storage.forgotten == 1
    assert exits == []
    clock.advance(0)
    assert exits == [(5, "the token is gone; the card was removed anyway")]


@pytest.mark.parametrize("state", list(LifeState), ids=lambda s: s.value)
@pytest.mark.parametrize("name", INPUTS)
def test_require_usable_answers_as_the_machine_after_every_input(state, name):
    """require_usable's shortcut (the memory kept while in use) gives what the machine's own usable() and
    memory() give after every input, allowed or refused, and never returns wiped memory."""
    machine, memory = _machine_in(state)
    try:
        _fire(machine, name, memory)
    except CardError:
        pass
    for wiped in (False, True):
        memory.wiped = wiped
        if machine._m.usable():
            assert machine.require_usable() is machine._m.memory() is memory
        else:
            with pytest.raises(CardError, match=r"^the card is not inserted"):
                machine.require_usable()
