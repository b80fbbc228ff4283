"""
Answers of the card's PIV and OpenPGP applications (vsc.protocol.piv,
vsc.protocol.openpgp) that an adversarial review found to differ from a
YubiKey 5's in a way a tool (ykman/yubikit, yubico-piv-tool, the Yubico
minidriver, GnuPG) detects or mis-handles, each with the source for the
YubiKey's answer and how vsc answered; they hold since the fix.
"""

from __future__ import annotations

import pytest

from tests.test_piv import FakeCard, _put_data
from vsc.wire import tlv


@pytest.fixture
def card() -> FakeCard:
    c = FakeCard()
    assert c.select()[1] == 0x9000
    return c


# ================================================================ 1. YubiKey's own data objects


@pytest.mark.parametrize("tag", [0x5FFF00, 0x5FFF01, 0x5FFF10, 0x5FFF11, 0x5FFF15])
def test_put_data_stores_the_yubikey_vendor_objects(card, tag):
    """
    A YubiKey stores and returns its vendor data objects with PUT DATA /
    GET DATA like the PIV ones: ADMIN DATA 5FFF00 (ykman's and the .NET
    SDK's PIN-protected management key: "53 { 80 { 81 01 flags } }",
    Yubico.NET.SDK docs/users-manual/application-piv/pin-only.md), the
    attestation certificate 5FFF01, MSCMAP 5FFF10 and MSROOTS 5FFF11-15
    (the Yubico minidriver, yubico-piv-tool's YKPIV_OBJ_ADMIN_DATA ...
    YKPIV_OBJ_MSROOTS5 in lib/internal.h). vsc's valid_object_tag took
    only 5FC101-5FC123, 7F61 and 7E: PUT DATA answered 6A80, so
    ``ykman piv access change-management-key --protect`` and
    ``yubico-piv-tool -a write-object --id 0x5fff10`` failed after the
    management key was authenticated.
    """
    card.mgmt_auth()
    content = tlv.encode(0x80, tlv.encode(0x81, b"\x02"))
    assert card.get_data(tag) == (b"", 0x6A82)  # absent: 6A82, as on a YubiKey
    assert card.send(0xDB, 0x3F, 0xFF, _put_data(card, tag, content)) == (b"", 0x9000)
    assert card.get_data(tag) == (tlv.encode(0x53, content), 0x9000)
