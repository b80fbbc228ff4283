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
    INTERNAL = 10  # the server failed; nothing was changed, unless its database connection broke at the COMMIT
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
    the new KDF parameters (the card's own salt) and the protected information whose
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
        # the layout's struct twin (once per insert); anything it does not take, the schema decodes or refuses
        if type(data) is bytes and len(data) >= 5:
            alg, salt = _KDF_ALGS.get(data[0]), _take(data, 1, 1, 0, 64)
            if alg is not None and salt is not None and salt[1] + 3 == len(data):
                at = salt[1]
                return cls(alg=alg, salt=salt[0], log2_n=data[at], r=data[at + 1], p=data[at + 2])
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
        if type(data) is bytes and len(data) == 64:  # the layout's struct twin: ri2, then the MAC
            return cls(ri2=data[:32], mac=data[32:])
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
    if type(ri1) is bytes and len(ri1) == 32 and type(ri2) is bytes and len(ri2) == 32:  # MasterInput's twin
        text = _put_text(serial, 1, MAX_SERIAL)
        if text is not None:
            return b"vsc1 master-key" + ri1 + ri2 + text
    return _MasterInput.build(dict(ri1=ri1, ri2=ri2, serial=serial))


def _decode_struct(schema, cls, data: bytes, what: str):
    from vsc.wire.errors import ErrorCode, WireError

    try:
        parsed = schema.parse(data)
    except c.ConstructError as e:
        raise WireError(ErrorCode.MALFORMED, f"{what}: {str(e).strip()}") from None
    return cls(**{f.name: parsed[f.name] for f in attrs.fields(cls)})


# ---------------------------------------------------------------- struct twins of the operation messages
#
# A cycle (insert + remove) decodes two OpRequests and an AuthResponse and builds an AuthChallenge and two
# OpResults: plain byte layouts, built and split here without construct when every value is in range and of
# the exact type. Anything else (a length out of bounds, an unknown enum value, text that is not UTF-8,
# truncation, trailing bytes) returns None and goes through SCHEMA, which raises its own error
# (tests/test_wire.py compares each twin with its schema on samples, truncations and one-byte mutations).

_OPS = {int(v): v for v in Op}
_METHODS = {int(v): v for v in AuthMethod}
_STATUSES = {int(v): v for v in Status}
_KDF_ALGS = {int(v): v for v in KdfAlg}


def _put(value, width: int, lo: int, hi: int) -> bytes | None:
    if type(value) is not bytes or not lo <= len(value) <= hi:
        return None
    return len(value).to_bytes(width, "big") + value


def _put_text(value, lo: int, hi: int) -> bytes | None:
    if type(value) is not str:
        return None
    try:
        return _put(value.encode("utf-8"), 1, lo, hi)
    except UnicodeEncodeError:
        return None


def _take(body: bytes, at: int, width: int, lo: int, hi: int):
    """(the length-prefixed bytes at ``at``, the offset after them), or None."""
    start = at + width
    if start > len(body):
        return None
    n = int.from_bytes(body[at:start], "big")
    end = start + n
    if not lo <= n <= hi or end > len(body):
        return None
    return body[start:end], end


def _u32(value) -> bytes | None:
    return value.to_bytes(4, "big") if type(value) is int and 0 <= value < 1 << 32 else None


def _op_request_body(msg: OpRequest) -> bytes | None:
    parts = (bytes((msg.op,)) if type(msg.op) in (int, Op) and msg.op in _OPS else None,
             _put_text(msg.serial, 1, MAX_SERIAL), _put(msg.insert_secret, 1, 0, SECRET_SIZE),
             _put(msg.muk, 1, 0, MUK_SIZE), _u32(msg.version), _put(msg.protected, 4, 0, MAX_PROTECTED))
    return None if None in parts else b"".join(parts)


def _op_request_parse(body: bytes) -> OpRequest | None:
    if type(body) is not bytes or not body:
        return None
    op = _OPS.get(body[0])
    serial = _take(body, 1, 1, 1, MAX_SERIAL)
    if op is None or serial is None:
        return None
    secret = _take(body, serial[1], 1, 0, SECRET_SIZE)
    muk = secret and _take(body, secret[1], 1, 0, MUK_SIZE)
    if not muk or muk[1] + 4 > len(body):
        return None
    protected = _take(body, muk[1] + 4, 4, 0, MAX_PROTECTED)
    if protected is None or protected[1] != len(body):
        return None
    try:
        text = serial[0].decode("utf-8")
    except UnicodeDecodeError:
        return None
    return OpRequest(op=op, serial=text, insert_secret=secret[0], muk=muk[0],
                     version=int.from_bytes(body[muk[1]:muk[1] + 4], "big"), protected=protected[0])


def _op_result_body(msg: OpResult) -> bytes | None:
    parts = (bytes((msg.status,)) if type(msg.status) in (int, Status) and msg.status in _STATUSES else None,
             _u32(msg.version), _put(msg.protected, 4, 0, MAX_PROTECTED),
             _put(msg.registration, 2, 0, MAX_REGISTRATION))
    return None if None in parts else b"".join(parts)


def _op_result_parse(body: bytes) -> OpResult | None:
    if type(body) is not bytes or len(body) < 5:
        return None
    status = _STATUSES.get(body[0])
    protected = _take(body, 5, 4, 0, MAX_PROTECTED)
    registration = protected and _take(body, protected[1], 2, 0, MAX_REGISTRATION)
    if status is None or not registration or registration[1] != len(body):
        return None
    return OpResult(status=status, version=int.from_bytes(body[1:5], "big"), protected=protected[0],
                    registration=registration[0])


def _items_body(items) -> bytes | None:
    if type(items) is not tuple or not 1 <= len(items) <= 8:
        return None
    out = [bytes((len(items),))]
    for item in items:
        if type(item) is not AuthItem or type(item.method) not in (int, AuthMethod) or item.method not in _METHODS:
            return None
        data = _put(item.data, 2, 0, MAX_AUTH_DATA)
        if data is None:
            return None
        out += (bytes((item.method,)), data)
    return b"".join(out)


def _items_parse(body: bytes, at: int):
    """(a tuple of AuthItems, the offset after them), or None."""
    if at >= len(body) or not 1 <= body[at] <= 8:
        return None
    count, at = body[at], at + 1
    items = []
    for _ in range(count):
        if at >= len(body):
            return None
        method = _METHODS.get(body[at])
        data = _take(body, at + 1, 2, 0, MAX_AUTH_DATA)
        if method is None or data is None:
            return None
        items.append(AuthItem(method=method, data=data[0]))
        at = data[1]
    return tuple(items), at


def _auth_challenge_body(msg: AuthChallenge) -> bytes | None:
    kdf, items = _put(msg.kdf, 2, 1, MAX_KDF), _items_body(msg.challenges)
    return None if kdf is None or items is None else kdf + items


def _auth_challenge_parse(body: bytes) -> AuthChallenge | None:
    if type(body) is not bytes:
        return None
    kdf = _take(body, 0, 2, 1, MAX_KDF)
    items = kdf and _items_parse(body, kdf[1])
    if not items or items[1] != len(body):
        return None
    return AuthChallenge(kdf=kdf[0], challenges=items[0])


def _auth_response_body(msg: AuthResponse) -> bytes | None:
    items, muk = _items_body(msg.responses), _put(msg.muk, 1, 0, MUK_SIZE)
    return None if items is None or muk is None else items + muk


def _auth_response_parse(body: bytes) -> AuthResponse | None:
    if type(body) is not bytes:
        return None
    items = _items_parse(body, 0)
    muk = items and _take(body, items[1], 1, 0, MUK_SIZE)
    if not muk or muk[1] != len(body):
        return None
    return AuthResponse(responses=items[0], muk=muk[0])


OpRequest._TWIN = (_op_request_body, _op_request_parse)  # type: ignore[attr-defined]
OpResult._TWIN = (_op_result_body, _op_result_parse)  # type: ignore[attr-defined]
AuthChallenge._TWIN = (_auth_challenge_body, _auth_challenge_parse)  # type: ignore[attr-defined]
AuthResponse._TWIN = (_auth_response_body, _auth_response_parse)  # type: ignore[attr-defined]
