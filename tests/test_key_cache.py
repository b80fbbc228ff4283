"""
The key-cache policy of CardSession.with_key (issue 15): off by default
(decrypt-on-use: the key is opened for each operation), and for the slots
card.ini's ``key_cache`` names, the key is opened once and kept (locked
buffer + OpenSSL) until the slot's key changes or the card is removed.
"""

from __future__ import annotations

from vsc import crypto
from vsc.card.config import CardConfig
from vsc.card.protected import CardMemory
from vsc.card.session import CardSession, parse_key_cache
from vsc.wire.protected import ItemKind, KeyAlg
from tests.cardfakes import done as _done
from tests.test_card_units import ec_der, world  # noqa: F401 - fixtures

DIGEST = crypto.sha256(b"key cache")


def _count_opens(monkeypatch) -> list:
    """Record every CardMemory.open of a key."""
    opened: list = []
    real = CardMemory.open

    def counting(self, kind, name):
        if kind is ItemKind.KEY:
            opened.append(name)
        return real(self, kind, name)

    monkeypatch.setattr(CardMemory, "open", counting)
    return opened


def _public(world) -> bytes:
    return next(public for kind, name, _alg, public in world.session.memory.items() if name == "9c")


def test_the_policy_is_read_from_card_ini_and_off_by_default(tmp_path):
    """``key_cache`` lists slots (comma or space separated, any case); without it no slot is cached."""
    assert parse_key_cache("") == frozenset()
    assert parse_key_cache("9A, 9c 9e") == {"9a", "9c", "9e"}
    base = dict(home=tmp_path, server="tcp:127.0.0.1:9", server_key="SHA256:x", serial="s-1")
    assert CardSession(CardConfig(**base), None, None).key_cache_slots == frozenset()
    assert CardSession(CardConfig(**base, settings={"key_cache": "9a,9d"}), None, None).key_cache_slots == {"9a", "9d"}


def test_by_default_every_signature_opens_the_key(world, monkeypatch):
    """Without the policy each operation decrypts the key for itself and nothing is kept."""
    opened = _count_opens(monkeypatch)
    for _ in range(3):
        sig = _done(world.session.sign_digest("9c", DIGEST))
    assert opened == ["9c"] * 3 and world.session._key_cache == {}
    assert crypto.verify_sha256(_public(world), b"key cache", sig)


def test_a_cached_slot_is_opened_once_forgotten_on_a_new_key_and_on_remove(world, monkeypatch, ec_der):
    """
    With ``key_cache = 9c`` three signatures open the key once and all
    verify; a new key stored in 9c drops the cached one (its locked buffer
    freed) and the next signature opens the new key; remove frees the cache.
    """
    world.session.key_cache_slots = parse_key_cache("9c")
    opened = _count_opens(monkeypatch)
    sigs = [_done(world.session.sign_digest("9c", DIGEST)) for _ in range(3)]
    assert opened == ["9c"] and set(world.session._key_cache) == {"9c"}
    assert all(crypto.verify_sha256(_public(world), b"key cache", s) for s in sigs)
    buf = world.session._key_cache["9c"][0]

    new = crypto.generate_private_der("p256")
    _done(world.session.put_item(ItemKind.KEY, "9c", new, KeyAlg.P256, crypto.public_der_of(new)))
    assert world.session._key_cache == {} and buf._mm is None
    sig = _done(world.session.sign_digest("9c", DIGEST))
    assert opened == ["9c", "9c"] and crypto.verify_sha256(crypto.public_der_of(new), b"key cache", sig)

    buf = world.session._key_cache["9c"][0]
    _done(world.session.remove("test"))
    assert world.session._key_cache == {} and buf._mm is None
