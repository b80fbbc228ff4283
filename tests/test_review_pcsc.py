"""
The card's PC/SC path as a hostile local program (or a hostile vpcd peer)
sees it: vsc.card.vpcd (the vpcd link and the glue that performs the
applets' effects), vsc.protocol.router and the applets' command front
(vsc.protocol.applet) across SELECTs, resets, power cycles and reconnections.
Each test states the rule, how an adversarial review found it broken, and
what holds since the fix.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from tests.test_piv import PIN, Drbg, VpcdTransport, _exchange, session  # noqa: F401 - session is a fixture
from vsc.card import vpcd
from vsc.protocol import piv
from vsc.wire import apdu

SELECT_PIV = apdu.command(0, 0xA4, 4, 0, piv.PIV_AID[:9], 256)
PIN_STATUS = apdu.command(0, 0x20, 0, 0x80)


def _hold_stores(storage) -> list[Deferred]:
    """Make the storage's syncs wait until the test fires them (a slow server); the Deferreds, in order."""
    held: list[Deferred] = []
    real = storage.store

    async def store(envelope: bytes) -> None:
        d: Deferred = Deferred()
        held.append(d)
        await d
        await real(envelope)

    storage.store = store
    return held


# ================================================================ 1. a command that outlives a reset


def test_a_verify_pending_across_a_reconnection_does_not_verify_the_next_session(session):
    """
    Rule (vsc.protocol.piv, module docstring; SP 800-73-4 3.1; tests/test_piv
    test_verify_reset_select_and_power_clear_the_pin): power off, reset and a
    new vpcd connection ("a freshly inserted card", VpcdProtocol.connectionMade)
    clear the PIN status.

    Broken: an APDU whose effect waits (VERIFY syncs its retry counter to the
    server before it compares) kept running on the applet after the card was
    reset under it. vpcd's connection dropped (pcscd restarted) while a
    VERIFY with the right PIN waited for the server; the card reconnected,
    was reset, and a new PC/SC client selected PIV and saw 63C2; then the old
    VERIFY finished and set the PIN verified — on the new client's session,
    which could now sign with 9A without knowing the PIN.

    Now: a reset ends the commands still in flight (PivCard.reset); whatever
    they had already synced stays (the decremented counter), their volatile
    effects never land, and the new session stays unverified.
    """
    held = _hold_stores(session.storage)
    card = vpcd.PivCard(session, Drbg(b"race"))
    factory = vpcd.VpcdFactory(card)
    old, t1 = factory.buildProtocol(None), VpcdTransport()
    old.makeConnection(t1)
    assert _exchange(old, t1, SELECT_PIV)[0][-2:] == b"\x90\x00"
    assert _exchange(old, t1, apdu.command(0, 0x20, 0, 0x80, apdu.pad_pin(PIN))) == []  # waits on the sync
    assert len(held) == 1
    old.connectionLost(Failure(ConnectionError("pcscd restarted")))

    new, t2 = factory.buildProtocol(None), VpcdTransport()
    new.makeConnection(t2)
    answers = _exchange(new, t2, SELECT_PIV, PIN_STATUS)
    assert answers[1][:1] == b"\x63"  # not verified

    while held:
        held.pop(0).callback(None)  # the server answers the old VERIFY's syncs at last
    assert _exchange(new, t2, PIN_STATUS)[0][:1] == b"\x63"
    assert not card.applet.pin_verified
