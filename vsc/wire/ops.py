"""
Card ↔ server operations, carried as inner messages of the protected channel
(docs/protocol.md, "Operations"): enrol, insert (Figure 6), remove
(Figure 11), recover (Figure 12), destroy, sync.
"""

from __future__ import annotations

import enum

import attrs
import construct as c

from vsc.wire.codec import (U8, U16, U32, Array, Bytes, Fast, Message, MessageType, Nested, StrictEnum, Terminated, Text,
                            register)

MAX_SERIAL = 64
MAX_PROTECTED = 512 * 1024  # opaque protected information (ciphertext)
MAX_KDF = 512
MAX_AUTH_DATA = 16 * 1024  # one challenge or response (an agent's bytecode fits)
MAX_REGISTRATION = 16 * 1024
SECRET_SIZE = 32  # insert secret
MUK_SIZE = 32


class Op(enum.IntEnum):
    INSERT = 1
    REMOVE = 2
    RECOVER = 3
    DESTROY = 4
    SYNC = 5
    PASSWORD = 6  # a password change while in use (ChangePassword)
    ATTACH = 7  # a new channel of an in-use card presents its insert secret (raises the channel's limits)


class AuthMethod(enum.IntEnum):
    """Authentication methods (Figure 8): 501/502 owner, 503/504 implementation."""

    PASSWORD = 1  # [0039], [0086]: prove the authentication key
    MASTER_KEY = 2  # [0042], [0087], Figure 10
    KEYFILE = 3  # [0044]-[0046]
    ONE_TIME_AGENT = 4  # [0049]-[0051]
    TOTP = 5  # [0005], [0015], claim 5: reader-less device


class Status(enum.IntEnum):
    """
    Operation results. An unauthenticated peer only ever sees OK, REFUSED,
    BUSY, BAD_REQUEST, TIMEOUT, INTERNAL or STORAGE_FULL, identically for
    every serial.
    """

    OK = 0
    REFUSED = 1  # authentication failed, unknown serial, locked out, bad code: indistinguishable
    BUSY = 2  # another operation on this serial is running [0081]
    IN_USE = 3  # insert: the card is inserted elsewhere (authenticated peers only)
    NOT_IN_USE = 4  # recover/remove/sync: the card is not in use
    DESTROYED = 5  # the card is destroyed (authenticated peers only)
    MUK_MISMATCH = 6  # recover from another machine (authenticated peers only)
    VERSION_CONFLICT = 7  # sync/remove based on a stale version
    BAD_REQUEST = 8  # a request that makes no sense (missing fields)
    TIMEOUT = 9  # an answer came too late (implementation auth within 30 s)
    INTERNAL = 10  # the server failed; nothing was changed
    STORAGE_FULL = 11  # the server's database cannot store the change now (disk full); nothing was changed


_Serial = Text(U8, MAX_SERIAL, 1, "serial")


@register
@attrs.frozen
class EnrolRequest(Message):
    """First upload of a card's protected information and verifier, with the one-time code."""

    TYPE = MessageType.ENROL_REQUEST
    INNER = True
    SCHEMA = c.Struct(
        "serial" / _Serial,
        "code" / Text(U8, 128, 1, "code"),
        "verifier" / Bytes(U8, 64, 8, "verifier"),
        "kdf" / Bytes(U16, MAX_KDF, 1, "kdf"),
        "protected" / Bytes(U32, MAX_PROTECTED, 1, "protected"),
        "registration" / Bytes(U16, MAX_REGISTRATION, 0, "registration"),
    )
    serial: str
    code: str
    verifier: bytes
    kdf: bytes
    protected: bytes
    registration: bytes = b""


@register
@attrs.frozen
class OpRequest(Message):
    """
    Start an operation on ``serial``. ``insert_secret`` is the per-insert
    secret (drawn by the card at insert; presented for sync/remove and for a
    repeated insert). ``version`` and ``protected`` carry an upload.
    """

    TYPE = MessageType.OP_REQUEST
    INNER = True
    SCHEMA = c.Struct(
        "op" / StrictEnum(U8, Op),
        "serial" / _Serial,
        "insert_secret" / Bytes(U8, SECRET_SIZE, 0, "insert_secret"),
        "muk" / Bytes(U8, MUK_SIZE, 0, "muk"),
        "version" / U32,
        "protected" / Bytes(U32, MAX_PROTECTED, 0, "protected"),
    )
    op: Op
    serial: str
    insert_secret: bytes = b""
    muk: bytes = b""
    version: int = 0
    protected: bytes = b""


@register
@attrs.frozen
class ChangePassword(Message):
    """
    Change the owner's password while the card is in use (Op.PASSWORD):
    presented with the per-insert secret like sync; carries the new verifier,
    the new KDF parameters (a fresh salt) and the protected information whose
    data key is re-wrapped under the new protection key, based on ``version``.
    The server never sees either password.
    """

    TYPE = MessageType.PASSWORD_CHANGE
    INNER = True
    SCHEMA = c.Struct(
        "serial" / _Serial,
        "insert_secret" / Bytes(U8, SECRET_SIZE, SECRET_SIZE, "insert_secret"),
        "version" / U32,
        "verifier" / Bytes(U8, 64, 8, "verifier"),
        "kdf" / Bytes(U16, MAX_KDF, 1, "kdf"),
        "protected" / Bytes(U32, MAX_PROTECTED, 1, "protected"),
    )
    serial: str
    insert_secret: bytes = attrs.field(repr=False)
    version: int
    verifier: bytes = attrs.field(repr=False)
    kdf: bytes
    protected: bytes = attrs.field(repr=False)


@attrs.frozen
class AuthItem:
    """One challenge (server → card) or response (card → server) of ``method``."""

    method: AuthMethod
    data: bytes = b""


_Item = Nested(AuthItem, "method" / StrictEnum(U8, AuthMethod), "data" / Bytes(U16, MAX_AUTH_DATA, 0, "auth data"))


@register
@attrs.frozen
class AuthChallenge(Message):
    """Server → card: the KDF parameters for the owner's password and one challenge per required method."""

    TYPE = MessageType.AUTH_CHALLENGE
    INNER = True
    SCHEMA = c.Struct(
        "kdf" / Bytes(U16, MAX_KDF, 1, "kdf"),
        "challenges" / Array(U8, _Item, 8, 1, "challenges"),
    )
    kdf: bytes
    challenges: tuple = attrs.field(converter=tuple)


@register
@attrs.frozen
class AuthResponse(Message):
    """Card → server: one response per challenge, in order, and the MUK (303)."""

    TYPE = MessageType.AUTH_RESPONSE
    INNER = True
    SCHEMA = c.Struct(
        "responses" / Array(U8, _Item, 8, 1, "responses"),
        "muk" / Bytes(U8, MUK_SIZE, 0, "muk"),
    )
    responses: tuple = attrs.field(converter=tuple)
    muk: bytes = b""


@register
@attrs.frozen
class OpResult(Message):
    """Server → card: the outcome, the record's version, and a download when there is one."""

    TYPE = MessageType.OP_RESULT
    INNER = True
    SCHEMA = c.Struct(
        "status" / StrictEnum(U8, Status),
        "version" / U32,
        "protected" / Bytes(U32, MAX_PROTECTED, 0, "protected"),
        "registration" / Bytes(U16, MAX_REGISTRATION, 0, "registration"),
    )
    status: Status
    version: int = 0
    protected: bytes = b""
    registration: bytes = b""


class KdfAlg(enum.IntEnum):
    """Password key derivations (Figure 9, [0021], [0085])."""

    LEGACY_MD5 = 1  # MD5(password || SALT): first 64 bits auth key, second 64 bits protection key
    SCRYPT = 2  # scrypt(password, per-card salt): 256-bit auth key and 256-bit protection key


@attrs.frozen
class KdfParams:
    """Stored with the record and sent back at insert so the card can derive its keys."""

    alg: KdfAlg
    salt: bytes = b""
    log2_n: int = 15
    r: int = 8
    p: int = 1

    def encode(self) -> bytes:
        return _Kdf.build(attrs.asdict(self))

    @classmethod
    def decode(cls, data: bytes) -> "KdfParams":
        return _decode_struct(_Kdf, cls, data, "KDF parameters")


_KdfSchema = c.Struct(
    "alg" / StrictEnum(U8, KdfAlg),
    "salt" / Bytes(U8, 64, 0, "salt"),
    "log2_n" / c.Int8ub,
    "r" / c.Int8ub,
    "p" / c.Int8ub,
    Terminated,
)
_Kdf = Fast(_KdfSchema)


@attrs.frozen
class MasterResponse:
    """Figure 10: the card's ri2 and its keyed hash over ri1, ri2 and Master."""

    ri2: bytes
    mac: bytes

    def encode(self) -> bytes:
        return _Master.build(attrs.asdict(self))

    @classmethod
    def decode(cls, data: bytes) -> "MasterResponse":
        return _decode_struct(_Master, cls, data, "Master-key response")


_MasterSchema = c.Struct("ri2" / c.Bytes(32), "mac" / c.Bytes(32), Terminated)
_Master = Fast(_MasterSchema)

# The input of the Master-key keyed hash: a fixed label, ri1, ri2, the serial.
MasterInput = c.Struct(
    "label" / c.Const(b"vsc1 master-key"),
    "ri1" / c.Bytes(32),
    "ri2" / c.Bytes(32),
    "serial" / _Serial,
)
_MasterInput = Fast(MasterInput)


def master_input(ri1: bytes, ri2: bytes, serial: str) -> bytes:
    return _MasterInput.build(dict(ri1=ri1, ri2=ri2, serial=serial))


def _decode_struct(schema, cls, data: bytes, what: str):
    from vsc.wire.errors import ErrorCode, WireError

    try:
        parsed = schema.parse(data)
    except c.ConstructError as e:
        raise WireError(ErrorCode.MALFORMED, f"{what}: {str(e).strip()}") from None
    return cls(**{f.name: parsed[f.name] for f in attrs.fields(cls)})
