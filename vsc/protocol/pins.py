"""
The card's secrets that a holder types: PINs, PUKs, admin PINs, reset codes
— one record format (vsc.wire.apdu.SecretRecord: the value, tries left,
the retry limit) in the protected information, and one way to check them
that every application on the card shares.

``USER_PIN`` is THE card's user PIN: one value and one retry counter for
every application and every path (the PIV PIN is the same secret as any
other application's user PIN), so a PIN blocked on one path is blocked on
all of them.

Anti-hammering: every try with a value is STORED (synced to the storage)
before it is answered: exactly one store per try, whatever its result, of a
record of the same length — the counter decremented after a mismatch, back
at its maximum after a match. Nothing about the comparison leaves the card
before that store has succeeded: no answer, no notice, no second store
whose presence would tell a match from a mismatch (an attacker who cuts
the link or kills the process when a store starts learns nothing, and a
mismatch is never uncounted). A store that fails answers 6581 and the
session undoes the change in memory, so cutting the network gives no free
guesses either. (The classic smart-card rule is "decrement, store, then
compare": it exists because a chip's power trace shows the comparison
before the answer. Here the comparison is constant-time and in-process and
the one observable step is the store, so store-then-answer holds the same
line with one sync per correct VERIFY instead of two.)

The PIN policy (vsc.wire.pinpolicy, an item of the protected information
chosen at enrolment) says for each key slot whether its key needs the PIN
never, once or always; ``authorize`` is the one decision every path takes
before a private-key operation (the PIV applet over PC/SC, the local API
and ``vsc card``, the ssh-agent): a blocked PIN refuses every slot that
needs the PIN, whatever the path and whatever was verified before.
"""

from __future__ import annotations

from typing import Any, Generator

import attrs

from vsc import crypto
from vsc.protocol.applet import SW_BLOCKED, SW_MEMORY_FAILURE, Effect, EffectFailed, Load, Notice, Store
from vsc.wire import apdu
from vsc.wire.apdu import SecretRecord
from vsc.wire.pinpolicy import DEFAULT as DEFAULT_POLICY
from vsc.wire.pinpolicy import LEGACY as LEGACY_POLICY
from vsc.wire.pinpolicy import POLICY_ITEM, LocalVerify, PinPolicy, Policy, decode_policy
from vsc.wire.protected import ItemKind

__all__ = ["USER_PIN", "PUK", "DEFAULT_TRIES", "DEFAULT_PIN", "DEFAULT_PUK", "load_secret", "store_secret",
           "check_secret", "load_policy", "authorize", "verify_pin", "change_secret", "unblock_pin", "Policy",
           "PinPolicy", "LocalVerify", "DEFAULT_POLICY", "LEGACY_POLICY", "POLICY_ITEM"]

USER_PIN = "piv-pin"
PUK = "piv-puk"
#: the OpenPGP application's admin PIN (PW3); its PW1 is USER_PIN and its resetting code is PUK
OPENPGP_PW3 = "pgp-pw3"
DEFAULT_TRIES = 3
DEFAULT_PIN = b"123456"  # the PIV defaults, before the owner set their own (vsc card enroll sets them)
DEFAULT_PUK = b"12345678"
_DEFAULTS = {USER_PIN: DEFAULT_PIN, PUK: DEFAULT_PUK}

#: authorize's answers besides SW_OK: the PIN is needed (6982) or blocked (6983)
SW_OK = 0x9000
SW_PIN_NEEDED = 0x6982


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
    with secret ``name`` and store the try's result before anything is
    answered: one store every time, of the same length (the counter back at
    its maximum after a match, decremented after a mismatch). Returns the
    record (a match) or the status word to answer: 63Cx (x tries left) or
    6983 (blocked). ``label`` names it in the notices ("pin", "puk", ...).
    A failed store raises EffectFailed (6581) whatever the comparison said.
    """
    rec = yield from load_secret(name, default)
    if rec.tries_left == 0:
        return SW_BLOCKED
    match = crypto.constant_time_equal(bytes(value), rec.value)
    left = rec.max_tries if match else rec.tries_left - 1
    yield from store_secret(name, attrs.evolve(rec, tries_left=left))
    if match:
        return rec
    yield Notice(f"wrong-{label}", {"tries_left": left})
    if left == 0:
        yield Notice(f"{label}-blocked", {})
    return 0x63C0 | min(left, 15)


def policy_of(raw) -> Policy:
    """The PIN policy of a stored policy item (empty: LEGACY); a Load's ``derive``, kept while the item is unchanged."""
    return decode_policy(raw) if len(raw) else LEGACY_POLICY


def tries_of(raw) -> int | None:
    """A PIN record's tries left, from its header alone (empty: None); a Load's ``derive``: the PIN is not read."""
    return apdu.secret_tries(raw) if len(raw) else None


def load_policy() -> Generator[Effect, Any, Policy]:
    """The card's PIN policy (a card enrolled before policies existed: LEGACY, what its PIV application did)."""
    policy = yield Load(ItemKind.PIN, POLICY_ITEM, derive=policy_of)
    return LEGACY_POLICY if policy is None else policy


def authorize(slot: int, verified: bool, fresh: bool) -> Generator[Effect, Any, tuple[int, PinPolicy]]:
    """
    May slot ``slot``'s key be used now? ``verified``: the path's PIN
    verification is open (PIV: VERIFY since the last reset or SELECT; local:
    verify-pin or the insert, vsc.card.pin); ``fresh``: a verification made
    for this one operation (PIV: a VERIFY not yet consumed; local: the PIN
    given with the request). Returns (SW_OK, policy), (6982: the PIN is
    needed, policy) or (6983: the PIN is blocked, policy). Checked against
    the stored record every time: a PIN blocked on any path blocks here too.
    """
    policy = (yield from load_policy()).of(slot)
    if policy is PinPolicy.NEVER:
        return SW_OK, policy
    tries = yield Load(ItemKind.PIN, USER_PIN, derive=tries_of)
    if tries == 0:
        return SW_BLOCKED, policy
    if policy is PinPolicy.ALWAYS:
        return (SW_OK if fresh else SW_PIN_NEEDED), policy
    return (SW_OK if verified or fresh else SW_PIN_NEEDED), policy


def _block(value: bytes) -> bytes | None:
    """A PIN as typed -> the stored form (FF-padded 8 bytes); None when it cannot be one."""
    if not 1 <= len(value) <= 8 or b"\xff" in value:
        return None
    return apdu.pad_pin(bytes(value))


def verify_pin(value: bytes) -> Generator[Effect, Any, int]:
    """Check the user PIN as typed (the local paths): SW_OK, 63Cx or 6983 — the same counter as PC/SC's VERIFY."""
    block = _block(value)
    if block is None:
        block = b"\x00" * 8  # never matches (a stored PIN is FF-padded) but counts as a wrong try
    result = yield from check_secret(USER_PIN, block, apdu.pad_pin(DEFAULT_PIN), "pin")
    return result if isinstance(result, int) else SW_OK


def change_secret(name: str, old: bytes, new: bytes) -> Generator[Effect, Any, int]:
    """Change the PIN or the PUK (``name``) given the current value: SW_OK, 63Cx, 6983, or 6A80 for a bad new value."""
    new_block = _block(new)
    if new_block is None or len(new) < 6:
        return 0x6A80
    old_block = _block(old) or b"\x00" * 8
    label = "pin" if name == USER_PIN else "puk"
    result = yield from check_secret(name, old_block, apdu.pad_pin(_DEFAULTS[name]), label)
    if isinstance(result, int):
        return result
    yield from store_secret(name, SecretRecord(new_block, result.max_tries, result.max_tries))
    yield Notice(f"{label}-changed", {})
    return SW_OK


def unblock_pin(puk: bytes, new: bytes) -> Generator[Effect, Any, int]:
    """RESET RETRY COUNTER: the PUK sets a new PIN with its tries restored: SW_OK, 63Cx, 6983 or 6A80."""
    new_block = _block(new)
    if new_block is None or len(new) < 6:
        return 0x6A80
    result = yield from check_secret(PUK, _block(puk) or b"\x00" * 8, apdu.pad_pin(DEFAULT_PUK), "puk")
    if isinstance(result, int):
        return result
    pin = yield from load_secret(USER_PIN, apdu.pad_pin(DEFAULT_PIN))
    yield from store_secret(USER_PIN, SecretRecord(new_block, pin.max_tries, pin.max_tries))
    yield Notice("pin-unblocked", {})
    return SW_OK
