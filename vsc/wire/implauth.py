"""
Implementation authentication as bytes (docs/protocol.md, "Operations"):
what travels in EnrolRequest.registration, OpResult.registration, and the
data of the KEYFILE, ONE_TIME_AGENT and TOTP challenges and answers. The
agent's program and challenge are in vsc.wire.onetime_agent.

    Registration (card → server, at enrol):
        magic "VSCR", format 1, card_key (the card's slot 9e public key, SPKI DER),
        seal_key (32-byte X25519 public key the keyfile is sealed to)
    EnrolReply (server → card, at enrol):
        magic "VSCE", format 1, keyfile (a SealedKeyfile, or empty),
        totp_secret (20 bytes, or empty), totp_digits, totp_period
    KeyfileBody (what the server signs, [0044]):
        magic "VSCK", format 1, serial, card_key, as1 (16 bytes), issued (seconds)
    SignedKeyfile: body, signer (the server's SPKI DER), signature (RSA-PSS-SHA256)
    SealedKeyfile (the file HOME/keyfile.vsc):
        magic "VSCk", format 1, ephemeral (X25519 public), nonce (12),
        sealed (AES-256-GCM of the SignedKeyfile, tag appended)
    KEYFILE challenge: ri1 (32 bytes); answer: MasterResponse (ri2, mac) with
        mac = HMAC-SHA256(as1, KeyfileMacInput)
    TOTP challenge: empty; answer: TotpAnswer (the code the user typed)
"""

from __future__ import annotations

import attrs
import construct as c

from vsc.wire.codec import U8, U16, U64, Bytes, EmptyOr, Text
from vsc.wire.errors import ErrorCode, WireError

AS1_SIZE = 16  # [0044]: a 128-bit random number
TOTP_SECRET_SIZE = 20  # RFC 4226 recommends 160 bits for HMAC-SHA1
MAX_KEYFILE = 8192
MAX_CARD_KEY = 1200

_Serial = Text(U8, 64, 1, "serial")


def _encode(schema, value, what: str) -> bytes:
    try:
        return schema.build(attrs.asdict(value, recurse=False))
    except c.ConstructError as e:
        raise WireError(ErrorCode.MALFORMED, f"cannot encode the {what}: {str(e).strip()}") from None


def _decode(schema, cls, data: bytes, what: str):
    try:
        parsed = schema.parse(data)
    except c.ConstructError as e:
        raise WireError(ErrorCode.MALFORMED, f"{what}: {str(e).strip()}") from None
    return cls(**{f.name: parsed[f.name] for f in attrs.fields(cls)})


class _Codec:
    SCHEMA: c.Construct
    WHAT: str

    def encode(self) -> bytes:
        return _encode(self.SCHEMA, self, self.WHAT)

    @classmethod
    def decode(cls, data: bytes):
        return _decode(cls.SCHEMA, cls, data, cls.WHAT)


@attrs.frozen
class Registration(_Codec):
    """The card's public material for implementation authentication, sent at enrolment."""

    card_key: bytes = b""
    seal_key: bytes = b""

    WHAT = "card registration"
    SCHEMA = c.Struct(
        "magic" / c.Const(b"VSCR"),
        "format" / c.Const(1, U8),
        "card_key" / Bytes(U16, MAX_CARD_KEY, 0, "card key"),
        "seal_key" / EmptyOr(U8, 32, "seal key"),
        c.Terminated,
    )


@attrs.frozen
class EnrolReply(_Codec):
    """What the server hands a new card for its implementation authentication (once)."""

    keyfile: bytes = b""
    totp_secret: bytes = attrs.field(default=b"", repr=False)
    totp_digits: int = 6
    totp_period: int = 30

    WHAT = "enrolment reply"
    SCHEMA = c.Struct(
        "magic" / c.Const(b"VSCE"),
        "format" / c.Const(1, U8),
        "keyfile" / Bytes(U16, MAX_KEYFILE, 0, "keyfile"),
        "totp_secret" / EmptyOr(U8, TOTP_SECRET_SIZE, "TOTP secret"),
        "totp_digits" / U8,
        "totp_period" / U16,
        c.Terminated,
    )


@attrs.frozen
class KeyfileBody(_Codec):
    """[0044]: the card's public key and the confidential authentication string as1, for one serial."""

    serial: str
    card_key: bytes
    as1: bytes = attrs.field(repr=False)
    issued: int

    WHAT = "keyfile"
    SCHEMA = c.Struct(
        "magic" / c.Const(b"VSCK"),
        "format" / c.Const(1, U8),
        "serial" / _Serial,
        "card_key" / Bytes(U16, MAX_CARD_KEY, 0, "card key"),
        "as1" / c.Bytes(AS1_SIZE),
        "issued" / U64,
        c.Terminated,
    )


@attrs.frozen
class SignedKeyfile(_Codec):
    body: bytes = attrs.field(repr=False)
    signer: bytes
    signature: bytes

    WHAT = "signed keyfile"
    SCHEMA = c.Struct(
        "body" / Bytes(U16, 2048, 1, "keyfile body"),
        "signer" / Bytes(U16, 1200, 1, "keyfile signer"),
        "signature" / Bytes(U16, 1024, 1, "keyfile signature"),
        c.Terminated,
    )


@attrs.frozen
class SealedKeyfile(_Codec):
    ephemeral: bytes
    nonce: bytes
    sealed: bytes

    WHAT = "sealed keyfile"
    SCHEMA = c.Struct(
        "magic" / c.Const(b"VSCk"),
        "format" / c.Const(1, U8),
        "ephemeral" / c.Bytes(32),
        "nonce" / c.Bytes(12),
        "sealed" / Bytes(U16, MAX_KEYFILE, 17, "sealed keyfile"),
        c.Terminated,
    )


#: The additional data of the keyfile seal and the HKDF info of its key.
KeyfileSealInfo = c.Struct(
    "label" / c.Const(b"vsc1 keyfile seal"),
    "serial" / _Serial,
    "ephemeral" / c.Bytes(32),
    "recipient" / c.Bytes(32),
)


def keyfile_seal_info(serial: str, ephemeral: bytes, recipient: bytes) -> bytes:
    return KeyfileSealInfo.build(dict(serial=serial, ephemeral=ephemeral, recipient=recipient))


#: The input of the keyfile keyed hash: Figure 10 with as1 in place of Master ([0046]).
KeyfileMacInput = c.Struct(
    "label" / c.Const(b"vsc1 keyfile"),
    "ri1" / c.Bytes(32),
    "ri2" / c.Bytes(32),
    "serial" / _Serial,
)


def keyfile_mac_input(ri1: bytes, ri2: bytes, serial: str) -> bytes:
    return KeyfileMacInput.build(dict(ri1=ri1, ri2=ri2, serial=serial))


@attrs.frozen
class TotpAnswer(_Codec):
    """The code the owner read off the reader-less device ([0005]-[0006])."""

    code: str

    WHAT = "TOTP answer"
    SCHEMA = c.Struct("code" / Text(U8, 10, 1, "TOTP code"), c.Terminated)
