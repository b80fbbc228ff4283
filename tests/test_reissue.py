"""
Issue 13, deterministically: the server re-issues a keyfile with an insert to
a card that must pass ``keyfile`` but holds no material for it (impl_auth
gained keyfile after it enrolled; a duplicate, whose keyfile named the old
serial), the store records it, ``duplicate`` marks the copy, and ``revoke``
deletes a pending code. The end-to-end versions (real processes) are in
tests/test_operator.py.
"""

from __future__ import annotations

import json

import pytest

from tests.test_implauth import (
    KEYS,
    MUK,
    PINNED,
    SERIAL,
    Rand,
    card_answers,
    challenge_of,
    machine,
    record,
    registrar,
    registration,
)
from tests.test_store import CHANNEL, CODE, MUK_A, SESSION_A, VERIFIER, clock, enrol, h, store  # noqa: F401 - fixtures
from vsc.card import ops as card_ops
from vsc.protocol import implauth
from vsc.protocol.cardstore import CheckOut, RecoverCard
from vsc.protocol.server_ops import CancelDeadline, OpsPolicy
from vsc.server.store import StoreError
from vsc.wire.implauth import EnrolReply, KeyfileBody, SignedKeyfile
from vsc.wire.ops import AuthMethod, Op, Status

POLICY = OpsPolicy(impl_auth=(AuthMethod.MASTER_KEY, AuthMethod.KEYFILE))


def no_keyfile_record():
    """A card enrolled under impl_auth = master-key: a registration, no keyfile material."""
    return record({"methods": ["password", "master-key"], "registration": registration().hex()})


def test_a_card_without_keyfile_material_is_not_challenged_with_it_and_is_issued_one_at_insert():
    """Policy master-key,keyfile; the card has no keyfile: the challenge is password + Master key, the check-out carries the re-issue."""
    m = machine(policy=POLICY)
    ch = challenge_of(m, no_keyfile_record())
    assert [i.method for i in ch.challenges] == [AuthMethod.PASSWORD, AuthMethod.MASTER_KEY]
    effects = m.message(card_answers(ch, card_ops.Credentials(server_key=PINNED)))
    assert effects[0] == CancelDeadline() and isinstance(effects[1], CheckOut)
    out = effects[1]
    assert out.reissue == (AuthMethod.KEYFILE,) and out.registration == registration()
    assert out.registered_as == SERIAL


def test_a_card_with_keyfile_material_is_challenged_with_it_and_nothing_is_reissued():
    """The enrolled keyfile card (material stored) gets the keyfile challenge and a plain check-out."""
    m = machine(policy=POLICY)
    ch = challenge_of(m, record())
    assert AuthMethod.KEYFILE in [i.method for i in ch.challenges]


def test_recover_of_a_card_without_material_skips_the_method_but_issues_nothing():
    """Recover authenticates with the card's other methods and carries no material (only an insert does)."""
    m = machine(policy=POLICY)
    ch = challenge_of(m, no_keyfile_record(), op=Op.RECOVER)
    assert [i.method for i in ch.challenges] == [AuthMethod.PASSWORD, AuthMethod.MASTER_KEY]
    effects = m.message(card_answers(ch, card_ops.Credentials(server_key=PINNED)))
    assert isinstance(effects[1], RecoverCard)


def test_a_card_without_a_registration_keeps_failing_the_method():
    """No registration (no seal key to seal a keyfile to): keyfile stays required and nothing is due."""
    m = machine(policy=POLICY)
    ch = challenge_of(m, record({"methods": ["password", "master-key"]}))
    assert AuthMethod.KEYFILE in [i.method for i in ch.challenges]


def test_a_registration_without_a_seal_key_keeps_the_keyfile_challenge():
    """A registration with no seal key (not what vsc's card sends) gets no grace: keyfile stays required."""
    from vsc.wire.implauth import Registration

    m = machine(policy=POLICY)
    bare = Registration(card_key=b"CARD-9E-KEY", seal_key=b"").encode().hex()
    ch = challenge_of(m, record({"methods": ["password", "master-key"], "registration": bare}))
    assert AuthMethod.KEYFILE in [i.method for i in ch.challenges]


def test_a_keyfile_for_a_copy_names_the_new_serial_and_opens_with_the_original_seal_key():
    """Registrar.enrol(sealed_as=original): the keyfile body names the copy's serial; it unseals with the original serial's key."""
    material = registrar().enrol("copy-1", registration(), [AuthMethod.KEYFILE], sealed_as=SERIAL)
    sealed = EnrolReply.decode(material.reply).keyfile
    signed = SignedKeyfile.decode(implauth.unseal_keyfile(sealed, SERIAL, KEYS.protection_key))
    assert KeyfileBody.decode(signed.body).serial == "copy-1"
    with pytest.raises(implauth.KeyfileError):
        implauth.unseal_keyfile(sealed, "copy-1", KEYS.protection_key)
    resealed = implauth.seal_keyfile(implauth.unseal_keyfile(sealed, SERIAL, KEYS.protection_key), "copy-1",
                                     implauth.seal_public(KEYS.protection_key, "copy-1"), Rand(b"reseal"))
    body = implauth.open_keyfile(resealed, "copy-1", KEYS.protection_key, PINNED)
    assert body.as1.hex() == material.auth_info["keyfile"]["as1"]


def _enrolled(store, serial, **kw):  # noqa: F811
    store.issue(serial, h(CODE), '{"methods": ["password"]}', ttl=600)
    assert enrol(store, serial, **kw) is Status.OK


def _info(store, serial):
    return json.loads(store.get(serial).auth_info)


def test_the_store_keeps_reissued_material_with_a_history_row(store):  # noqa: F811
    """A check-out with auth_extra stores the material, lists the method, and writes 'reissue ok'."""
    _enrolled(store, "card-1", registration=b"REG")
    extra = {"keyfile": {"as1": "00" * 32, "issued": 1}}
    out = store.check_out(CheckOut("card-1", MUK_A, SESSION_A, CHANNEL, "p", VERIFIER, reissue=(AuthMethod.KEYFILE,),
                                   auth_extra=extra))
    assert out.status is Status.OK
    info = _info(store, "card-1")
    assert info["keyfile"] == extra["keyfile"] and "keyfile" in info["methods"]
    last = store.history("card-1")[-1]
    assert (last.op, last.result, last.detail) == ("reissue", "ok", "keyfile issued with this insert")


def test_duplicate_drops_the_keyfile_material_and_remembers_the_registered_serial(store):  # noqa: F811
    """The copy of a keyfile card has no as1 (its keyfile is re-issued) and registered_as names the original."""
    _enrolled(store, "card-1", registration=b"REG", extra={"keyfile": {"as1": "11" * 32, "issued": 1}})
    store.duplicate("card-1", "card-2")
    copy, original = _info(store, "card-2"), _info(store, "card-1")
    assert "keyfile" not in copy and copy["registered_as"] == "card-1" and "keyfile" in copy["methods"]
    assert "keyfile" in original
    assert "a keyfile for this serial is issued at its first insert" in store.history("card-2")[-1].detail


def test_revoke_deletes_the_code_with_a_history_row_and_refuses_an_enrolled_card(store):  # noqa: F811
    """revoke: the code is gone (enrolment() is None), history 'revoke ok'; an enrolled card or no code is a StoreError."""
    store.issue("card-9", b"H" * 32, "{}", 600)
    expires = store.revoke("card-9")
    assert expires == pytest.approx(store.now() + 600) and store.enrolment("card-9") is None
    assert [(e.op, e.result) for e in store.history("card-9")] == [("issue", "ok"), ("revoke", "ok")]
    with pytest.raises(StoreError, match="no enrolment code for card-9"):
        store.revoke("card-9")
    _enrolled(store, "card-1")
    with pytest.raises(StoreError, match="there is no code to revoke"):
        store.revoke("card-1")
