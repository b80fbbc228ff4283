"""
PC/SC is reachable by any local program, so every sequence below is one an
unprivileged local attacker can send. An adversarial review found both
working before the fix: OpenPGP's PW3 (public on a new card, and again after
a factory reset that anyone can start) reset the card's PIN, which is the
PIV PIN. Now only the PUK resets it (vsc.protocol.openpgp ``_rc``).
"""

from __future__ import annotations

from vsc import crypto
from vsc.protocol import pins, piv
from vsc.wire import apdu, tlv
from vsc.wire.protected import ItemKind, KeyAlg

from tests.test_openpgp import FIXED, PW3, FakeCard

OWNER_PIN = b"24681357"  # the PIN the holder chose at enrolment (not a default)
OWNER_PUK = b"97531864"
ATTACKER_PIN = b"666666"


def _enrolled_card() -> FakeCard:
    """A card as `vsc card enroll` leaves it: PIV PIN and PUK set by the holder, a P-256 key in 9A; PW3 untouched."""
    c = FakeCard()
    c.items[(ItemKind.PIN, pins.USER_PIN)] = (
        apdu.encode_secret(apdu.SecretRecord(apdu.pad_pin(OWNER_PIN), 3, 3)), KeyAlg.NONE, b"")
    c.items[(ItemKind.PIN, pins.PUK)] = (
        apdu.encode_secret(apdu.SecretRecord(apdu.pad_pin(OWNER_PUK), 3, 3)), KeyAlg.NONE, b"")
    der = FIXED[KeyAlg.P256]
    c.items[(ItemKind.KEY, "9a")] = (der, KeyAlg.P256, crypto.public_der_of(der))
    return c


def _piv_sign_9a(c: FakeCard, pin: bytes) -> int:
    """SELECT PIV, VERIFY ``pin``, GENERAL AUTHENTICATE 9A (ECDSA over a 32-byte hash): the last status word."""
    assert c.send(0xA4, 0x04, 0x00, piv.PIV_AID)[1] == 0x9000
    c.send(0x20, 0x00, 0x80, apdu.pad_pin(pin))
    body = tlv.encode(0x7C, tlv.encode_many([(0x82, b""), (0x81, b"\x11" * 32)]))
    return c.send(0x87, 0x11, 0x9A, body, le=256)[1]


def test_default_admin_pin_resets_the_piv_pin():
    """OpenPGP PW3 (default 12345678, never set by enrolment) must not be a second, publicly known PUK for the
    card's PIV PIN: RESET RETRY COUNTER P1=02 with the default PW3 must not let a local program that knows
    neither the PIN nor the PUK choose a new PIV PIN and then use the PIV 9A key."""
    c = _enrolled_card()
    c.send(0xA4, 0x04, 0x00, bytes.fromhex("d27600012401"))
    c.send(0x20, 0x00, 0x83, PW3)                        # the documented default admin PIN
    c.send(0x2C, 0x02, 0x81, ATTACKER_PIN)               # RESET RETRY COUNTER with PW3: new PW1 = the PIV PIN
    assert apdu.decode_secret(c.items[(ItemKind.PIN, pins.USER_PIN)][0]).value == apdu.pad_pin(OWNER_PIN)
    assert _piv_sign_9a(c, ATTACKER_PIN) != 0x9000


def test_factory_reset_then_default_admin_pin_resets_the_piv_pin():
    """Even when the holder changed PW3: anyone can block PW3 (3 wrong tries), TERMINATE DF + ACTIVATE FILE
    bring PW3 back to 12345678, and RESET RETRY COUNTER P1=02 then sets the card's user PIN = the PIV PIN.
    docs/openpgp.md ("Factory reset") promises the opposite: "a reset that anyone can start by blocking the
    admin PIN must not hand out a default PIN for the PIV keys". The PIV 9A key must stay out of reach."""
    c = _enrolled_card()
    c.send(0xA4, 0x04, 0x00, bytes.fromhex("d27600012401"))
    assert c.send(0x20, 0x00, 0x83, PW3)[1] == 0x9000
    assert c.send(0x24, 0x00, 0x83, PW3 + b"owner-admin-secret")[1] == 0x9000  # the holder changed PW3
    c.router.reset()                                     # later: a new PC/SC session of the attacker
    c.send(0xA4, 0x04, 0x00, bytes.fromhex("d27600012401"))
    for _ in range(3):
        c.send(0x20, 0x00, 0x83, b"wrong-admin-pin")     # block PW3: no secret needed
    c.send(0xE6, 0x00, 0x00)                             # TERMINATE DF (allowed: PW3 blocked)
    c.send(0x44, 0x00, 0x00)                             # ACTIVATE FILE: every pgp- item gone, PW3 = 12345678
    c.send(0xA4, 0x04, 0x00, bytes.fromhex("d27600012401"))
    c.send(0x20, 0x00, 0x83, PW3)
    c.send(0x2C, 0x02, 0x81, ATTACKER_PIN)
    assert apdu.decode_secret(c.items[(ItemKind.PIN, pins.USER_PIN)][0]).value == apdu.pad_pin(OWNER_PIN)
    assert _piv_sign_9a(c, ATTACKER_PIN) != 0x9000
