"""
Rules of the server (vsc.server.service, vsc.server.admission,
vsc.server.store, vsc.protocol.server_ops) that hold against an
*authenticated* but hostile card owner on a multi-tenant server, which an
adversarial review found broken, each with how it was broken; they hold
since the fix. Deterministic: a task.Clock, a real SQLite Store on a
temporary file, a manual pool run by hand, iosim connections.
"""

from __future__ import annotations

from twisted.internet.task import Clock

from tests.test_server_ops import MASTER, MUK, SECRET, SERIAL, Harness, result_of, server_key
from vsc.card import ops as card_ops
from vsc.protocol.lifecycle import State
from vsc.protocol.suites import ChannelConfig
from vsc.server.admission import Admission, AdmissionLimits
from vsc.server.service import ServerFactory
from vsc.wire.ops import Status

# ---------------------------------------------------------------- helpers


def _harness(tmp_path, **limits) -> Harness:
    """Test_server_ops's Harness with admission (the limits on connections nothing has authenticated on)."""
    h = Harness(tmp_path)
    admission = Admission(AdmissionLimits(**limits), h.clock.seconds)  # no pool: decryptions run inline
    h.factory = ServerFactory(ChannelConfig(), server_key(), h.clock, backend=h.backend,
                              ops_policy=h.factory.ops_policy, master=MASTER, admission=admission)
    return h


def _inserted(h: Harness):
    """The owner's card enrolled and inserted on one channel; returns that channel."""
    owner, _, _ = h.connect()
    keys = h.enrol(owner)
    result, _ = result_of(h.run(card_ops.insert(owner, SERIAL, "pw", MUK, SECRET, MASTER, keys=keys)))
    assert result.status is Status.OK and h.store.get(SERIAL).state is State.IN_USE
    return owner


# ---------------------------------------------------------------- 1. authenticated channels per card


def test_an_owner_cannot_hold_unbounded_authenticated_channels_of_one_card(tmp_path):
    """
    Rule (docs/admin.md §9a, docs/protocol.md §9.3): what a connection may
    hold is bounded — unauthenticated ones by ``max_unauthenticated`` (fitted
    to the open-file limit, so that strangers "can never take every
    descriptor"), authenticated ones by the cards that exist: a card uses one
    channel at a time (vsc.card.storage reconnects and ATTACHes when its
    channel drops).

    Before the fix: a channel that ATTACHed (or passed any operation) leaves
    the unauthenticated count and is counted nowhere else, with 1 MiB frames
    and a 600 s idle timer that every ECHO_REQUEST restarts. So the owner of
    one in-use card (or anyone holding its insert secret) opens connection
    after connection, ATTACHes each with the insert secret (no history row,
    no store write), and holds them all: here 12 channels of one card stay
    open, without limit, until the server's descriptors are gone and accept()
    fails for every other owner. Now at most ``max_channels_per_card``
    authenticated channels of a serial stay open: the oldest is closed when
    another authenticates for it (so the card's own reconnection always gets
    in), and the newest keeps working.
    """
    h = _harness(tmp_path, handshake_burst=100)
    owner = _inserted(h)
    cap = h.factory.admission.limits.max_channels_per_card
    extra = []
    for _ in range(12):
        client, server, _ = h.connect()
        assert result_of(h.run(card_ops.attach(client, SERIAL, SECRET))).status is Status.OK
        extra.append((client, server))
    h.settle()
    open_channels = [c for c, s in [(owner, None)] + extra if not c.channel.closed]
    assert len(open_channels) <= cap, f"{len(open_channels)} authenticated channels of one card held open"
    # the newest channel is the card's: it keeps working
    newest, _ = extra[-1]
    assert result_of(h.run(card_ops.sync(newest, SERIAL, SECRET, 1, b"PROTECTED-2"))).version == 2
    # and a closed channel's place is given back: no protocol is left registered for the serial
    h.clock.advance(0)
    held = h.factory.authenticated.get(SERIAL, {})
    assert len(held) <= cap and all(not p.channel.closed for p in held.values())
