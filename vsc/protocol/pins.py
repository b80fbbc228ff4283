"""
The card's secrets that a holder types: PINs, PUKs, admin PINs, reset codes
— one record format (vsc.wire.apdu.SecretRecord: the value, tries left,
the retry limit) in the protected information, and one way to check them
that every application on the card shares.

``USER_PIN`` is THE card's user PIN: one value and one retry counter for
every application and every path (the PIV PIN is the same secret as any
other application's user PIN), so a PIN blocked on one path is blocked on
all of them.

Anti-hammering: the counter is decremented and STORED (synced to the
storage) before the comparison; only a match stores it back at its maximum.
A store that fails answers 6581 without having compared anything, so
cutting the network gives an attacker no free guesses.
"""

from __future__ import annotations

from typing import Any, Generator

import attrs

from vsc import crypto
from vsc.protocol.applet import SW_BLOCKED, SW_MEMORY_FAILURE, Effect, EffectFailed, Load, Notice, Store
from vsc.wire import apdu
from vsc.wire.apdu import SecretRecord
from vsc.wire.protected import ItemKind

USER_PIN = "piv-pin"
PUK = "piv-puk"
#: the OpenPGP application's admin PIN (PW3) and reset code (RC); its PW1 is USER_PIN itself
OPENPGP_PW3 = "pgp-pw3"
OPENPGP_RC = "pgp-rc"
DEFAULT_TRIES = 3


def load_secret(name: str, default: bytes) -> Generator[Effect, Any, SecretRecord]:
    """The record of secret ``name``, or the default (``default`` as stored, DEFAULT_TRIES) before it was set."""
    raw = yield Load(ItemKind.PIN, name)
    if not raw:
        return SecretRecord(default, DEFAULT_TRIES, DEFAULT_TRIES)
    return apdu.decode_secret(raw)


def store_secret(name: str, rec: SecretRecord) -> Generator[Effect, Any, None]:
    """Store the record (synced before the caller answers); a failed store is 6581."""
    try:
        yield Store(ItemKind.PIN, name, apdu.encode_secret(rec))
    except EffectFailed as e:
        raise EffectFailed(str(e), SW_MEMORY_FAILURE) from None


def check_secret(name: str, value: bytes, default: bytes, label: str) -> Generator[Effect, Any, SecretRecord | int]:
    """
    Compare ``value`` (as stored: the PIV form is an FF-padded 8-byte block)
    with secret ``name``, the counter decremented and stored first. Returns
    the record (a match; the counter stored back at its maximum) or the
    status word to answer: 63Cx (x tries left) or 6983 (blocked).
    ``label`` names it in the notices ("pin", "puk", ...).
    """
    rec = yield from load_secret(name, default)
    if rec.tries_left == 0:
        return SW_BLOCKED
    left = rec.tries_left - 1
    yield from store_secret(name, attrs.evolve(rec, tries_left=left))
    if crypto.constant_time_equal(bytes(value), rec.value):
        if left != rec.max_tries:
            yield from store_secret(name, attrs.evolve(rec, tries_left=rec.max_tries))
        return rec
    yield Notice(f"wrong-{label}", {"tries_left": left})
    if left == 0:
        yield Notice(f"{label}-blocked", {})
    return 0x63C0 | min(left, 15)
