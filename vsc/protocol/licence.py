"""
Licence keyfiles as pure functions ([0044]-[0045], [0064]-[0065], claim 8):
verifying a keyfile with the vendor's key, its limits against a given time,
the card counter a rental run costs, the proof of possession, and what the
CARD checks before it funds a rental counter. No I/O, no clock, no
randomness: the caller passes the time and the nonce (vsc.licensing.lcp for
protected programs and ``vsc run``, vsc.card.session for the card). The
keyfile format is vsc.wire.license.

Counter names. A run of a rental keyfile costs units of a card counter whose
name is qualified by the vendor key (the first 12 hex digits of the SHA-256
of the vendor public key's DER), so a keyfile signed with another key (the
user's own, say) can never fund or drain the real vendor's counter:

* one per rental grant: ``lic:PRODUCT:<first 16 hex of the licence id>:<vendor tag>``
* a counter the keyfile names (``--counter lic:NAME``): ``lic:NAME:<vendor tag>``

Only ``lic:`` counters are funded or charged (the card never lets the user
increase them), and only names a card can hold (counter_problem): issue
signs no other keyfile, and the card and the API use none.
"""

from __future__ import annotations

from vsc import crypto
from vsc.wire import WireError
from vsc.wire.license import License, armor, challenge, decode_body, dearmor, encode_body
from vsc.wire.protected import MAX_ITEM_NAME

LICENCE_PREFIX = "lic:"  # the card only funds, and never lets the user increase, counters named so


class LicenseError(Exception):
    """The licence does not allow this run (message is user-facing, one line)."""


def loads(text: str, vendor_public_pem: bytes, name: str = "keyfile") -> License:
    """The licence in a keyfile's text, once the vendor's signature over it verified."""
    try:
        body, signature = dearmor(text)
    except WireError as e:
        raise LicenseError(f"{name}: {e.message}") from None
    try:
        good = crypto.vendor_verify(vendor_public_pem, body, signature)
    except (crypto.CryptoError, ValueError) as e:
        raise LicenseError(f"the vendor public key is not usable: {e}") from None
    if not good:
        raise LicenseError(f"{name}: the vendor's signature does not verify (forged or altered keyfile)")
    try:
        return decode_body(body)
    except WireError as e:
        raise LicenseError(f"{name}: {e.message}") from None


def check_limits(lic: License, now: float, feature: str | None = None, product: str | None = None) -> None:
    """LicenseError unless the licence is for ``product``, unexpired at ``now`` and includes ``feature``."""
    if product is not None and lic.product != product:
        raise LicenseError(f"the keyfile is for {lic.product!r}, not {product!r}")
    if lic.expires and now >= lic.expires:
        raise LicenseError(f"the licence for {lic.product} expired")
    if feature is not None and feature not in lic.features:
        raise LicenseError(f"the licence for {lic.product} does not include the feature {feature!r}")


def is_rental(lic: License) -> bool:
    """Does each run cost units of a card counter?"""
    return bool(lic.runs or lic.counter)


def vendor_tag(vendor_public_pem: bytes) -> str:
    """The vendor key's 12 hex digits that qualify every counter name (see the module docstring)."""
    return crypto.sha256(crypto.vendor_public_der(vendor_public_pem)).hex()[:12]


VENDOR_TAG_HEX = 12


def _unqualified_counter(lic: License) -> str:
    return lic.counter or f"{LICENCE_PREFIX}{lic.product}:{lic.license_id.hex()[:16]}"


def counter_name(lic: License, vendor_public_pem: bytes) -> str:
    """The card counter a run costs: the keyfile's own, or one per rental grant, qualified by the vendor key."""
    return f"{_unqualified_counter(lic)}:{vendor_tag(vendor_public_pem)}"


def counter_problem(lic: License) -> str:
    """
    Why this rental keyfile must not fund or charge its counter, or "" when
    it may (or it has no counter): a run costs nothing, the counter is not a
    ``lic:`` one (the user could increase it), or its name is longer than a
    card's item names.
    """
    if not is_rental(lic):
        return ""
    if lic.cost < 1:  # a step of 0 is a read: every run would be free
        return f"a run must cost at least 1 unit, not {lic.cost}"
    if lic.counter and not lic.counter.startswith(LICENCE_PREFIX):
        return (f"its counter {lic.counter!r} must start with {LICENCE_PREFIX!r} (the user could increase any other "
                "counter)")
    base = _unqualified_counter(lic)
    size = len(base.encode("utf-8")) + 1 + VENDOR_TAG_HEX
    if size <= MAX_ITEM_NAME:
        return ""
    what = "--counter" if lic.counter else "the product name"
    return (f"the rental counter {base}:<vendor tag> would have {size} bytes; a card holds names of at most "
            f"{MAX_ITEM_NAME} (shorten {what} by {size - MAX_ITEM_NAME})")


def proof_challenge(lic: License, nonce: bytes) -> bytes:
    """What the card signs to prove it holds the key the keyfile names (``nonce``: 32 fresh random bytes)."""
    return challenge(lic.product, lic.license_id, nonce)


def verify_proof(lic: License, nonce: bytes, signature: bytes) -> bool:
    """Does ``signature`` over the challenge verify with the card key named in the keyfile?"""
    try:
        return crypto.verify_sha256(lic.card_key, proof_challenge(lic, nonce), signature)
    except ValueError:  # a card key the crypto library cannot load: nothing verifies with it
        return False


def no_runs_left(lic: License, reason: str, name: str = "") -> LicenseError | None:
    """The user-facing error for a counter refusal that means "the rental is used up", else None."""
    if "below zero" in reason or "no counter" in reason:
        return LicenseError(f"no runs left on the licence for {lic.product}" + (f" (counter {name})" if name else ""))
    return None


def fund_request(keyfile_text: str, vendor_public_pem: bytes, card_public_keys: dict[str, bytes]) -> tuple[str, int]:
    """
    What the CARD checks before it creates a rental counter: the keyfile's
    vendor signature, that it names one of this card's own keys, and that it
    is a rental; the counter's name and funding come from the signed keyfile,
    never from the caller. Returns (counter name, units): 0 units for a
    keyfile that draws on a shared counter (``--counter`` without runs),
    which funds nothing.
    """
    lic = loads(keyfile_text, vendor_public_pem)
    if counter_problem(lic):
        raise LicenseError(f"the keyfile for {lic.product} cannot be used: {counter_problem(lic)}")
    if card_public_keys.get(lic.slot) != lic.card_key:
        raise LicenseError(f"the keyfile for {lic.product} was not issued to this card's slot {lic.slot}")
    if not is_rental(lic):
        raise LicenseError(f"the keyfile for {lic.product} grants no runs")
    return counter_name(lic, vendor_public_pem), lic.runs


def vendor_binding(vendor_public_pem: bytes) -> bytes:
    """
    What a card records on a licence counter it funds, and compares on every
    later fund request: the vendor's whole public key (DER). The 48-bit tag in
    the counter's name keeps two vendors' names apart; this keeps a key ground
    to collide with a vendor's tag from funding that vendor's counters.
    """
    return crypto.vendor_public_der(vendor_public_pem)


def issue(vendor_private_pem: bytes, lic: License) -> str:
    """
    The vendor's keyfile generator: sign and armor. ValueError for a licence
    that does not encode, or whose rental counter no card could hold.
    """
    try:
        body = encode_body(lic)
    except WireError as e:
        raise ValueError(e.message) from None
    if counter_problem(lic):
        raise ValueError(counter_problem(lic))
    return armor(body, crypto.vendor_sign(vendor_private_pem, body))
