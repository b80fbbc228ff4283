"""
One PIN on the card's local paths (issue 12): vsc.card.pin over a real
CardSession (its memory a real CardMemory from a sealed envelope, its
storage in memory), the control socket's ControlProtocol and the
ssh-agent's CardAgent, with the PIN policy as enrolment stores it
(vsc.wire.pinpolicy). Deterministic: no sockets, no clock.
"""

from __future__ import annotations

import pytest
from twisted.internet.testing import StringTransport

from tests.cardfakes import MemoryStorage, done, in_use_session, leave_use, release
from vsc import crypto
from vsc.card import control as daemon
from vsc.card import sshagent
from vsc.card.config import CardConfig
from vsc.card.pin import local_pin
from vsc.card.protected import PlainItem, seal_envelope
from vsc.card.session import CardError, LifeState
from vsc.protocol import pins
from vsc.wire import ampbox, apdu, pinpolicy
from vsc.wire import control as wc
from vsc.wire import sshagent as w
from vsc.wire.protected import ItemKind, KeyAlg

SERIAL = "pin-1"
PIN, PUK = b"246810", b"13579111"
KINDS = {"9a": crypto.KEY_RSA2048, "9c": crypto.KEY_P256, "9d": crypto.KEY_RSA2048, "9e": crypto.KEY_P256}


def _rand(n: int) -> bytes:
    return crypto.system_random(n)


@pytest.fixture(scope="module")
def keys() -> dict:
    return {slot: crypto.generate_private_der(kind) for slot, kind in KINDS.items()}


def _session(tmp_path, keys, policy: str | None, local: str | None = None):
    items = [PlainItem(ItemKind.KEY, slot, der, KeyAlg.RSA2048 if KINDS[slot] == crypto.KEY_RSA2048 else KeyAlg.P256,
                       crypto.public_der_of(der)) for slot, der in keys.items()]
    items.append(PlainItem(ItemKind.PIN, pins.USER_PIN, apdu.encode_secret(apdu.SecretRecord(apdu.pad_pin(PIN), 3, 3))))
    items.append(PlainItem(ItemKind.PIN, pins.PUK, apdu.encode_secret(apdu.SecretRecord(apdu.pad_pin(PUK), 3, 3))))
    if policy is not None:
        items.append(PlainItem(ItemKind.PIN, pinpolicy.POLICY_ITEM,
                               pinpolicy.encode_policy(pinpolicy.parse_text(policy, pinpolicy.DEFAULT, local))))
    key = _rand(32)
    storage = MemoryStorage(SERIAL, seal_envelope(SERIAL, key, items, _rand), key, _rand)
    cfg = CardConfig(home=tmp_path, server="tcp:127.0.0.1:1", server_key="SHA256:unused", serial=SERIAL)
    return in_use_session(cfg, storage, _rand)


@pytest.fixture
def make(tmp_path, keys):
    made = []

    def make_session(policy: str | None = "", local: str | None = None):
        s = _session(tmp_path / f"h{len(made)}", keys, policy, local)
        made.append(s)
        return s

    yield make_session
    for s in made:
        release(s)


class Control:
    """One control connection: requests encoded by the client's schema, answered by the daemon's ControlProtocol."""

    def __init__(self, session):
        self.proto = daemon.ControlProtocol(session)
        self.transport = StringTransport()
        self.proto.makeConnection(self.transport)
        self.ask = 0

    def call(self, command, **args):
        self.ask += 1
        self.transport.clear()
        self.proto.dataReceived(ampbox.encode_box(wc.request(command, self.ask, args)))
        box, _used = ampbox.decode_box(self.transport.value())
        return wc.answer(command, self.ask, box)

    def sign(self, slot: str):
        return self.call(wc.SIGN_DIGEST, slot=slot, digest=bytes(32))


def _refused(fn, match: str):
    with pytest.raises(wc.Refused, match=match):
        fn()


def _tries(session) -> int:
    return local_pin(session).tries_left()


def test_default_policy_with_insert_verification(make):
    """YubiKey's defaults, local=insert: 9A/9D/9E sign after the insert alone; 9C (always) needs the PIN with the request, once."""
    c = Control(make(""))
    for slot in ("9a", "9d", "9e"):
        assert c.sign(slot)["signature"]
    _refused(lambda: c.sign("9c"), "slot 9c needs the PIN with every use")
    c.call(wc.VERIFY_PIN, pin=PIN, keep=False)
    assert c.sign("9c")["signature"]
    _refused(lambda: c.sign("9c"), "needs the PIN with every use")  # the verification was used up


def test_local_pin_mode_needs_verify_pin_until_remove(make):
    """local=pin: 9A is refused until VerifyPin(keep) opens the local verification; ForgetPin closes it; 9E (never) always signs."""
    session = make("9a=once", "pin")
    c = Control(session)
    assert c.sign("9e")["signature"]
    _refused(lambda: c.sign("9a"), "run vsc card verify-pin first")
    c.call(wc.VERIFY_PIN, pin=PIN, keep=True)
    assert c.sign("9a")["signature"] and Control(session).sign("9a")["signature"]  # every connection, until remove
    c.call(wc.FORGET_PIN)
    _refused(lambda: c.sign("9a"), "verify-pin")


def test_one_request_verification_stays_on_its_connection(make):
    """A VerifyPin(keep=False) counts for the next key operation on its own connection, not another's."""
    session = make("9a=always")
    mine, other = Control(session), Control(session)
    mine.call(wc.VERIFY_PIN, pin=PIN, keep=False)
    _refused(lambda: other.sign("9a"), "every use")
    assert mine.sign("9a")["signature"]


def test_wrong_pins_count_against_the_one_counter_and_block_every_path(make, keys):
    """Three wrong PINs locally block the PIN (the stored record at 0); then 9A is refused on the control socket and the agent, 9E still signs."""
    session = make("")
    c = Control(session)
    for left in (2, 1):
        _refused(lambda: c.call(wc.VERIFY_PIN, pin=b"000000", keep=True), f"wrong PIN \\({left} tries left\\)")
    _refused(lambda: c.call(wc.VERIFY_PIN, pin=b"0", keep=True), "wrong PIN \\(0 tries left\\)")
    assert _tries(session) == 0
    assert apdu.decode_secret(_stored_pin(session)).tries_left == 0  # synced to the storage before the answer
    _refused(lambda: c.sign("9a"), "the PIN is blocked")
    _refused(lambda: c.call(wc.VERIFY_PIN, pin=PIN, keep=True), "the PIN is blocked")
    assert c.sign("9e")["signature"]
    agent = sshagent.CardAgent(session)
    blob = next(k.key_blob for k in agent.keys() if k.slot == "9a")
    answer = done(agent.answer(w.encode_request(w.SignRequest(blob, b"data", w.SignFlags.RSA_SHA2_256))[4:]))
    assert isinstance(answer, w.Failure)


def test_the_pin_check_before_each_key_operation_does_not_open_the_pin(make, monkeypatch):
    """authorize reads the policy and the PIN record's tries left through Load(derive=...): decrypted once and
    kept while the items are unchanged (the PIN itself is not copied per operation); a wrong PIN stores a new
    record, so the next check sees the new count at once and a blocked PIN refuses."""
    from vsc.card.protected import CardMemory

    session = make("")
    c = Control(session)
    opened = []
    real_open = CardMemory._open

    def counting(self, held):
        opened.append(held.name)
        return real_open(self, held)

    monkeypatch.setattr(CardMemory, "_open", counting)
    assert c.sign("9a")["signature"]
    opened.clear()
    for _ in range(3):
        assert c.sign("9a")["signature"]
    assert opened == ["9a"] * 3  # the key, per operation; neither the PIN record nor the policy again
    for _ in range(3):
        _refused(lambda: c.call(wc.VERIFY_PIN, pin=b"000000", keep=True), "wrong PIN")
    _refused(lambda: c.sign("9a"), "the PIN is blocked")


def test_sign_digest_is_answered_at_once_when_free_and_after_the_holder_when_busy(make):
    """The local API's SignDigest is answered in the turn it arrives when no operation holds the card (no
    coroutine: the answer is written before dataReceived returns); while another operation holds the card it
    waits for it and is answered once the lock is released, with the same PIN checks."""
    session = make("")
    c = Control(session)
    assert c.sign("9a")["signature"]  # answered synchronously: Control.call reads the answer right away
    held = done(session._oplock.acquire())
    assert session.busy
    c.transport.clear()
    c.ask += 1
    c.proto.dataReceived(ampbox.encode_box(wc.request(wc.SIGN_DIGEST, c.ask, {"slot": "9a", "digest": bytes(32)})))
    assert c.transport.value() == b""  # waits for the holder
    held.release()
    box, _used = ampbox.decode_box(c.transport.value())
    assert wc.answer(wc.SIGN_DIGEST, c.ask, box)["signature"] and not session.busy
    _refused(lambda: c.sign("9c"), "needs the PIN with every use")  # the fast path keeps the policy


def _stored_pin(session) -> bytes:
    from vsc.card.protected import CardMemory

    mem = CardMemory.load(SERIAL, session.storage.envelope, session.storage.protection_key, _rand)
    try:
        with mem.open(ItemKind.PIN, pins.USER_PIN) as v:
            return bytes(v)
    finally:
        mem.wipe()


def test_unblock_and_change(make):
    """UnblockPin with the PUK sets a new PIN with 3 tries; ChangePin needs the current PIN; a short new PIN is refused."""
    session = make("9a=always")
    c = Control(session)
    for _ in range(3):
        with pytest.raises(wc.Refused):
            c.call(wc.VERIFY_PIN, pin=b"999999", keep=False)
    _refused(lambda: c.call(wc.UNBLOCK_PIN, puk=b"00000000", new=b"111111"), "wrong PUK \\(2 tries left\\)")
    c.call(wc.UNBLOCK_PIN, puk=PUK, new=b"111111")
    assert _tries(session) == 3
    _refused(lambda: c.call(wc.CHANGE_PIN, which="pin", old=b"111111", new=b"12"), "6 to 8 characters")
    c.call(wc.CHANGE_PIN, which="pin", old=b"111111", new=b"22222222")
    c.call(wc.VERIFY_PIN, pin=b"22222222", keep=False)
    assert c.sign("9a")["signature"]


def test_the_agent_obeys_the_policy(make):
    """The agent signs with a slot of policy once after the insert (local=insert), refuses always slots, and with local=pin waits for verify-pin."""
    agent = sshagent.CardAgent(make("9a=once,9c=always"))

    def sign(a, slot):
        key = next(k for k in a.keys() if k.slot == slot)
        flags = w.SignFlags.RSA_SHA2_256 if key.alg is KeyAlg.RSA2048 else 0
        return done(a.answer(w.encode_request(w.SignRequest(key.key_blob, b"data", flags))[4:]))

    assert isinstance(sign(agent, "9a"), w.SignResponse)
    assert isinstance(sign(agent, "9c"), w.Failure)
    assert local_pin(agent.session).status()["pin_refusal"].startswith("ssh-agent: slot 9c needs the PIN")
    session = make("9a=once", "pin")
    strict = sshagent.CardAgent(session)
    assert isinstance(sign(strict, "9a"), w.Failure)
    done(local_pin(session).verify(PIN))
    assert isinstance(sign(strict, "9a"), w.SignResponse)


def test_verification_ends_with_remove(make):
    """The local verification belongs to one insert: after remove the card refuses, and status shows no PIN state."""
    session = make("9a=once", "pin")
    done(local_pin(session).verify(PIN))
    assert local_pin(session).verified()
    leave_use(session, LifeState.IDLE)
    assert not local_pin(session).verified() and local_pin(session).status() == {}
    with pytest.raises(CardError):
        done(local_pin(session).authorize("9a"))


def test_status_shows_the_policy_and_the_pin_state(make):
    """Status carries the policy text, the local mode, the tries left and whether the local verification is open."""
    c = Control(make("9e=always", "pin"))
    status = wc.status_of(c.call(wc.STATUS))
    assert status["pin_policy"] == "9a=once,9c=always,9d=once,9e=always"
    assert (status["pin_local"], status["pin_tries"], status["pin_verified"]) == ("pin", 3, False)
    with pytest.raises(wc.Refused):
        c.call(wc.VERIFY_PIN, pin=b"000000", keep=True)
    c2 = wc.status_of(c.call(wc.STATUS))
    assert c2["pin_tries"] == 2 and not c2["pin_verified"]


def test_a_card_without_a_policy_keeps_the_piv_rule(make):
    """A card enrolled before policies existed: 9A/9C/9D once (the insert counts), 9E never — and a blocked PIN still refuses."""
    session = make(None)
    c = Control(session)
    for slot in ("9a", "9c", "9d", "9e"):
        assert c.sign(slot)["signature"]
    assert wc.status_of(c.call(wc.STATUS))["pin_policy"] == "9a=once,9c=once,9d=once,9e=never"


def test_policy_text_parsing():
    """--pin-policy text: slots over the defaults; a bad slot or policy is one line naming what is wrong."""
    p = pinpolicy.parse_text("9A=never, 9e=ALWAYS", local="pin")
    assert p.text() == "9a=never,9c=always,9d=once,9e=always" and p.local is pinpolicy.LocalVerify.PIN
    assert pinpolicy.decode_policy(pinpolicy.encode_policy(p)) == p
    for bad, words in (("9b=once", "slot of 9a"), ("9a=sometimes", "never, once, always"), ("9a", "SLOT=POLICY")):
        with pytest.raises(ValueError, match=words):
            pinpolicy.parse_text(bad)
    with pytest.raises(ValueError, match="--local-pin"):
        pinpolicy.parse_text("", local="tty")
