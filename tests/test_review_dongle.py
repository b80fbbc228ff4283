"""
Rules of the card on a PKCS#11 token (dongle mode, claim 10: vsc.dongle,
vsc.cli.dongle) that an adversarial review found broken, each with how it
was broken; they hold since the fix.

The token tests use SoftHSM2 through the lab of tests/test_dongle.py (a
token directory of their own, python-pkcs11 in a short subprocess); they
skip like those tests when SoftHSM2 or python-pkcs11 is missing.
"""

from __future__ import annotations

import pytest


# ================================================================ 1. the token PIN stays out of card.ini


@pytest.mark.parametrize("uri", [
    "pkcs11:token=t?module-path=/m.so&pin-value=7391",  # RFC 7512's own form: pin-value= is a query attribute
    "pkcs11:pin-value=7391;token=t;module-path=/m.so",  # pin-value= first
    "pkcs11:token=t;module-path=/m.so;pin-value=7391",
    "pkcs11:token=t;pin-value=7391?module-path=/m.so",
])
def test_enroll_and_replace_strip_the_token_pin_of_every_uri_form_before_card_ini(uri):
    """
    `vsc dongle enroll` and `replace --home` write the token URI to card.ini
    ("no secrets here") without its pin-value= (docs/dongle.md), so the
    token PIN does not end up in a settings file, its backups and copies.

    Broken: the PIN was stripped only from `;`-separated attributes after the
    first one. TokenRef.parse takes pin-value= also as the first attribute
    and in RFC 7512's query form (`?...&pin-value=`, which the docs accept),
    and those forms went to card.ini with the PIN in them.
    """
    from vsc.cli.dongle import _strip_pin
    from vsc.dongle.token import TokenError, TokenRef

    stripped = _strip_pin(uri)
    assert "7391" not in stripped and "pin-value" not in stripped, stripped
    ref = TokenRef.parse(stripped, "1")  # the same token and module, the PIN from elsewhere
    assert (ref.module, ref.token_label, ref.pin) == ("/m.so", "t", "1")
    with pytest.raises(TokenError, match="no token PIN"):
        TokenRef.parse(stripped)
    plain = "pkcs11:token=t;module-path=/m.so"
    assert _strip_pin(plain) == plain  # a URI without a PIN is written as given
