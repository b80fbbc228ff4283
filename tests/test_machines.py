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
