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
from vsc.wire.apdu import ApduError, Command
from vsc.wire.errors import WireError
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
class Certify:
    """
    Issue an X.509 certificate signed by slot ``signer``'s key (the PIV attestation key, F9; vsc.crypto.x509):
    with ``issuer`` empty, the signer's own self-signed attestation CA certificate named ``subject``; otherwise an
    attestation certificate for the public key ``public`` named ``subject``, its issuer and validity copied from
    the certificate ``issuer``, with ``extensions`` ((OID, raw value), ...). ``serial``: the certificate's serial
    number. The result is the certificate's DER; nothing is stored.
    """

    signer: str
    subject: str
    serial: int
    public: bytes = b""
    issuer: bytes = b""
    extensions: tuple = ()


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


Effect = Load | Store | KeyInfo | PrivateOp | Generate | Certify | Clear | Notice
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
    #: the most data one response APDU carries: with its status word it must fit one vpcd message (0xFFFF bytes),
    #: so an extended Le of 0000 (65536) gets at most this much and the rest by GET RESPONSE
    MAX_RESPONSE_DATA = apdu.VPCD_MAX - 2

    def _respond(self, body: bytes, cmd: Command) -> bytes:
        limit = min(cmd.le if cmd.le is not None else (65536 if cmd.extended else 256), self.MAX_RESPONSE_DATA)
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
        n = min(cmd.le if cmd.le is not None else 256, self.MAX_RESPONSE_DATA)
        chunk = self._out[self._out_pos:self._out_pos + n]
        self._out_pos += len(chunk)
        if self._out_pos >= len(self._out):
            self._out, self._out_pos = b"", 0
            return apdu.build_response(chunk, SW_OK)
        return apdu.build_response(chunk, self._more_sw())


class CommandFront(ResponseBuffer):
    """
    The front every application of the card puts before its own commands
    (PIV, OpenPGP): parse the APDU (a malformed one is answered with its
    status word), refuse a class byte other than 00 / 10, hand out GET
    RESPONSE parts, collect command chaining (ISO 7816-4 5.3.3: CLA 10 on all
    but the last part of one header; a different header abandons the chain;
    at most ``MAX_CHAIN`` bytes, else 6A84), then ``_dispatch(cmd, data)``
    with the whole data. Its ``(body, sw)`` comes back as the response, in
    parts when longer than Le; an ``ApduError``, a ``WireError`` (6A80) or an
    ``EffectFailed`` (with a notice) becomes the status word.

    Subclasses set ``CHAINABLE`` (the INS bytes that may be chained) and
    ``MAX_CHAIN``, and define ``_dispatch``.
    """

    CHAINABLE: frozenset[int] = frozenset()
    MAX_CHAIN: int = 4096
    INS_GET_RESPONSE = 0xC0
    _chain: tuple[tuple[int, int, int], bytearray] | None = None
    _static: dict[str, bytes]  # answers that never change, built once (the subclass makes the dict)

    def _cached(self, name: str, build: Callable[[], bytes]) -> bytes:
        if name not in self._static:
            self._static[name] = build()
        return self._static[name]

    def interrupted(self) -> None:
        """
        Another command reached the card without reaching this application
        (a SELECT the router answered itself, or one another application
        refused): a chain in progress and an answer waiting for GET RESPONSE
        are abandoned (ISO/IEC 7816-4 5.3.3, 5.3.4), as a command of its own
        with another header would abandon them.
        """
        self._chain = None
        self._out, self._out_pos = b"", 0

    def process(self, raw: bytes) -> Generator[Effect, Any, bytes]:
        """One command APDU in, one response APDU out (a generator of effects)."""
        try:
            cmd = apdu.parse_command(raw)
        except ApduError as e:
            self._chain = None
            self._out, self._out_pos = b"", 0
            return apdu.build_response(b"", e.sw)
        if cmd.cla & ~0x10:
            self._chain = None
            return apdu.build_response(b"", SW_CLA)
        if cmd.ins == self.INS_GET_RESPONSE and not cmd.chained:
            return self._get_response(cmd)
        self._out, self._out_pos = b"", 0
        header = (cmd.ins, cmd.p1, cmd.p2)
        if self._chain is not None and self._chain[0] != header:
            self._chain = None  # a different command abandons the chain
        if cmd.chained:
            if cmd.ins not in self.CHAINABLE:
                self._chain = None
                return apdu.build_response(b"", SW_CHAIN_UNSUPPORTED)
            if self._chain is None:
                self._chain = (header, bytearray())
            self._chain[1].extend(cmd.data)
            if len(self._chain[1]) > self.MAX_CHAIN:
                self._chain = None
                return apdu.build_response(b"", SW_NO_MEMORY)
            return apdu.build_response(b"", SW_OK)
        data = cmd.data
        if self._chain is not None:
            buf = self._chain[1]
            buf.extend(cmd.data)
            self._chain = None
            if len(buf) > self.MAX_CHAIN:
                return apdu.build_response(b"", SW_NO_MEMORY)
            data = bytes(buf)
        try:
            body, sw = yield from self._dispatch(cmd, data)
        except ApduError as e:
            body, sw = b"", e.sw
        except WireError:
            body, sw = b"", SW_WRONG_DATA
        except EffectFailed as e:
            yield Notice("effect-failed", {"ins": cmd.ins, "why": str(e), "sw": e.sw})
            body, sw = b"", e.sw
        if sw != SW_OK or not body:
            return apdu.build_response(b"", sw)
        return self._respond(body, cmd)

    def _dispatch(self, cmd: Command, data: bytes) -> Generator[Effect, Any, tuple[bytes, int]]:  # pragma: no cover
        raise NotImplementedError
