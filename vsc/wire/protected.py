"""
The layout of a card's protected information ([0025]) as the server stores
it — opaque to the server, which never has the keys:

    Envelope: magic "VSCP", format 1, the data key wrapped under the
              password's protection key (AES-256-GCM), then the Index sealed
              under the data key (AES-256-GCM).
    Index:    the items; each item's secret value is sealed on its own under
              the data key, so a card process can open one item for one
              operation without ever holding the whole plaintext. Format 2
              adds the generation: a counter the card raises with every
              upload, sealed with the index, so a card can tell an older copy
              from a newer one whatever the server says (vsc.card.freshness).

A password change re-wraps only the data key.
"""

from __future__ import annotations

import enum
import functools

import attrs
import construct as c

from vsc.wire.codec import U8, U16, U32, Array, Bytes, Fast, StrictEnum, Text
from vsc.wire.errors import ErrorCode, WireError

MAX_ITEMS = 256
MAX_VALUE = 256 * 1024


class ItemKind(enum.IntEnum):
    KEY = 1  # a private key (PKCS#8 DER); name = PIV slot, e.g. "9a"
    COUNTER = 2  # a signed 64-bit counter ([0025]: software rental)
    DATA = 3  # a confidential data object
    PIN = 4  # PIN / PUK state (PIV)
    CERT = 5  # a certificate (not secret, kept with its key)


class KeyAlg(enum.IntEnum):
    NONE = 0
    RSA2048 = 1
    P256 = 2
    ED25519 = 3  # the OpenPGP application's EdDSA keys
    X25519 = 4  # the OpenPGP application's Cv25519 (ECDH) decryption key
    # a new value, never reused: an index written before P-384 never holds 5, and a card that does not know a
    # value refuses the whole index as MALFORMED (StrictEnum) rather than guessing what the key is
    P384 = 5  # PIV algorithm 14 (SP 800-78-4 table 6-2)


@attrs.frozen
class SealedValue:
    nonce: bytes
    ciphertext: bytes = attrs.field(repr=False)
    tag: bytes


@attrs.frozen
class Item:
    kind: ItemKind
    name: str
    alg: KeyAlg
    public: bytes  # public key DER for KEY items; empty otherwise
    value: SealedValue


_Sealed = c.Struct("nonce" / c.Bytes(12), "ciphertext" / Bytes(U32, MAX_VALUE, 0, "item value"), "tag" / c.Bytes(16))

#: the longest name of an item (a key slot, a counter, a data object), in UTF-8 bytes
MAX_ITEM_NAME = 64

_Item = c.Struct(
    "kind" / StrictEnum(U8, ItemKind),
    "name" / Text(U8, MAX_ITEM_NAME, 1, "item name"),
    "alg" / StrictEnum(U8, KeyAlg),
    "public" / Bytes(U16, 4096, 0, "public key"),
    "value" / _Sealed,
)

IndexSchema = c.Struct(
    "format" / c.OneOf(U8, (1, 2)),
    "generation" / c.If(c.this.format == 2, c.Int64ub),
    "items" / Array(U16, _Item, MAX_ITEMS, 0, "items"),
    c.Terminated,
)

EnvelopeSchema = c.Struct(
    "magic" / c.Const(b"VSCP"),
    "format" / c.Const(1, U8),
    # the serial the card was enrolled as: every seal's AAD names it, so a
    # duplicate ([0102]) or replacement ([0062]) under a new serial still opens
    "card_id" / Text(U8, 64, 1, "card id"),
    "wrap" / _Sealed,
    "index" / _Sealed,
    c.Terminated,
)

AadSchema = c.Struct("label" / c.PascalString(U8, "ascii"), "serial" / Text(U8, 64, 1, "serial"),
                     "kind" / U8, "name" / Text(U8, 64, 0, "name"))
CounterSchema = c.Int64sb


@functools.lru_cache(maxsize=4096)
def aad(label: str, serial: str, kind: int = 0, name: str = "") -> bytes:
    """The additional data of a seal: built once per (label, serial, kind, name) (every card operation opens an item)."""
    return AadSchema.build(dict(label=label, serial=serial, kind=kind, name=name))


def _sealed(v) -> SealedValue:
    return SealedValue(nonce=v.nonce, ciphertext=v.ciphertext, tag=v.tag)


#: the compiled twins (vsc.wire.codec.Fast: the same bytes and the same errors as the schemas)
_FAST_INDEX = Fast(IndexSchema)
_FAST_ENVELOPE = Fast(EnvelopeSchema)


def encode_index(items: list[Item], generation: int = 0) -> bytes:
    """Format 2: the items and the upload's generation."""
    return _FAST_INDEX.build(  # every sync of the card builds it (a PIN check: twice): compiled
        dict(format=2, generation=generation,
             items=[dict(kind=i.kind, name=i.name, alg=i.alg, public=i.public, value=attrs.asdict(i.value)) for i in items])
    )


def decode_index_generation(data) -> tuple[list[Item], int]:
    """The items and the generation (0 for a format-1 index, written before generations existed)."""
    try:
        parsed = IndexSchema.parse(bytes(data))
    except c.ConstructError as e:
        raise WireError(ErrorCode.MALFORMED, f"protected information index: {str(e).strip()}") from None
    items = [Item(kind=i.kind, name=i.name, alg=i.alg, public=i.public, value=_sealed(i.value)) for i in parsed["items"]]
    return items, parsed.generation or 0


def decode_index(data) -> list[Item]:
    return decode_index_generation(data)[0]


def encode_envelope(wrap: SealedValue, index: SealedValue, card_id: str) -> bytes:
    return _FAST_ENVELOPE.build(dict(card_id=card_id, wrap=attrs.asdict(wrap), index=attrs.asdict(index)))


def envelope_card_id(data: bytes) -> str:
    try:
        return EnvelopeSchema.parse(data).card_id
    except c.ConstructError as e:
        raise WireError(ErrorCode.MALFORMED, f"protected information envelope: {str(e).strip()}") from None


def decode_envelope(data: bytes) -> tuple[SealedValue, SealedValue]:
    try:
        parsed = EnvelopeSchema.parse(data)
    except c.ConstructError as e:
        raise WireError(ErrorCode.MALFORMED, f"protected information envelope: {str(e).strip()}") from None
    return _sealed(parsed.wrap), _sealed(parsed.index)


def encode_counter(value: int) -> bytes:
    return CounterSchema.build(value)


def decode_counter(data) -> int:
    return CounterSchema.parse(bytes(data))
