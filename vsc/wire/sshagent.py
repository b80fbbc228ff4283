"""
The SSH agent protocol (draft-miller-ssh-agent, OpenSSH PROTOCOL.agent) as
the card's ssh-agent speaks it: length-prefixed messages on a UNIX socket,

    uint32 length, byte type, contents            (length counts type + contents)

and the SSH signature blobs it answers with (RFC 4253 6.6, RFC 5656 3.1.2,
RFC 8332):

    string algorithm, string signature            ECDSA: signature = mpint r, mpint s

and the public key blobs it lists (RFC 4253 6.6, RFC 5656 3.1):

    string "ssh-rsa", mpint e, mpint n
    string "ecdsa-sha2-nistp256", string "nistp256", string Q (uncompressed point)

(twisted.conch.ssh.keys would need bcrypt, which vsc does not otherwise
depend on; these few schemas do not.)
"""

from __future__ import annotations

import enum
from typing import Any, Union

import attrs
import construct as c

from vsc.wire.codec import U8, U32, Array, Bytes, Text
from vsc.wire.errors import ErrorCode, WireError

#: Largest message accepted (OpenSSH's AGENT_MAX_LEN): a longer length field closes the connection.
MAX_MESSAGE = 256 * 1024
MAX_KEY_BLOB = 16 * 1024
MAX_COMMENT = 1024
MAX_IDENTITIES = 64
MAX_SIGNATURE = 2048
MAX_MPINT = 1024


class AgentMessageType(enum.IntEnum):
    # SSH1 (obsolete): answered with failure
    REQUEST_RSA_IDENTITIES = 1
    RSA_IDENTITIES_ANSWER = 2
    REMOVE_RSA_IDENTITY = 8
    REMOVE_ALL_RSA_IDENTITIES = 9
    # SSH2
    FAILURE = 5
    SUCCESS = 6
    REQUEST_IDENTITIES = 11
    IDENTITIES_ANSWER = 12
    SIGN_REQUEST = 13
    SIGN_RESPONSE = 14
    ADD_IDENTITY = 17
    REMOVE_IDENTITY = 18
    REMOVE_ALL_IDENTITIES = 19
    ADD_SMARTCARD_KEY = 20
    REMOVE_SMARTCARD_KEY = 21
    LOCK = 22
    UNLOCK = 23
    ADD_ID_CONSTRAINED = 25
    ADD_SMARTCARD_KEY_CONSTRAINED = 26
    EXTENSION = 27
    EXTENSION_FAILURE = 28


class SignFlags(enum.IntFlag):
    """SSH_AGENTC_SIGN_REQUEST flags (RFC 8332 for the RSA ones)."""

    OLD_SIGNATURE = 1
    RSA_SHA2_256 = 2
    RSA_SHA2_512 = 4


# ---------------------------------------------------------------- values


@attrs.frozen
class RequestIdentities:
    pass


@attrs.frozen
class SignRequest:
    key_blob: bytes
    data: bytes = attrs.field(repr=lambda d: f"<{len(d)} bytes>")
    flags: int = 0


@attrs.frozen
class Extension:
    name: str
    contents: bytes = b""


@attrs.frozen
class OtherRequest:
    """Any request the card's agent does not serve (add/remove/lock/SSH1...): its type only."""

    type: int


@attrs.frozen
class Identity:
    key_blob: bytes
    comment: str


@attrs.frozen
class IdentitiesAnswer:
    identities: tuple = attrs.field(converter=tuple, default=())


@attrs.frozen
class SignResponse:
    signature: bytes


@attrs.frozen
class Failure:
    pass


@attrs.frozen
class Success:
    pass


Request = Union[RequestIdentities, SignRequest, Extension, OtherRequest]
Response = Union[IdentitiesAnswer, SignResponse, Failure, Success]


@attrs.frozen
class SshSignature:
    """An SSH signature blob: ``string algorithm, string signature``."""

    algorithm: str
    blob: bytes


@attrs.frozen
class RsaPublicKey:
    e: int
    n: int

    algorithm = "ssh-rsa"


@attrs.frozen
class EcdsaPublicKey:
    curve: str  # "nistp256"
    point: bytes  # X9.62 uncompressed

    @property
    def algorithm(self) -> str:
        return f"ecdsa-sha2-{self.curve}"


PublicKey = Union[RsaPublicKey, EcdsaPublicKey]


@attrs.frozen
class EcdsaSignature:
    """The inner blob of an ecdsa-sha2-* signature: ``mpint r, mpint s``."""

    r: int
    s: int


# ---------------------------------------------------------------- schemas


class _Mpint(c.Adapter):
    """An SSH mpint that must be non-negative and minimally encoded (RFC 4251 section 5)."""

    def _decode(self, obj: bytes, context: Any, path: str) -> int:
        if obj and obj[0] & 0x80:
            raise c.ValidationError("negative mpint", path=path)
        if len(obj) > 1 and obj[0] == 0 and not obj[1] & 0x80:
            raise c.ValidationError("mpint has a superfluous leading zero", path=path)
        if obj == b"\x00":
            raise c.ValidationError("mpint zero must be empty", path=path)
        return int.from_bytes(obj, "big")

    def _encode(self, obj: int, context: Any, path: str) -> bytes:
        if not isinstance(obj, int) or obj < 0:
            raise c.ValidationError(f"mpint must be a non-negative int, not {obj!r}", path=path)
        if obj == 0:
            return b""
        return obj.to_bytes(obj.bit_length() // 8 + 1, "big")  # room for the sign bit


Mpint = _Mpint(Bytes(U32, MAX_MPINT, 0, "mpint"))

_Typed = c.Struct("type" / U8, "contents" / c.GreedyBytes)
_Length = U32

_Empty = c.Struct(c.Terminated)
_SignRequest = c.Struct(
    "key_blob" / Bytes(U32, MAX_KEY_BLOB, 1, "key blob"),
    "data" / Bytes(U32, MAX_MESSAGE, 0, "data to sign"),
    "flags" / U32,
    c.Terminated,
)
_Extension = c.Struct("name" / Text(U32, 256, 1, "extension name"), "contents" / c.GreedyBytes)
_Identity = c.Struct("key_blob" / Bytes(U32, MAX_KEY_BLOB, 1, "key blob"), "comment" / Text(U32, MAX_COMMENT, 0, "comment"))
_IdentitiesAnswer = c.Struct("identities" / Array(U32, _Identity, MAX_IDENTITIES, 0, "identities"), c.Terminated)
_SignResponse = c.Struct("signature" / Bytes(U32, MAX_SIGNATURE, 1, "signature"), c.Terminated)
_Signature = c.Struct("algorithm" / Text(U32, 64, 1, "signature algorithm"), "blob" / Bytes(U32, MAX_SIGNATURE, 1, "signature"), c.Terminated)
_EcdsaSignature = c.Struct("r" / Mpint, "s" / Mpint, c.Terminated)
_KeyBlob = c.Struct("algorithm" / Text(U32, 64, 1, "key algorithm"), "body" / c.GreedyBytes)
_RsaKeyBody = c.Struct("e" / Mpint, "n" / Mpint, c.Terminated)
_EcdsaKeyBody = c.Struct("curve" / Text(U32, 32, 1, "curve"), "point" / Bytes(U32, 133, 1, "EC point"), c.Terminated)

T = AgentMessageType


def _parse(schema: c.Construct, data: bytes, what: str):
    try:
        return schema.parse(data)
    except c.TerminatedError:
        raise WireError(ErrorCode.MALFORMED, f"{what}: trailing bytes after the last field") from None
    except c.StreamError:
        raise WireError(ErrorCode.MALFORMED, f"{what}: truncated ({len(data)} bytes)") from None
    except c.ConstructError as e:
        raise WireError(ErrorCode.MALFORMED, f"{what}: {str(e).strip()}") from None


def _build(schema: c.Construct, value: dict, what: str) -> bytes:
    try:
        return schema.build(value)
    except c.ConstructError as e:
        raise WireError(ErrorCode.MALFORMED, f"cannot encode {what}: {str(e).strip()}") from None


def frame(body: bytes) -> bytes:
    """``uint32 length || body``: one message on the socket."""
    if len(body) > MAX_MESSAGE:
        raise WireError(ErrorCode.FRAME_TOO_LARGE, f"agent message of {len(body)} bytes exceeds {MAX_MESSAGE}")
    return _Length.build(len(body)) + body


# ---------------------------------------------------------------- requests (client → agent)


def decode_request(body: bytes) -> Request:
    """One message body → a request value; WireError (MALFORMED) if it does not parse."""
    if not body:
        raise WireError(ErrorCode.MALFORMED, "empty agent message (no type byte)")
    typed = _Typed.parse(body)
    kind, contents = typed.type, typed.contents
    if kind == T.REQUEST_IDENTITIES:
        _parse(_Empty, contents, "REQUEST_IDENTITIES")
        return RequestIdentities()
    if kind == T.SIGN_REQUEST:
        p = _parse(_SignRequest, contents, "SIGN_REQUEST")
        return SignRequest(key_blob=p.key_blob, data=p.data, flags=p.flags)
    if kind == T.EXTENSION:
        p = _parse(_Extension, contents, "EXTENSION")
        return Extension(name=p.name, contents=p.contents)
    return OtherRequest(type=kind)


def encode_request(req: Request) -> bytes:
    """A request as a whole framed message (clients and tests)."""
    if isinstance(req, RequestIdentities):
        return frame(_Typed.build(dict(type=T.REQUEST_IDENTITIES, contents=b"")))
    if isinstance(req, SignRequest):
        contents = _build(_SignRequest, attrs.asdict(req), "SIGN_REQUEST")
        return frame(_Typed.build(dict(type=T.SIGN_REQUEST, contents=contents)))
    if isinstance(req, Extension):
        contents = _build(_Extension, attrs.asdict(req), "EXTENSION")
        return frame(_Typed.build(dict(type=T.EXTENSION, contents=contents)))
    if isinstance(req, OtherRequest):
        return frame(_Typed.build(dict(type=req.type, contents=b"")))
    raise TypeError(f"not an agent request: {req!r}")


# ---------------------------------------------------------------- responses (agent → client)


def encode_response(resp: Response) -> bytes:
    """A response as a whole framed message."""
    if isinstance(resp, Failure):
        return frame(_Typed.build(dict(type=T.FAILURE, contents=b"")))
    if isinstance(resp, Success):
        return frame(_Typed.build(dict(type=T.SUCCESS, contents=b"")))
    if isinstance(resp, IdentitiesAnswer):
        contents = _build(_IdentitiesAnswer, dict(identities=[attrs.asdict(i) for i in resp.identities]), "IDENTITIES_ANSWER")
        return frame(_Typed.build(dict(type=T.IDENTITIES_ANSWER, contents=contents)))
    if isinstance(resp, SignResponse):
        contents = _build(_SignResponse, attrs.asdict(resp), "SIGN_RESPONSE")
        return frame(_Typed.build(dict(type=T.SIGN_RESPONSE, contents=contents)))
    raise TypeError(f"not an agent response: {resp!r}")


def decode_response(body: bytes) -> Response:
    """One response body → a value (clients and tests); WireError if it does not parse."""
    if not body:
        raise WireError(ErrorCode.MALFORMED, "empty agent message (no type byte)")
    typed = _Typed.parse(body)
    kind, contents = typed.type, typed.contents
    if kind == T.FAILURE:
        _parse(_Empty, contents, "FAILURE")
        return Failure()
    if kind == T.SUCCESS:
        _parse(_Empty, contents, "SUCCESS")
        return Success()
    if kind == T.IDENTITIES_ANSWER:
        p = _parse(_IdentitiesAnswer, contents, "IDENTITIES_ANSWER")
        return IdentitiesAnswer(tuple(Identity(key_blob=i.key_blob, comment=i.comment) for i in p.identities))
    if kind == T.SIGN_RESPONSE:
        p = _parse(_SignResponse, contents, "SIGN_RESPONSE")
        return SignResponse(signature=p.signature)
    raise WireError(ErrorCode.UNKNOWN_TYPE, f"unexpected agent response type {kind}")


# ---------------------------------------------------------------- signature blobs


def encode_signature(sig: SshSignature) -> bytes:
    return _build(_Signature, attrs.asdict(sig), "SSH signature")


def decode_signature(data: bytes) -> SshSignature:
    p = _parse(_Signature, data, "SSH signature")
    return SshSignature(algorithm=p.algorithm, blob=p.blob)


def encode_ecdsa_signature(sig: EcdsaSignature) -> bytes:
    return _build(_EcdsaSignature, attrs.asdict(sig), "ECDSA signature")


def decode_ecdsa_signature(data: bytes) -> EcdsaSignature:
    p = _parse(_EcdsaSignature, data, "ECDSA signature")
    return EcdsaSignature(r=p.r, s=p.s)


# ---------------------------------------------------------------- public key blobs


def encode_public_key(key: PublicKey) -> bytes:
    """The OpenSSH public key blob (what identities list and sign requests name)."""
    if isinstance(key, RsaPublicKey):
        body = _build(_RsaKeyBody, attrs.asdict(key), "ssh-rsa key")
    elif isinstance(key, EcdsaPublicKey):
        body = _build(_EcdsaKeyBody, attrs.asdict(key), "ECDSA key")
    else:
        raise TypeError(f"not a public key value: {key!r}")
    return _build(_KeyBlob, dict(algorithm=key.algorithm, body=body), "key blob")


def decode_public_key(blob: bytes) -> PublicKey:
    """An OpenSSH public key blob (ssh-rsa or ecdsa-sha2-*) → a value; WireError otherwise."""
    p = _parse(_KeyBlob, blob, "key blob")
    if p.algorithm == "ssh-rsa":
        k = _parse(_RsaKeyBody, p.body, "ssh-rsa key")
        return RsaPublicKey(e=k.e, n=k.n)
    if p.algorithm.startswith("ecdsa-sha2-"):
        k = _parse(_EcdsaKeyBody, p.body, "ECDSA key")
        if p.algorithm != f"ecdsa-sha2-{k.curve}":
            raise WireError(ErrorCode.MALFORMED, f"key blob: {p.algorithm} names curve {k.curve}")
        return EcdsaPublicKey(curve=k.curve, point=k.point)
    raise WireError(ErrorCode.MALFORMED, f"key blob: unsupported key type {p.algorithm!r}")
