"""
The card's protected information, at rest and in use.

At rest (on the server, or a dongle) it is an Envelope (vsc.wire.protected):
a random data key wrapped under the password's protection key, and the
index of items sealed under the data key, each item's secret value sealed
on its own.

In use ([0027]-[0028], [0099]-[0100], Figure 13) CardMemory keeps every item
sealed under a fresh temporary key, in locked memory (vsc.card.memory); an
operation opens ONE item into a locked buffer, and the buffer is zeroed as
soon as the operation is done. The data key is kept the same way, so remove
and sync can re-seal without the password.
"""

from __future__ import annotations

import attrs

from vsc import crypto
from vsc.card.memory import LockedBuffer, random_into, scratch
from vsc.wire.protected import (
    Item,
    ItemKind,
    KeyAlg,
    SealedValue,
    aad,
    decode_envelope,
    decode_index_generation,
    encode_envelope,
    encode_index,
    envelope_card_id,
)

DATA_KEY = 32


def wrapping_key(protection_key: bytes) -> bytes:
    """A 256-bit AES key from the protection key (64-bit legacy keys included)."""
    return crypto.hkdf_extract_expand(b"vsc protection wrap", protection_key, b"vsc1 wrap", 32)


@attrs.frozen
class PlainItem:
    """An item with its plaintext value, used only by the enrolment process."""

    kind: ItemKind
    name: str
    value: bytes = attrs.field(repr=False)
    alg: KeyAlg = KeyAlg.NONE
    public: bytes = b""


def seal_envelope(serial: str, protection_key: bytes, items: list[PlainItem], rand: crypto.RandomBytes) -> bytes:
    """Build the protected information for enrolment (a short-lived process)."""
    with LockedBuffer(DATA_KEY) as dk:
        random_into(dk.view)
        sealed = []
        for it in items:
            out = bytearray(len(it.value) + 16)
            nonce = rand(12)
            tag = crypto.gcm_seal_into(dk.view, nonce, it.value, out, aad("item", serial, it.kind, it.name))
            sealed.append(Item(it.kind, it.name, it.alg, it.public, SealedValue(nonce, bytes(out[: len(it.value)]), tag)))
        return _envelope(serial, protection_key, dk.view, sealed, rand)


def _envelope(serial: str, protection_key: bytes, data_key, sealed: list[Item], rand) -> bytes:
    index = encode_index(sealed)
    out = bytearray(len(index) + 16)
    nonce = rand(12)
    tag = crypto.gcm_seal_into(data_key, nonce, index, out, aad("index", serial))
    index_sealed = SealedValue(nonce, bytes(out[: len(index)]), tag)
    wk = wrapping_key(protection_key)
    wout = bytearray(DATA_KEY + 16)
    wnonce = rand(12)
    wtag = crypto.gcm_seal_into(wk, wnonce, data_key, wout, aad("wrap", serial))
    return encode_envelope(SealedValue(wnonce, bytes(wout[:DATA_KEY]), wtag), index_sealed, serial)


def rewrap(serial: str, envelope: bytes, old_protection_key: bytes, new_protection_key: bytes, rand) -> bytes:
    """Password change: re-wrap only the data key; the items are untouched."""
    wrap, index = decode_envelope(envelope)
    serial = envelope_card_id(envelope)  # the AADs name the enrolment serial, whatever the card is called now
    with LockedBuffer(DATA_KEY) as dk:
        crypto.gcm_open_into(wrapping_key(old_protection_key), wrap.nonce, wrap.ciphertext, wrap.tag, dk.view, aad("wrap", serial))
        wk = wrapping_key(new_protection_key)
        wout = bytearray(DATA_KEY + 16)
        wnonce = rand(12)
        wtag = crypto.gcm_seal_into(wk, wnonce, dk.view, wout, aad("wrap", serial))
    from vsc.wire.protected import encode_envelope as _enc

    return _enc(SealedValue(wnonce, bytes(wout[:DATA_KEY]), wtag), index, serial)


@attrs.define
class _Held:
    """
    One item sealed under the temporary key, in locked memory: ``buf`` holds
    the ciphertext and then its tag (``length`` + 16 bytes), ``aad`` is the
    seal's additional data, built once.
    """

    kind: ItemKind
    name: str
    alg: KeyAlg
    public: bytes
    nonce: bytes
    aad: bytes
    length: int
    buf: LockedBuffer


class _Opened:
    """
    An item's plaintext for one operation (``CardMemory.open``): ``with``
    gives the view of it, and leaving the block releases the view and gives
    the locked buffer back to the pool, zeroed. A class rather than a
    generator-based context manager: it is on every operation's path.
    """

    __slots__ = ("plain", "view")

    def __init__(self, plain: LockedBuffer, view: memoryview):
        self.plain = plain
        self.view = view

    def __enter__(self) -> memoryview:
        return self.view

    def __exit__(self, *exc) -> None:
        try:
            self.view.release()
        except BufferError:  # a view of the plaintext outlived the operation: zeroed, never reused
            self.plain.zero()
            raise
        scratch.give(self.plain)


class CardMemory:
    """The protected information of an inserted card, under a temporary key."""

    def __init__(self, serial: str, rand: crypto.RandomBytes = crypto.system_random):
        self.serial = serial
        self.rand = rand
        self._temp = LockedBuffer(32)
        random_into(self._temp.view)
        self._items: dict[tuple[ItemKind, str], _Held] = {}
        #: ``read``'s derived values: (kind, name) -> (the sealed item they came from, derive, value)
        self._derived: dict[tuple[ItemKind, str], tuple[_Held, object, object]] = {}
        self._data_key: _Held | None = None
        self._wrap: SealedValue | None = None
        self.wiped = False
        #: the generation sealed in the index this memory was loaded from, or last acknowledged by the
        #: storage (vsc.card.freshness); every export carries the next one
        self.generation = 0
        self._exported = 0
        #: the tag of the sealed index of that copy (loaded, or last acknowledged): it names the copy, where
        #: the generation only numbers it (a failed upload the server kept has the next number too)
        self.index_tag = b""
        self._exported_tag = b""

    # -- loading (insert) and exporting (sync, remove)

    @classmethod
    def load(cls, serial: str, envelope: bytes, protection_key: bytes, rand=crypto.system_random) -> "CardMemory":
        """
        Figure 13, 1002-1006: decrypt with the protection key, re-encrypt under
        temp, zero the plaintext. ``serial`` is the card's current name; the
        seals name the serial it was enrolled as (the same unless duplicated).
        """
        serial = envelope_card_id(envelope)
        mem = cls(serial, rand)
        try:
            wrap, index = decode_envelope(envelope)
            mem._wrap = wrap
            with LockedBuffer(DATA_KEY) as dk:
                crypto.gcm_open_into(
                    wrapping_key(protection_key), wrap.nonce, wrap.ciphertext, wrap.tag, dk.view, aad("wrap", serial)
                )
                mem._data_key = mem._seal(ItemKind.DATA, "\x00data-key", KeyAlg.NONE, b"", dk.view)
                idx = bytearray(len(index.ciphertext) + 16)
                n = crypto.gcm_open_into(dk.view, index.nonce, index.ciphertext, index.tag, idx, aad("index", serial))
                items, mem.generation = decode_index_generation(memoryview(idx)[:n])
                mem.index_tag = index.tag
                for it in items:
                    with LockedBuffer(len(it.value.ciphertext)) as plain:
                        crypto.gcm_open_into(
                            dk.view, it.value.nonce, it.value.ciphertext, it.value.tag, plain.view,
                            aad("item", serial, it.kind, it.name),
                        )
                        mem._items[(it.kind, it.name)] = mem._seal(it.kind, it.name, it.alg, it.public, plain.view)
        except BaseException:
            mem.wipe()
            raise
        return mem

    def export(self) -> bytes:
        """
        The envelope to upload: every item re-sealed under the data key with
        fresh nonces, and the next generation sealed in the index. The data
        key's wrap under the protection key is reused as downloaded (it is
        ciphertext), so no password is needed. Call ``acknowledge`` once the
        storage has it.
        """
        self._exported = self.generation + 1
        if self._data_key is None or self._wrap is None:
            raise RuntimeError("no data key")
        with self._open(self._data_key) as dk:
            sealed = []
            for held in self._items.values():
                with self._open(held) as plain:
                    out = bytearray(held.length + 16)
                    nonce = self.rand(12)
                    tag = crypto.gcm_seal_into(dk, nonce, plain, out, aad("item", self.serial, held.kind, held.name))
                    sealed.append(Item(held.kind, held.name, held.alg, held.public,
                                       SealedValue(nonce, bytes(out[: held.length]), tag)))
            index = encode_index(sealed, self._exported)
            out = bytearray(len(index) + 16)
            nonce = self.rand(12)
            tag = crypto.gcm_seal_into(dk, nonce, index, out, aad("index", self.serial))
            self._exported_tag = tag
            return encode_envelope(self._wrap, SealedValue(nonce, bytes(out[: len(index)]), tag), self.serial)

    def acknowledge(self) -> int:
        """The storage has the last export: its generation is now this card's. Returns it."""
        if self._exported >= self.generation:
            self.generation, self.index_tag = self._exported, self._exported_tag
        return self.generation

    def data_key_mac(self, label: bytes, data: bytes) -> bytes:
        """HMAC-SHA256 under a key derived from the data key (only a holder of the password has it)."""
        assert self._data_key is not None
        with self._open(self._data_key) as dk:
            key = crypto.hkdf_extract_expand(b"vsc data-key mac", dk, label, 32)
        return crypto.hmac_sha256(key, data)

    def adopt_wrap(self, envelope: bytes) -> None:
        """
        After a password change: keep the data key's new wrap (under the new
        protection key) from ``envelope`` (made by ``rewrap`` from this memory's
        export), so later syncs and the remove upload it. The data key itself is unchanged.
        """
        wrap, _index = decode_envelope(envelope)
        self._wrap = wrap

    # -- the temporary-key layer

    def _seal(self, kind, name, alg, public, plaintext) -> _Held:
        buf = LockedBuffer(len(plaintext) + 16)
        nonce = self.rand(12)
        extra = aad("temp", self.serial, kind, name)
        crypto.gcm_seal_joined_into(self._temp.view, nonce, plaintext, buf.view, extra)
        return _Held(kind, name, alg, public, nonce, extra, len(plaintext), buf)

    def _open(self, held: _Held) -> "_Opened":
        """``with self._open(held) as view``: the item decrypted into a pooled locked buffer, given back zeroed."""
        if self.wiped:
            raise RuntimeError("the card has been removed")
        plain = scratch.take(held.length)  # locked, zeroed when given back (vsc.card.memory.ScratchPool)
        view = plain.view[: held.length]
        try:
            crypto.gcm_open_joined_into(self._temp.view, held.nonce, held.buf.view, view, held.aad)
        except BaseException:
            _Opened(plain, view).__exit__(None, None, None)
            raise
        return _Opened(plain, view)

    # -- what operations use

    def items(self) -> list[tuple[ItemKind, str, KeyAlg, bytes]]:
        return [(h.kind, h.name, h.alg, h.public) for h in self._items.values()]

    def has(self, kind: ItemKind, name: str) -> bool:
        return (kind, name) in self._items

    def public_of(self, kind: ItemKind, name: str) -> bytes | None:
        """An item's public part (a key's public key, a licence counter's vendor key), None when it is absent."""
        held = self._items.get((kind, name))
        return None if held is None else held.public

    def open(self, kind: ItemKind, name: str) -> "_Opened":
        """``with memory.open(kind, name) as view``: one item decrypted into locked memory for one operation; zeroed on exit."""
        held = self._items.get((kind, name))
        if held is None:
            raise KeyError(f"no {kind.name.lower()} {name!r}")
        return self._open(held)

    def read(self, kind: ItemKind, name: str, derive=None):
        """
        What an applet's ``Load`` effect asks (vsc.protocol.applet.Load):
        None when the item is absent; else ``derive(value)`` when a
        ``derive`` is given, computed on the plaintext in locked memory and
        kept until the item is replaced (the cache entry names the sealed
        item it came from, so any put, revert or removal makes it stale);
        else a bytes copy of the value.
        """
        held = self._items.get((kind, name))
        if held is None:
            return None
        if derive is None:
            with self._open(held) as view:
                return bytes(view)
        cached = self._derived.get((kind, name))
        if cached is not None and cached[0] is held and cached[1] is derive:
            return cached[2]
        with self._open(held) as view:
            value = derive(view)
        self._derived[(kind, name)] = (held, derive, value)
        return value

    def put(self, kind: ItemKind, name: str, value, alg: KeyAlg = KeyAlg.NONE, public: bytes = b"") -> "_Held | None":
        """
        Replace or add an item (its new value is sealed under temp at once).
        Returns the previous sealed item: pass it to ``discard`` once the change
        is synced, or to ``revert`` if the sync failed.
        """
        old = self._items.get((kind, name))
        if old is not None and not public:
            alg, public = old.alg, old.public
        self._items[(kind, name)] = self._seal(kind, name, alg, public, value)
        return old

    def remove_prefix(self, prefix: str) -> dict:
        """
        Take out every item whose name starts with ``prefix`` (an application's factory reset). Returns them:
        pass them to ``restore`` if the sync failed, or to ``discard_removed`` once it is stored.
        """
        gone = {key: held for key, held in self._items.items() if key[1].startswith(prefix)}
        for key in gone:
            del self._items[key]
        return gone

    def restore(self, gone: dict) -> None:
        self._items.update(gone)

    def discard_removed(self, gone: dict) -> None:
        for held in gone.values():
            held.buf.free()

    def discard(self, old: "_Held | None") -> None:
        if old is not None:
            old.buf.free()

    def revert(self, kind: ItemKind, name: str, old: "_Held | None") -> None:
        new = self._items.pop((kind, name), None)
        if new is not None:
            new.buf.free()
        if old is not None:
            self._items[(kind, name)] = old

    def wipe(self) -> None:
        """Zero and unmap everything ([0029])."""
        for held in self._items.values():
            held.buf.free()
        self._items.clear()
        self._derived.clear()
        if self._data_key is not None:
            self._data_key.buf.free()
            self._data_key = None
        self._temp.free()
        self.wiped = True

    @property
    def locked(self) -> bool:
        return self._temp.locked and all(h.buf.locked for h in self._items.values())
