"""
The card's PC/SC path as a hostile local program (or a hostile vpcd peer)
sees it: vsc.card.vpcd (the vpcd link and the glue that performs the
applets' effects), vsc.protocol.router and the applets' command front
(vsc.protocol.applet) across SELECTs, resets, power cycles and reconnections.
Each test states the rule, how an adversarial review found it broken, and
what holds since the fix.
"""

from __future__ import annotations

import pytest
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from tests.test_openpgp import AID6, PW1
from tests.test_piv import PIN, Drbg, VpcdTransport, _exchange, session, vpcd_payloads  # noqa: F401 - session is a fixture
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
    they had already synced stays (the try's retry counter), their volatile
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


# ================================================================ 2. a refused SELECT changes nothing


def _both_with_pins():
    """PIV and OpenPGP behind the router (tests/test_openpgp's FakeCard)."""
    from tests.test_openpgp import FakeCard

    return FakeCard()


OTHER_PGP_AID = bytes.fromhex("d2760001240103040000deadbeef0000")  # a full OpenPGP AID, another card's serial


@pytest.mark.parametrize("select, current", [
    (apdu.command(0, 0xA4, 0x04, 0x00, OTHER_PGP_AID), "piv"),  # no such application on this card: 6A82
    (apdu.command(0, 0xA4, 0x04, 0x04, AID6), "piv"),  # the OpenPGP application, a P2 it refuses: 6A86
    (apdu.command(0x80, 0xA4, 0x04, 0x00, AID6), "piv"),  # the OpenPGP application, a class it refuses: 6E00
    (apdu.command(0, 0xA4, 0x04, 0x04, piv.PIV_AID), "openpgp"),
    (apdu.command(0x80, 0xA4, 0x04, 0x00, piv.PIV_AID), "openpgp"),
], ids=["other-openpgp-aid", "openpgp-p2", "openpgp-cla", "piv-p2", "piv-cla"])
def test_a_refused_select_keeps_the_current_application_and_its_status(select, current):
    """
    Rule (vsc.protocol.router docstring; ISO/IEC 7816-4 7.1.1): a SELECT of an
    AID no carried application has is answered 6A82 and changes nothing; a
    SELECT that fails leaves the current application selected, with its
    security status.

    Broken: the router switched to (and reset the status of) whichever
    application's AID test matched before that application had looked at
    the command. A SELECT of a 16-byte OpenPGP AID with another card's
    serial (the router's test takes any OpenPGP AID, the application only
    its own) was answered 6A82, yet PIV was deselected — its PIN status gone
    — and the card then answered 6D00 to every PIV command: any local PC/SC
    program (or a middleware probing AIDs) could knock the owner's session
    off its application while being told nothing changed. The same with a
    SELECT the application refused for its P2 (6A86) or class (6E00).

    Now: the router switches only when the named application accepts the
    SELECT (9000, 61xx, or OpenPGP's 6285); otherwise nothing changes.
    """
    c = _both_with_pins()
    if current == "piv":
        assert c.send(0xA4, 0x04, 0x00, piv.PIV_AID)[1] == 0x9000
        assert c.send(0x20, 0x00, 0x80, apdu.pad_pin(PIN))[1] == 0x9000
        status = apdu.command(0, 0x20, 0x00, 0x80)
    else:
        assert c.select() == 0x9000
        assert c.verify(0x82, PW1) == 0x9000
        status = apdu.command(0, 0x20, 0x00, 0x82)
    assert c.raw(status)[1] == 0x9000
    assert c.raw(select)[1] != 0x9000
    assert c.raw(status)[1] == 0x9000, "the current application lost its selection or its PIN status"


# ================================================================ 3. a vpcd peer that floods the card


GET_CHUID = apdu.command(0, 0xCB, 0x3F, 0xFF, bytes.fromhex("5c035fc102"), 256)


def _linked(session):
    proto = vpcd.VpcdFactory(vpcd.PivCard(session, Drbg(b"flood"))).buildProtocol(None)
    transport = VpcdTransport()
    proto.makeConnection(transport)
    return proto, transport


def test_the_card_stops_reading_while_an_apdu_waits(session):
    """
    Rule (VpcdProtocol: messages are answered strictly in order, one at a
    time): while an APDU waits on an effect (a sync to the server, a busy
    key), what the peer sends next waits in the peer's socket, not in the
    card process.

    Broken: every further frame became an entry in a DeferredLock's waiting
    list (a Deferred and the payload), with the connection still read: a
    peer on the vpcd link (anyone local, in listen mode; whoever holds port
    35963 before pcscd) sent one VERIFY while the server was slow, then an
    endless stream of APDUs, and the card process grew until it was killed —
    the owner's card gone from every path (PC/SC, ssh-agent, local API).

    Now: the card stops reading from the link while an APDU is in flight
    (what one read already brought is kept, in order) and reads again once
    it is answered; vpcd itself never sends a second APDU before the answer,
    so nothing changes for it.
    """
    held = _hold_stores(session.storage)
    proto, transport = _linked(session)
    _exchange(proto, transport, SELECT_PIV)
    flood = apdu.encode_vpcd(apdu.command(0, 0x20, 0, 0x80, apdu.pad_pin(PIN))) + apdu.encode_vpcd(GET_CHUID) * 500
    transport.clear()
    proto.dataReceived(flood)
    assert transport.value() == b"" and len(held) == 1
    assert transport.producerState == "paused", "the card kept reading while an APDU waited"
    while held:
        held.pop(0).callback(None)
    answers = vpcd_payloads(transport.value())
    assert len(answers) == 501 and answers[0] == b"\x90\x00" and answers[1] == answers[-1]
    assert apdu.parse_response(answers[1])[1] == 0x9000
    assert transport.producerState == "producing"


def test_a_peer_that_does_not_read_its_answers_stops_the_card_reading(session):
    """
    Rule: a peer that never reads what the card answers cannot make the card
    buffer answers without bound (Twisted's producer/consumer flow control,
    twisted.internet.interfaces.IPushProducer).

    Broken: VpcdProtocol answered every frame that arrived and never
    registered as the transport's producer, so when the peer stopped reading
    the answers piled up in the transport's write buffer: each 17-byte GET
    DATA of the CHUID (or a 12 KB certificate, or 1 KiB of GET CHALLENGE
    with an extended Le) queued its whole answer, and a peer writing without
    reading grew the card process without limit.

    Now: the protocol is the transport's streaming producer; when the write
    buffer is full (the transport calls pauseProducing) the card stops
    reading and stops answering what it already read, and goes on when the
    buffer drained (resumeProducing), in order.
    """
    proto, transport = _linked(session)
    _exchange(proto, transport, SELECT_PIV)
    assert transport.producer is proto and transport.streaming
    transport.clear()
    transport.producer.pauseProducing()  # what a TCP transport does once its write buffer is full
    proto.dataReceived(apdu.encode_vpcd(GET_CHUID) * 300)
    assert transport.value() == b"" and transport.producerState == "paused"
    transport.producer.resumeProducing()  # the peer read: the buffer drained
    answers = vpcd_payloads(transport.value())
    assert len(answers) == 300 and len(set(answers)) == 1 and apdu.parse_response(answers[0])[1] == 0x9000
    assert transport.producerState == "producing"


# ================================================================ 4. an extended Le and the vpcd link's frame


def test_an_extended_le_answer_fits_the_vpcd_link():
    """
    Rule (vsc.wire.apdu, the vpcd link; docs/anchors: "every message both
    ways is a 2-byte big-endian length, then the payload (max 0xFFFF)"): every
    response APDU must fit one vpcd message.

    Broken: an extended Le of 0000 (65536) let ResponseBuffer answer up to
    65536 data bytes plus the status word in one response APDU, 65538 bytes,
    which encode_vpcd refuses: VpcdProtocol failed the message and dropped
    the connection, and the card left PC/SC. A certificate the owner put
    through the local API (CertPut carries up to 64 KiB) did it for every
    client that read its object with an extended Le of 0000.

    Now: one response carries at most 0xFFFF - 2 data bytes; the rest comes
    in 61xx / GET RESPONSE parts, extended Le or not.
    """
    from tests.test_piv import FakeCard
    from vsc.wire.protected import ItemKind, KeyAlg

    c = FakeCard()
    assert c.select()[1] == 0x9000
    cert = bytes(range(256)) * 255 + b"\x01" * 250  # 65530 bytes: the object is 65530 + 13
    c.items[(ItemKind.CERT, "9a")] = (cert, KeyAlg.NONE, b"")
    raw = apdu.command(0, 0xCB, 0x3F, 0xFF, bytes.fromhex("5c035fc105"), 65536, extended=True)
    response = piv.run_sync(c.applet.process(raw), c.perform)
    apdu.encode_vpcd(response)  # raised WireError: a frame of more than 0xFFFF bytes
    body, sw = apdu.parse_response(response)
    while sw >> 8 == 0x61:
        more = piv.run_sync(c.applet.process(apdu.command(0, 0xC0, 0, 0, le=65536, extended=True)), c.perform)
        apdu.encode_vpcd(more)
        part, sw = apdu.parse_response(more)
        body += part
    assert sw == 0x9000 and body == piv.PivApplet.certificate_object(cert)
