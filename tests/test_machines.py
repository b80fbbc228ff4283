"""vsc.protocol.machines.indexed: Automat dispatch by table gives exactly Automat's own answers."""

from __future__ import annotations

import pytest
from automat import NoTransition
from automat._core import Automaton

from vsc.protocol import channel, server_ops


@pytest.mark.parametrize("machine", [channel._ServerMachine, channel._CardMachine, server_ops._Machine],
                         ids=["channel-server", "channel-card", "server-ops"])
def test_table_dispatch_matches_the_linear_scan(machine):
    """For every state and every input symbol, the indexed lookup returns what Automaton.outputForInput returns (or raises the same NoTransition)."""
    automaton = machine.__automat_automaton__
    assert "outputForInput" in vars(automaton)  # indexed
    states = automaton.states()
    symbols = automaton.inputAlphabet()
    checked = 0
    for state in states:
        for symbol in symbols:
            try:
                expected = Automaton.outputForInput(automaton, state, symbol)
            except NoTransition:
                with pytest.raises(NoTransition):
                    automaton.outputForInput(state, symbol)
            else:
                assert automaton.outputForInput(state, symbol) == expected
            checked += 1
    assert checked == len(states) * len(symbols) > 0


def test_a_copy_of_a_state_is_refused_loudly_not_dispatched_differently():
    """The table is keyed by the states' identity (their dataclass __hash__ is a Python call per input): a state
    object equal to one of the machine's but not it (which Automat's scan would have matched by ==) raises
    RuntimeError, rather than quietly taking no transition."""
    import copy

    automaton = channel._ServerMachine.__automat_automaton__
    state, symbol, _, _ = next(iter(automaton._transitions))
    twin = copy.copy(state)
    assert twin == state and twin is not state
    assert automaton.outputForInput(state, symbol) == Automaton.outputForInput(automaton, state, symbol)
    with pytest.raises(RuntimeError, match="not one of the machine's own state objects"):
        automaton.outputForInput(twin, symbol)
