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

from vsc.wire import apdu
from vsc.wire.apdu import Command
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
    """
    Read an item of the protected information; the result is its value
    (bytes) or None. With ``derive`` the result is ``derive(value)`` instead
    (None still when the item is absent): a pure function of the value that
    reveals no secret (a PIN record's tries left, the PIN policy). The glue
    may compute it once and keep it until the item changes
    (vsc.card.protected.CardMemory.read), so the check every private-key
    operation makes neither decrypts the PIN record nor copies the PIN.
    """

    kind: ItemKind
    name: str
    derive: Callable[[Any], Any] | None = attrs.field(default=None, eq=False, repr=False)


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





async def run_async(gen: Generator, perform: Callable[[Effect], Any]) -> Any:
    """Drive ``process`` with an async ``perform`` (the card's glue): its result, or EffectFailed thrown back in."""
    send: Any = None
    throw: BaseException | None = None
    while True:
        try:
            effect = gen.throw(throw) if throw is not None else gen.send(send)
        except StopIteration as stop:
            return stop.value
        send, throw = None, None
        try:
            send = await perform(effect)
        except EffectFailed as e:
            throw = e

class ResponseBuffer:
    """
    A response longer than the command's Le, handed out in parts (ISO 7816-4
    61xx and GET RESPONSE), shared by the card's applications (PIV, OpenPGP).
    The application keeps ``_out`` (the whole body) and ``_out_pos`` (how much
    was sent) and clears them when another command comes.
    """

    _out: bytes = b""
    _out_pos: int = 0

    def _respond(self, body: bytes, cmd: Command) -> bytes:
        limit = cmd.le if cmd.le is not None else (65536 if cmd.extended else 256)
        if len(body) <= limit:
            return apdu.build_response(body, SW_OK)
        self._out, self._out_pos = body, limit
        return apdu.build_response(body[:limit], self._more_sw())

    def _more_sw(self) -> int:
        left = len(self._out) - self._out_pos
        return 0x6100 | (left if left < 256 else 0)

    def _get_response(self, cmd: Command) -> bytes:
        if cmd.p1 or cmd.p2:
            return apdu.build_response(b"", SW_WRONG_P1P2)
        if not self._out or self._out_pos >= len(self._out):
            self._out, self._out_pos = b"", 0
            return apdu.build_response(b"", SW_CONDITIONS)
        n = cmd.le if cmd.le is not None else 256
        chunk = self._out[self._out_pos:self._out_pos + n]
        self._out_pos += len(chunk)
        if self._out_pos >= len(self._out):
            self._out, self._out_pos = b"", 0
            return apdu.build_response(chunk, SW_OK)
        return apdu.build_response(chunk, self._more_sw())
