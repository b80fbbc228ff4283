"""
The retired key-management slots 82-95 of the PIV application (NIST SP
800-73-4 part 1 3.3.2 and table 4b: "Retired Key Management Key" 1-20, key
references 82-95, certificates 5FC10D-5FC120; a YubiKey 5 has all twenty:
Yubico's "PIV certificate slots" page, yubikit.piv.SLOT.RETIRED1-20) on the
applet (tests.test_piv's FakeCard) and on the card's local paths (a real
CardSession, tests.test_pin_local's builders): a key in a retired slot is a
first-class slot wherever a 9A-9E key is.
"""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from tests.cardfakes import MemoryStorage, in_use_session, release
from tests.test_piv import EC_KEY, PIN, RSA_KEY, FakeCard, _pkcs1_block, _self_signed
from tests.test_review_fidelity import SealingCard, _import_data, _yubikit_slot_metadata
from vsc import crypto
from vsc.card import sshagent
from vsc.card.config import CardConfig
from vsc.card.protected import PlainItem, seal_envelope
from vsc.protocol import pins, piv
from vsc.wire import apdu, pinpolicy, tlv
from vsc.wire.protected import ItemKind, KeyAlg


@pytest.fixture
def card() -> FakeCard:
    c = SealingCard()  # copies a stored key at once, as the glue seals it (the applet zeroes its copy after)
    assert c.select()[1] == 0x9000
    return c


def _generate(card: FakeCard, slot: int, alg: int, policy: int | None = None) -> tuple[bytes, int]:
    template = tlv.encode(0x80, bytes([alg])) + (tlv.encode(0xAA, bytes([policy])) if policy is not None else b"")
    return card.get_all(0x47, 0x00, slot, tlv.encode(0xAC, template))


# ---------------------------------------------------------------- the applet


def test_every_retired_slot_has_its_certificate_object():
    """SP 800-73-4 part 1 table 3: retired key 1 (82) keeps its certificate in 5FC10D ... retired key 20 (95) in 5FC120."""
    assert [piv.SLOTS[ref] for ref in range(0x82, 0x96)] == list(range(0x5FC10D, 0x5FC121))
    assert piv.CERT_SLOT[0x5FC10D] == 0x82 and piv.CERT_SLOT[0x5FC120] == 0x95
    assert 0x96 not in piv.SLOTS and 0x81 not in piv.SLOTS and 0xF9 not in piv.SLOTS


def test_generate_in_82_then_sign_with_the_default_policy_once(card):
    """
    GENERATE ``00 47 00 82`` (behind the management key, as for 9A-9E; yubico-piv-tool -a generate -s 82) makes a
    P-256 key; GET METADATA (yubikit get_slot_metadata) reports it generated, PIN policy once (a YubiKey's default
    for the retired slots: yubikit's PIN_POLICY.DEFAULT is ONCE for every slot but 9C and 9E), touch never; GENERAL
    AUTHENTICATE with 82 needs a VERIFY first (6982), then signs a hash the returned public key verifies.
    """
    assert _generate(card, 0x82, 0x11)[1] == 0x6982  # no management key: nothing generated
    assert (ItemKind.KEY, "82") not in card.items
    card.mgmt_auth()
    body, sw = _generate(card, 0x82, 0x11)
    assert sw == 0x9000
    point = tlv.to_dict(tlv.decode_one(body, 0x7F49))[0x86]
    spki = card.items[(ItemKind.KEY, "82")][2]
    assert crypto.public_numbers(spki)["ec"] == point
    meta, sw = card.get_all(0xF7, 0x00, 0x82)
    assert sw == 0x9000 and _yubikit_slot_metadata(meta) == (0x11, 0x02, 0x01, True, spki)
    digest = bytes(range(32))
    assert card.general_authenticate(0x11, 0x82, 0x81, digest)[1] == 0x6982
    assert card.verify(PIN) == 0x9000
    sig, sw = card.general_authenticate(0x11, 0x82, 0x81, digest)
    assert sw == 0x9000
    key = serialization.load_der_public_key(spki)
    key.verify(sig, digest, ec.ECDSA(Prehashed(hashes.SHA256())))


def test_generate_rsa_in_95_with_a_pin_policy_and_decipher(card):
    """
    ``yubico-piv-tool -a generate -s 95 -A RSA2048 --pin-policy=always`` (template AA 03): the policy is stored for
    slot 95 alone (the card's policy item, ``95=always`` in its text; every other slot unchanged), GET METADATA says
    so, and the key deciphers (the raw RSA operation of GENERAL AUTHENTICATE, as 9D) right after a VERIFY only.
    """
    card.mgmt_auth()
    body, sw = _generate(card, 0x95, 0x07, policy=0x03)
    assert sw == 0x9000
    policy = pinpolicy.decode_policy(card.items[(ItemKind.PIN, pinpolicy.POLICY_ITEM)][0])
    assert policy.of(0x95) is pinpolicy.PinPolicy.ALWAYS and policy.of(0x82) is pinpolicy.PinPolicy.ONCE
    assert policy.text().endswith(",95=always")
    meta, _ = card.get_all(0xF7, 0x00, 0x95)
    assert _yubikit_slot_metadata(meta)[:4] == (0x07, 0x03, 0x01, True)
    pub = serialization.load_der_public_key(card.items[(ItemKind.KEY, "95")][2])
    secret = b"retired key management"
    enc = pub.encrypt(secret, padding.PKCS1v15())
    assert card.verify(PIN) == 0x9000
    block, sw = card.general_authenticate(0x07, 0x95, 0x81, enc)
    assert sw == 0x9000 and block.endswith(b"\x00" + secret) and block[:2] == b"\x00\x02"
    assert card.general_authenticate(0x07, 0x95, 0x81, enc)[1] == 0x6982  # always: the VERIFY was used up


def test_import_into_a_retired_slot_and_ecdh(card):
    """
    IMPORT ASYMMETRIC KEY (YubiKey INS FE, ``ykman piv keys import 90``; yubico-piv-tool -a import-key -s 90) into
    90 with PIN policy never: origin imported in GET METADATA (yubikit: generated False); ECDH (GENERAL
    AUTHENTICATE with 85, yubikit's calculate_secret, what a retired key-management key is for) without a PIN.
    """
    card.mgmt_auth()
    assert card.send(0xFE, 0x11, 0x90, _import_data(EC_KEY) + tlv.encode(0xAA, b"\x01")) == (b"", 0x9000)
    meta, _ = card.get_all(0xF7, 0x00, 0x90)
    spki = EC_KEY.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert _yubikit_slot_metadata(meta) == (0x11, 0x01, 0x01, False, spki)
    peer = ec.generate_private_key(ec.SECP256R1())
    point = peer.public_key().public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    card.applet.reset()
    assert card.select()[1] == 0x9000  # no VERIFY, no management key: policy never
    shared, sw = card.general_authenticate(0x11, 0x90, 0x85, point)
    assert sw == 0x9000 and shared == peer.exchange(ec.ECDH(), EC_KEY.public_key())
    # RSA into 83 too (the CRT parts yubikit sends)
    card.mgmt_auth()
    assert card.send(0xFE, 0x07, 0x83, _import_data(RSA_KEY)) == (b"", 0x9000)
    assert card.verify(PIN) == 0x9000
    digest = bytes(32)
    sig, sw = card.general_authenticate(0x07, 0x83, 0x81, _pkcs1_block(digest))
    assert sw == 0x9000
    RSA_KEY.public_key().verify(sig, digest, padding.PKCS1v15(), Prehashed(hashes.SHA256()))


def test_retired_certificate_objects_put_and_get(card):
    """
    PUT DATA 5FC10D (behind the management key, as every certificate; yubico-piv-tool -a import-certificate -s 82)
    stores slot 82's certificate; GET DATA 5FC10D answers it in the PIV certificate object (70, 71 00, FE); an
    object never written (5FC120) is 6A82; without the management key PUT DATA is 6982.
    """
    cert = _self_signed("9c")
    obj = tlv.encode(0x53, tlv.encode_many([(0x70, cert), (0x71, b"\x00"), (0xFE, b"")]))
    put = tlv.encode(0x5C, tlv.tag_bytes(0x5FC10D)) + obj
    assert card.send(0xDB, 0x3F, 0xFF, put)[1] == 0x6982
    card.mgmt_auth()
    assert card.send(0xDB, 0x3F, 0xFF, put) == (b"", 0x9000)
    assert card.items[(ItemKind.CERT, "82")][0] == cert
    assert card.get_data(0x5FC10D) == (piv.PivApplet.certificate_object(cert), 0x9000)
    assert card.get_data(0x5FC120) == (b"", 0x6A82)


def test_references_beyond_the_retired_range_stay_refused(card):
    """
    81 (the PUK), 96 and F9 are no key slots for GENERATE, IMPORT and GENERAL AUTHENTICATE (6A88: SP 800-73-4
    part 2 3.3.2 "reference data not found"); an empty retired slot is 6A88 for GET METADATA (yubikit's
    test_delete_key) and GENERAL AUTHENTICATE.
    """
    card.mgmt_auth()
    for ref in (0x81, 0x96, 0xF9):
        assert _generate(card, ref, 0x11)[1] == 0x6A88, hex(ref)
        assert card.send(0xFE, 0x11, ref, _import_data(EC_KEY))[1] == 0x6A88, hex(ref)
    assert card.verify(PIN) == 0x9000
    assert card.general_authenticate(0x11, 0x84, 0x81, bytes(32))[1] == 0x6A88
    assert card.send(0xF7, 0x00, 0x84) == (b"", 0x6A88)


# ---------------------------------------------------------------- the PIN policy item


def test_policy_text_and_item_carry_retired_slots():
    """
    ``--pin-policy 82=never,95=always`` is accepted (a YubiKey takes a PIN policy for every key slot); 96 is not a
    slot; the stored item round-trips a policy for all 24 slots; the text shows the four main slots always and a
    retired slot once a policy was chosen for it (the status line of a card without retired keys is unchanged).
    """
    p = pinpolicy.parse_text("82=never,95=always")
    assert p.of(0x82) is pinpolicy.PinPolicy.NEVER and p.of(0x95) is pinpolicy.PinPolicy.ALWAYS
    assert p.of(0x90) is pinpolicy.PinPolicy.ONCE
    assert p.text() == "9a=once,9c=always,9d=once,9e=never,82=never,95=always"
    assert pinpolicy.DEFAULT.text() == "9a=once,9c=always,9d=once,9e=never"
    with pytest.raises(ValueError, match="82-95"):
        pinpolicy.parse_text("96=once")
    full = pinpolicy.Policy({ref: pinpolicy.PinPolicy.ALWAYS for ref in pinpolicy.KEY_SLOTS})
    assert pinpolicy.decode_policy(pinpolicy.encode_policy(full)) == full


# ---------------------------------------------------------------- the local paths (a real CardSession)

KINDS = {"9a": crypto.KEY_RSA2048, "9e": crypto.KEY_P256, "82": crypto.KEY_P256, "95": crypto.KEY_RSA2048,
         "f9": crypto.KEY_P256}


@pytest.fixture(scope="module")
def keys() -> dict:
    return {slot: crypto.generate_private_der(kind) for slot, kind in KINDS.items()}


@pytest.fixture
def session(tmp_path, keys):
    items = [PlainItem(ItemKind.KEY, slot, der, KeyAlg.RSA2048 if KINDS[slot] == crypto.KEY_RSA2048 else KeyAlg.P256,
                       crypto.public_der_of(der)) for slot, der in keys.items()]
    items.append(PlainItem(ItemKind.PIN, pins.USER_PIN,
                           apdu.encode_secret(apdu.SecretRecord(apdu.pad_pin(b"246810"), 3, 3))))
    items.append(PlainItem(ItemKind.PIN, pinpolicy.POLICY_ITEM,
                           pinpolicy.encode_policy(pinpolicy.parse_text("95=always"))))
    key = crypto.system_random(32)
    storage = MemoryStorage("retired-1", seal_envelope("retired-1", key, items, crypto.system_random), key,
                            crypto.system_random)
    cfg = CardConfig(home=tmp_path, server="tcp:127.0.0.1:1", server_key="SHA256:unused", serial="retired-1")
    s = in_use_session(cfg, storage, crypto.system_random)
    yield s
    release(s)


def test_local_api_signs_with_a_retired_slot_under_its_policy(session):
    """
    The local API (vsc card sign --slot 82) takes a retired slot like 9a: 82 (policy once; the insert counts by
    default) signs, 95 (always) is refused without the PIN, and f9 (a key that is no PIV key slot: the attestation
    key) has no PIN policy here, so it is refused (a local program must not sign with it).
    """
    from tests.test_pin_local import Control, _refused

    c = Control(session)
    sig = c.sign("82")["signature"]
    pub = serialization.load_der_public_key(crypto.public_der_of(session_key(session, "82")))
    pub.verify(sig, bytes(32), ec.ECDSA(Prehashed(hashes.SHA256())))
    _refused(lambda: c.sign("95"), "slot 95 needs the PIN with every use")
    _refused(lambda: c.sign("f9"), "no key in slot f9")


def session_key(session, slot: str) -> bytes:
    with session.memory.open(ItemKind.KEY, slot) as der:
        return bytes(der)


def test_ssh_agent_lists_retired_keys_after_the_main_slots(session):
    """
    The card's ssh-agent offers every PIV key slot's key, the retired ones included, in slot order (9a, 9c, 9d, 9e,
    then 82..95: ssh tries keys in the order the agent lists them, so a retired key never goes before 9a); a key that
    is no PIV key slot (f9, the attestation key) is not offered. ``--ssh-agent-slots 82`` is a valid choice.
    """
    agent = sshagent.CardAgent(session)
    assert [k.slot for k in agent.keys()] == ["9a", "9e", "82", "95"]
    assert sshagent.parse_slots("82,9a") == ("82", "9a")
    with pytest.raises(ValueError):
        sshagent.parse_slots("f9")
    assert [k.slot for k in sshagent.CardAgent(session, ("82",)).keys()] == ["82"]


def test_cli_slot_choices_take_the_retired_slots():
    """vsc card sign/cert/ssh-pubkey --slot: the four main slots then 82..95 (and nothing else)."""
    from vsc.cli import card as cli_card

    assert cli_card.SLOTS == ("9a", "9c", "9d", "9e", *(f"{r:02x}" for r in range(0x82, 0x96)))
