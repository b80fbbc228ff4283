"""
The codec core: strict construct building blocks, the frame header, the
message registry, and encode/decode between attrs values and bytes.

Pitfalls handled here once for every message:

* ``Struct.parse`` ignores trailing bytes: every schema ends in ``Terminated``.
* ``Enum`` lets unknown integers through: ``StrictEnum`` rejects them.
* Short input raises ``StreamError``: callers deliver whole frames (the
  ``Deframer``) and every construct error becomes one ``WireError``.
* Variable-length fields have explicit maxima (``Bounded``), checked both when
  parsing and when building.
"""

from __future__ import annotations

import enum
import io
import struct
from typing import Any, ClassVar, Iterator, TypeVar

import attrs
import construct as c

from vsc.wire.errors import ErrorCode, WireError

MAGIC = b"VS"
PROTOCOL_VERSION = 1
HEADER_SIZE = 8
#: Largest frame body anyone may send (1 MiB): protected information with
#: several keys, certificates and data objects fits with room to spare.
MAX_FRAME_BODY = 1 << 20
#: Largest frame body accepted before the channel is established.
MAX_HANDSHAKE_BODY = 4096


class MessageType(enum.IntEnum):
    """The message-type registry (docs/protocol.md, "Message types")."""

    # plaintext handshake frames
    HELLO = 0x01
    KEY_TRANSPORT = 0x02
    SERVER_FINISHED = 0x03
    CLIENT_FINISHED = 0x04
    ALERT = 0x05
    RECORD = 0x10
    # inner messages, only inside a sealed RECORD
    CLOSE = 0x20
    ECHO_REQUEST = 0x21
    ECHO_REPLY = 0x22
    # 0x30-0x6F: card/server operations (vsc.wire.ops), inner only
    ENROL_REQUEST = 0x30
    OP_REQUEST = 0x31
    AUTH_CHALLENGE = 0x32
    AUTH_RESPONSE = 0x33
    OP_RESULT = 0x34
    PASSWORD_CHANGE = 0x35


class _Emitted(c.Adapter):
    """
    An Adapter the construct compiler can inline: its subcon compiled, its own
    ``_decode``/``_encode`` (the checks below) called as they are, so the
    compiled schema raises exactly where the interpreted one does.
    """

    def _emitparse(self, code):
        code.linkedinstances[id(self)] = self
        return f"linkedinstances[{id(self)}]._decode({self.subcon._compileparse(code)}, this, '(compiled)')"

    def _emitbuild(self, code):
        code.linkedinstances[id(self)] = self
        sub = self.subcon
        if isinstance(sub, c.Prefixed) and sub.subcon is c.GreedyBytes and not sub.includelength \
                and isinstance(sub.lengthfield, c.FormatField):
            # Prefixed(lengthfield, GreedyBytes) has no compiled build: the length, then the bytes (a value
            # that is not bytes fails here and the interpreted schema reports it)
            inner = (f"(reuse(len(obj), lambda obj: ({sub.lengthfield._compilebuild(code)})), "
                     f"io.write(obj if isinstance(obj, bytes) else b''[obj]), obj)[2]")
        else:
            inner = sub._compilebuild(code)
        return f"reuse(linkedinstances[{id(self)}]._encode(obj, this, '(compiled)'), lambda obj: ({inner}))"


class _StrictEnum(_Emitted):
    def __init__(self, subcon: c.Construct, enum_type: type[enum.IntEnum]):
        super().__init__(subcon)
        self.enum_type = enum_type

    def _decode(self, obj: int, context: Any, path: str) -> enum.IntEnum:
        try:
            return self.enum_type(obj)
        except ValueError:
            raise c.ValidationError(
                f"unknown {self.enum_type.__name__} value {obj:#x}", path=path
            ) from None

    def _encode(self, obj: Any, context: Any, path: str) -> int:
        try:
            return int(self.enum_type(obj))
        except ValueError:
            raise c.ValidationError(f"unknown {self.enum_type.__name__} value {obj!r}", path=path) from None


def StrictEnum(subcon: c.Construct, enum_type: type[enum.IntEnum]) -> c.Construct:
    """An integer field that only accepts the members of ``enum_type``."""
    return _StrictEnum(subcon, enum_type)


class _Bounded(_Emitted):
    def __init__(self, subcon: c.Construct, minimum: int, maximum: int, what: str):
        super().__init__(subcon)
        self.minimum, self.maximum, self.what = minimum, maximum, what

    def _check(self, obj: Any, path: str) -> None:
        n = len(obj)
        if not self.minimum <= n <= self.maximum:
            raise c.ValidationError(
                f"{self.what} has {n} items/bytes, allowed {self.minimum}..{self.maximum}",
                path=path,
            )

    def _decode(self, obj: Any, context: Any, path: str) -> Any:
        self._check(obj, path)
        if isinstance(obj, list):
            return tuple(obj)
        return obj

    def _encode(self, obj: Any, context: Any, path: str) -> Any:
        self._check(obj, path)
        return list(obj) if isinstance(obj, tuple) else obj


def Bytes(lenfield: c.Construct, maximum: int, minimum: int = 0, what: str = "field") -> c.Construct:
    """Length-prefixed bytes with an explicit maximum (and minimum)."""
    return _Bounded(c.Prefixed(lenfield, c.GreedyBytes), minimum, maximum, what)


class _EmptyOrExact(_Bounded):
    def _check(self, obj: Any, path: str) -> None:
        n = len(obj)
        if n not in (0, self.maximum):
            raise c.ValidationError(f"{self.what} has {n} bytes, allowed 0 or {self.maximum}", path=path)


def EmptyOr(lenfield: c.Construct, size: int, what: str = "field") -> c.Construct:
    """Length-prefixed bytes that are either absent (length 0) or exactly ``size`` bytes."""
    return _EmptyOrExact(c.Prefixed(lenfield, c.GreedyBytes), 0, size, what)


def Array(countfield: c.Construct, item: c.Construct, maximum: int, minimum: int = 0, what: str = "list") -> c.Construct:
    """A counted array with an explicit maximum number of items."""
    return _Bounded(c.PrefixedArray(countfield, item), minimum, maximum, what)


class _Utf8(_Emitted):
    def _decode(self, obj: bytes, context: Any, path: str) -> str:
        try:
            return obj.decode("utf-8")
        except UnicodeDecodeError:
            raise c.ValidationError("text is not valid UTF-8", path=path) from None

    def _encode(self, obj: str, context: Any, path: str) -> bytes:
        return obj.encode("utf-8")


def Text(lenfield: c.Construct, maximum: int, minimum: int = 0, what: str = "text") -> c.Construct:
    """Length-prefixed UTF-8 text, at most ``maximum`` bytes once encoded."""
    return _Utf8(Bytes(lenfield, maximum, minimum, what))


class _Nested(_Emitted):
    def __init__(self, cls: type, subcon: c.Construct):
        super().__init__(subcon)
        self.cls = cls

    def _decode(self, obj: Any, context: Any, path: str) -> Any:
        return self.cls(**{f.name: obj[f.name] for f in attrs.fields(self.cls)})

    def _encode(self, obj: Any, context: Any, path: str) -> dict:
        return {f.name: getattr(obj, f.name) for f in attrs.fields(self.cls)}


def Nested(cls: type, *fields: c.Construct) -> c.Construct:
    """A struct inside a message, with an attrs value ``cls`` in and out."""
    return _Nested(cls, c.Struct(*fields))


class _StrictFlag(_Emitted):
    """A boolean byte that must be 0 or 1 (``c.Flag`` reads any non-zero as
    true, so two encodings would decode to the same value)."""

    def _decode(self, obj: int, context: Any, path: str) -> bool:
        if obj not in (0, 1):
            raise c.ValidationError(f"flag byte {obj:#04x} is neither 0 nor 1", path=path)
        return bool(obj)

    def _encode(self, obj: Any, context: Any, path: str) -> int:
        if obj not in (0, 1):
            raise c.ValidationError(f"flag must be a bool, not {obj!r}", path=path)
        return int(obj)


Flag = _StrictFlag(c.Int8ub)
U8, U16, U32, U64 = c.Int8ub, c.Int16ub, c.Int32ub, c.Int64ub


class _StrictIO(io.BytesIO):
    """A BytesIO whose ``read(n)`` raises StreamError when fewer than ``n`` bytes are left, as construct's
    interpreted ``stream_read`` does (the compiler's generated code calls ``io.read(n)`` and would take a
    short read)."""

    def at_end(self) -> bool:
        return self.tell() >= len(self.getbuffer())

    def read(self, n: int | None = -1) -> bytes:
        data = super().read(n)
        if n is not None and n >= 0 and len(data) != n:
            raise c.StreamError(f"stream read less than specified amount, expected {n}, found {len(data)}")
        return data


class _Terminated(type(c.Terminated)):  # type: ignore[misc]
    """``c.Terminated`` that the construct compiler inlines: the end of input is checked without a read."""

    def _emitparse(self, code):
        code.linkedinstances[id(self)] = self
        return f"(None if io.at_end() else linkedinstances[{id(self)}]._parse(io, this, '(compiled)'))"

    def _emitbuild(self, code):
        return "obj"


Terminated = _Terminated()


def _strict_builders(con: c.Construct, seen: set | None = None) -> None:
    """
    Make the compiled builds of ``c.Bytes(n)`` and ``c.GreedyBytes`` in ``con`` as strict as the interpreted ones
    (Bytes(n): ``bytes`` of exactly n; GreedyBytes: ``bytes`` or a bytearray): construct's compiler emits a bare
    ``io.write(obj)``, which wrote 0 or 31 bytes for a 32-byte field, or a bytearray / memoryview the interpreted
    schema refuses. A value the check does not take fails there (``b''[obj]``), so Fast.build re-runs the
    interpreted schema, which builds it as it always did or raises its error.
    """
    seen = set() if seen is None else seen
    if id(con) in seen:
        return
    seen.add(id(con))
    if type(con) is c.Bytes and type(con.length) is int:
        n = con.length
        con._emitbuild = lambda code: f"(io.write(obj if type(obj) is bytes and len(obj) == {n} else b''[obj]), obj)[1]"
    elif con is c.GreedyBytes:
        con._emitbuild = lambda code: "(io.write(obj if isinstance(obj, (bytes, bytearray)) else b''[obj]), obj)[1]"
    for sub in (getattr(con, "subcon", None), *(getattr(con, "subcons", None) or ())):
        if isinstance(sub, c.Construct):
            _strict_builders(sub, seen)


class Fast:
    """
    A schema and its compiled twin (``Construct.compile()``: generated Python,
    several times faster), compiled on first use (importing stays cheap for a
    short-lived command). The compiled one runs first; if it raises anything,
    the interpreted schema runs on the same input, so every error is exactly
    the interpreted schema's (its class, path and message), and a value or
    byte string comes out only if the interpreted schema agrees it is valid
    (tests/test_wire.py checks both on every sample, truncation and mutation).
    A schema that does not compile is used as it is.
    """

    __slots__ = ("schema", "_compiled")

    def __init__(self, schema: c.Construct):
        self.schema = schema
        self._compiled: c.Construct | None = None

    @property
    def compiled(self) -> c.Construct:
        if self._compiled is None:
            try:
                _strict_builders(self.schema)
                compiled = self.schema.compile()
                compiled.module.BytesIO = _StrictIO  # its substreams (Prefixed) read strictly too
            except Exception:  # noqa: BLE001 - a construct the compiler cannot emit: interpreted only
                compiled = self.schema
            self._compiled = compiled
        return self._compiled

    # The compiled functions are called directly with the top-level context construct's parse_stream and
    # build_stream would make (a Container of _parsing, _building, _sizing and _params = itself): those
    # wrappers cost about as much as the generated code.
    #
    # That context refers to itself, and the generated code's struct context takes ``_root`` from it or else
    # refers to ITSELF too (with the stream in ``_io``): every call left a reference cycle of two Containers
    # and the stream (with a copy of the bytes) for the cycle collector, a dozen objects per sealed record,
    # which made a server holding 10,000 polling cards run a generation-0 collection 30 times a second.
    # Here ``_root`` is the top-level context (no schema of ours refers to ``_root``), and the context is
    # emptied after the call, so everything is freed at once by reference counting (tests/test_wire.py).

    @staticmethod
    def _context(parsing: bool) -> c.Container:
        context = c.Container(_parsing=parsing, _building=not parsing, _sizing=False)
        context["_params"] = context
        context["_root"] = context
        return context

    def parse(self, data: bytes) -> Any:
        compiled = self._compiled or self.compiled
        if compiled is not self.schema:
            context = self._context(True)
            try:
                return compiled.parsefunc(_StrictIO(data), context)
            except Exception:  # noqa: BLE001 - the interpreted schema says what is wrong
                pass
            finally:
                context.clear()
        return self.schema.parse(data)

    def build(self, obj: Any) -> bytes:
        compiled = self._compiled or self.compiled
        if compiled is not self.schema:
            context = self._context(False)
            try:
                stream = io.BytesIO()
                compiled.buildfunc(obj, stream, context)
                return stream.getvalue()
            except Exception:  # noqa: BLE001 - the interpreted schema says what is wrong
                pass
            finally:
                context.clear()
        return self.schema.build(obj)


# ---------------------------------------------------------------- frames

FrameHeaderSchema = c.Struct(
    "magic" / c.Bytes(2),
    "version" / U8,
    "type" / U8,
    "length" / U32,
)


@attrs.frozen
class FrameHeader:
    type: int
    length: int
    version: int = PROTOCOL_VERSION


def parse_header(data: bytes) -> FrameHeader:
    """Parse the 8-byte frame header and check magic and version (not type)."""
    msg_type, length = _header(data)
    return FrameHeader(type=msg_type, length=length, version=PROTOCOL_VERSION)


def _header(data) -> tuple[int, int]:
    """``parse_header``'s checks and errors, giving (type, length) without building a FrameHeader (twice per frame)."""
    if len(data) < HEADER_SIZE:
        raise WireError(ErrorCode.MALFORMED, f"frame header needs {HEADER_SIZE} bytes, got {len(data)}")
    magic, version, msg_type, length = _HEADER.unpack_from(data)  # FrameHeaderSchema's layout (fixed size)
    if magic != MAGIC:
        raise WireError(ErrorCode.MALFORMED, f"bad magic {magic!r}, expected {MAGIC!r}")
    if version != PROTOCOL_VERSION:
        raise WireError(
            ErrorCode.PROTOCOL_VERSION,
            f"protocol version {version}, this implementation speaks {PROTOCOL_VERSION}",
        )
    return msg_type, length


# The fixed-size layouts of every frame and record, as struct twins of their construct schemas (the schemas stay
# the specification; tests/test_wire.py checks that each twin gives the schema's bytes). Used only where every
# value is in range; anything else goes through the schema and raises its error.
_HEADER = struct.Struct(">2sBBI")  # FrameHeaderSchema
_Header = Fast(FrameHeaderSchema)


def build_header(msg_type: int, length: int) -> bytes:
    if length > MAX_FRAME_BODY:
        raise WireError(ErrorCode.FRAME_TOO_LARGE, f"frame body of {length} bytes exceeds {MAX_FRAME_BODY}")
    # isinstance, not type(...) is int: every frame's msg.TYPE is a MessageType (an IntEnum); a float, None or
    # str still goes to the schema and its error
    if isinstance(msg_type, int) and isinstance(length, int) and 0 <= msg_type <= 0xFF and 0 <= length:
        return _HEADER.pack(MAGIC, PROTOCOL_VERSION, msg_type, length)
    return _Header.build(dict(magic=MAGIC, version=PROTOCOL_VERSION, type=msg_type, length=length))


class Deframer:
    """
    Sans-IO frame splitter: feed any chunking of a byte stream, get whole
    frames (header + body) back. Raises WireError on a bad header or a length
    above ``max_body`` (which the owner may lower, e.g. during a handshake).
    """

    def __init__(self, max_body: int = MAX_FRAME_BODY):
        self.max_body = max_body
        self._buffer = bytearray()

    def whole(self, data: bytes) -> bytes | None:
        """
        ``data`` itself if nothing is buffered and it is exactly one whole
        frame whose header is valid and whose length is within ``max_body``
        (the common case: one frame per read); otherwise None, and the caller
        feeds it (``feed`` gives the same frame, or the error, the long way).
        """
        if self._buffer or len(data) < HEADER_SIZE:
            return None
        magic, version, _, length = _HEADER.unpack_from(data)
        if magic == MAGIC and version == PROTOCOL_VERSION and length <= self.max_body and len(data) == HEADER_SIZE + length:
            return data
        return None

    def feed(self, data: bytes) -> Iterator[bytes]:
        # Buffer now, not on the first next(): a caller that expects no whole
        # frame yet (and does not iterate) must not lose the partial data.
        self._buffer += data
        return self._frames()

    def _frames(self) -> Iterator[bytes]:
        # ``max_body`` is read before each frame, so the owner may raise it
        # between frames (e.g. once the handshake completes).
        while len(self._buffer) >= HEADER_SIZE:
            _, length = _header(self._buffer)  # reads the first HEADER_SIZE bytes only
            if length > self.max_body:
                raise WireError(
                    ErrorCode.FRAME_TOO_LARGE,
                    f"frame body of {length} bytes exceeds the limit of {self.max_body}",
                )
            end = HEADER_SIZE + length
            if len(self._buffer) < end:
                return
            frame = bytes(self._buffer[:end])
            del self._buffer[:end]
            yield frame

    @property
    def buffered(self) -> int:
        return len(self._buffer)


# ---------------------------------------------------------------- messages

M = TypeVar("M", bound="Message")

_REGISTRY: dict[MessageType, type["Message"]] = {}
_BY_NUMBER: dict[int, type["Message"]] = {}  # the same, keyed by the plain number (no MessageType(...) per decode)


class Message:
    """
    Base of every message: an attrs class with ``TYPE`` and ``SCHEMA`` (a
    construct Struct whose field names match the attrs fields).
    ``INNER`` says whether it travels only inside a sealed record.
    """

    TYPE: ClassVar[MessageType]
    SCHEMA: ClassVar[c.Construct]
    INNER: ClassVar[bool] = False


def register(cls: type[M]) -> type[M]:
    if cls.TYPE in _REGISTRY:
        raise RuntimeError(f"message type {cls.TYPE!r} registered twice")
    cls._TERMINATED = c.Struct(*cls.SCHEMA.subcons, Terminated)  # type: ignore[attr-defined]
    cls._FAST = Fast(cls._TERMINATED)  # type: ignore[attr-defined]
    cls._NAMES = tuple(f.name for f in attrs.fields(cls))  # type: ignore[attr-defined]  # (attrs.fields is slow)
    _REGISTRY[cls.TYPE] = cls
    _BY_NUMBER[int(cls.TYPE)] = cls
    return cls


def registry() -> dict[MessageType, type[Message]]:
    return dict(_REGISTRY)


def _fields(msg: Message) -> dict[str, Any]:
    names = getattr(type(msg), "_NAMES", None) or tuple(f.name for f in attrs.fields(type(msg)))
    return {name: getattr(msg, name) for name in names}


def encode_body(msg: Message) -> bytes:
    twin = getattr(type(msg), "_TWIN", None)  # a struct twin of the schema (messages.Record)
    if twin is not None:
        body = twin[0](msg)
        if body is not None:
            return body
    try:
        return type(msg)._FAST.build(_fields(msg))  # type: ignore[attr-defined]
    except c.ConstructError as e:
        raise WireError(ErrorCode.MALFORMED, f"cannot encode {type(msg).__name__}: {_explain(e)}") from None


def _message_class(msg_type: int) -> type[Message]:
    cls = _BY_NUMBER.get(msg_type)  # an int from a header or a record's first byte (MessageType members hash alike)
    if cls is None:
        raise WireError(ErrorCode.UNKNOWN_TYPE, f"unknown message type {msg_type:#04x}")
    return cls


def decode_body(msg_type: int, body: bytes, inner: bool | None = None) -> Message:
    """
    Decode a message body of type ``msg_type``. ``inner``: where it arrived
    (False: as a frame, True: inside a record, None: anywhere). docs/protocol.md
    §3 and §8 fix the order: an unknown type is UNKNOWN_TYPE; a known type
    out of its place (an inner-only type as a frame, a frame type in a
    record) is UNEXPECTED_MESSAGE *without parsing its body*; only then does
    the body have to parse (MALFORMED).
    """
    cls = _message_class(msg_type)
    if inner is not None and cls.INNER is not inner:
        where = "only valid inside a sealed record" if cls.INNER else "not valid inside a record"
        raise WireError(ErrorCode.UNEXPECTED_MESSAGE, f"{cls.__name__} is {where}")
    twin = getattr(cls, "_TWIN", None)
    if twin is not None:
        msg = twin[1](body)
        if msg is not None:
            return msg
    try:
        parsed = cls._FAST.parse(body)  # type: ignore[attr-defined]
    except c.TerminatedError:
        raise WireError(ErrorCode.MALFORMED, f"{cls.__name__}: trailing bytes after the last field") from None
    except c.StreamError:
        raise WireError(ErrorCode.MALFORMED, f"{cls.__name__}: truncated ({len(body)} bytes)") from None
    except c.ConstructError as e:
        raise WireError(ErrorCode.MALFORMED, f"{cls.__name__}: {_explain(e)}") from None
    try:
        return cls(**{name: parsed[name] for name in cls._NAMES})  # type: ignore[call-arg, attr-defined]
    except (TypeError, ValueError) as e:
        raise WireError(ErrorCode.MALFORMED, f"{cls.__name__}: {e}") from None


def _explain(e: c.ConstructError) -> str:
    text = str(e)
    # construct prefixes "Error in path (parsing) -> field"; keep it short
    return text.replace("\n", " ").strip()


def encode_frame(msg: Message) -> bytes:
    """A whole frame: header then body."""
    body = encode_body(msg)
    return build_header(msg.TYPE, len(body)) + body


def decode_frame(frame: bytes, max_body: int = MAX_FRAME_BODY) -> Message:
    """Decode exactly one whole frame (as produced by ``Deframer``)."""
    msg_type, length = _header(frame)
    if length > max_body:
        raise WireError(ErrorCode.FRAME_TOO_LARGE, f"frame body of {length} bytes exceeds {max_body}")
    if len(frame) != HEADER_SIZE + length:
        raise WireError(
            ErrorCode.MALFORMED,
            f"frame length field says {length} body bytes, frame has {len(frame) - HEADER_SIZE}",
        )
    return decode_body(msg_type, frame[HEADER_SIZE:], inner=False)


# Inner plaintext of a sealed record: one type byte, then the message body.
InnerSchema = c.Struct("type" / U8, "body" / c.GreedyBytes)
_Inner = Fast(InnerSchema)


def encode_inner(msg: Message) -> bytes:
    if not msg.INNER:
        raise WireError(ErrorCode.UNEXPECTED_MESSAGE, f"{type(msg).__name__} cannot travel inside a record")
    return bytes((msg.TYPE,)) + encode_body(msg)  # InnerSchema: the type byte, then the body (TYPE < 256)


def decode_inner(plaintext: bytes) -> Message:
    if not plaintext:
        raise WireError(ErrorCode.MALFORMED, "empty record plaintext")
    # InnerSchema: the type byte, then the body
    return decode_body(plaintext[0], plaintext[1:], inner=True)


RecordAADSchema = c.Struct(
    "magic" / c.Const(MAGIC),
    "version" / c.Const(PROTOCOL_VERSION, U8),
    "type" / c.Const(int(MessageType.RECORD), U8),
    "direction" / U8,
    "seq" / U64,
)

#: Record directions, authenticated in every record's AAD.
CARD_TO_SERVER = 0
SERVER_TO_CARD = 1


# what the twins below do not take (out of range, not an int) goes through the schemas and raises their errors
_RecordAAD, _U64 = Fast(RecordAADSchema), Fast(U64)


_AAD = struct.Struct(">2sBBBQ")  # RecordAADSchema
_SEQ = struct.Struct(">Q")  # U64
_RECORD = int(MessageType.RECORD)


def record_aad(direction: int, seq: int) -> bytes:
    if type(direction) is int and type(seq) is int and 0 <= direction <= 0xFF and 0 <= seq < 1 << 64:
        return _AAD.pack(MAGIC, PROTOCOL_VERSION, _RECORD, direction, seq)
    return _RecordAAD.build(dict(direction=direction, seq=seq))


def seq_bytes(seq: int) -> bytes:
    """The 8-byte big-endian sequence number used in AEAD nonces."""
    if type(seq) is int and 0 <= seq < 1 << 64:
        return _SEQ.pack(seq)
    return _U64.build(seq)
