"""
The protected channel's messages (Figure 7, [0078]): the handshake frames,
the alert, the sealed record, and the inner CLOSE / ECHO messages.
docs/protocol.md is normative; field sizes here must match it.
"""

from __future__ import annotations

import enum
import struct

import attrs
import construct as c

from vsc.wire.codec import (
    U8,
    U16,
    U64,
    Array,
    Bytes,
    EmptyOr,
    Fast,
    Flag,
    Message,
    MessageType,
    StrictEnum,
    Terminated,
    register,
)
from vsc.wire.errors import ErrorCode

RANDOM_SIZE = 32  # r1, r2
SESSION_KEY_SIZE = 32  # s1, s2
X25519_SIZE = 32
MAC_SIZE = 32
MAX_SPKI = 1200  # an RSA-4096 SubjectPublicKeyInfo is 550 bytes
MAX_KEY_TRANSPORT = 512  # RSA-4096 ciphertext
MAX_SUITES = 8
MAX_ECHO = 65536


class Suite(enum.IntEnum):
    """Record-protection suites (docs/protocol.md, "Suites")."""

    AES256_GCM = 0x01
    CHACHA20_POLY1305 = 0x02
    AES256_CBC_HMAC_SHA256 = 0x03
    DES_CBC_MD5 = 0x80  # the patent's [0078] suite; insecure, opt-in on both ends

    @property
    def label(self) -> str:
        return _SUITE_NAMES[self]

    @classmethod
    def from_label(cls, label: str) -> "Suite":
        for s, name in _SUITE_NAMES.items():
            if name == label:
                return s
        raise ValueError(f"unknown suite {label!r}; known: {', '.join(_SUITE_NAMES.values())}")


_SUITE_NAMES = {
    Suite.AES256_GCM: "aes256-gcm",
    Suite.CHACHA20_POLY1305: "chacha20-poly1305",
    Suite.AES256_CBC_HMAC_SHA256: "aes256-cbc-hmac-sha256",
    Suite.DES_CBC_MD5: "des-cbc-md5",
}

_SuiteField = StrictEnum(U8, Suite)


def _fixed(n: int):
    def check(inst, attribute, value):
        if not isinstance(value, bytes) or len(value) != n:
            raise ValueError(f"{attribute.name} must be {n} bytes")

    return check


@register
@attrs.frozen
class Hello(Message):
    """Server → card, first frame: r1 (402), the server's public key (404), and
    an optional X25519 ephemeral key for the forward-secret variant."""

    TYPE = MessageType.HELLO
    SCHEMA = c.Struct(
        "r1" / c.Bytes(RANDOM_SIZE),
        "server_key" / Bytes(U16, MAX_SPKI, 1, "server_key"),
        "fs_public" / EmptyOr(U8, X25519_SIZE, "fs_public"),
    )
    r1: bytes = attrs.field(validator=_fixed(RANDOM_SIZE))
    server_key: bytes = attrs.field()
    fs_public: bytes = b""


@register
@attrs.frozen
class KeyTransport(Message):
    """Card → server: r2, the suites offered in the card's preference order, an
    optional X25519 ephemeral key, and RSA-OAEP(r1 || r2 || s1 || s2)."""

    TYPE = MessageType.KEY_TRANSPORT
    SCHEMA = c.Struct(
        "r2" / c.Bytes(RANDOM_SIZE),
        "suites" / Array(U8, _SuiteField, MAX_SUITES, 1, "suites"),
        "fs_public" / EmptyOr(U8, X25519_SIZE, "fs_public"),
        "ciphertext" / Bytes(U16, MAX_KEY_TRANSPORT, 1, "ciphertext"),
    )
    r2: bytes = attrs.field(validator=_fixed(RANDOM_SIZE))
    suites: tuple = attrs.field(converter=tuple)
    fs_public: bytes = b""
    ciphertext: bytes = b""


# The RSA-OAEP plaintext of KeyTransport.ciphertext.
KeyTransportPlaintext = c.Struct(
    "r1" / c.Bytes(RANDOM_SIZE),
    "r2" / c.Bytes(RANDOM_SIZE),
    "s1" / c.Bytes(SESSION_KEY_SIZE),
    "s2" / c.Bytes(SESSION_KEY_SIZE),
    Terminated,
)
_KeyTransportPlaintext = Fast(KeyTransportPlaintext)


@register
@attrs.frozen
class ServerFinished(Message):
    """Server → card: the chosen suite, whether X25519 was mixed in, and the
    server's key-confirmation MAC over the transcript."""

    TYPE = MessageType.SERVER_FINISHED
    SCHEMA = c.Struct(
        "suite" / _SuiteField,
        "forward_secret" / Flag,
        "mac" / c.Bytes(MAC_SIZE),
    )
    suite: Suite
    forward_secret: bool
    mac: bytes = attrs.field(validator=_fixed(MAC_SIZE))


@register
@attrs.frozen
class ClientFinished(Message):
    """Card → server: the card's key-confirmation MAC."""

    TYPE = MessageType.CLIENT_FINISHED
    SCHEMA = c.Struct("mac" / c.Bytes(MAC_SIZE))
    mac: bytes = attrs.field(validator=_fixed(MAC_SIZE))


@register
@attrs.frozen
class Alert(Message):
    """Either way, plaintext: the channel is closing because of ``code``."""

    TYPE = MessageType.ALERT
    SCHEMA = c.Struct("code" / StrictEnum(U16, ErrorCode))
    code: ErrorCode


@register
@attrs.frozen
class Record(Message):
    """A sealed record: sequence number, then the suite's sealed bytes."""

    TYPE = MessageType.RECORD
    SCHEMA = c.Struct("seq" / U64, "sealed" / c.GreedyBytes)
    seq: int
    sealed: bytes


# Record's struct twin (every sealed record in either direction goes through it): the 8-byte sequence number,
# then the sealed bytes. Used when the values fit; anything else goes through SCHEMA and raises its error
# (tests/test_wire.py checks the twin gives the schema's bytes and values).
_SEQ = struct.Struct(">Q")


def _record_body(msg: Record) -> bytes | None:
    if type(msg.seq) is int and 0 <= msg.seq < 1 << 64 and type(msg.sealed) is bytes:
        return _SEQ.pack(msg.seq) + msg.sealed
    return None


def _record_parse(body: bytes) -> Record | None:
    if len(body) >= _SEQ.size:
        return Record(seq=_SEQ.unpack_from(body)[0], sealed=bytes(body[_SEQ.size:]))
    return None


Record._TWIN = (_record_body, _record_parse)  # type: ignore[attr-defined]


@register
@attrs.frozen
class Close(Message):
    """Inner: orderly close (code CLOSE_NOTIFY) or an authenticated error."""

    TYPE = MessageType.CLOSE
    INNER = True
    SCHEMA = c.Struct("code" / StrictEnum(U16, ErrorCode))
    code: ErrorCode = ErrorCode.CLOSE_NOTIFY


@register
@attrs.frozen
class EchoRequest(Message):
    """Inner: ask the peer to send ``data`` back (liveness, demos, benchmarks)."""

    TYPE = MessageType.ECHO_REQUEST
    INNER = True
    SCHEMA = c.Struct("data" / Bytes(c.Int32ub, MAX_ECHO, 0, "data"))
    data: bytes = b""


@register
@attrs.frozen
class EchoReply(Message):
    """Inner: the answer to an EchoRequest."""

    TYPE = MessageType.ECHO_REPLY
    INNER = True
    SCHEMA = c.Struct("data" / Bytes(c.Int32ub, MAX_ECHO, 0, "data"))
    data: bytes = b""


# EchoRequest's and EchoReply's struct twin (a card's liveness poll and its answer): a 4-byte length, then
# the data. Used when the values fit; anything else goes through SCHEMA and raises its error.
_LEN32 = struct.Struct(">I")


def _echo_twin(cls):
    def body(msg) -> bytes | None:
        if type(msg.data) is bytes and len(msg.data) <= MAX_ECHO:
            return _LEN32.pack(len(msg.data)) + msg.data
        return None

    def parse(data: bytes):
        if len(data) >= 4 and _LEN32.unpack_from(data)[0] == len(data) - 4 <= MAX_ECHO:
            return cls(data=bytes(data[4:]))
        return None

    cls._TWIN = (body, parse)


_echo_twin(EchoRequest)
_echo_twin(EchoReply)


@attrs.frozen
class SessionSecrets:
    """The RSA-OAEP plaintext carried by KeyTransport: r1 || r2 || s1 || s2."""

    r1: bytes
    r2: bytes
    s1: bytes
    s2: bytes

    def encode(self) -> bytes:
        return _KeyTransportPlaintext.build(attrs.asdict(self))

    @classmethod
    def decode(cls, data: bytes) -> "SessionSecrets":
        from vsc.wire.errors import WireError

        try:
            p = _KeyTransportPlaintext.parse(data)
        except c.ConstructError:
            raise WireError(ErrorCode.HANDSHAKE_FAILED, f"key transport plaintext is {len(data)} bytes, expected 128") from None
        return cls(r1=p.r1, r2=p.r2, s1=p.s1, s2=p.s2)


# Inputs to the key schedule and the key-confirmation MACs (docs/protocol.md,
# "Key schedule"): fixed layouts so a second implementation derives the same.
KeyInfoSchema = c.Struct(
    "prefix" / c.Const(b"vsc1 "),
    "label" / c.PascalString(U8, "ascii"),
    "suite" / U8,
    "transcript" / c.Bytes(32),
)

FinishedInputSchema = c.Struct(
    "label" / c.PascalString(U8, "ascii"),
    "transcript" / c.Bytes(32),
    "suite" / U8,
    "forward_secret" / Flag,
)
_KeyInfo, _FinishedInput = Fast(KeyInfoSchema), Fast(FinishedInputSchema)


def _pascal_ascii(label: str) -> bytes | None:
    """PascalString(U8, "ascii")'s bytes when the label fits (None: let the schema say why not)."""
    if type(label) is not str or not label.isascii() or len(label) > 0xFF:
        return None
    return bytes((len(label),)) + label.encode("ascii")


def key_info(label: str, suite: int, transcript: bytes) -> bytes:
    # KeyInfoSchema's struct twin (six per handshake); anything out of range goes through the schema
    lab = _pascal_ascii(label)
    if lab is not None and isinstance(suite, int) and 0 <= suite <= 0xFF and type(transcript) is bytes \
            and len(transcript) == 32:
        return b"vsc1 " + lab + bytes((suite,)) + transcript
    return _KeyInfo.build(dict(label=label, suite=suite, transcript=transcript))


def finished_input(label: str, transcript: bytes, suite: int, forward_secret: bool) -> bytes:
    # FinishedInputSchema's struct twin (two per handshake); anything out of range goes through the schema
    lab = _pascal_ascii(label)
    if lab is not None and isinstance(suite, int) and 0 <= suite <= 0xFF and type(transcript) is bytes \
            and len(transcript) == 32 and forward_secret in (0, 1):
        return lab + transcript + bytes((suite, int(forward_secret)))
    return _FinishedInput.build(
        dict(label=label, transcript=transcript, suite=suite, forward_secret=forward_secret)
    )
