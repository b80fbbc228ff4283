"""
Freshness the card can check (vsc/card/freshness.py, issue 11 attack 1):
the generation sealed in the protected information against the record the
card keeps in HOME, and the floors that keep an accepted rollback from
refunding rental runs or PIN tries.
"""

from __future__ import annotations

import json

import pytest

from vsc.card.freshness import FreshnessStore, RollbackError, floors_of
from vsc.card.protected import CardMemory, PlainItem, seal_envelope
from vsc.wire import apdu
from vsc.wire.protected import ItemKind, decode_counter, encode_counter

PK = b"k" * 32
SERIAL = "card-1"


def envelope(runs: int = 10, tries: int = 3) -> bytes:
    items = [
        PlainItem(ItemKind.COUNTER, "lic:editor:abc", encode_counter(runs)),
        PlainItem(ItemKind.COUNTER, "plain", encode_counter(7)),
        PlainItem(ItemKind.PIN, "piv-pin", apdu.encode_secret(apdu.SecretRecord(b"123456\xff\xff", tries, 3))),
    ]
    return seal_envelope(SERIAL, PK, items, lambda n: b"\x01" * n)


def counter(mem: CardMemory, name: str) -> int:
    with mem.open(ItemKind.COUNTER, name) as v:
        return decode_counter(v)


def tries(mem: CardMemory) -> int:
    with mem.open(ItemKind.PIN, "piv-pin") as v:
        return apdu.decode_secret(v).tries_left


def step(mem: CardMemory, store: FreshnessStore, runs: int | None = None, pin_tries: int | None = None) -> bytes:
    """One acknowledged upload: change what is asked, export (generation + 1), acknowledge, record."""
    if runs is not None:
        mem.discard(mem.put(ItemKind.COUNTER, "lic:editor:abc", encode_counter(runs)))
    if pin_tries is not None:
        mem.discard(mem.put(ItemKind.PIN, "piv-pin", apdu.encode_secret(apdu.SecretRecord(b"123456\xff\xff",
                                                                                          pin_tries, 3))))
    blob = mem.export()
    mem.acknowledge()
    store.save(mem)
    return blob


def test_each_upload_seals_a_higher_generation(tmp_path):
    """export() seals generation + 1 into the index; a reload of that upload reads it back."""
    mem = CardMemory.load(SERIAL, envelope(), PK)
    assert mem.generation == 0
    blob = step(mem, FreshnessStore(tmp_path))
    assert mem.generation == 1 and CardMemory.load(SERIAL, blob, PK).generation == 1


def test_a_restored_backup_is_refused(tmp_path):
    """A copy older than the last acknowledged upload (a restored database) is refused before anything is served."""
    store = FreshnessStore(tmp_path)
    mem = CardMemory.load(SERIAL, envelope(runs=10), PK)
    backup = step(mem, store)  # generation 1, 10 runs
    step(mem, store, runs=9)  # generation 2, one run spent
    again = CardMemory.load(SERIAL, backup, PK)
    with pytest.raises(RollbackError, match="the server handed back an older copy"):
        store.check(again)
    assert store.load(again).generation == 2
    with pytest.raises(RollbackError, match="the token handed back an older copy"):  # dongle mode says where
        store.check(again, "the token")


def test_a_relabelled_blob_is_refused_whatever_the_server_says(tmp_path):
    """The server's version number is not consulted: only the generation sealed under the data key counts."""
    store = FreshnessStore(tmp_path)
    mem = CardMemory.load(SERIAL, envelope(), PK)
    old = step(mem, store)
    step(mem, store, runs=8)
    with pytest.raises(RollbackError):
        store.check(CardMemory.load(SERIAL, old, PK))  # whatever version label came with it


def test_an_accepted_rollback_keeps_the_floors(tmp_path):
    """
    After 'accept-rollback' the older copy loads, but rental runs and PIN
    tries are lowered to the last acknowledged values; the acceptance is
    used once, and the next uploads carry on above the highest generation.
    """
    store = FreshnessStore(tmp_path)
    mem = CardMemory.load(SERIAL, envelope(runs=10, tries=3), PK)
    backup = step(mem, store)
    step(mem, store, runs=4, pin_tries=1)
    store.accept_next_rollback()
    restored = CardMemory.load(SERIAL, backup, PK)
    rec, lowered = store.check(restored)
    assert sorted(lowered) == ["lic:editor:abc", "piv-pin"]
    assert (counter(restored, "lic:editor:abc"), tries(restored), counter(restored, "plain")) == (4, 1, 7)
    assert restored.generation == rec.generation == 2 and not store.rollback_accepted()
    with pytest.raises(RollbackError):  # used up: the next older copy is refused again
        store.check(CardMemory.load(SERIAL, backup, PK))


def test_a_forged_or_foreign_record_is_ignored(tmp_path):
    """A record whose MAC does not verify under this card's data key (edited, or another card's) counts as none."""
    store = FreshnessStore(tmp_path)
    mem = CardMemory.load(SERIAL, envelope(), PK)
    step(mem, store)
    data = json.loads(store.path.read_text())
    data["records"][SERIAL]["generation"] = 99
    store.path.write_text(json.dumps(data))
    assert store.load(mem) is None
    other = CardMemory.load(SERIAL, seal_envelope(SERIAL, PK, [], lambda n: b"\x02" * n), PK)
    step(mem, store)
    assert store.load(other) is None


def test_floors_cover_licence_counters_and_pin_tries_only(tmp_path):
    """Only what a rollback could refund is a floor: lic: counters and PIN/PUK tries, not plain counters."""
    mem = CardMemory.load(SERIAL, envelope(runs=5, tries=2), PK)
    assert floors_of(mem) == {f"{int(ItemKind.COUNTER)}:lic:editor:abc": 5, f"{int(ItemKind.PIN)}:piv-pin": 2}


def test_the_record_is_owner_only(tmp_path):
    """HOME/freshness is written 0600 (and atomically: no .tmp is left behind)."""
    store = FreshnessStore(tmp_path)
    step(CardMemory.load(SERIAL, envelope(), PK), store)
    assert store.path.stat().st_mode & 0o777 == 0o600
    assert not list(tmp_path.glob("*.tmp"))


def test_a_record_of_the_earlier_one_record_format_still_counts(tmp_path):
    """HOME/freshness written before records were kept per card ID (one record at the top level) reads as that
    card's record, and the next save keeps it under the card's ID beside any other card's."""
    from vsc.card.freshness import _body

    store = FreshnessStore(tmp_path)
    mem = CardMemory.load(SERIAL, envelope(), PK)
    body = _body(SERIAL, 5, {})
    store.path.write_text(json.dumps(dict(json.loads(body), mac=mem.data_key_mac(b"vsc freshness", body).hex())))
    assert store.load(mem).generation == 5
    with pytest.raises(RollbackError):
        store.check(mem)  # its generation (0) is older than the record's 5
    mem.generation = 6
    store.save(mem)
    assert list(json.loads(store.path.read_text())["records"]) == [SERIAL] and store.load(mem).generation == 6
