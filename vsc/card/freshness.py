"""
Freshness the card can check (issue 11; docs/security.md "Rollback").

The server is the party vsc does not trust with the card's secrets, and it
must not be trusted with their *age* either: a server operator who restores
a backup, or relabels an older protected-information blob with a higher
version number, would otherwise hand back spent rental runs and PIV PIN
tries without anyone noticing.

So the card seals a **generation** into the protected information itself
(the index of the VSCP envelope, format 2: vsc.wire.protected), raises it
with every upload, and keeps in its HOME the highest generation a storage
has acknowledged (``HOME/freshness``, one record per card ID, so another
card's blob handed to this card cannot replace this card's record),
authenticated with an HMAC under a key
derived from the card's data key — a key only the password opens, so the
file can be neither forged nor moved to another card by anyone without the
password. On insert the card refuses protected information whose sealed
generation is older than that record, before serving anything.

The record also keeps *floors*: the values of what must never come back
(rental counters ``lic:...`` and PIN/PUK tries left, as of the last
acknowledged upload). After a real disaster the owner may accept an older
copy deliberately (``vsc card accept-rollback``, then insert): the card then
lowers every such value to its floor before serving, so even an accepted
rollback refunds no run and no PIN try.

What this cannot do: a machine with no record (a new machine, a deleted
HOME) accepts whatever it is given first; docs/security.md says so. A
record that is there but cannot be read (cut short, emptied, overwritten)
is not taken for none: it refuses the insert, and is never written over,
until the owner puts back a good copy or moves it away.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import attrs

from vsc.card.paths import write_private
from vsc.wire import openpgp as pgp_wire
from vsc.wire.protected import ItemKind, decode_counter, encode_counter

RECORD_NAME = "freshness"
ACCEPT_NAME = "freshness.accept-rollback"
LICENCE_PREFIX = "lic:"


class RollbackError(Exception):
    """The storage handed back protected information older than this card has seen stored."""


class RecordUnreadable(RollbackError):
    """HOME/freshness is there but cannot be read: the card cannot tell an older copy (message: one line)."""


@attrs.frozen
class Record:
    card_id: str
    generation: int
    floors: dict  # "kind:name" -> the lowest value it may be lowered to
    #: the acknowledged copy's index tag (hex): a failed upload the server kept may carry the same generation
    #: (None: a record written before it was kept)
    index: str | None = None


def _body(card_id: str, generation: int, floors: dict, index: str | None = None) -> bytes:
    body = {"card_id": card_id, "generation": generation, "floors": floors}
    if index is not None:
        body["index"] = index
    return json.dumps(body, sort_keys=True).encode()


def _pin_tries(value) -> int:
    from vsc.wire import apdu

    return apdu.decode_secret(value).tries_left


def _with_pin_tries(value, tries: int) -> bytes:
    from vsc.wire import apdu

    rec = apdu.decode_secret(value)
    return apdu.encode_secret(attrs.evolve(rec, tries_left=min(rec.tries_left, tries)))


#: What must never come back through a rollback: (kind, is it one of these items?, read, lower to a floor).
#: Lower is "more used" for each. Other applications add their retry counters here.
MONOTONIC: list[tuple[ItemKind, Callable[[str], bool], Callable, Callable]] = [
    (ItemKind.COUNTER, lambda name: name.startswith(LICENCE_PREFIX), decode_counter,
     lambda value, floor: encode_counter(min(decode_counter(value), floor))),
    (ItemKind.PIN, lambda name: name.startswith(("piv-pin", "piv-puk", "pgp-")), _pin_tries, _with_pin_tries),
    # the OpenPGP signature counter only grows: "more used" is a higher count, so it is read negated
    (ItemKind.DATA, lambda name: name == "pgp-sig-counter", lambda value: -pgp_wire.decode_sig_counter(value),
     lambda value, floor: pgp_wire.encode_sig_counter(max(pgp_wire.decode_sig_counter(value), -floor))),
]


def floors_of(memory) -> dict:
    """The current value of every monotonic item of ``memory`` (a vsc.card.protected.CardMemory)."""
    out = {}
    for kind, name, _alg, _public in memory.items():
        for mkind, match, read, _lower in MONOTONIC:
            if kind is mkind and match(name):  # read once per stored value (CardMemory.read's derived cache)
                out[f"{int(kind)}:{name}"] = memory.read(kind, name, read)
    return out


def apply_floors(memory, floors: dict) -> list[str]:
    """
    Lower every monotonic item to its floor (after an accepted rollback), and put back at its floor a
    ``lic:`` counter the copy lacks. Returns what changed.
    """
    changed = []
    for kind, name, _alg, _public in list(memory.items()):
        for mkind, match, read, lower in MONOTONIC:
            key = f"{int(kind)}:{name}"
            if kind is mkind and match(name) and key in floors:
                with memory.open(kind, name) as value:
                    if read(value) <= floors[key]:
                        continue
                    new = lower(bytes(value), floors[key])
                old = memory.put(kind, name, new)
                memory.discard(old)
                changed.append(name)
    # a rental counter the older copy lacks (funded after it was made) comes back at its floor: absent, the next
    # run would fund it afresh from its keyfile and every run spent since would be refunded
    present = {f"{int(kind)}:{name}" for kind, name, _alg, _public in memory.items()}
    prefix = f"{int(ItemKind.COUNTER)}:{LICENCE_PREFIX}"
    for key, floor in floors.items():
        if key.startswith(prefix) and key not in present:
            name = key.split(":", 1)[1]
            memory.discard(memory.put(ItemKind.COUNTER, name, encode_counter(max(floor, 0))))
            changed.append(name)
    return changed


class FreshnessStore:
    """``HOME/freshness``: the highest acknowledged generation and the floors, with an HMAC."""

    def __init__(self, home: Path):
        self.path = Path(home) / RECORD_NAME
        self.accept_path = Path(home) / ACCEPT_NAME

    def _records(self) -> dict:
        """
        The records in ``HOME/freshness``, one per card ID, each with its own
        MAC. One card's upload never replaces another card's record: a server
        that hands this card another card's blob (same password, its salt)
        would otherwise overwrite the record and could then hand back an older
        copy of this card unnoticed. A file of the earlier format (one record)
        reads as that one record. No file is no record; a file that cannot be
        read as records is RecordUnreadable, never taken for none.
        """
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:  # ValueError: not UTF-8
            raise self._unreadable(getattr(e, "strerror", None) or "not text") from None
        try:
            data = json.loads(text)
        except ValueError:
            data = None
        if isinstance(data, dict) and isinstance(data.get("records"), dict):
            return dict(data["records"])
        if isinstance(data, dict) and isinstance(data.get("card_id"), str):
            return {data["card_id"]: data}
        raise self._unreadable("empty" if not text.strip() else "not a freshness record")

    def _unreadable(self, why: str) -> RecordUnreadable:
        return RecordUnreadable(
            f"refused: {self.path} cannot be read ({why}), so this machine cannot tell an older copy of the card "
            f"from the last one it saw stored. Nothing was served. Put back a good copy of that file, or move it "
            f"away to take the copy handed out next as a new machine would")

    def load(self, memory) -> Record | None:
        """This card's record, if its data key authenticates one (else None: no history here); RecordUnreadable
        when the file is there but cannot be read."""
        entry = self._records().get(memory.serial)
        if not isinstance(entry, dict):
            return None
        try:
            index = entry.get("index")
            if index is not None and not isinstance(index, str):
                return None
            body = _body(memory.serial, int(entry["generation"]), dict(entry["floors"]), index)
            mac = bytes.fromhex(entry["mac"])
        except (ValueError, KeyError, TypeError):
            return None
        from vsc import crypto

        if entry.get("card_id") != memory.serial or not crypto.constant_time_equal(
                mac, memory.data_key_mac(b"vsc freshness", body)):
            return None
        return Record(memory.serial, int(entry["generation"]), {k: int(v) for k, v in entry["floors"].items()}, index)

    def save(self, memory) -> Record:
        """Record ``memory``'s generation (just acknowledged by the storage) and floors; atomic, fsynced.
        RecordUnreadable (nothing written) when the file there cannot be read: writing over it would drop
        every other card's record."""
        rec = Record(memory.serial, memory.generation, floors_of(memory), memory.index_tag.hex() or None)
        body = _body(rec.card_id, rec.generation, rec.floors, rec.index)
        records = self._records()
        records[rec.card_id] = dict(json.loads(body), mac=memory.data_key_mac(b"vsc freshness", body).hex())
        write_private(self.path, json.dumps({"records": records}, sort_keys=True).encode())
        return rec

    def accept_next_rollback(self) -> None:
        """The owner's deliberate choice: the next insert may load an older copy (floors still apply)."""
        write_private(self.accept_path, b"")

    def rollback_accepted(self) -> bool:
        return self.accept_path.exists()

    def check(self, memory, source: str = "the server") -> tuple[Record | None, list[str]]:
        """
        On insert: refuse ``memory`` if its sealed generation is older than
        the record (RollbackError), unless the owner accepted the next
        rollback, in which case the floors are applied (returned: what was
        lowered) and the acceptance is used up. ``source`` names where the
        copy came from in the refusal ("the server", "the token").
        """
        rec = self.load(memory)
        if rec is None or memory.generation > rec.generation:
            return rec, []
        if memory.generation == rec.generation:
            if rec.index is None or rec.index == memory.index_tag.hex():
                return rec, []  # the very copy this machine saw stored
            if not self.rollback_accepted():
                raise RollbackError(
                    f"refused: {source} handed back another copy of generation {rec.generation} than the one "
                    f"this machine saw stored (an upload the card was told had failed). Nothing was served. If "
                    f"you know why and want that copy, run 'vsc card accept-rollback' and insert again (rental "
                    f"runs and PIN tries stay as they were)")
        elif not self.rollback_accepted():
            raise RollbackError(
                f"refused: {source} handed back an older copy of this card (generation {memory.generation}; "
                f"this machine has seen generation {rec.generation} stored). It may have been restored from "
                f"a backup or tampered with. Nothing was served. If you know why and want that copy, run "
                f"'vsc card accept-rollback' and insert again (rental runs and PIN tries stay as they were)")
        lowered = apply_floors(memory, rec.floors)
        memory.generation = rec.generation  # carry on above every generation seen, so no number means two copies
        self.accept_path.unlink(missing_ok=True)
        return rec, lowered
