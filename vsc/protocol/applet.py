"""
What every card application (vsc.protocol.piv, and others beside it on the
same card) is made of: an applet's ``process(apdu)`` is a generator that
yields *effects* — load or store an item of the protected information, run
a private-key operation, generate a key pair, report an event — receives
their results, and returns the response APDU. The glue (vsc.card.vpcd)
performs the effects on the card session, syncing every store to the
storage before the response is sent; tests drive an applet with a
dictionary (``run_sync``).
"""

from __future__ import annotations

from typing import Any, Callable, Generator

import attrs

from vsc.wire.protected import ItemKind, KeyAlg

SW_OK = 0x9000
SW_WRONG_LENGTH = 0x6700
SW_MEMORY_FAILURE = 0x6581
SW_SECURITY = 0x6982
SW_BLOCKED = 0x6983
SW_CONDITIONS = 0x6985
SW_WRONG_DATA = 0x6A80
SW_NOT_FOUND = 0x6A82
SW_NO_MEMORY = 0x6A84
SW_WRONG_P1P2 = 0x6A86
SW_REF_NOT_FOUND = 0x6A88
SW_CHAIN_UNSUPPORTED = 0x6884
SW_INS = 0x6D00
SW_CLA = 0x6E00
SW_UNKNOWN = 0x6F00




@attrs.frozen
class Load:
    """Read an item of the protected information; the result is its value (bytes) or None."""

    kind: ItemKind
    name: str


@attrs.frozen
class Store:
    """Replace an item and sync it to the server before answering; result None, or EffectFailed."""

    kind: ItemKind
    name: str
    value: bytes = attrs.field(repr=False)
    alg: KeyAlg = KeyAlg.NONE
    public: bytes = b""


@attrs.frozen
class KeyInfo:
    """The algorithm and public key (SubjectPublicKeyInfo DER) of a slot's key, or None."""

    slot: str


@attrs.frozen
class PrivateOp:
    """A private-key operation on a slot's key: "rsa" (a block the host padded), "ecdsa" (a hash), "ecdh" (a peer point)."""

    slot: str
    op: str
    data: bytes = attrs.field(repr=False)


@attrs.frozen
class Generate:
    """Generate a key pair into a slot, stored and synced; the result is the public key DER."""

    slot: str
    alg: KeyAlg


@attrs.frozen
class Clear:
    """Remove every item whose name starts with ``prefix``, synced (one upload); result None, or EffectFailed."""

    prefix: str


@attrs.frozen
class Notice:
    """Something worth a log line (the glue logs ``event`` with ``fields``); result None."""

    event: str
    fields: dict = attrs.field(factory=dict)


class EffectFailed(Exception):
    """The glue could not perform an effect; ``sw`` is what the card answers."""

    def __init__(self, message: str, sw: int = SW_UNKNOWN):
        super().__init__(message)
        self.sw = sw


Effect = Load | Store | KeyInfo | PrivateOp | Generate | Clear | Notice
Step = Generator[Effect, Any, tuple[bytes, int]]


def run_sync(gen: Generator, perform: Callable[[Effect], Any]) -> bytes:
    """Drive ``process`` synchronously (tests, tools): ``perform`` returns a result or raises EffectFailed."""
    send: Any = None
    throw: BaseException | None = None
    while True:
        try:
            effect = gen.throw(throw) if throw is not None else gen.send(send)
        except StopIteration as stop:
            return stop.value
        send, throw = None, None
        try:
            send = perform(effect)
        except EffectFailed as e:
            throw = e


