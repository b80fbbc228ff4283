"""
Automat dispatch by table. Automat's ``Automaton.outputForInput`` finds a
transition by scanning every (state, input) pair with ``==`` (dataclass
equality): the channel's server machine has 44 transitions, so each input
cost dozens of generated ``__eq__`` calls — the largest single item in a
profile of sealed records in memory. ``indexed`` gives a built TypeMachine's
automaton a dictionary of the same transitions; what each input does is
unchanged (Automat refuses duplicate (state, input) pairs, so there is exactly
one answer either way, and an unknown pair still raises NoTransition or takes
the unhandled transition).
"""

from __future__ import annotations

from automat import NoTransition


def indexed(machine):
    """Index ``machine``'s transitions once (after ``TypeMachineBuilder.build()``, which adds no more); returns it."""
    automaton = machine.__automat_automaton__
    # keyed by the state's identity: a typed machine's states are dataclasses whose generated __hash__ is a
    # Python call per transition; they live as long as the builder, and each is its own only equal
    states = {id(state): state for t in automaton._transitions for state in (t[0], t[2])}
    table = {(id(state), symbol): (out, tuple(outputs)) for state, symbol, out, outputs in automaton._transitions}
    unhandled = automaton._unhandledTransition

    def outputForInput(inState, inputSymbol):  # noqa: N802, N803 - Automat's names
        try:
            out, outputs = table[id(inState), inputSymbol]
        except KeyError:
            if id(inState) not in states and any(inState == known for known in states.values()):
                raise RuntimeError(f"{inState!r} is not one of the machine's own state objects") from None
            if unhandled is None:
                raise NoTransition(state=inState, symbol=inputSymbol) from None
            return unhandled
        return out, list(outputs)

    automaton.outputForInput = outputForInput
    return machine
