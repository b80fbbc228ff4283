"""
The card's life cycle as this process lives it (Figure 4 on the card's side;
insert Figure 6, remove Figure 11, the checks of [0031]-[0033] and [0106]),
sans-IO: an Automat machine the card session reports events and outcomes to.

    idle --insert--> inserting --inserted--> in_use --remove--> removing --removed--> idle
                     inserting --insert_failed--> idle
                                               removing --remove_failed--> in_use
                                 in_use --abort--> exited   (MUK or process id changed, a failed token check)

While in use the machine holds the card's memory. It answers the one
question every service of the card asks before it touches that memory —
PIV through vpcd, the ssh-agent, the local API (control socket), and the
OpenPGP application: ``require_usable()`` (in use, memory present and not
wiped) returns the memory or raises the one ``CardError`` line. An input the
current state does not allow is refused the same way, and changes nothing.

Where the protected information lives (a VSC Server or a token) is not this
machine's business: vsc.card.session runs it for either storage.
"""

from __future__ import annotations

import enum
from typing import Callable, Protocol

import attrs
from automat import NoTransition, TypeMachineBuilder

from vsc.protocol.machines import indexed


class CardError(Exception):
    """A refusal to report to the user as one line (every service of the card raises this one)."""


class LifeState(enum.Enum):
    """Where the card is in its life cycle; the value is what ``vsc card status`` shows."""

    IDLE = "idle"
    INSERTING = "inserting"
    IN_USE = "in-use"
    REMOVING = "removing"
    EXITED = "exited"


class Memory(Protocol):
    """What the machine needs to know of the card's memory (vsc.card.protected.CardMemory)."""

    @property
    def wiped(self) -> bool: ...


class LifecycleInputs(Protocol):
    def insert(self) -> None:
        "An insert begins (Figure 6); only an idle card can be inserted."

    def inserted(self, memory: Memory) -> None:
        "The insert succeeded: the protected information is in this memory."

    def insert_failed(self) -> None:
        "The insert was refused or failed: idle again, nothing held."

    def remove(self) -> None:
        "A remove begins (801): every service is refused from now on."

    def removed(self) -> None:
        "The protected information is checked in (or already safe on the token) and the memory wiped: idle."

    def remove_failed(self) -> None:
        "The check-in failed and the card stays in use (a server card: recover it later or retry)."

    def abort(self) -> None:
        "Exit without remove ([0031]-[0032], a failed token check [0106]); the memory was wiped."

    def state(self) -> LifeState:
        "Where the card is."

    def usable(self) -> bool:
        "In use, with memory present and not wiped."

    def memory(self) -> Memory | None:
        "The card's memory while it is held (in use, and while removing for the check-in)."


@attrs.define
class _Core:
    memory: Memory | None = None


def _build():
    b = TypeMachineBuilder(LifecycleInputs, _Core)
    idle = b.state("idle")
    inserting = b.state("inserting")
    in_use = b.state("in_use")
    removing = b.state("removing")
    exited = b.state("exited")

    idle.upon(LifecycleInputs.insert).to(inserting).returns(None)
    inserting.upon(LifecycleInputs.insert_failed).to(idle).returns(None)

    @inserting.upon(LifecycleInputs.inserted).to(in_use)
    def inserted(m: LifecycleInputs, core: _Core, memory: Memory) -> None:
        core.memory = memory

    in_use.upon(LifecycleInputs.remove).to(removing).returns(None)
    removing.upon(LifecycleInputs.remove_failed).to(in_use).returns(None)

    @removing.upon(LifecycleInputs.removed).to(idle)
    def removed(m: LifecycleInputs, core: _Core) -> None:
        core.memory = None

    @in_use.upon(LifecycleInputs.abort).to(exited)
    def abort(m: LifecycleInputs, core: _Core) -> None:
        core.memory = None

    for state, label in ((idle, LifeState.IDLE), (inserting, LifeState.INSERTING), (in_use, LifeState.IN_USE),
                         (removing, LifeState.REMOVING), (exited, LifeState.EXITED)):
        state.upon(LifecycleInputs.state).loop().returns(label)

        @state.upon(LifecycleInputs.memory).loop()
        def memory(m: LifecycleInputs, core: _Core) -> Memory | None:
            return core.memory

    @in_use.upon(LifecycleInputs.usable).loop()
    def usable(m: LifecycleInputs, core: _Core) -> bool:
        return core.memory is not None and not core.memory.wiped

    for state in (idle, inserting, removing, exited):
        state.upon(LifecycleInputs.usable).loop().returns(False)
    return b.build()


_Machine = indexed(_build())  # dispatch by table: every service asks require_usable per request

#: what each event is, in a refusal ("cannot remove: the card is not inserted")
_EVENT = {
    "insert": "insert",
    "inserted": "finish an insert",
    "insert_failed": "end an insert",
    "remove": "remove",
    "removed": "finish a remove",
    "remove_failed": "end a remove",
    "abort": "exit without remove",
}

#: where the card is, in words
_WHERE = {
    LifeState.IDLE: "not inserted",
    LifeState.INSERTING: "being inserted",
    LifeState.IN_USE: "in use",
    LifeState.REMOVING: "being removed",
    LifeState.EXITED: "exiting (the card process stops)",
}

#: why a service is refused when the card is not usable
_NOT_USABLE = {
    LifeState.IDLE: "the card is not inserted",
    LifeState.INSERTING: "the card is not inserted yet",
    LifeState.IN_USE: "the card is not inserted (its memory was wiped)",
    LifeState.REMOVING: "the card is not inserted (it is being removed)",
    LifeState.EXITED: "the card is not inserted (the card process is exiting)",
}


class CardLifecycle:
    """One card's life cycle: events move it, refusals are one CardError line, queries never refuse."""

    def __init__(self) -> None:
        self._m = _Machine(_Core())
        #: the memory while the machine is in use (set after every event): require_usable's answer without
        #: two machine inputs, asked several times per request by every service
        self._in_use: Memory | None = None

    def _fire(self, event: str, fire: Callable[..., None], *args) -> None:
        try:
            fire(*args)
        except NoTransition:
            raise CardError(f"cannot {_EVENT[event]}: the card is {_WHERE[self._m.state()]}") from None
        finally:
            self._in_use = self._m.memory() if self._m.state() is LifeState.IN_USE else None

    # -- events and outcomes
    def insert(self) -> None:
        self._fire("insert", self._m.insert)

    def inserted(self, memory: Memory) -> None:
        self._fire("inserted", self._m.inserted, memory)

    def insert_failed(self) -> None:
        self._fire("insert_failed", self._m.insert_failed)

    def remove(self) -> None:
        self._fire("remove", self._m.remove)

    def removed(self) -> None:
        self._fire("removed", self._m.removed)

    def remove_failed(self) -> None:
        self._fire("remove_failed", self._m.remove_failed)

    def abort(self) -> None:
        self._fire("abort", self._m.abort)

    # -- queries
    @property
    def state(self) -> LifeState:
        return self._m.state()

    @property
    def usable(self) -> bool:
        memory = self._in_use
        if memory is not None:  # in use: the machine's answer is whether the memory was wiped
            return not memory.wiped
        return self._m.usable()

    @property
    def memory(self) -> Memory | None:
        return self._m.memory()

    def require_usable(self) -> Memory:
        """The memory of a usable card, or the one refusal every service of the card gives."""
        memory = self._in_use
        if memory is not None and not memory.wiped:  # what the machine's usable() answers in use
            return memory
        if not self._m.usable():
            raise CardError(_NOT_USABLE[self._m.state()])
        memory = self._m.memory()
        assert memory is not None
        return memory
