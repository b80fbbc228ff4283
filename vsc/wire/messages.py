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
    MAGIC,
    MAX_FRAME_BODY,
    PROTOCOL_VERSION,
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
    encode_frame,
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

# A whole RECORD frame's fixed part: FrameHeaderSchema, then RecordSchema's sequence number.
_RECORD_HEAD = struct.Struct(">2sBBIQ")


def record_frame(seq: int, sealed: bytes) -> bytes:
    """
    ``encode_frame(Record(seq=seq, sealed=sealed))`` (the channel sends one per
    record), built with one pack when every value is in range; anything else
    takes that long way and its error.
    """
    if type(seq) is int and 0 <= seq < 1 << 64 and type(sealed) is bytes and len(sealed) <= _MAX_SEALED:
        return _RECORD_HEAD.pack(MAGIC, PROTOCOL_VERSION, _RECORD_TYPE, _SEQ.size + len(sealed), seq) + sealed
    return encode_frame(Record(seq=seq, sealed=sealed))


_RECORD_TYPE = int(MessageType.RECORD)
_MAX_SEALED = MAX_FRAME_BODY - _SEQ.size


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


# The handshake frames' struct twins (one Hello, KeyTransport, ServerFinished and ClientFinished per handshake,
# an Alert or Close per refusal or close): the same layouts as the schemas above, used when every value is in
# range and of the exact type; anything else (a wrong length, an unknown suite or code, trailing bytes) returns
# None and goes through SCHEMA, which raises its error (tests/test_wire.py checks the twins against the schemas
# on samples, every truncation and every one-byte mutation).
_U16 = struct.Struct(">H")
_SUITES = {int(s): s for s in Suite}
_CODES = {int(e): e for e in ErrorCode}


def _is(value, n: int) -> bool:
    return type(value) is bytes and len(value) == n


def _hello_body(msg: Hello) -> bytes | None:
    key, fs = msg.server_key, msg.fs_public
    if _is(msg.r1, RANDOM_SIZE) and type(key) is bytes and 1 <= len(key) <= MAX_SPKI and type(fs) is bytes \
            and len(fs) in (0, X25519_SIZE):
        return msg.r1 + _U16.pack(len(key)) + key + bytes((len(fs),)) + fs
    return None


def _hello_parse(body: bytes) -> Hello | None:
    if type(body) is not bytes or len(body) < RANDOM_SIZE + 3:
        return None
    end = RANDOM_SIZE + 2 + _U16.unpack_from(body, RANDOM_SIZE)[0]
    if not RANDOM_SIZE + 3 <= end <= RANDOM_SIZE + 2 + MAX_SPKI or len(body) <= end:
        return None
    fs_len = body[end]
    if fs_len not in (0, X25519_SIZE) or len(body) != end + 1 + fs_len:
        return None
    return Hello(r1=body[:RANDOM_SIZE], server_key=body[RANDOM_SIZE + 2:end], fs_public=body[end + 1:])


def _key_transport_body(msg: KeyTransport) -> bytes | None:
    suites, fs, ct = msg.suites, msg.fs_public, msg.ciphertext
    if _is(msg.r2, RANDOM_SIZE) and type(suites) is tuple and 1 <= len(suites) <= MAX_SUITES \
            and all(type(s) in (int, Suite) and s in _SUITES for s in suites) and type(fs) is bytes \
            and len(fs) in (0, X25519_SIZE) and type(ct) is bytes and 1 <= len(ct) <= MAX_KEY_TRANSPORT:
        return (msg.r2 + bytes((len(suites),)) + bytes(suites) + bytes((len(fs),)) + fs + _U16.pack(len(ct)) + ct)
    return None


def _key_transport_parse(body: bytes) -> KeyTransport | None:
    if type(body) is not bytes or len(body) < RANDOM_SIZE + 1:
        return None
    count = body[RANDOM_SIZE]
    at = RANDOM_SIZE + 1 + count
    if not 1 <= count <= MAX_SUITES or len(body) < at + 1:
        return None
    suites = tuple(_SUITES.get(b) for b in body[RANDOM_SIZE + 1:at])
    if None in suites:
        return None
    fs_len = body[at]
    at += 1 + fs_len
    if fs_len not in (0, X25519_SIZE) or len(body) < at + 2:
        return None
    ct_len = _U16.unpack_from(body, at)[0]
    if not 1 <= ct_len <= MAX_KEY_TRANSPORT or len(body) != at + 2 + ct_len:
        return None
    return KeyTransport(r2=body[:RANDOM_SIZE], suites=suites, fs_public=body[at - fs_len:at], ciphertext=body[at + 2:])


def _server_finished_body(msg: ServerFinished) -> bytes | None:
    if type(msg.suite) in (int, Suite) and msg.suite in _SUITES and type(msg.forward_secret) is bool \
            and _is(msg.mac, MAC_SIZE):
        return bytes((msg.suite, msg.forward_secret)) + msg.mac
    return None


def _server_finished_parse(body: bytes) -> ServerFinished | None:
    if type(body) is bytes and len(body) == 2 + MAC_SIZE and body[0] in _SUITES and body[1] in (0, 1):
        return ServerFinished(suite=_SUITES[body[0]], forward_secret=bool(body[1]), mac=body[2:])
    return None


def _client_finished_body(msg: ClientFinished) -> bytes | None:
    return msg.mac if _is(msg.mac, MAC_SIZE) else None


def _client_finished_parse(body: bytes) -> ClientFinished | None:
    return ClientFinished(mac=body) if _is(body, MAC_SIZE) else None


def _code_twin(cls):
    def body(msg) -> bytes | None:
        if type(msg.code) in (int, ErrorCode) and msg.code in _CODES:
            return _U16.pack(msg.code)
        return None

    def parse(data: bytes):
        if type(data) is bytes and len(data) == 2:
            code = _CODES.get(_U16.unpack(data)[0])
            if code is not None:
                return cls(code=code)
        return None

    cls._TWIN = (body, parse)


Hello._TWIN = (_hello_body, _hello_parse)  # type: ignore[attr-defined]
KeyTransport._TWIN = (_key_transport_body, _key_transport_parse)  # type: ignore[attr-defined]
ServerFinished._TWIN = (_server_finished_body, _server_finished_parse)  # type: ignore[attr-defined]
ClientFinished._TWIN = (_client_finished_body, _client_finished_parse)  # type: ignore[attr-defined]
_code_twin(Alert)
_code_twin(Close)


@attrs.frozen
class SessionSecrets:
    """The RSA-OAEP plaintext carried by KeyTransport: r1 || r2 || s1 || s2."""

    r1: bytes
    r2: bytes
    s1: bytes
    s2: bytes

    def encode(self) -> bytes:
        # KeyTransportPlaintext's struct twin: four 32-byte strings back to back (else the schema's error)
        if _is(self.r1, RANDOM_SIZE) and _is(self.r2, RANDOM_SIZE) and _is(self.s1, SESSION_KEY_SIZE) \
                and _is(self.s2, SESSION_KEY_SIZE):
            return self.r1 + self.r2 + self.s1 + self.s2
        return _KeyTransportPlaintext.build(attrs.asdict(self))

    @classmethod
    def decode(cls, data: bytes) -> "SessionSecrets":
        from vsc.wire.errors import WireError

        if type(data) is bytes and len(data) == 2 * RANDOM_SIZE + 2 * SESSION_KEY_SIZE:  # the schema's twin
            return cls(r1=data[:32], r2=data[32:64], s1=data[64:96], s2=data[96:])
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
